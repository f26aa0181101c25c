//! What the hive's and the worker's HTTP servers share: errors as JSON responses with the
//! status of their class, and a listener with Nagle's algorithm off.

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
        ExitKind::Ssh | ExitKind::Internal | ExitKind::Interrupted => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_for(self.0.kind()), Json(ErrorBody::from(&self.0))).into_response()
    }
}

/// The listener with Nagle's algorithm off on every connection. A token or done event is one
/// small write; with Nagle on, the write after it waits for the peer's (delayed, up to 40 ms)
/// acknowledgement of the one before.
pub(crate) fn no_delay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
        }
    }
    listener.tap_io(set as fn(&mut tokio::net::TcpStream))
}
