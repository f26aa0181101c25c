//! The hive's HTTP API: health, workers, inference and model downloads (server-sent events),
//! shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::{self, DEFAULT_TIMEOUT};
use crate::deadline::{BUDGET_HEADER, Budget};
use crate::error::{Error, ExitKind};
use crate::hive::entry::Supervision;
use crate::hive::metrics::Metrics;
use crate::hive::registry::Registry;
use crate::hive::requests::Requests;
use crate::protocol::error_from_response;
use crate::protocol::{
    GenerateRequest, HiveDetail, HiveHealth, InferRequest, ModelTable, REQUEST_ID_HEADER,
    RequestInfo, RequestStage, WorkerInfo,
};
use crate::server::ApiError;

pub(crate) struct Hive {
    pub(crate) node: String,
    /// The node's `remote_dir`.
    pub(crate) dir: std::path::PathBuf,
    pub(crate) started: Instant,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when a stopping hive's drain time is over: generations still under way end.
    pub(crate) drained: CancellationToken,
    pub(crate) requests: Arc<Requests>,
    pub(crate) keys: Arc<crate::hive::keys::NodeKeys>,
    pub(crate) audit: crate::audit::Audit,
}

pub(crate) fn router(hive: Arc<Hive>, verifier: Arc<crate::auth::layer::Guard>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/workers", get(workers))
        .route("/metrics", get(metrics))
        .route("/v1/workers/{model}", delete(stop_worker))
        .route("/v1/workers/{model}/restart", post(restart_worker))
        .route("/v1/workers/{model}/load", post(load_worker))
        .route("/v1/requests", get(requests))
        .route("/v1/requests/{id}/cancel", post(cancel_request))
        .route("/v1/logs", get(logs))
        .route("/v1/infer", post(infer))
        .route("/v1/models", put(update_models))
        .route("/v1/models/{model}/pull", post(pull_model))
        .route("/v1/models/{model}", delete(remove_model))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/keys", get(crate::hive::key_routes::list))
        .route("/v1/keys/reload", post(crate::hive::key_routes::reload))
        .route("/v1/keys/retire", post(crate::hive::key_routes::retire))
        .route("/v1/keys/enroll", post(crate::hive::key_routes::approve))
        .route("/v1/keys/revoke", post(crate::hive::key_routes::revoke))
        .layer(DefaultBodyLimit::max(crate::auth::layer::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::auth::layer::require_signature,
        ))
        .with_state(hive)
}

/// `GET /metrics` alone, for the node's optional TCP port: nothing else of the hive is
/// reachable there.
pub(crate) fn metrics_router(hive: Arc<Hive>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(hive)
}

async fn health(
    State(hive): State<Arc<Hive>>,
    signer: Option<axum::Extension<crate::auth::layer::Authenticated>>,
) -> Json<HiveHealth> {
    Json(HiveHealth {
        status: if hive.shutdown.is_cancelled() {
            crate::protocol::HIVE_STOPPING
        } else {
            "ok"
        }
        .to_string(),
        version: crate::protocol::own_version(),
        protocol: crate::protocol::own_protocol(),
        signed: signer.map(|_| HiveDetail {
            node: hive.node.clone(),
            pid: std::process::id(),
            uptime_s: hive.started.elapsed().as_secs_f64(),
            requests: Some(hive.requests.list().len()),
            workers: Some(hive.registry.workers()),
        }),
    })
}

async fn workers(State(hive): State<Arc<Hive>>) -> Json<Vec<WorkerInfo>> {
    Json(hive.registry.workers())
}

async fn metrics(State(hive): State<Arc<Hive>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::hive::metrics::CONTENT_TYPE,
        )],
        hive.metrics.render(&hive.registry.workers()),
    )
}

/// An operator's restart: clears a failed state and the breaker, replaces the process.
async fn restart_worker(
    State(hive): State<Arc<Hive>>,
    Path(model): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    let spec = hive.registry.served(&model, None)?;
    let entry = hive.registry.entry(&spec);
    let was_failed = matches!(entry.lock().supervision, Supervision::Failed { .. });
    if was_failed {
        hive.registry
            .notes
            .note(
                "breaker_closed",
                serde_json::json!({ "model": model, "by": "operator" }),
            )
            .await;
    }
    let old = {
        let mut st = entry.lock();
        st.history.reset();
        st.supervision = Supervision::Normal;
        st.failed_reason = None;
        st.proc.take()
    };
    if let Some(old) = old {
        hive.registry.stop_proc(&model, &old).await;
    }
    let budget = Budget::new(spec.load_timeout);
    entry.worker(&hive.registry, &budget).await?;
    // The reply follows the load's records.
    hive.registry.notes.flush().await;
    let info = entry
        .info()
        .ok_or_else(|| Error::worker(format!("the worker for `{model}` did not stay up")))?;
    Ok(Json(info))
}

/// A preload: the model's worker, loaded now (or already), within the request's budget; a
/// load outlives the request, so one that gives up leaves it going.
async fn load_worker(
    State(hive): State<Arc<Hive>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Json<WorkerInfo>, ApiError> {
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    let spec = hive.registry.served(&model, None)?;
    let budget = Budget::from_headers(&headers).unwrap_or_else(|| Budget::new(spec.load_timeout));
    let entry = hive.registry.entry(&spec);
    let (_, load_ms) = entry.worker(&hive.registry, &budget).await?;
    hive.registry
        .notes
        .note(
            "model_preloaded",
            serde_json::json!({ "model": model, "waited_ms": load_ms }),
        )
        .await;
    let info = entry
        .info()
        .ok_or_else(|| Error::worker(format!("the worker for `{model}` did not stay up")))?;
    Ok(Json(info))
}

/// The queen's models for this node replace the table: what requests may name from now on.
async fn update_models(
    State(hive): State<Arc<Hive>>,
    Json(table): Json<ModelTable>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    table.validate()?;
    let fields = hive.registry.update(table.models).await;
    hive.registry
        .notes
        .note("models_updated", fields.clone())
        .await;
    Ok(Json(fields))
}

#[derive(serde::Deserialize)]
struct LogQuery {
    /// Lines before following; 10 when absent.
    n: Option<usize>,
    #[serde(default)]
    follow: bool,
    /// A model's worker log instead of the hive's.
    model: Option<String>,
}

/// The last lines of the hive's log or of a model's worker log, as `line` events signed like a
/// generation's (the node's proof travels with every line), then `end`; following sends each
/// line written after, until the reader goes away or the hive stops.
async fn logs(
    State(hive): State<Arc<Hive>>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
    axum::Extension(signer): axum::Extension<crate::auth::layer::Authenticated>,
) -> Result<Response, ApiError> {
    let path = match &query.model {
        Some(model) => {
            if !config::valid_name(model) {
                return Err(Error::invalid("invalid model name").into());
            }
            let path = hive.registry.worker_log(model);
            if !path.exists() {
                return Err(Error::worker(format!(
                    "no worker for `{model}` has run on `{}`, so it has no log",
                    hive.node
                ))
                .into());
            }
            path
        }
        None => hive.registry.log().to_path_buf(),
    };
    let n = query.n.unwrap_or(10).min(crate::hive::logs::MAX_LINES);
    let (lines_tx, mut lines_rx) = mpsc::channel::<String>(256);
    tokio::spawn(crate::hive::logs::tail(
        path,
        n,
        query.follow,
        lines_tx,
        hive.shutdown.clone(),
    ));
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(line) = lines_rx.recv().await {
            let event =
                crate::protocol::sse::SseEvent::json("line", &serde_json::json!({ "text": line }));
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(crate::protocol::sse::SseEvent::json(
                "end",
                &serde_json::json!({}),
            ))
            .await;
    });
    let mut chain = signer.chain();
    let stream = ReceiverStream::new(rx).map(move |mut event: crate::protocol::sse::SseEvent| {
        event.id = Some(chain.sign(&event.event, &event.data));
        Ok::<Event, Infallible>(crate::protocol::sse::to_wire(event))
    });
    Ok(Sse::new(stream).into_response())
}

async fn requests(State(hive): State<Arc<Hive>>) -> Json<Vec<RequestInfo>> {
    Json(hive.requests.list())
}

/// An operator's cancel of one request in flight: its generation ends at once (the worker
/// stops decoding it and frees its slot), its client ends as interrupted, and the request's
/// `request_cancelled` record names the key that signed this call.
async fn cancel_request(
    State(hive): State<Arc<Hive>>,
    Path(id): Path<String>,
    axum::Extension(signer): axum::Extension<crate::auth::layer::Authenticated>,
) -> Result<Json<RequestInfo>, ApiError> {
    let by = signer.kid();
    let Some(info) = hive.requests.cancel(&id, &by) else {
        return Err(Error::invalid(format!(
            "no request {} is in flight on `{}`; `rbee worker list` shows those that are",
            crate::audit::bounded(&id, crate::audit::UNTRUSTED_BYTES),
            hive.node
        ))
        .into());
    };
    tracing::info!(request_id = %info.request_id, by = %by, "request cancel requested");
    Ok(Json(info))
}

/// Removes a model's file (and a transfer's partial file) from the node. Refused while a worker
/// has the model loaded or a transfer holds its lock: the file is in use.
async fn remove_model(
    State(hive): State<Arc<Hive>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use nix::fcntl::{Flock, FlockArg};
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    let spec = hive.registry.served(&model, None)?;
    if hive.registry.entry(&spec).lock().proc.is_some() {
        return Err(Error::invalid(format!(
            "a worker for `{model}` has it loaded on `{}`: `rbee worker stop --node {} --model \
             {model}` first",
            hive.node, hive.node
        ))
        .into());
    }
    let path = crate::hive::worker_proc::model_path(&spec);
    let lock_path = crate::hive::download::lock_path(&path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::internal(format!("cannot open `{}`: {e}", lock_path.display())))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        Error::invalid(format!(
            "a transfer of `{model}` to `{}` is under way (it holds `{}`: {e}); wait for it, \
             then remove the model",
            hive.node,
            lock_path.display()
        ))
    })?;
    let mut removed = Vec::new();
    let mut bytes = 0u64;
    for p in [path.clone(), crate::hive::download::part_path(&path)] {
        let len = std::fs::metadata(&p).map_or(0, |m| m.len());
        match std::fs::remove_file(&p) {
            Ok(()) => {
                bytes += len;
                removed.push(p.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    Error::internal(format!("cannot remove `{}`: {e}", p.display())).into(),
                );
            }
        }
    }
    let _ = std::fs::remove_file(&lock_path);
    let fields = serde_json::json!({ "model": model, "removed": removed, "bytes": bytes });
    hive.registry
        .notes
        .note("model_removed", fields.clone())
        .await;
    Ok(Json(fields))
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
    lost: Option<axum::Extension<crate::auth::layer::LostRecord>>,
    axum::Extension(signer): axum::Extension<crate::auth::layer::Authenticated>,
    Json(request): Json<InferRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let lost = lost.map(|l| l.0.0);
    let chain = signer.chain();
    let result = start_generation(&hive, &headers, request, received, lost, chain).await;
    if let Err(err) = &result {
        let outcome = match err.0.kind() {
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
    mut lost: Option<String>,
    mut chain: crate::auth::EventChain,
) -> Result<Response, ApiError> {
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    if !config::valid_name(&request.model) {
        return Err(Error::invalid("invalid model name").into());
    }
    request.validate()?;
    let generate = GenerateRequest {
        request_id: request.request_id.clone(),
        system: request.system,
        prompt: request.prompt,
        messages: request.messages,
        raw: request.raw,
        params: request.params,
    };
    generate.validate()?;
    let budget = Budget::from_headers(headers).unwrap_or_else(|| Budget::new(DEFAULT_TIMEOUT));
    if budget.is_spent() {
        return Err(
            Error::deadline("the request's budget was spent before it reached the hive").into(),
        );
    }
    // The model's file and settings are the node's own, from the queen's last table: the
    // request names the model and the spec it means (its digest), and carries nothing else of it.
    let spec = hive
        .registry
        .served(&request.model, Some(&request.model_digest))?;
    tracing::info!(
        request_id = %generate.request_id,
        model = %request.model,
        budget_ms = u64::try_from(budget.remaining().as_millis()).unwrap_or(u64::MAX),
        "request received"
    );

    // The queen's head travels with the request so that this log witnesses the queen's, as the
    // queen's keeps this one's head from the done event.
    let started = hive
        .audit
        .record_work(
            "request_started",
            Some(generate.request_id.clone()),
            serde_json::json!({
                "model": request.model,
                "prompt": crate::audit::digest(&generate.input_text()),
                "budget_ms": u64::try_from(budget.remaining().as_millis()).unwrap_or(u64::MAX),
                "queen_audit": request.queen_audit,
            }),
        )
        .await?;
    if let crate::audit::Recorded::Lost(why) = started {
        lost.get_or_insert(why);
    }
    let tracked = hive
        .requests
        .track(&generate.request_id, &request.model, budget);
    let entry = hive.registry.entry(&spec);
    let queued_at = Instant::now();
    // A request cancelled while it waits for its place or its worker ends there; the load
    // itself outlives it, as any load outlives its request.
    let cancel = tracked.cancel.clone();
    let cancelled = || {
        Error::of_kind(
            ExitKind::Interrupted,
            format!(
                "request `{}` was cancelled on `{}` by key {} (`rbee worker cancel`) before it \
                 started generating",
                generate.request_id,
                hive.node,
                cancel.by().unwrap_or_default()
            ),
        )
    };
    let lease = tokio::select! {
        biased;
        () = cancel.token.cancelled() => return Err(cancelled().into()),
        lease = entry.lease(&budget, &hive.registry) => lease?,
    };
    let queue_ms = queued_at.elapsed().as_secs_f64() * 1000.0;
    tracked.stage(RequestStage::Loading);
    let (proc, load_ms) = tokio::select! {
        biased;
        () = cancel.token.cancelled() => return Err(cancelled().into()),
        worker = entry.worker(&hive.registry, &budget) => worker?,
    };
    tracked.stage(RequestStage::Generating);

    let body = serde_json::to_vec(&generate)
        .map_err(|e| Error::internal(format!("cannot encode the request: {e}")))?;
    let budget_ms = budget.header_value();
    let covered = crate::auth::Covered {
        budget_ms: &budget_ms,
        request_id: &generate.request_id,
    };
    let signature = crate::auth::sign(
        &hive.registry.worker_key,
        "POST",
        "/v1/generate",
        covered,
        &body,
    );
    let sent = proc
        .http
        .post(proc.url("/v1/generate"))
        .header(BUDGET_HEADER, &budget_ms)
        .header(REQUEST_ID_HEADER, &generate.request_id)
        .header(crate::auth::SIGNATURE_HEADER, signature)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    // A worker answers at once with its `started` event; one that does not is stuck (stopped,
    // or wedged in llama.cpp) and is treated as one that stops sending mid-stream.
    let response = tokio::time::timeout(crate::hive::relay::STALL_TIMEOUT, sent)
        .await
        .map_err(|_| {
            Metrics::add(&hive.metrics.stuck_kills, 1);
            proc.kill(crate::hive::worker_proc::KillReason::Stuck);
            Error::worker(format!(
                "the worker for `{}` did not answer for {}s and was killed as stuck; the hive \
                 restarts it per its restart policy",
                request.model,
                crate::hive::relay::STALL_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            Error::worker(format!(
                "cannot reach the worker for `{}`: {e}",
                request.model
            ))
        })?;
    if !response.status().is_success() {
        return Err(error_from_response(response, "the worker").await.into());
    }

    let (tx, rx) = mpsc::channel(64);
    let relay = crate::hive::relay::Relay {
        request_id: generate.request_id.clone(),
        audit: hive.audit.clone(),
        notes: hive.registry.notes.clone(),
        tracked,
        lease,
        proc,
        metrics: hive.metrics.clone(),
        model: request.model,
        node: hive.node.clone(),
        drained: hive.drained.clone(),
        queue_ms,
        load_ms,
        received,
        lost,
        stopping: hive.shutdown.clone(),
    };
    tokio::spawn(relay.run(response, tx));
    // Each event is signed as it leaves, chained to the one before: in order, on one task.
    let stream = ReceiverStream::new(rx).map(move |mut event: crate::protocol::sse::SseEvent| {
        event.id = Some(chain.sign(&event.event, &event.data));
        Ok::<Event, Infallible>(crate::protocol::sse::to_wire(event))
    });
    Ok(Sse::new(stream).into_response())
}

/// Downloads a model's file on the node from the URL the queen resolved from its `source`; the
/// answer is a stream of signed events (`waiting`, `progress`, `retrying`, then `done` or
/// `error`). The file's path and SHA-256 are the hive's own, from its table.
async fn pull_model(
    State(hive): State<Arc<Hive>>,
    Path(model): Path<String>,
    axum::Extension(signer): axum::Extension<crate::auth::layer::Authenticated>,
    Json(request): Json<crate::protocol::pull::PullRequest>,
) -> Result<Response, ApiError> {
    use crate::hive::download;
    if hive.shutdown.is_cancelled() {
        return Err(hive.registry.stopping_error().into());
    }
    if request.url.len() > crate::protocol::pull::MAX_URL_BYTES
        || !matches!(
            config::Origin::parse(&request.url),
            Ok(config::Origin::Url(_))
        )
    {
        return Err(Error::invalid("the download URL must be an http:// or https:// URL").into());
    }
    let spec = hive.registry.served(&model, Some(&request.model_digest))?;
    let token = if request.hf_token {
        download::read_token(&hive.dir)?
    } else {
        None
    };
    let dl = download::Download {
        model: model.clone(),
        path: crate::hive::worker_proc::model_path(&spec),
        sha256: spec.sha256.clone(),
        url: request.url.clone(),
        token,
    };
    let shown = download::shown(&request.url).to_string();
    tracing::info!(model = %model, url = %shown, "model download requested");
    let (tx, rx) = mpsc::channel(16);
    let task_hive = hive.clone();
    tokio::spawn(async move {
        let hive = task_hive;
        let result = tokio::select! {
            biased;
            _ = hive.shutdown.cancelled() => Err(hive.registry.stopping_error()),
            r = download::run(dl, &tx) => r,
        };
        let (event, fields) = match &result {
            Ok(pulled) => (
                crate::protocol::sse::SseEvent::json("done", pulled),
                serde_json::json!({
                    "model": model,
                    "url": shown,
                    "outcome": pulled.action,
                    "bytes": pulled.bytes,
                    "fetched": pulled.fetched,
                    "resumed_from": pulled.resumed_from,
                    "sha256": pulled.sha256,
                }),
            ),
            Err(err) => (
                crate::protocol::sse::SseEvent::json(
                    "error",
                    &crate::protocol::ErrorBody::from(err),
                ),
                serde_json::json!({
                    "model": model,
                    "url": shown,
                    "outcome": "error",
                    "code": err.wire_code(),
                }),
            ),
        };
        if let Err(err) = &result {
            tracing::warn!(model = %model, "model download failed: {err}");
        }
        hive.registry.notes.note("model_pulled", fields).await;
        let _ = tx.send(event).await;
    });
    let mut chain = signer.chain();
    let stream = ReceiverStream::new(rx).map(move |mut event: crate::protocol::sse::SseEvent| {
        event.id = Some(chain.sign(&event.event, &event.data));
        Ok::<Event, Infallible>(crate::protocol::sse::to_wire(event))
    });
    Ok(Sse::new(stream).into_response())
}
