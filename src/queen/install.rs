//! Putting rbee on a node over SSH: the binary (only when its SHA-256 differs, atomically) and
//! model files (resumable, verified on the node). Every path travels shell-quoted.

use std::pin::Pin;
use std::task::{Context, Poll};

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use crate::config::{Model, Node};
use crate::error::{Error, IoContext, Result};
use crate::hive::verify::sha256_file;
use crate::progress::Progress;
use crate::ssh::Session;
use crate::ssh::remote;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Installed {
    /// Whether the binary was uploaded (false: the node already had this one).
    pub(crate) uploaded: bool,
    pub(crate) bytes: u64,
    pub(crate) os: String,
    /// The node user's home, as the node printed it.
    #[serde(skip)]
    pub(crate) home: String,
}

/// Makes sure `<remote_dir>/bin/rbee` is this very binary.
pub(crate) async fn install_binary(
    session: &Session,
    node: &Node,
    progress: &Progress,
) -> Result<Installed> {
    let out = session
        .run(
            "checking the node",
            &remote::install_probe(&node.remote_dir),
        )
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let home = lines.next().unwrap_or_default().to_string();
    let os = lines.next().unwrap_or_default().trim().to_string();
    check_platform(node, &os)?;
    let remote_sha = lines
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();

    let exe = std::env::current_exe().doing("find this rbee binary")?;
    let exe_for_hash = exe.clone();
    let local_sha = tokio::task::spawn_blocking(move || {
        sha256_file(&exe_for_hash, &tokio_util::sync::CancellationToken::new())
    })
    .await
    .map_err(|e| Error::internal(format!("hashing task failed: {e}")))??;
    if remote_sha == local_sha {
        return Ok(Installed {
            uploaded: false,
            bytes: 0,
            os,
            home,
        });
    }
    let file = tokio::fs::File::open(&exe).await.at("open", &exe)?;
    let bytes = file.metadata().await.at("read the size of", &exe)?.len();
    let command = remote::install_binary(&node.remote_dir, &local_sha);
    let bar = progress.bytes(&format!("rbee to {}", node.name), bytes);
    session
        .run_reader("uploading rbee", &command, Counting { inner: file, bar })
        .await?;
    Ok(Installed {
        uploaded: true,
        bytes,
        os,
        home,
    })
}

fn check_platform(node: &Node, uname: &str) -> Result<()> {
    let mut parts = uname.split_whitespace();
    let os = parts.next().unwrap_or_default().to_ascii_lowercase();
    let arch = parts.next().unwrap_or_default();
    let arch = match arch {
        "arm64" => "aarch64",
        other => other,
    };
    if os == std::env::consts::OS && arch == std::env::consts::ARCH {
        return Ok(());
    }
    Err(Error::hive(format!(
        "node `{}` runs `{uname}`, but this rbee is built for {} {}; install rbee built for \
         that platform on the node, or use a node of the same platform",
        node.name,
        std::env::consts::OS,
        std::env::consts::ARCH
    )))
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Pushed {
    pub(crate) model: String,
    /// `present` (already there and verified), `uploaded`, `resumed`, or `downloaded` (by the
    /// node itself, from a URL `source`).
    pub(crate) action: &'static str,
    pub(crate) bytes_sent: u64,
    pub(crate) resumed_from: u64,
    /// Whether it waited for another transfer of the same file to finish first.
    pub(crate) waited: bool,
}

impl From<crate::protocol::pull::Pulled> for Pushed {
    /// A model the node downloaded itself, as `hive install` lists it beside pushed ones.
    fn from(pulled: crate::protocol::pull::Pulled) -> Pushed {
        Pushed {
            model: pulled.model,
            action: match pulled.action.as_str() {
                "present" => "present",
                "resumed" => "resumed",
                _ => "downloaded",
            },
            bytes_sent: pulled.fetched,
            resumed_from: pulled.resumed_from,
            waited: false,
        }
    }
}

/// Copies a model's `source` to its `path` on the node: skips a verified file, resumes a partial
/// upload (`<path>.part`), checks the SHA-256 on the node before moving it into place.
pub(crate) async fn push_model(
    session: &Session,
    node: &Node,
    model: &Model,
    progress: &Progress,
) -> Result<Pushed> {
    let source = model.source.as_deref().ok_or_else(|| {
        Error::config(format!(
            "model `{}` has no `source` to push from; set `source = \"PATH\"` in its table",
            model.name
        ))
    })?;
    if model.download_url().is_some() {
        return Err(Error::config(format!(
            "model `{0}` has a URL `source`: the node downloads it itself, with `rbee models pull \
             --node {1} {0}`",
            model.name, node.name
        )));
    }
    let source = crate::paths::expand_tilde(source);
    let size = std::fs::metadata(&source)
        .map_err(|e| Error::config(format!("model source `{}`: {e}", source.display())))?
        .len();
    let mut waited = false;
    loop {
        let out = session
            .run(
                "checking the model on the node",
                &remote::model_probe(&model.path),
            )
            .await?;
        let text = out.stdout_text();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let present = lines.first().copied().unwrap_or("missing");
        if present.eq_ignore_ascii_case(&model.sha256) {
            return Ok(Pushed {
                model: model.name.clone(),
                action: "present",
                bytes_sent: 0,
                resumed_from: 0,
                waited,
            });
        }
        // Another push, or the hive's download, writes this file: wait for it to finish, then
        // look again (it may well have put the file in place).
        if lines.get(3) == Some(&"busy") {
            if !waited {
                tracing::info!(node = %node.name, model = %model.name, "another transfer is under way; waiting");
            }
            waited = true;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
        let mut offset: u64 = lines.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        if offset > size {
            offset = 0;
        }
        if let Some(free) = lines.get(2).and_then(|l| l.parse::<u64>().ok()) {
            let free = free.saturating_mul(1024);
            let needed = size - offset;
            if needed > free {
                return Err(Error::worker(format!(
                    "`{}` needs {:.1} MB more on `{}`, but the filesystem of `{}` there has \
                     {:.1} MB free; nothing was sent (free some space, or point the model's \
                     `path` elsewhere)",
                    model.name,
                    needed as f64 / 1e6,
                    node.name,
                    model.path,
                    free as f64 / 1e6
                )));
            }
        }
        let mut file = tokio::fs::File::open(&source).await.at("open", &source)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .at("seek in", &source)?;
        let command = remote::model_upload(&model.path, offset > 0, &model.sha256, size);
        let bar = progress.bytes(&format!("{} to {}", model.name, node.name), size);
        bar.set_position(offset);
        bar.reset_eta();
        let out = session
            .exec_reader(&command, Counting { inner: file, bar })
            .await?;
        match out.code {
            Some(0) => {
                return Ok(Pushed {
                    model: model.name.clone(),
                    action: if offset > 0 { "resumed" } else { "uploaded" },
                    bytes_sent: size - offset,
                    resumed_from: offset,
                    waited,
                });
            }
            // Taken between the probe and the upload: wait for that one.
            Some(remote::MODEL_BUSY) => {
                waited = true;
                continue;
            }
            Some(remote::MODEL_MISMATCH) => {
                return Err(Error::worker(format!(
                    "the copy of `{}` on `{}` does not match its sha256 {}; the partial file \
                     was removed, push again",
                    model.name, node.name, model.sha256
                )));
            }
            Some(remote::MODEL_INCOMPLETE) => {
                return Err(Error::hive(format!(
                    "the push of `{}` to `{}` ended before the whole file was there; the \
                     partial file is kept: push again to resume it",
                    model.name, node.name
                )));
            }
            code => {
                return Err(Error::worker(format!(
                    "pushing `{}` to `{}` failed (exit {}): {}",
                    model.name,
                    node.name,
                    code.map_or("?".to_string(), |c| c.to_string()),
                    out.stderr_text()
                )));
            }
        }
    }
}

/// Advances `bar` by the bytes read through it; the bar clears its line when the upload ends.
struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.bar.inc(read as u64);
        poll
    }
}

/// Puts this machine's copy of the node's signing key in `<remote_dir>/hive.key` (mode 0600)
/// when the node's differs; `name` may be `hive.key.next` during a rotation.
pub(crate) async fn install_key(
    session: &Session,
    node: &Node,
    key: &crate::auth::Key,
    name: &str,
) -> Result<bool> {
    let content = format!("{}\n", key.to_hex());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
    let probe = remote::file_sha256(&node.remote_dir, name);
    if session.exec(&probe, None).await?.stdout_text() == sha {
        return Ok(false);
    }
    session
        .run_reader(
            "writing the signing key",
            &remote::write_private_file(&node.remote_dir, name),
            content.as_bytes(),
        )
        .await?;
    tracing::info!(node = %node.name, key = %key.fingerprint(), "installed the signing key");
    Ok(true)
}
