//! The worker's HTTP server: `POST /v1/generate` streams one generation as server-sent events,
//! `GET /health` says whether it is busy, and to a signer which model it holds and what it works on.

use std::convert::Infallible;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::deadline::Budget;
use crate::error::Error;
use crate::protocol::sse::sse_event;
use crate::protocol::{
    ErrorBody, GenerateRequest, PrefillEvent, ProgressEvent, TokenEvent, WorkerDetail, WorkerHealth,
};
use crate::server::ApiError;
use crate::worker::engine::{Engine, EngineEvent, Job};

#[derive(Clone)]
pub(crate) struct WorkerState {
    pub(crate) engine: Engine,
    pub(crate) model: String,
    pub(crate) n_ctx: u32,
    pub(crate) slots: u32,
    pub(crate) offload: crate::protocol::Offload,
}

pub(crate) fn router(
    state: WorkerState,
    verifier: std::sync::Arc<crate::auth::layer::Guard>,
) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/generate", post(generate))
        .layer(DefaultBodyLimit::max(crate::auth::layer::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::auth::layer::require_signature,
        ))
        .with_state(state)
}

async fn health(
    State(state): State<WorkerState>,
    signer: Option<axum::Extension<crate::auth::layer::Authenticated>>,
) -> Json<WorkerHealth> {
    let activity = state.engine.activity();
    let status = if activity.active.is_empty() {
        "ready"
    } else {
        "busy"
    };
    Json(WorkerHealth {
        status: status.to_string(),
        signed: signer.map(|_| WorkerDetail {
            model: state.model.clone(),
            n_ctx: state.n_ctx,
            slots: state.slots,
            pid: std::process::id(),
            active: activity.active,
            last: activity.last,
            offload: state.offload.clone(),
            prefill_passes: activity.prefill_passes,
            prefill_chunks: activity.prefill_chunks,
            peak_active: activity.peak_active,
        }),
    })
}

async fn generate(
    State(state): State<WorkerState>,
    headers: HeaderMap,
    Json(request): Json<GenerateRequest>,
) -> Result<Response, ApiError> {
    request.validate()?;
    let budget = Budget::from_headers(&headers);
    if budget.is_some_and(|b| b.is_spent()) {
        return Err(
            Error::deadline("the request's budget was spent before it reached the worker").into(),
        );
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tracing::info!(request_id = %request.request_id, "generation queued");
    state.engine.submit(Job {
        request,
        deadline: budget.map(|b| b.deadline()),
        events: tx,
    })?;
    let mut rx = UnboundedReceiverStream::new(rx);
    // Problems found before the first token (prompt too long...) get a proper status.
    match rx.next().await {
        Some(EngineEvent::Started { tokens_in }) => {
            let first = sse_event("started", &serde_json::json!({ "tokens_in": tokens_in }));
            let rest = rx.map(|event| Ok::<Event, Infallible>(to_sse(event)));
            let stream = futures::stream::once(async move { Ok(first) }).chain(rest);
            Ok(Sse::new(stream).into_response())
        }
        Some(EngineEvent::Failed(err)) => Err(err.into()),
        Some(_) | None => Err(Error::worker("the batcher dropped the request").into()),
    }
}

fn to_sse(event: EngineEvent) -> Event {
    match event {
        EngineEvent::Token(text) => sse_event("token", &TokenEvent { text }),
        EngineEvent::Prefill { done, total } => sse_event("prefill", &PrefillEvent { done, total }),
        EngineEvent::Progress { tokens_out } => {
            sse_event("progress", &ProgressEvent { tokens_out })
        }
        EngineEvent::Done(done) => sse_event("done", &done),
        EngineEvent::Failed(err) => sse_event("error", &ErrorBody::from(&err)),
        EngineEvent::Started { tokens_in } => {
            sse_event("started", &serde_json::json!({ "tokens_in": tokens_in }))
        }
    }
}
