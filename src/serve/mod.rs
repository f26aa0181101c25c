//! `rbee serve`: a long-lived queen that serves the OpenAI API over the fleet. Each request is
//! admitted against its model's slots and wait queue, routed and failed over as `infer` does
//! (`queen::generate`), audited on this machine, and answered in OpenAI's shapes; a client
//! that goes away cancels its generation on the node.

pub(crate) mod admission;
mod chat;
mod fleet;
pub(crate) mod keys;
mod metrics;
mod openai;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, IoError, Result};
use crate::queen::generate::Runner;
use crate::queen::node::ConnectOptions;
use admission::Admission;
use keys::Keys;
use openai::ApiError;

/// How long the requests cut off at the end of the drain have at most to send their error and
/// close their connections (each first writes its audit record); the server ends as soon as
/// they have.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// What `rbee serve` runs with.
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) max_queue: usize,
    /// How long requests in flight may take to finish once a stop is asked for.
    pub(crate) drain: Duration,
    pub(crate) connect: ConnectOptions,
    pub(crate) config: Config,
}

/// What every handler shares.
pub(crate) struct App {
    config: Arc<Config>,
    keys: Keys,
    admission: Arc<Admission>,
    runner: Runner,
    metrics: metrics::Metrics,
    fleet: fleet::Fleet,
    /// One connection per node, kept by the fleet's watchers and taken by every request.
    pool: Arc<crate::queen::pool::Pool>,
    /// When this server started (Unix seconds): the `created` of its models.
    started: u64,
    /// Cancelled when the drain time after a stop has run out: the requests still waiting or
    /// generating then end with an error (an error event once a stream has begun) rather than
    /// with their connection cut.
    cut: CancellationToken,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the server until SIGTERM or SIGINT, then lets requests in flight finish for up to
/// the drain time and returns.
pub(crate) fn run(settings: Settings) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| IoError::doing("start the runtime", e))?;
    let result = runtime.block_on(serve(settings));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(settings: Settings) -> Result<()> {
    let keys = Keys::new(keys::path());
    if keys.count()? == 0 {
        eprintln!(
            "rbee: warning: no API keys yet; every request gets 401 until one is made with \
             `rbee serve key create NAME`"
        );
    }
    let stop = CancellationToken::new();
    let models = Arc::new(settings.config.models.clone());
    let pool = Arc::new(crate::queen::pool::Pool::default());
    let admission = Arc::new(Admission::new(&settings.config, settings.max_queue));
    let app = Arc::new(App {
        fleet: fleet::Fleet::watch(
            &settings.config,
            settings.connect,
            pool.clone(),
            admission.clone(),
            &stop,
        ),
        pool,
        admission,
        config: Arc::new(settings.config),
        keys,
        runner: Runner {
            connect: settings.connect,
            models: models.clone(),
            progress: crate::progress::Progress::hidden(),
            note_start: false,
        },
        metrics: metrics::Metrics::default(),
        started: unix_now(),
        cut: CancellationToken::new(),
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| IoError::doing(format!("listen on {}", settings.listen), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| IoError::doing("read the listening address", e))?;
    eprintln!("rbee serve: listening on http://{local}/v1");
    crate::queen::audit_note(
        "serve_started",
        None,
        json!({ "listen": local.to_string(), "max_queue": settings.max_queue }),
    );

    let drain = settings.drain;
    tokio::spawn({
        let stop = stop.clone();
        async move {
            crate::signals::terminated().await;
            eprintln!("rbee serve: stopping; requests in flight have {drain:?} to finish");
            stop.cancel();
        }
    });
    let server = axum::serve(crate::server::NoDelay(listener), router(app.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => result.map_err(|e| IoError::doing("serve", e))?,
        () = async { stop.cancelled().await; tokio::time::sleep(drain).await } => {
            eprintln!(
                "rbee serve: the drain time ({drain:?}) ran out; requests still in flight were cut \
                 off and end with an error"
            );
            app.cut.cancel();
            match tokio::time::timeout(CUT_GRACE, server).await {
                Ok(result) => result.map_err(|e| IoError::doing("serve", e))?,
                Err(_) => eprintln!(
                    "rbee serve: connections still open {CUT_GRACE:?} after the cut were closed"
                ),
            }
        }
    }
    crate::queen::audit_note("serve_stopped", None, json!({}));
    Ok(())
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/models", get(models).fallback(only("GET")))
        .route(
            "/v1/chat/completions",
            post(chat::chat).fallback(only("POST")),
        )
        .route(
            "/v1/completions",
            post(chat::completions).fallback(only("POST")),
        )
        .route("/health", get(health).fallback(only("GET")))
        .route("/metrics", get(metrics).fallback(only("GET")))
        .layer(axum::extract::DefaultBodyLimit::max(openai::BODY_LIMIT))
        .fallback(not_found)
        .with_state(app)
}

/// The key's name when the request carries a key on file, else 401.
fn authorize(app: &App, headers: &HeaderMap) -> std::result::Result<String, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("this API needs a key: `Authorization: Bearer KEY`")
        })?;
    match app.keys.check(presented) {
        Ok(Some(name)) => Ok(name),
        Ok(None) => Err(ApiError::unauthorized("the API key is not valid")),
        Err(e) => {
            tracing::error!("cannot read the API keys: {e}");
            eprintln!("rbee serve: cannot read the API keys: {e}");
            Err(ApiError::internal("the server cannot check API keys now"))
        }
    }
}

/// The models of nodes.toml that some node serves.
fn served(config: &Config) -> impl Iterator<Item = &str> {
    config
        .models
        .keys()
        .filter(|name| config.nodes.values().any(|n| n.models.contains(name)))
        .map(String::as_str)
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let data: Vec<_> = served(&app.config)
        .map(|name| {
            json!({ "id": name, "object": "model", "created": app.started, "owned_by": "rbee" })
        })
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

/// 200 while some node serving a model can be reached (its hive runs or can be started), as
/// the fleet's watchers last saw it; 503 otherwise.
async fn health(State(app): State<Arc<App>>) -> Response {
    let seen = app.fleet.seen();
    let reachable = seen.iter().filter(|(_, s)| s.reachable).count();
    let any = reachable > 0 && served(&app.config).next().is_some();
    let status = if any {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let queued: serde_json::Map<String, serde_json::Value> = app
        .admission
        .queued()
        .map(|(model, n)| (model.to_string(), n.into()))
        .collect();
    let body = json!({
        "status": if any { "ok" } else { "unavailable" },
        "nodes": seen.len(),
        "nodes_reachable": reachable,
        "hives_answering": seen.iter().filter(|(_, s)| s.hive).count(),
        "free_slots": seen.iter().map(|(_, s)| s.free_slots).sum::<u32>(),
        "queued": queued,
    });
    (status, axum::Json(body)).into_response()
}

/// Prometheus metrics; like `/health`, outside `/v1/` and so without a key.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(app.admission.queued());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// The answer to a method the route does not take, in the envelope, with `Allow`.
fn only(
    allowed: &'static str,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move || {
        let mut response = ApiError::method_not_allowed(allowed).into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        std::future::ready(response)
    }
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".to_string(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
        retry_after: None,
        should_retry: None,
    }
    .into_response()
}

/// A failed request as its client sees it: the class of what happened, never the node's host,
/// a path or a key (those are in this server's log under the request id).
fn api_error(err: &Error, model: &str, request_id: &str) -> ApiError {
    use crate::error::ExitKind;
    match err.kind() {
        // About the request itself: the client can act on what it says.
        ExitKind::InvalidRequest => ApiError::invalid(None, err.to_string()),
        ExitKind::Deadline => ApiError::deadline(format!(
            "the request's deadline passed before it finished (request id {request_id})"
        )),
        ExitKind::Internal => ApiError::internal(format!(
            "the server failed on this request (request id {request_id})"
        )),
        // The node's operator cancelled it (`rbee worker cancel`), or serve's drain time after
        // a stop ran out: serve's log says which. Not to be retried: a retry would run again
        // what the operator cancelled, or find the server gone (and the SDK would then report
        // a connection error, not this).
        ExitKind::Interrupted => ApiError {
            should_retry: Some(false),
            ..ApiError::unavailable(format!(
                "the request was cancelled before it finished: the server is stopping and its \
                 drain time ran out, or the node's operator cancelled it (request id {request_id})"
            ))
        },
        // The work could not be recorded (a node's trail or this server's): under `required`
        // it is refused or not reported done. Not to be retried: a retry runs the generation
        // again and meets the same trail.
        ExitKind::Audit => ApiError {
            should_retry: Some(false),
            ..ApiError::unavailable(format!(
                "the request could not be recorded in the audit trail, which this server keeps \
                 for every request (request id {request_id})"
            ))
        },
        _ => ApiError::unavailable(format!(
            "no node can serve `{model}` now; try again later (request id {request_id})"
        )),
    }
}
