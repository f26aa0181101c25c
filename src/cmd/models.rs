//! `rbee models list|push|pull|hash`: model files on nodes: copied there from this machine,
//! or downloaded by the node itself from a URL.

use serde::Serialize;

use crate::cli::ModelsCommand;
use crate::cmd::Context;
use crate::config::Transport;
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::output::table;
use crate::queen::install;
use crate::ssh::remote;

#[derive(Serialize)]
struct ModelFile {
    name: String,
    path: String,
    present: bool,
    bytes: Option<u64>,
    default: bool,
}

pub(crate) async fn run(ctx: &Context, command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List { node } => list(ctx, node.as_deref()).await,
        ModelsCommand::Push { node, model } => push(ctx, &node, &model).await,
        ModelsCommand::Load { node, model } => load(ctx, &node, &model).await,
        ModelsCommand::Pull { node, model } => pull(ctx, &node, &model).await,
        ModelsCommand::Rm { node, model } => rm(ctx, &node, &model).await,
        ModelsCommand::Hash { file } => hash(ctx, &file).await,
    }
}

/// How much longer than the model's `load_timeout` a preload waits: the hive's start and the
/// connection come first.
const LOAD_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);

/// `models load`: the hive loads the model now; a spinner tells the wait on a terminal.
async fn load(ctx: &Context, node: &str, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(node))?;
    let spec = config.model(node, Some(model))?;
    let budget = Budget::new(spec.load_timeout + LOAD_MARGIN);
    let mut conn = ctx.open(node, &budget).await?;
    let models = crate::queen::node_models(&config.models, node);
    crate::queen::lifecycle::ensure_running(&mut conn, &models, &budget, &ctx.progress).await?;
    let client = &conn.client;
    let spinner = ctx
        .progress
        .spinner(format!("{}: loading `{model}`", node.name));
    let info = client
        .with_models(&models, &budget, || client.load_worker(model, &budget))
        .await;
    spinner.finish_and_clear();
    let info = info?;
    let value = serde_json::json!({ "node": node.name, "worker": info });
    ctx.out.result(&value, || {
        format!(
            "{}: `{model}` is loaded (pid {}, load {})",
            node.name,
            info.pid.map_or("-".to_string(), |p| p.to_string()),
            info.load_ms
                .map_or("-".to_string(), |ms| format!("{ms:.0}ms"))
        )
    });
    Ok(())
}

/// `models rm`: the hive removes the model's file, unless it is in use.
async fn rm(ctx: &Context, node: &str, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(node))?;
    config.model(node, Some(model))?;
    let budget = Budget::new(node.timeout);
    let mut conn = ctx.open(node, &budget).await?;
    let models = crate::queen::node_models(&config.models, node);
    crate::queen::lifecycle::ensure_running(&mut conn, &models, &budget, &ctx.progress).await?;
    let client = &conn.client;
    let removed = client
        .with_models(&models, &budget, || {
            client.remove_model(model, budget.remaining())
        })
        .await?;
    let value = serde_json::json!({ "node": node.name, "removed": removed });
    ctx.out.result(&value, || {
        format!(
            "{}: removed `{model}` ({} bytes)",
            node.name,
            removed["bytes"].as_u64().unwrap_or(0)
        )
    });
    Ok(())
}

async fn list(ctx: &Context, node: Option<&str>) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    let budget = Budget::new(node.timeout);
    let mut files = Vec::new();
    let mut conn = None;
    for (i, name) in node.models.iter().enumerate() {
        let model = config.model(node, Some(name))?;
        let bytes = if node.transport == Transport::Local {
            std::fs::metadata(crate::paths::expand_tilde(&model.path))
                .ok()
                .map(|m| m.len())
        } else {
            if conn.is_none() {
                conn = Some(ctx.open(node, &budget).await?);
            }
            let session = match conn.as_mut() {
                Some(c) => c.ssh(&budget).await?,
                None => return Err(Error::internal("no connection")),
            };
            let out = session.exec(&remote::file_size(&model.path), None).await?;
            out.ok().then(|| out.stdout_text().parse().ok()).flatten()
        };
        files.push(ModelFile {
            name: name.clone(),
            path: model.path.clone(),
            present: bytes.is_some(),
            bytes,
            default: i == 0,
        });
    }
    let value = serde_json::json!({ "node": node.name, "models": files });
    ctx.out.result(&value, || {
        let rows: Vec<Vec<String>> = files
            .iter()
            .map(|f| {
                vec![
                    format!("{}{}", f.name, if f.default { " (default)" } else { "" }),
                    if f.present { "present" } else { "missing" }.to_string(),
                    f.bytes
                        .map_or("-".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
                    f.path.clone(),
                ]
            })
            .collect();
        table(&["MODEL", "FILE", "SIZE", "PATH"], &rows)
    });
    Ok(())
}

async fn push(ctx: &Context, node: &str, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(node))?;
    let model = config.model(node, Some(model))?;
    if node.transport == Transport::Local {
        return Err(Error::config(format!(
            "node `{}` is this machine; there is nothing to push (the hive reads `{}` directly)",
            node.name, model.path
        )));
    }
    // A large file may take longer than one request's budget; the connect still has its limit.
    let budget = Budget::new(node.timeout);
    let mut conn = ctx.open(node, &budget).await?;
    let session = conn.ssh(&budget).await?;
    let pushed = install::push_model(session, node, model, &ctx.progress).await?;
    let waited = if pushed.waited {
        " (after waiting for another transfer of it)"
    } else {
        ""
    };
    ctx.out.result(&pushed, || match pushed.action {
        "present" => format!(
            "{}: `{}` already present and verified{waited}",
            node.name, model.name
        ),
        "resumed" => format!(
            "{}: `{}` resumed at {:.1} MB, sent {:.1} MB, verified{waited}",
            node.name,
            model.name,
            pushed.resumed_from as f64 / 1e6,
            pushed.bytes_sent as f64 / 1e6
        ),
        _ => format!(
            "{}: `{}` uploaded ({:.1} MB), verified{waited}",
            node.name,
            model.name,
            pushed.bytes_sent as f64 / 1e6
        ),
    });
    Ok(())
}

async fn pull(ctx: &Context, node: &str, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(node))?;
    let model = config.model(node, Some(model))?;
    crate::queen::fetch::url_of(node, model)?;
    // The budget bounds reaching the node and starting its hive; the download itself runs until
    // the file is there, reporting as it goes.
    let budget = Budget::new(node.timeout);
    let mut conn = ctx.open(node, &budget).await?;
    let models = crate::queen::node_models(&config.models, node);
    let out = ctx.out;
    let node_name = node.name.clone();
    let pulled = crate::queen::fetch::pull(
        &mut conn,
        &models,
        model,
        &budget,
        &ctx.progress,
        |update| match update {
            crate::queen::fetch::Update::Progress(p) if out.json => {
                out.json_line(&serde_json::json!({
                    "event": "progress", "node": node_name, "model": model.name,
                    "bytes": p.bytes, "total": p.total,
                }))
            }
            crate::queen::fetch::Update::Progress(_) => {}
            crate::queen::fetch::Update::Note(event, why) if out.json => {
                out.json_line(&serde_json::json!({
                    "event": event, "node": node_name, "model": model.name, "reason": why,
                }));
            }
            crate::queen::fetch::Update::Note(_, why) => out.note(format!("{node_name}: {why}")),
        },
    )
    .await?;
    ctx.audit_note(
        "model_pulled",
        None,
        serde_json::json!({
            "node": node.name, "model": model.name, "outcome": pulled.action,
            "bytes": pulled.bytes, "sha256": pulled.sha256,
        }),
    );
    let mut value = serde_json::to_value(&pulled)
        .map_err(|e| Error::internal(format!("cannot encode the result: {e}")))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("event".into(), "done".into());
        map.insert("node".into(), node.name.clone().into());
    }
    ctx.out.result(&value, || match pulled.action.as_str() {
        "present" => format!(
            "{}: `{}` already present and verified",
            node.name, model.name
        ),
        "resumed" => format!(
            "{}: `{}` resumed at {:.1} MB, downloaded {:.1} MB, verified",
            node.name,
            model.name,
            pulled.resumed_from as f64 / 1e6,
            pulled.fetched as f64 / 1e6
        ),
        _ => format!(
            "{}: `{}` downloaded ({:.1} MB), verified",
            node.name,
            model.name,
            pulled.fetched as f64 / 1e6
        ),
    });
    Ok(())
}

/// Hashes a file on this machine, or a URL as it downloads (nothing is kept), and prints the
/// `[models.NAME]` entry for it.
async fn hash(ctx: &Context, file: &str) -> Result<()> {
    use crate::config::Origin;
    let origin = Origin::parse(file).map_err(Error::usage)?;
    let (sha256, bytes, file_name, source) = match &origin {
        Origin::File(path) => {
            let path = crate::paths::expand_tilde(path);
            let meta = std::fs::metadata(&path)
                .map_err(|e| Error::usage(format!("cannot read `{}`: {e}", path.display())))?;
            let owned = path.clone();
            let sha = tokio::task::spawn_blocking(move || {
                crate::hive::verify::sha256_file(
                    &owned,
                    &tokio_util::sync::CancellationToken::new(),
                )
            })
            .await
            .map_err(|e| Error::internal(format!("hashing task failed: {e}")))??;
            let absolute = std::path::absolute(&path).unwrap_or(path.clone());
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (sha, meta.len(), name, absolute.display().to_string())
        }
        _ => {
            let url = origin
                .url(std::env::var("HF_ENDPOINT").ok().as_deref())
                .ok_or_else(|| Error::internal("a URL source without a URL"))?;
            let (sha, bytes) = hash_url(ctx, &url).await?;
            let name = crate::hive::download::shown(&url)
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            (sha, bytes, name, file.to_string())
        }
    };
    let stem = file_name
        .strip_suffix(".gguf")
        .or_else(|| file_name.strip_suffix(".GGUF"))
        .unwrap_or(&file_name);
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        name = "model".to_string();
    }
    let path = format!("~/.rbee/models/{file_name}");
    let value = serde_json::json!({
        "name": name, "path": path, "sha256": sha256, "source": source, "bytes": bytes,
    });
    ctx.out.result(&value, || {
        let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
        format!(
            "[models.{name}]\npath = {}\nsha256 = {}\nsource = {}",
            quoted(&path),
            quoted(&sha256),
            quoted(&source)
        )
    });
    Ok(())
}

/// The SHA-256 and size of what `url` serves, read as it arrives.
async fn hash_url(ctx: &Context, url: &str) -> Result<(String, u64)> {
    use futures::StreamExt;
    use sha2::Digest;
    let shown = crate::hive::download::shown(url);
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("rbee/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::internal(format!("http client: {e}")))?;
    let response = client.get(url).send().await.map_err(|e| {
        Error::worker(format!(
            "cannot download {shown}: {}",
            crate::error::root_cause(&e)
        ))
    })?;
    if !response.status().is_success() {
        return Err(Error::worker(format!(
            "{shown} answered {}",
            response.status()
        )));
    }
    let bar = ctx.progress.bytes(
        &format!("hashing {shown}"),
        response.content_length().unwrap_or(0),
    );
    let mut hasher = sha2::Sha256::new();
    let mut bytes = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Error::worker(format!(
                "the download of {shown} broke: {}",
                crate::error::root_cause(&e)
            ))
        })?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        bar.set_position(bytes);
    }
    bar.finish_and_clear();
    Ok((hex::encode(hasher.finalize()), bytes))
}
