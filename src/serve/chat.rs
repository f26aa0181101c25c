//! `POST /v1/chat/completions` and `POST /v1/completions`: the body becomes an `InferRequest`,
//! the request is admitted, then runs on the fleet in a task of its own whose tokens come back
//! over a channel: gathered into one response, or sent on as server-sent chunks. A client that
//! goes away drops the channel, which ends the task and so the generation on the node.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::openai::{self, ApiError, Envelope, Role, Usage};
use super::{App, api_error, authorize};
use crate::config::DEFAULT_MAX_CONTEXT;
use crate::deadline::Budget;
use crate::error::{DeadlineError, Error};
use crate::protocol::{
    ChatMessage, DoneEvent, InferRequest, MAX_TOKENS_LIMIT, ResponseFormat, SamplingParams,
};
use crate::queen::generate::{self, Shared, breakdown};
use crate::queen::trail;
use crate::serve::admission::Refused;

/// How long a streamed response waits for its first token before it commits to a 200 and goes
/// on with keep-alives: an error before then still gets its own status.
const COMMIT_AFTER: Duration = Duration::from_secs(2);
/// An SSE comment this often while no token comes (a long queue, load or prefill).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// What a 429 tells the client to wait.
const RETRY_AFTER_S: u64 = 1;
pub(crate) const TIMEOUT_HEADER: &str = "x-rbee-timeout";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A request as the endpoints share it, once its body is read.
struct Job {
    request: InferRequest,
    budget: Budget,
    stream: bool,
    include_usage: bool,
    kind: Kind,
    key: String,
    envelope: Envelope,
}

/// What the generation task sends back.
enum Msg {
    Token(String),
    End(Box<Outcome>),
}

struct Outcome {
    result: Result<(), Error>,
    done: Option<DoneEvent>,
}

/// A body axum could not read (over its 2 MiB limit, or cut off): the answer still comes in
/// the API's envelope, which the SDKs parse.
type ReadBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

pub(super) async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: ReadBody,
) -> Response {
    respond(app, headers, body, Kind::Chat).await
}

pub(super) async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: ReadBody,
) -> Response {
    respond(app, headers, body, Kind::Completion).await
}

async fn respond(app: Arc<App>, headers: HeaderMap, body: ReadBody, kind: Kind) -> Response {
    let request_id = format!("{:032x}", rand::random::<u128>());
    let handled = match body {
        Ok(body) => handle(app, &headers, &body, kind, &request_id).await,
        Err(rejection) => Err(openai::unread_body(&rejection)),
    };
    let mut response = match handled {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(request_id, status = %e.status, "refused: {}", e.message);
            e.into_response()
        }
    };
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

async fn handle(
    app: Arc<App>,
    headers: &HeaderMap,
    body: &[u8],
    kind: Kind,
    request_id: &str,
) -> Result<Response, ApiError> {
    let key = authorize(&app, headers)?;
    let map = openai::object(body)?;
    let model_name: String = openai::field(&map, "model")?
        .ok_or_else(|| ApiError::invalid(Some("model"), "`model` is required"))?;
    let route = app
        .config
        .route(None, Some(&model_name))
        .map_err(|_| ApiError::model_not_found(&model_name))?;
    let model = route.model.clone();
    let first = route.nodes[0];
    let budget = Budget::new(match headers.get(TIMEOUT_HEADER) {
        None => first.timeout,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|t| crate::config::parse_duration(t).ok())
            .ok_or_else(|| {
                ApiError::invalid(
                    Some(TIMEOUT_HEADER),
                    format!("`{TIMEOUT_HEADER}` must be a duration such as `30s` or `1500ms`"),
                )
            })?,
    });
    let params = params(&map, model.context.unwrap_or(DEFAULT_MAX_CONTEXT))?;
    let (system, prompt, messages, raw) = match kind {
        Kind::Chat => conversation(openai::messages(&map)?),
        Kind::Completion => {
            let prompt: String = openai::field(&map, "prompt")?
                .ok_or_else(|| ApiError::invalid(Some("prompt"), "`prompt` is required"))?;
            (None, prompt, Vec::new(), true)
        }
    };
    let request = InferRequest {
        request_id: request_id.to_string(),
        model: model.name.clone(),
        model_digest: crate::protocol::model_digest(&model),
        system,
        prompt,
        messages,
        raw,
        params,
        queen_audit: None,
    };
    request
        .validate()
        .map_err(|e| ApiError::invalid(None, e.to_string()))?;
    let job = Job {
        stream: openai::field(&map, "stream")?.unwrap_or(false),
        include_usage: openai::include_usage(&map)?,
        kind,
        key,
        envelope: Envelope {
            id: match kind {
                Kind::Chat => format!("chatcmpl-{request_id}"),
                Kind::Completion => format!("cmpl-{request_id}"),
            },
            created: super::unix_now(),
            model: request.model.clone(),
        },
        request,
        budget,
    };
    let admitted = tokio::select! {
        // Cut first: the slots the cut requests free must not start new ones.
        biased;
        () = app.cut.cancelled() => return Err(super::api_error(
            &Error::Interrupted,
            &model_name,
            request_id,
        )),
        admitted = tokio::time::timeout_at(
            job.budget.deadline().into(),
            app.admission.admit(&model_name),
        ) => admitted,
    };
    let permit = match admitted {
        Ok(Ok(permit)) => permit,
        Ok(Err(Refused::Full)) => {
            app.metrics.request(&model_name, "-", "busy");
            return Err(ApiError::busy(&model_name, RETRY_AFTER_S));
        }
        Ok(Err(Refused::Unknown)) => return Err(ApiError::model_not_found(&model_name)),
        Err(_) => {
            return Err(ApiError::deadline(format!(
                "the request's deadline passed while it waited for a slot (request id {request_id})"
            )));
        }
    };
    let rx = start(app.clone(), &job, permit);
    if job.stream {
        stream(job, rx).await
    } else {
        whole(job, rx).await
    }
}

/// The sampling fields of the body, OpenAI's defaults where absent (a request without a
/// token limit may use the whole context).
fn params(map: &Map<String, Value>, context: u32) -> Result<SamplingParams, ApiError> {
    // `max_completion_tokens`, or its older name `max_tokens`.
    let max_tokens = match openai::field::<u32>(map, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => openai::field::<u32>(map, "max_tokens")?,
    };
    let seed = openai::field::<i64>(map, "seed")?
        // Any 64-bit seed is taken; the worker's sampler takes 32 bits of it.
        .map(|s| (s as u64 & u64::from(u32::MAX)) as u32);
    let format = match openai::field::<Value>(map, "response_format")? {
        None => ResponseFormat::Text,
        Some(v) => response_format(&v)?,
    };
    let params = SamplingParams {
        max_tokens: max_tokens.unwrap_or_else(|| context.min(MAX_TOKENS_LIMIT)),
        temperature: openai::field(map, "temperature")?.unwrap_or(1.0),
        top_p: openai::field(map, "top_p")?.unwrap_or(1.0),
        seed,
        stop: openai::stop(map)?,
        format,
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(None, e.to_string()))?;
    Ok(params)
}

fn response_format(v: &Value) -> Result<ResponseFormat, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("response_format"), m.to_string());
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let schema = v
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|s| s.is_object())
                .ok_or_else(|| bad("`response_format.json_schema.schema` must be an object"))?;
            Ok(ResponseFormat::JsonSchema {
                schema: schema.clone(),
            })
        }
        _ => Err(bad(
            "`response_format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// A conversation as the protocol takes it: a system prompt and one user message travel as
/// `system` and `prompt` (what `infer` sends); anything longer as `messages`.
fn conversation(messages: Vec<(Role, String)>) -> (Option<String>, String, Vec<ChatMessage>, bool) {
    let role = |r: Role| match r {
        Role::System | Role::Developer => crate::protocol::Role::System,
        Role::User => crate::protocol::Role::User,
        Role::Assistant => crate::protocol::Role::Assistant,
    };
    match messages.as_slice() {
        [(Role::User, prompt)] => (None, prompt.clone(), Vec::new(), false),
        [
            (Role::System | Role::Developer, system),
            (Role::User, prompt),
        ] => (Some(system.clone()), prompt.clone(), Vec::new(), false),
        _ => (
            None,
            String::new(),
            messages
                .into_iter()
                .map(|(r, content)| ChatMessage {
                    role: role(r),
                    content,
                })
                .collect(),
            false,
        ),
    }
}

/// Starts the generation task; its messages come on the receiver, which, dropped, ends it.
fn start(
    app: Arc<App>,
    job: &Job,
    permit: super::admission::Permit,
) -> mpsc::UnboundedReceiver<Msg> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = job.request.clone();
    let budget = job.budget;
    let key = job.key.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let started = Instant::now();
        let Ran {
            result,
            done,
            node,
            client_gone,
            first_token,
        } = run(&app, &mut request, &budget, &key, &tx, started).await;
        let status = match &result {
            Ok(()) if client_gone => "client_gone".to_string(),
            Ok(()) => "ok".to_string(),
            Err(e) => e.kind().wire_code().to_string(),
        };
        let model = &request.model;
        app.metrics
            .request(model, node.as_deref().unwrap_or("-"), &status);
        if let Some(done) = &done {
            app.metrics.tokens(model, done.tokens_in, done.tokens_out);
        }
        if let Some(t) = first_token {
            app.metrics.first_token(model, t.as_secs_f64());
        }
        match &result {
            // One line per request, so that the request id finds the whole cause (an error
            // over several nodes names each on a line of its own).
            Err(e) => eprintln!(
                "rbee serve: request {} (key `{key}`, model `{}`, node `{}`): {status}: {}",
                request.request_id,
                request.model,
                node.as_deref().unwrap_or("-"),
                e.to_string().replace('\n', " ")
            ),
            Ok(()) => tracing::info!(
                request_id = %request.request_id,
                key,
                model = %request.model,
                node = node.as_deref().unwrap_or("-"),
                tokens_out = done.as_ref().map(|d| d.tokens_out),
                ms = started.elapsed().as_millis() as u64,
                "{status}"
            ),
        }
        let _ = tx.send(Msg::End(Box::new(Outcome { result, done })));
    });
    rx
}

/// How a request went on the fleet.
struct Ran {
    result: Result<(), Error>,
    done: Option<DoneEvent>,
    /// The node that took it last.
    node: Option<String>,
    client_gone: bool,
    /// From admission to the first token.
    first_token: Option<Duration>,
}

impl Ran {
    fn failed(e: Error) -> Ran {
        Ran {
            result: Err(e),
            done: None,
            node: None,
            client_gone: false,
            first_token: None,
        }
    }
}

/// Runs the request on the fleet, audited as `infer` is: the request, with the key's name,
/// before it goes out; its end, with the node, tokens, outcome and duration, once it is over.
async fn run(
    app: &App,
    request: &mut InferRequest,
    budget: &Budget,
    key: &str,
    tx: &mpsc::UnboundedSender<Msg>,
    admitted: Instant,
) -> Ran {
    let config = app.config.clone();
    let route = match config.route(None, Some(&request.model)) {
        Ok(route) => route,
        Err(e) => return Ran::failed(e),
    };
    let first = route.nodes[0];
    if let Err(e) = trail::record_request(
        &crate::queen::audit(),
        request,
        first,
        budget,
        json!({
            "serve": true,
            "key": key,
            "candidates": route.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        }),
    ) {
        return Ran::failed(e);
    }
    let request = &*request;
    let account = Shared::default();
    let sink_tx = tx.clone();
    let mut first_token = None;
    let mut sink = |t: &str| {
        first_token.get_or_insert_with(|| admitted.elapsed());
        sink_tx
            .send(Msg::Token(t.to_string()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    };
    // Placed from what the fleet's watchers last saw, over the connections they keep; a node
    // that fails is looked at again at once.
    let order = app.fleet.order(&route.nodes, route.model, &app.pool);
    let look_again = |node: &crate::config::Node| app.fleet.nudge(&node.name);
    let work = generate::in_order(
        &app.runner,
        order,
        request,
        budget,
        &account,
        &mut sink,
        &look_again,
    );
    let result = tokio::select! {
        biased;
        // The client went away: dropping the work closes the connection to the hive, which
        // cancels the generation on the node.
        () = tx.closed() => {
            account.get().reader_gone = true;
            Ok(())
        }
        // The drain time after a stop ran out: dropping the work cancels it on the node, and
        // the client hears why.
        () = app.cut.cancelled() => Err(Error::Classified {
            kind: crate::error::ExitKind::Interrupted,
            message: "still running when serve's drain time after a stop ran out; cancelled on \
                      the node"
                .to_string(),
        }),
        result = tokio::time::timeout_at(budget.deadline().into(), work) => match result {
            Ok(result) => result,
            Err(_) => Err(Error::Deadline(DeadlineError::Spent(breakdown(
                budget.total(),
                budget,
                &account.get(),
            )))),
        },
    };
    let account = account.into_inner();
    let node = account.node.as_ref().unwrap_or(first);
    let done = account.done.as_ref();
    // Off the runtime's threads: a wait for the log's lock must not stall the other requests,
    // /health or the drain.
    let completed = crate::queen::audit_end(budget, &result)
        .record_async(
            "infer_completed",
            Some(request.request_id.clone()),
            trail::completed_fields(
                node,
                &request.model,
                &result,
                done,
                budget,
                json!({ "key": key, "client_gone": account.reader_gone }),
            ),
        )
        .await;
    let result = trail::audited(node, result, done, completed.err());
    Ran {
        result,
        done: account.done.clone(),
        node: Some(node.name.clone()),
        client_gone: account.reader_gone,
        first_token,
    }
}

/// The usage and finish reason of a generation that ended well, or the error to answer with.
fn ended(job: &Job, outcome: &Outcome) -> Result<(Usage, &'static str), ApiError> {
    let model = &job.request.model;
    let id = &job.request.request_id;
    if let Err(e) = &outcome.result {
        return Err(api_error(e, model, id));
    }
    let done = outcome.done.as_ref().ok_or_else(|| {
        ApiError::internal(format!("the generation ended early (request id {id})"))
    })?;
    let finish = openai::finish_reason(done.stop_reason).ok_or_else(|| {
        ApiError::unavailable(format!("the generation was cut short (request id {id})"))
    })?;
    Ok((Usage::new(done.tokens_in, done.tokens_out), finish))
}

/// The whole answer in one response.
async fn whole(job: Job, mut rx: mpsc::UnboundedReceiver<Msg>) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Token(t) => text.push_str(&t),
            Msg::End(outcome) => {
                let (usage, finish) = ended(&job, &outcome)?;
                let body = match job.kind {
                    Kind::Chat => job.envelope.chat_completion(&text, finish, usage),
                    Kind::Completion => job.envelope.completion(&text, finish, usage),
                };
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(format!(
        "the generation ended without an outcome (request id {})",
        job.request.request_id
    )))
}

/// The answer as server-sent chunks. Until the first token (or `COMMIT_AFTER`) nothing is
/// sent, so that a request no node can take still gets its status.
async fn stream(job: Job, mut rx: mpsc::UnboundedReceiver<Msg>) -> Result<Response, ApiError> {
    let first = match tokio::time::timeout(COMMIT_AFTER, rx.recv()).await {
        Ok(Some(Msg::End(outcome))) if outcome.result.is_err() => {
            return Err(ended(&job, &outcome)
                .err()
                .unwrap_or_else(|| ApiError::internal("the generation failed without an error")));
        }
        Ok(Some(msg)) => Some(msg),
        Ok(None) => {
            return Err(ApiError::internal(format!(
                "the generation ended without an outcome (request id {})",
                job.request.request_id
            )));
        }
        Err(_) => None,
    };
    let chunks = Chunks {
        job,
        rx,
        first,
        pending: VecDeque::new(),
        began: false,
        finished: false,
    };
    let body = futures::stream::unfold(chunks, |mut c| async move {
        let bytes = c.next().await?;
        Some((Ok::<Bytes, Infallible>(bytes), c))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The state of a streamed answer.
struct Chunks {
    job: Job,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// What came while the response was not yet committed.
    first: Option<Msg>,
    pending: VecDeque<Bytes>,
    /// The opening chunk (the role) is out.
    began: bool,
    finished: bool,
}

fn data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl Chunks {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some(bytes);
            }
            if self.finished {
                return None;
            }
            let env = &self.job.envelope;
            let usage = self.job.include_usage;
            if !self.began {
                self.began = true;
                if self.job.kind == Kind::Chat {
                    let delta = json!({ "role": "assistant", "content": "" });
                    return Some(data(&env.chat_chunk(delta, None, usage)));
                }
            }
            let msg = match self.first.take() {
                Some(msg) => Some(msg),
                None => match tokio::time::timeout(KEEP_ALIVE, self.rx.recv()).await {
                    Ok(msg) => msg,
                    Err(_) => return Some(Bytes::from_static(b": keep-alive\n\n")),
                },
            };
            match msg {
                Some(Msg::Token(text)) => {
                    let chunk = match self.job.kind {
                        Kind::Chat => env.chat_chunk(json!({ "content": text }), None, usage),
                        Kind::Completion => env.completion_chunk(&text, None, usage),
                    };
                    return Some(data(&chunk));
                }
                Some(Msg::End(outcome)) => {
                    self.finished = true;
                    match ended(&self.job, &outcome) {
                        Ok((counts, finish)) => {
                            let last = match self.job.kind {
                                Kind::Chat => env.chat_chunk(json!({}), Some(finish), usage),
                                Kind::Completion => env.completion_chunk("", Some(finish), usage),
                            };
                            self.pending.push_back(data(&last));
                            if usage {
                                let chunk = match self.job.kind {
                                    Kind::Chat => env.chat_usage_chunk(counts),
                                    Kind::Completion => env.completion_usage_chunk(counts),
                                };
                                self.pending.push_back(data(&chunk));
                            }
                            self.pending
                                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        }
                        Err(e) => self.pending.push_back(data(&e.body())),
                    }
                }
                None => {
                    self.finished = true;
                    let e = ApiError::internal(format!(
                        "the generation ended without an outcome (request id {})",
                        self.job.request.request_id
                    ));
                    self.pending.push_back(data(&e.body()));
                }
            }
        }
    }
}
