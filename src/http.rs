//! HTTP plumbing shared by the hive and the worker: errors as JSON responses with the status
//! of their class, and stream events as server-sent events.

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{Error, ExitKind};
use crate::wire::ErrorBody;

/// An `Error` on its way out of a handler.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> ApiError {
        ApiError(err)
    }
}

pub fn status_for(kind: ExitKind) -> StatusCode {
    match kind {
        ExitKind::InvalidRequest | ExitKind::Usage => StatusCode::BAD_REQUEST,
        ExitKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ExitKind::Config => StatusCode::NOT_FOUND,
        ExitKind::Deadline => StatusCode::GATEWAY_TIMEOUT,
        ExitKind::WorkerUnavailable | ExitKind::HiveUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ExitKind::Ssh | ExitKind::Internal | ExitKind::Interrupted => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_for(self.0.kind), Json(ErrorBody::from(&self.0))).into_response()
    }
}

/// An SSE event named `name` carrying `data` as JSON.
pub fn sse_event(name: &str, data: &impl Serialize) -> Event {
    match serde_json::to_string(data) {
        Ok(json) => Event::default().event(name).data(json),
        // Our event types serialize infallibly; if one ever does not, the client sees why.
        Err(e) => Event::default().event("error").data(
            serde_json::json!({"code": "internal", "message": format!("cannot encode event: {e}")})
                .to_string(),
        ),
    }
}

/// Reads an error body a peer sent with a failure status.
pub async fn error_from_response(response: reqwest::Response, peer: &str) -> Error {
    let status = response.status();
    match response.json::<ErrorBody>().await {
        Ok(body) if status == reqwest::StatusCode::UNAUTHORIZED => Error::new(
            ExitKind::Unauthenticated,
            format!("{peer} rejected the request: {}", body.message),
        ),
        Ok(body) => body.into(),
        Err(_) => {
            let kind = match status.as_u16() {
                400 | 413 | 422 => ExitKind::InvalidRequest,
                401 => ExitKind::Unauthenticated,
                504 => ExitKind::Deadline,
                _ => ExitKind::Internal,
            };
            Error::new(kind, format!("{peer} answered {status}"))
        }
    }
}

/// Largest request body any route accepts; the signature layer reads at most this much.
pub const BODY_LIMIT: usize = crate::wire::MAX_PROMPT_BYTES * 2 + 16 * 1024;

/// What the signature layer checks with, and where it records what it decided.
pub struct Guard {
    pub verifier: std::sync::Arc<crate::auth::Verifier>,
    pub audit: Option<crate::audit::Audit>,
}

/// Axum layer: every request but `GET /health` and `GET /metrics` must carry a valid signature.
pub async fn require_signature(
    axum::extract::State(guard): axum::extract::State<std::sync::Arc<Guard>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let open = request.method() == axum::http::Method::GET
        && matches!(request.uri().path(), "/health" | "/metrics");
    if open {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_string(), |c| c.0.to_string());
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        let err = Error::invalid(format!("the request body is over {BODY_LIMIT} bytes"));
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(ErrorBody::from(&err))).into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let header = parts
        .headers
        .get(crate::auth::SIGNATURE_HEADER)
        .and_then(|h| h.to_str().ok());
    let result = guard
        .verifier
        .verify(parts.method.as_str(), &path, header, &bytes);
    if let Some(audit) = &guard.audit {
        let request_id = parts
            .headers
            .get(crate::wire::REQUEST_ID_HEADER)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let (event, fields) = match &result {
            Ok(kid) => (
                "auth_success",
                serde_json::json!({ "kid": kid, "peer": peer, "path": path }),
            ),
            Err(reject) => (
                "auth_failure",
                serde_json::json!({
                    "kid": header.and_then(|h| crate::auth::parse(h).ok()).map(|s| s.kid.to_string()),
                    "peer": peer,
                    "path": path,
                    "reason": reject.class(),
                }),
            ),
        };
        audit.note(event, request_id, fields).await;
    }
    match result {
        Ok(kid) => {
            tracing::debug!(kid = %kid, peer = %peer, path = %path, "request authenticated");
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        Err(reject) => {
            tracing::warn!(peer = %peer, path = %path, reason = reject.class(), "request rejected");
            let err = Error::new(
                ExitKind::Unauthenticated,
                format!("{} ({})", reject.explain(), reject.class()),
            );
            (StatusCode::UNAUTHORIZED, Json(ErrorBody::from(&err))).into_response()
        }
    }
}

/// The listener with Nagle's algorithm off on every connection. A token or done event is one
/// small write; with Nagle on, the write after it waits for the peer's (delayed, up to 40 ms)
/// acknowledgement of the one before.
pub fn no_delay(
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
