//! `rbee models list|push`: model files on nodes.

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
    ctx.out.result(&pushed, || match pushed.action {
        "present" => format!(
            "{}: `{}` already present and verified",
            node.name, model.name
        ),
        "resumed" => format!(
            "{}: `{}` resumed at {:.1} MB, sent {:.1} MB, verified",
            node.name,
            model.name,
            pushed.resumed_from as f64 / 1e6,
            pushed.bytes_sent as f64 / 1e6
        ),
        _ => format!(
            "{}: `{}` uploaded ({:.1} MB), verified",
            node.name,
            model.name,
            pushed.bytes_sent as f64 / 1e6
        ),
    });
    Ok(())
}
