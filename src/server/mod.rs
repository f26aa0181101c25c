//! What the hive's and the worker's HTTP servers share: errors as JSON responses with the
//! status of their class, the Unix socket they listen on (a TCP listener with Nagle's algorithm
//! off where a node opts into HTTP), who is on the other end of a connection, and the hive's
//! bounded serving loop (`bounded`).

pub(crate) mod bounded;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ExitKind};
use crate::protocol::ErrorBody;

/// An `Error` on its way out of a handler.
#[derive(Debug)]
pub(crate) struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> ApiError {
        ApiError(err)
    }
}

pub(crate) fn status_for(kind: ExitKind) -> StatusCode {
    match kind {
        ExitKind::InvalidRequest | ExitKind::Usage => StatusCode::BAD_REQUEST,
        ExitKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ExitKind::Config => StatusCode::NOT_FOUND,
        ExitKind::Deadline => StatusCode::GATEWAY_TIMEOUT,
        ExitKind::WorkerUnavailable | ExitKind::HiveUnavailable | ExitKind::Audit => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ExitKind::Ssh | ExitKind::Internal | ExitKind::BatchFailed | ExitKind::Interrupted => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_for(self.0.kind()), Json(ErrorBody::from(&self.0))).into_response()
    }
}

/// Who is on the other end of a connection, for logs and audit records: an address for TCP,
/// the peer's uid and pid (from the kernel) for a Unix socket.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    shown: String,
    /// Who it is across connections (the address without its port, the uid without the pid):
    /// what refusals are counted by.
    pub(crate) source: String,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Peer {
    pub(crate) fn of_tcp(addr: &std::net::SocketAddr) -> Peer {
        Peer {
            shown: addr.to_string(),
            source: addr.ip().to_string(),
        }
    }

    pub(crate) fn of_unix(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                shown: format!(
                    "unix:uid={},pid={}",
                    cred.uid(),
                    cred.pid()
                        .map_or_else(|| "-".to_string(), |p| p.to_string())
                ),
                source: format!("unix:uid={}", cred.uid()),
            },
            Err(_) => Peer {
                shown: "unix".to_string(),
                source: "unix".to_string(),
            },
        }
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Peer {
        Peer::of_unix(stream.io())
    }
}

/// Listens on the Unix socket at `path`, replacing a stale one (a server killed before it could
/// remove its socket). Only the directory's owner can reach it: the directory is 0700, and the
/// socket itself is made 0600.
pub(crate) fn bind_unix(
    path: &std::path::Path,
) -> crate::error::Result<std::os::unix::net::UnixListener> {
    use crate::error::IoContext;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if path.as_os_str().len() > crate::paths::MAX_SOCKET_PATH {
        return Err(Error::from(crate::config::ConfigError::SocketPathTooLong {
            path: path.display().to_string(),
            bytes: path.as_os_str().len(),
            max: crate::paths::MAX_SOCKET_PATH,
            dir_max: crate::paths::MAX_SOCKET_PATH - 1 - crate::paths::MAX_SOCKET_NAME,
        }));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).at("remove the stale socket", path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).at("listen on the socket", path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .at("make the socket private", path)?;
    Ok(listener)
}

/// A TCP listener with Nagle's algorithm off on every connection, for `axum::serve` (`rbee
/// serve`'s API). A token is one small write; with Nagle on, the write after it waits for the
/// peer's (delayed, up to 40 ms) acknowledgement of the one before.
pub(crate) struct NoDelay(pub(crate) tokio::net::TcpListener);

impl axum::serve::Listener for NoDelay {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
                    }
                    return (tcp, addr);
                }
                // Out of descriptors and the like: wait for some to be released, as axum does.
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}
