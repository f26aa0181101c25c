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
    /// `present` (already there and verified), `uploaded`, or `resumed`.
    pub(crate) action: &'static str,
    pub(crate) bytes_sent: u64,
    pub(crate) resumed_from: u64,
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
    let source = crate::paths::expand_tilde(source);
    let size = std::fs::metadata(&source)
        .map_err(|e| Error::config(format!("model source `{}`: {e}", source.display())))?
        .len();
    let out = session
        .run(
            "checking the model on the node",
            &remote::model_probe(&model.path),
        )
        .await?;
    let text = out.stdout_text();
    let mut lines = text.lines();
    let present = lines.next().unwrap_or("missing");
    if present.eq_ignore_ascii_case(&model.sha256) {
        return Ok(Pushed {
            model: model.name.clone(),
            action: "present",
            bytes_sent: 0,
            resumed_from: 0,
        });
    }
    let mut offset: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    if offset > size {
        offset = 0;
    }
    let mut file = tokio::fs::File::open(&source).await.at("open", &source)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .at("seek in", &source)?;
    let command = remote::model_upload(&model.path, offset > 0);
    let bar = progress.bytes(&format!("{} to {}", model.name, node.name), size);
    bar.set_position(offset);
    bar.reset_eta();
    session
        .run_reader(
            &format!("pushing `{}`", model.name),
            &command,
            Counting { inner: file, bar },
        )
        .await?;
    let out = session
        .exec(&remote::model_finish(&model.path, &model.sha256), None)
        .await?;
    if !out.ok() {
        return Err(Error::worker(format!(
            "the copy of `{}` on `{}` does not match its sha256 {}; the partial file was removed, \
             push again",
            model.name, node.name, model.sha256
        )));
    }
    Ok(Pushed {
        model: model.name.clone(),
        action: if offset > 0 { "resumed" } else { "uploaded" },
        bytes_sent: size - offset,
        resumed_from: offset,
    })
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

/// What the node did with this machine's key (see `remote::enroll_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enrollment {
    /// The node already accepts it.
    Enrolled,
    /// The node had no key: this one is its first.
    First,
    /// The node accepts other machines' keys: this one waits for one of them to approve it.
    Pending,
}

/// Enrolls this machine's key on the node over SSH: first come on a node with no key, else it
/// is left waiting for approval; a key the node has is never replaced.
pub(crate) async fn enroll_key(
    session: &Session,
    node: &Node,
    key: &crate::auth::Key,
) -> Result<Enrollment> {
    let content = format!("{}\n", key.to_hex());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
    let kid = key.fingerprint();
    let out = session
        .run_reader(
            "enrolling this machine's key",
            &remote::enroll_key(&node.remote_dir, &kid, &sha),
            content.as_bytes(),
        )
        .await?;
    let state = match out.stdout_text().trim() {
        "enrolled" => Enrollment::Enrolled,
        "first" => Enrollment::First,
        "pending" => Enrollment::Pending,
        other => {
            return Err(Error::hive(format!(
                "enrolling the key on `{}` printed `{}`, not its outcome",
                node.name,
                other.chars().take(200).collect::<String>()
            )));
        }
    };
    tracing::info!(node = %node.name, key = %kid, ?state, "enrollment of this machine's key");
    Ok(state)
}

/// The refusal a machine whose key the node does not accept gets: what to run, and where.
pub(crate) fn not_enrolled(node: &Node, key: &crate::auth::Key) -> Error {
    let kid = key.fingerprint();
    Error::Unauthenticated(format!(
        "this machine's key {kid} is not enrolled on `{0}`, which accepts other machines' keys; \
         it now waits there for approval: on a machine that has access, run \
         `rbee nodes enroll {0} --approve {kid}`, then run this again",
        node.name
    ))
}
