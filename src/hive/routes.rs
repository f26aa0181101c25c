//! The hive's HTTP API: health, workers, inference (server-sent events), shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::{self, DEFAULT_TIMEOUT};
use crate::deadline::{BUDGET_HEADER, Budget};
use crate::error::Error;
use crate::hive::registry::{Lease, Registry};
use crate::hive::requests::{Requests, Tracked};
use crate::hive::worker_proc::WorkerProc;
use crate::http::{ApiError, error_from_response, sse_event};
use crate::sse::{SseEvent, events};
use crate::wire::{
    self, DoneEvent, ErrorBody, GenerateRequest, HiveHealth, InferRequest, REQUEST_ID_HEADER,
    RequestInfo, RequestStage, WorkerInfo,
};

pub struct Hive {
    pub node: String,
    pub started: Instant,
    pub registry: Registry,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub requests: Arc<Requests>,
}

pub fn router(hive: Arc<Hive>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/workers", get(workers))
        .route("/v1/workers/{model}", delete(stop_worker))
        .route("/v1/requests", get(requests))
        .route("/v1/infer", post(infer))
        .route("/v1/shutdown", post(shutdown))
        .layer(DefaultBodyLimit::max(
            wire::MAX_PROMPT_BYTES * 2 + 16 * 1024,
        ))
        .with_state(hive)
}

async fn health(State(hive): State<Arc<Hive>>) -> Json<HiveHealth> {
    Json(HiveHealth {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: wire::PROTOCOL_VERSION,
        node: hive.node.clone(),
        pid: std::process::id(),
        uptime_s: hive.started.elapsed().as_secs_f64(),
    })
}

async fn workers(State(hive): State<Arc<Hive>>) -> Json<Vec<WorkerInfo>> {
    Json(hive.registry.workers())
}

async fn requests(State(hive): State<Arc<Hive>>) -> Json<Vec<RequestInfo>> {
    Json(hive.requests.list())
}

async fn stop_worker(
    State(hive): State<Arc<Hive>>,
    Path(model): Path<String>,
) -> Json<serde_json::Value> {
    let stopped = hive.registry.stop_worker(&model).await;
    Json(serde_json::json!({ "model": model, "stopped": stopped }))
}

async fn shutdown(State(hive): State<Arc<Hive>>) -> impl IntoResponse {
    tracing::info!("shutdown requested over HTTP");
    hive.shutdown.cancel();
    (
        axum::http::StatusCode::ACCEPTED,
        Json(serde_json::json!({ "stopping": true, "pid": std::process::id() })),
    )
}

async fn infer(
    State(hive): State<Arc<Hive>>,
    headers: HeaderMap,
    Json(request): Json<InferRequest>,
) -> Result<Response, ApiError> {
    if !config::valid_name(&request.model.name) {
        return Err(Error::invalid(format!("invalid model name `{}`", request.model.name)).into());
    }
    let generate = GenerateRequest {
        request_id: request.request_id.clone(),
        system: request.system,
        prompt: request.prompt,
        params: request.params,
    };
    generate.validate()?;
    let budget = Budget::from_headers(&headers).unwrap_or_else(|| Budget::new(DEFAULT_TIMEOUT));
    if budget.is_spent() {
        return Err(
            Error::deadline("the request's budget was spent before it reached the hive").into(),
        );
    }
    tracing::info!(
        request_id = %generate.request_id,
        model = %request.model.name,
        budget_ms = u64::try_from(budget.remaining().as_millis()).unwrap_or(u64::MAX),
        "request received"
    );

    let tracked = hive
        .requests
        .track(&generate.request_id, &request.model.name, budget);
    let entry = hive.registry.entry(&request.model)?;
    let queued_at = Instant::now();
    let lease = entry.lease(&budget).await?;
    let queue_ms = queued_at.elapsed().as_secs_f64() * 1000.0;
    tracked.stage(RequestStage::Loading);
    let (proc, load_ms) = entry.worker(&hive.registry, &budget).await?;
    tracked.stage(RequestStage::Generating);

    let response = hive
        .http
        .post(format!("{}/v1/generate", proc.base_url()))
        .header(BUDGET_HEADER, budget.header_value())
        .header(REQUEST_ID_HEADER, &generate.request_id)
        .json(&generate)
        .send()
        .await
        .map_err(|e| {
            Error::worker(format!(
                "cannot reach the worker for `{}`: {e}",
                request.model.name
            ))
        })?;
    if !response.status().is_success() {
        return Err(error_from_response(response, "the worker").await.into());
    }

    let (tx, rx) = mpsc::channel(64);
    let relay = Relay {
        _tracked: tracked,
        lease,
        proc,
        model: request.model.name,
        queue_ms,
        load_ms,
    };
    tokio::spawn(relay.run(response, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    Ok(Sse::new(stream).into_response())
}

/// Carries one generation from the worker to the client. It holds the model's queue place until
/// the generation ends, and drops the worker's stream (which stops decoding) as soon as the
/// client goes away.
struct Relay {
    _tracked: Tracked,
    lease: Lease,
    proc: Arc<WorkerProc>,
    model: String,
    queue_ms: f64,
    load_ms: Option<f64>,
}

impl Relay {
    async fn run(self, response: reqwest::Response, tx: mpsc::Sender<Event>) {
        let mut upstream = std::pin::pin!(events(response));
        let mut finished = false;
        loop {
            let next = tokio::select! {
                biased;
                _ = tx.closed() => {
                    tracing::info!(model = %self.model, "client went away; cancelling generation");
                    break;
                }
                next = upstream.next() => next,
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(err)) => {
                    tracing::warn!(model = %self.model, "worker stream broke: {err}");
                    break;
                }
                None => break,
            };
            finished |= event.event == "done" || event.event == "error";
            if tx.send(self.forward(event)).await.is_err() {
                break;
            }
            if finished {
                break;
            }
        }
        if !finished && !tx.is_closed() {
            let _ = tx.send(self.crashed().await).await;
        }
        drop(self.lease);
    }

    fn forward(&self, event: SseEvent) -> Event {
        if event.event == "done"
            && let Ok(mut done) = serde_json::from_str::<DoneEvent>(&event.data)
        {
            done.timings_ms.queue = Some(self.queue_ms);
            done.timings_ms.load = self.load_ms;
            return sse_event("done", &done);
        }
        // Tokens pass through untouched: no re-encoding on the hot path.
        Event::default().event(event.event).data(event.data)
    }

    async fn crashed(&self) -> Event {
        let mut exit = None;
        for _ in 0..20 {
            exit = self.proc.exit_status();
            if exit.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let how = exit.map_or_else(
            || "its stream ended".to_string(),
            |s| format!("it exited: {s}"),
        );
        let err = Error::worker(format!(
            "the worker for `{}` stopped in the middle of the request ({how})",
            self.model
        ));
        tracing::warn!("{err}");
        sse_event("error", &ErrorBody::from(&err))
    }
}
