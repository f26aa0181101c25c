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
use crate::error::{Error, ExitKind};
use crate::hive::metrics::Metrics;
use crate::hive::registry::{Lease, Registry, Supervision};
use crate::hive::requests::{Requests, Tracked};
use crate::hive::worker_proc::WorkerProc;
use crate::http::{ApiError, error_from_response, sse_event};
use crate::sse::{SseEvent, events};
use crate::wire::{
    DoneEvent, ErrorBody, GenerateRequest, HiveHealth, InferRequest, REQUEST_ID_HEADER,
    RequestInfo, RequestStage, StopReason, WorkerInfo,
};

pub struct Hive {
    pub node: String,
    pub started: Instant,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub requests: Arc<Requests>,
    pub keys: Arc<crate::hive::keys::NodeKeys>,
    pub audit: crate::audit::Audit,
}

pub fn router(hive: Arc<Hive>, verifier: Arc<crate::http::Guard>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/workers", get(workers))
        .route("/metrics", get(metrics))
        .route("/v1/workers/{model}", delete(stop_worker))
        .route("/v1/workers/{model}/restart", post(restart_worker))
        .route("/v1/requests", get(requests))
        .route("/v1/infer", post(infer))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/keys/reload", post(keys_reload))
        .route("/v1/keys/retire", post(keys_retire))
        .layer(DefaultBodyLimit::max(crate::http::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::http::require_signature,
        ))
        .with_state(hive)
}

async fn health(State(hive): State<Arc<Hive>>) -> Json<HiveHealth> {
    Json(HiveHealth {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: crate::wire::PROTOCOL_VERSION,
        node: hive.node.clone(),
        pid: std::process::id(),
        uptime_s: hive.started.elapsed().as_secs_f64(),
    })
}

async fn workers(State(hive): State<Arc<Hive>>) -> Json<Vec<WorkerInfo>> {
    Json(hive.registry.workers())
}

async fn metrics(State(hive): State<Arc<Hive>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        hive.metrics.render(&hive.registry.workers()),
    )
}

/// An operator's restart: clears a failed state and the breaker, replaces the process.
async fn restart_worker(
    State(hive): State<Arc<Hive>>,
    Path(model): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    let entry = hive.registry.find(&model).ok_or_else(|| {
        Error::config(format!("no worker for `{model}` has run on this hive yet"))
    })?;
    let old = {
        let mut st = entry.lock();
        st.history.reset();
        st.supervision = Supervision::Normal;
        st.failed_reason = None;
        st.proc.take()
    };
    if let Some(old) = old {
        old.stop(crate::hive::worker_proc::STOP_GRACE).await;
    }
    let budget = Budget::new(std::time::Duration::from_secs(120));
    entry.worker(&hive.registry, &budget).await?;
    Metrics::add(&hive.metrics.spawns, 1);
    let info = entry
        .info()
        .ok_or_else(|| Error::worker(format!("the worker for `{model}` did not stay up")))?;
    Ok(Json(info))
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

/// Key rotation, step one: accept the node's next key (`hive.key.next`) beside the current one.
async fn keys_reload(State(hive): State<Arc<Hive>>) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = hive.keys.reload()?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
}

/// Key rotation, step two: the next key becomes the key; the old one is accepted a little
/// longer, for requests signed just before the switch.
async fn keys_retire(State(hive): State<Arc<Hive>>) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = hive.keys.retire()?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
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
    let received = Instant::now();
    let result = start_generation(&hive, &headers, request, received).await;
    if let Err(err) = &result {
        let outcome = match err.0.kind {
            ExitKind::Deadline => "deadline",
            ExitKind::InvalidRequest => "rejected",
            _ => "error",
        };
        hive.metrics
            .request(outcome, received.elapsed().as_secs_f64());
    }
    result
}

async fn start_generation(
    hive: &Arc<Hive>,
    headers: &HeaderMap,
    request: InferRequest,
    received: Instant,
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
    let budget = Budget::from_headers(headers).unwrap_or_else(|| Budget::new(DEFAULT_TIMEOUT));
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

    hive.audit
        .note(
            "request_started",
            Some(generate.request_id.clone()),
            serde_json::json!({
                "model": request.model.name,
                "prompt": crate::audit::digest(&generate.prompt),
                "budget_ms": u64::try_from(budget.remaining().as_millis()).unwrap_or(u64::MAX),
            }),
        )
        .await;
    let tracked = hive
        .requests
        .track(&generate.request_id, &request.model.name, budget);
    let entry = hive.registry.entry(&request.model);
    let queued_at = Instant::now();
    let lease = entry.lease(&budget).await?;
    let queue_ms = queued_at.elapsed().as_secs_f64() * 1000.0;
    tracked.stage(RequestStage::Loading);
    let (proc, load_ms) = entry.worker(&hive.registry, &budget).await?;
    if load_ms.is_some() {
        Metrics::add(&hive.metrics.spawns, 1);
    }
    tracked.stage(RequestStage::Generating);

    let body = serde_json::to_vec(&generate)
        .map_err(|e| Error::internal(format!("cannot encode the request: {e}")))?;
    let signature = crate::auth::sign(&hive.registry.worker_key, "POST", "/v1/generate", &body);
    let response = hive
        .http
        .post(format!("{}/v1/generate", proc.base_url()))
        .header(BUDGET_HEADER, budget.header_value())
        .header(REQUEST_ID_HEADER, &generate.request_id)
        .header(crate::auth::SIGNATURE_HEADER, signature)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body)
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
        request_id: generate.request_id.clone(),
        audit: hive.audit.clone(),
        _tracked: tracked,
        lease,
        proc,
        metrics: hive.metrics.clone(),
        model: request.model.name,
        queue_ms,
        load_ms,
        received,
    };
    tokio::spawn(relay.run(response, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    Ok(Sse::new(stream).into_response())
}

/// Carries one generation from the worker to the client. It holds the model's queue place until
/// the generation ends, and drops the worker's stream (which stops decoding) as soon as the
/// client goes away.
struct Relay {
    request_id: String,
    audit: crate::audit::Audit,
    _tracked: Tracked,
    lease: Lease,
    proc: Arc<WorkerProc>,
    metrics: Arc<Metrics>,
    model: String,
    queue_ms: f64,
    load_ms: Option<f64>,
    received: Instant,
}

/// A busy worker that sends nothing for this long is taken as stuck.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Relay {
    async fn run(self, response: reqwest::Response, tx: mpsc::Sender<Event>) {
        let mut upstream = std::pin::pin!(events(response));
        let mut outcome = "error";
        let mut first_token = true;
        let mut stalled = false;
        loop {
            let next = tokio::select! {
                biased;
                _ = tx.closed() => {
                    tracing::info!(model = %self.model, "client went away; cancelling generation");
                    outcome = "cancelled";
                    break;
                }
                next = tokio::time::timeout(STALL_TIMEOUT, upstream.next()) => next,
            };
            let event = match next {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(err))) => {
                    tracing::warn!(model = %self.model, "worker stream broke: {err}");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(model = %self.model, pid = self.proc.pid, "worker sent nothing for {}s; killing it as stuck", STALL_TIMEOUT.as_secs());
                    Metrics::add(&self.metrics.stuck_kills, 1);
                    self.proc.kill();
                    stalled = true;
                    break;
                }
            };
            if event.event == "token" && first_token {
                first_token = false;
                self.metrics
                    .first_token(self.received.elapsed().as_secs_f64());
            }
            let last = event.event == "done" || event.event == "error";
            let mut head = None;
            if event.event == "done" {
                outcome = self.record_done(&event);
                head = self.audit_end(outcome, Some(&event)).await;
            }
            if tx.send(self.forward(event, head)).await.is_err() {
                outcome = "cancelled";
                break;
            }
            if last {
                break;
            }
        }
        if outcome != "ok" && outcome != "deadline" {
            self.audit_end(outcome, None).await;
        }
        if outcome == "error" && !tx.is_closed() {
            let _ = tx.send(self.crashed(stalled).await).await;
        }
        self.metrics
            .request(outcome, self.received.elapsed().as_secs_f64());
        drop(self.lease);
    }

    fn record_done(&self, event: &SseEvent) -> &'static str {
        let Ok(done) = serde_json::from_str::<DoneEvent>(&event.data) else {
            return "error";
        };
        Metrics::add(&self.metrics.tokens, u64::from(done.tokens_out));
        match done.stop_reason {
            StopReason::Deadline => "deadline",
            StopReason::Cancelled => "cancelled",
            _ => "ok",
        }
    }

    /// The node's record of how the request ended; its head goes back to the queen.
    async fn audit_end(
        &self,
        outcome: &'static str,
        done: Option<&SseEvent>,
    ) -> Option<crate::audit::Head> {
        let done = done.and_then(|e| serde_json::from_str::<DoneEvent>(&e.data).ok());
        let event = match outcome {
            "ok" => "request_completed",
            "deadline" => "request_deadline_exceeded",
            "cancelled" => "request_cancelled",
            _ => "request_failed",
        };
        let fields = serde_json::json!({
            "model": self.model,
            "tokens_in": done.as_ref().map(|d| d.tokens_in),
            "tokens_out": done.as_ref().map(|d| d.tokens_out),
            "stop_reason": done.as_ref().map(|d| d.stop_reason),
            "duration_ms": u64::try_from(self.received.elapsed().as_millis()).unwrap_or(u64::MAX),
            "worker_pid": self.proc.pid,
        });
        match self
            .audit
            .record_async(event, Some(self.request_id.clone()), fields)
            .await
        {
            Ok(head) => Some(head),
            Err(e) => {
                tracing::error!("cannot write the audit record: {e}");
                None
            }
        }
    }

    fn forward(&self, event: SseEvent, head: Option<crate::audit::Head>) -> Event {
        if event.event == "done"
            && let Ok(mut done) = serde_json::from_str::<DoneEvent>(&event.data)
        {
            done.timings_ms.queue = Some(self.queue_ms);
            done.timings_ms.load = self.load_ms;
            done.node_audit = head;
            return sse_event("done", &done);
        }
        // Tokens pass through untouched: no re-encoding on the hot path.
        Event::default().event(event.event).data(event.data)
    }

    async fn crashed(&self, stalled: bool) -> Event {
        let mut exit = None;
        for _ in 0..20 {
            exit = self.proc.exit_status();
            if exit.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let how = match exit {
            _ if stalled => format!(
                "it sent nothing for {}s and was killed as stuck; the hive restarts it per its restart policy",
                STALL_TIMEOUT.as_secs()
            ),
            Some(s) => format!("it exited: {s}; the hive restarts it per its restart policy"),
            None => "its stream ended".to_string(),
        };
        let err = Error::worker(format!(
            "the worker for `{}` stopped in the middle of the request ({how})",
            self.model
        ));
        tracing::warn!("{err}");
        sse_event("error", &ErrorBody::from(&err))
    }
}
