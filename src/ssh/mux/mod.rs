//! One SSH connection for many invocations, like OpenSSH's ControlPersist: the first `rbee`
//! that connects to a node leaves a background process (`rbee nodes hold`, the `holder`)
//! holding the session for the node's `persist` time after last use; later invocations reach it
//! through a Unix socket in the private run directory (`client`). What they say to each other is
//! here: a length-prefixed JSON request and answer, then raw bytes (a stream to the hive's
//! socket) or framed output (a command's stdout, stderr and exit status).

pub(crate) mod client;
pub(crate) mod holder;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Result;
use crate::ssh::{SshError, Target};

/// Bumped whenever requests, answers or frames change; a holder of another protocol (or of
/// another rbee version) is bypassed, never spoken to.
pub(super) const PROTOCOL: u32 = 2;
pub(super) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest request or answer (a command line, an error message).
const MAX_MESSAGE: usize = 1 << 20;

/// What an invocation asks of a holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Op {
    /// Only the handshake: is the holder there, of this version, and answering.
    Ping,
    /// Close the connection and end (`rbee nodes disconnect`).
    Exit,
    /// Run a command (already wrapped under `sh -c`); stdin follows until end of stream.
    Exec { command: String },
    /// Carry the rest of this connection to the Unix socket `path` on the node, opened in
    /// `mode`; the holder says how it opened it (`Opened`) before the first byte.
    Stream { path: String, mode: Mode },
}

/// How a stream is to be opened, as the invocation's forward has it (see `ssh::forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    /// A direct-streamlocal channel, else the bridge.
    Any,
    /// A channel that sshd fails ends the stream: the invocation asks the node whether its
    /// hive runs.
    FailFast,
    /// The bridge only: sshd refuses forwarding.
    Bridge,
}

/// How the holder opened a stream, sent before its first byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "opened", rename_all = "snake_case")]
pub(crate) enum Opened {
    /// A direct-streamlocal channel carries it: sshd forwards.
    Channel,
    /// The bridge carries it; `prohibited`: sshd refused the channel outright.
    Bridge { prohibited: bool },
    /// sshd failed the channel and no bridge was tried; `forwards`: a channel opened on this
    /// connection before, so nothing listens on the socket.
    Failed { forwards: bool },
    /// Neither opened (the connection broke, the bridge failed).
    Broken { why: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Request {
    pub(super) protocol: u32,
    pub(super) version: String,
    #[serde(flatten)]
    pub(super) op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Answer {
    pub(super) protocol: u32,
    pub(super) version: String,
    pub(super) ok: bool,
    #[serde(default)]
    pub(super) why: Option<String>,
    /// The holder's SSH connection has ended (the link died, or the node closed it): it is
    /// ending too, and the invocation starts another.
    #[serde(default)]
    pub(super) gone: bool,
}

/// What a new holder says on its stdout once, after connecting (or failing to).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(super) enum Ready {
    /// Connected and listening; `accepted` is the fingerprint of a host key recorded now.
    Ready { accepted: Option<String> },
    /// The connection failed: an SSH failure as its variant, else its exit code and message.
    Failed {
        ssh: Option<SshError>,
        code: u8,
        message: String,
    },
}

/// The holder's first message to a new holder: where and for how long.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Start {
    pub(super) target: Target,
    pub(super) socket: PathBuf,
    pub(super) persist_ms: u64,
    pub(super) budget_ms: u64,
    pub(super) accept_new: bool,
}

/// Output frames of a command run through a holder.
pub(super) const FRAME_STDOUT: u8 = 1;
pub(super) const FRAME_STDERR: u8 = 2;
pub(super) const FRAME_EXIT: u8 = 3;
pub(super) const FRAME_ERROR: u8 = 4;

/// The socket of the holder for `target`: named by a hash of everything that makes the
/// connection (host, port, user, keys, certificates, known_hosts, algorithms, hops), so the path stays far below the
/// 107-byte limit whatever the names.
pub(crate) fn socket_for(target: &Target) -> Result<PathBuf> {
    let identity = serde_json::to_vec(&(
        &target.host,
        target.port,
        &target.user,
        &target.identity_files,
        &target.known_hosts,
        &target.certificate_files,
        &target.algorithms,
        target
            .jumps
            .iter()
            .map(|j| (&j.host, j.port, &j.user))
            .collect::<Vec<_>>(),
    ))
    .unwrap_or_default();
    let hash = hex::encode(&Sha256::digest(&identity)[..8]);
    Ok(crate::paths::private_run_dir()?.join(format!("m-{hash}.sock")))
}

pub(super) async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

pub(super) async fn read_msg<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other("message too long"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

pub(super) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    tag: u8,
    data: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.push(tag);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await
}

/// The next frame, or `None` at the end of the stream.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    // A holder sends a command's output in one frame, never more than a command may print.
    if len > crate::ssh::session::OUTPUT_LIMIT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            crate::ssh::session::output_too_large(),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).await?;
    Ok(Some((head[0], data)))
}
