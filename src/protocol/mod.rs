//! What travels between queen, hive and worker: request bodies, stream events, status views.

pub(crate) mod pull;
pub mod sse;

use serde::{Deserialize, Serialize};

use crate::config::Model;
use crate::error::{Error, ExitKind};

/// Bumped when a hive and a CLI of different versions can no longer talk.
pub(crate) const PROTOCOL_VERSION: u32 = 5;

/// This rbee's version as it tells its peers. `RBEE_TEST_VERSION` stands in for it: the way the
/// tests play another release of rbee (an older or newer queen, the hive such a queen starts on
/// a local node) with the one binary they build. Nothing else changes with it.
pub(crate) fn own_version() -> String {
    std::env::var("RBEE_TEST_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// This rbee's protocol as it tells its peers; `RBEE_TEST_PROTOCOL` stands in for it, as
/// `RBEE_TEST_VERSION` does for the version.
pub(crate) fn own_protocol() -> u32 {
    std::env::var("RBEE_TEST_PROTOCOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_VERSION)
}

/// Whether version `a` is older than `b`, comparing `MAJOR.MINOR.PATCH` numerically (anything
/// after a `-` or `+` is ignored); a version that does not read so is older than one that does.
pub(crate) fn is_older(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
        let t = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(t)
    }
    match (parts(a), parts(b)) {
        (Some(a), Some(b)) => a < b,
        (None, Some(_)) => true,
        _ => false,
    }
}
pub(crate) const REQUEST_ID_HEADER: &str = "x-rbee-request-id";
/// The `status` of a hive's `/health` once it has begun to stop (else `ok`).
pub(crate) const HIVE_STOPPING: &str = "stopping";

/// Upper bounds that keep a single request from taking a worker hostage.
pub(crate) const MAX_PROMPT_BYTES: usize = 1 << 20;
pub(crate) const MAX_TEMPERATURE: f32 = 5.0;
pub(crate) const MAX_TOKENS_LIMIT: u32 = 1_000_000;
/// Stop strings per request at most, and the bytes of each (bounds on what the worker matches
/// against every token's text).
pub(crate) const MAX_STOP_STRINGS: usize = 16;
pub(crate) const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SamplingParams {
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) seed: Option<u32>,
    /// Generation ends before the first of these appears in the text; the text returned holds
    /// neither the stop string nor anything after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) stop: Vec<String>,
    /// What shape the output must take (a grammar constrains sampling to it).
    #[serde(default, skip_serializing_if = "ResponseFormat::is_text")]
    pub(crate) format: ResponseFormat,
}

/// The shape the generated text is constrained to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against `schema` (a JSON Schema object).
    JsonSchema { schema: serde_json::Value },
}

impl ResponseFormat {
    pub(crate) fn is_text(&self) -> bool {
        matches!(self, ResponseFormat::Text)
    }
}

/// Who says a message of a conversation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ChatMessage {
    pub(crate) role: Role,
    pub(crate) content: String,
}

impl SamplingParams {
    /// Bounds every hop checks before doing any work.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return Err(Error::invalid(format!(
                "`max_tokens` must be between 1 and {MAX_TOKENS_LIMIT}, got {}",
                self.max_tokens
            )));
        }
        if !(self.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&self.temperature)) {
            return Err(Error::invalid(format!(
                "`temperature` must be between 0 and {MAX_TEMPERATURE}, got {}",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid(format!(
                "`stop` holds at most {MAX_STOP_STRINGS} strings, got {}",
                self.stop.len()
            )));
        }
        if let Some(bad) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(Error::invalid(format!(
                "each `stop` string must be 1 to {MAX_STOP_BYTES} bytes, got one of {}",
                bad.len()
            )));
        }
        if let ResponseFormat::JsonSchema { schema } = &self.format
            && !schema.is_object()
        {
            return Err(Error::invalid(
                "a `json_schema` format's `schema` must be a JSON object",
            ));
        }
        Ok(())
    }
}

/// What a request asks the model about, checked for combinations that contradict each other:
/// a conversation (`messages`) replaces `system` and `prompt`, and a `raw` prompt goes to the
/// model as it is, so it has no system prompt and no conversation around it.
fn check_input(
    system: Option<&str>,
    prompt: &str,
    messages: &[ChatMessage],
    raw: bool,
) -> Result<(), Error> {
    if !messages.is_empty() {
        if system.is_some() {
            return Err(Error::invalid(
                "a request with `messages` has no `system`: put it first in the messages",
            ));
        }
        if !prompt.is_empty() {
            return Err(Error::invalid(
                "a request with `messages` has no `prompt`: the conversation is the prompt",
            ));
        }
        if raw {
            return Err(Error::invalid(
                "`raw` takes a `prompt`, not `messages` (those go through the chat template)",
            ));
        }
    }
    if raw && system.is_some() {
        return Err(Error::invalid(
            "a `raw` prompt has no `system`: it goes to the model without a chat template",
        ));
    }
    let len = prompt.len()
        + system.map_or(0, str::len)
        + messages.iter().map(|m| m.content.len()).sum::<usize>();
    if len > MAX_PROMPT_BYTES {
        return Err(Error::invalid(format!(
            "prompt is {len} bytes; the limit is {MAX_PROMPT_BYTES}"
        )));
    }
    Ok(())
}

/// Most models one hive's table holds (`PUT /v1/models`).
pub(crate) const MAX_MODELS: usize = 256;

/// What of a model's spec the node uses: all of it but the queen-side `source`.
pub(crate) fn node_spec(model: &Model) -> Model {
    Model {
        source: None,
        ..model.clone()
    }
}

/// SHA-256 (hex) of the node-side spec as JSON (fields in declaration order, no spaces): the
/// one function both ends use, so a request proves which spec its queen means by name.
pub(crate) fn model_digest(model: &Model) -> String {
    use sha2::Digest;
    // Serializing plain strings and numbers cannot fail.
    let json = serde_json::to_vec(&node_spec(model)).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(&json))
}

/// Queen -> hive (`PUT /v1/models`): every model the node serves, which replaces the hive's
/// table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelTable {
    pub(crate) models: Vec<Model>,
}

impl ModelTable {
    /// The node's models, without what only the queen uses.
    pub(crate) fn of<'a>(models: impl IntoIterator<Item = &'a Model>) -> ModelTable {
        ModelTable {
            models: models.into_iter().map(node_spec).collect(),
        }
    }

    /// What the hive checks before it keeps a table: the bounds nodes.toml has.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        use crate::config::{MAX_CONTEXT, MAX_GPU_LAYERS, MAX_SLOTS, MAX_THREADS};
        if self.models.len() > MAX_MODELS {
            return Err(Error::invalid(format!(
                "a hive serves at most {MAX_MODELS} models, got {}",
                self.models.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            let bad = if !crate::config::valid_name(&m.name) {
                Some("an invalid name")
            } else if !seen.insert(m.name.as_str()) {
                Some("a second entry")
            } else if m.path.is_empty() || m.path.len() > 4096 || m.path.contains('\0') {
                Some("an invalid path")
            } else if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                Some("an invalid sha256")
            } else if m.slots.is_some_and(|s| s == 0 || s > MAX_SLOTS) {
                Some("`slots` out of range")
            } else if m.context.is_some_and(|c| c == 0 || c > MAX_CONTEXT)
                || m.threads.is_some_and(|t| t == 0 || t > MAX_THREADS)
                || matches!(m.gpu_layers, crate::config::GpuLayers::Layers(n) if n > MAX_GPU_LAYERS)
            {
                Some("`context`, `threads` or `gpu_layers` out of range")
            } else if m.load_timeout.is_zero() {
                Some("a zero `load_timeout`")
            } else {
                None
            };
            if let Some(bad) = bad {
                let shown: String = m.name.chars().take(64).collect();
                return Err(Error::invalid(format!(
                    "the model table has {bad} for model `{shown}`"
                )));
            }
        }
        Ok(())
    }
}

/// Queen -> hive: run a prompt on a model, named; the hive runs it with the spec it was given.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InferRequest {
    pub(crate) request_id: String,
    /// The model's name in the node's table.
    pub(crate) model: String,
    /// `model_digest` of the spec the queen means: a hive whose table says otherwise refuses
    /// with `model_spec_mismatch`.
    pub(crate) model_digest: String,
    pub(crate) system: Option<String>,
    pub(crate) prompt: String,
    /// When non-empty: the whole conversation, rendered with the model's chat template
    /// (`system` is then None and `prompt` empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) messages: Vec<ChatMessage>,
    /// The prompt is tokenized as given, without the chat template.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) raw: bool,
    pub(crate) params: SamplingParams,
    /// The head of the queen's audit log (its record of this request), which the node keeps in
    /// its own record of the request: the node's witness of the queen's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) queen_audit: Option<crate::audit::QueenHead>,
}

/// Longest request id a hop accepts (the queen makes 32 hex digits).
pub(crate) const MAX_REQUEST_ID_BYTES: usize = 128;

impl InferRequest {
    /// What the hive checks before it keeps any of it.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let id = &self.request_id;
        if id.is_empty()
            || id.len() > MAX_REQUEST_ID_BYTES
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(format!(
                "the request id must be 1 to {MAX_REQUEST_ID_BYTES} letters, digits, `-` or `_`"
            )));
        }
        if let Some(head) = &self.queen_audit
            && !head.is_valid()
        {
            return Err(Error::invalid(
                "`queen_audit` must name a queen (1 to 64 hex digits) and a record hash (64 hex digits)",
            ));
        }
        check_input(
            self.system.as_deref(),
            &self.prompt,
            &self.messages,
            self.raw,
        )?;
        self.params.validate()
    }
}

/// Hive -> worker: the same, without the model (a worker serves one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GenerateRequest {
    pub(crate) request_id: String,
    pub(crate) system: Option<String>,
    pub(crate) prompt: String,
    /// As in `InferRequest`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) raw: bool,
    pub(crate) params: SamplingParams,
}

impl GenerateRequest {
    /// What the request asks, as one text for an audit digest: the prompt, or the conversation
    /// as JSON (so that a conversation is not recorded as the empty prompt beside it).
    pub(crate) fn input_text(&self) -> std::borrow::Cow<'_, str> {
        if self.messages.is_empty() {
            std::borrow::Cow::Borrowed(&self.prompt)
        } else {
            std::borrow::Cow::Owned(serde_json::to_string(&self.messages).unwrap_or_default())
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        check_input(
            self.system.as_deref(),
            &self.prompt,
            &self.messages,
            self.raw,
        )?;
        self.params.validate()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StopReason {
    /// The model produced its end-of-generation token.
    Eos,
    MaxTokens,
    /// The context window is full.
    ContextFull,
    Deadline,
    Cancelled,
    /// A stop string matched; the text returned ends before it.
    Stop,
}

/// Milliseconds per stage; each hop fills the stages it owns.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Timings {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) connect: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) hive_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) queue: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) load: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) prefill: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) decode: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) total: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TokenEvent {
    pub(crate) text: String,
}

/// A busy worker that sends the hive nothing for this long is taken as stuck and killed.
pub(crate) const WORKER_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a decoding generation goes without an event before its next token sends one, well
/// inside the stall timeout: one whose text a stop string holds back sends `progress` instead.
pub(crate) const WORKER_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_millis(2500);

/// Decoding goes on although no text went out (a stop string may still be under way): the
/// worker's sign of life, which the hive takes as such and passes on to no one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProgressEvent {
    pub(crate) tokens_out: u32,
}

/// How far a prompt's prefill has got: `done` of its `total` tokens. The worker sends it between
/// chunks; the hive counts it as a sign of life and passes it on; the CLI shows it on its
/// spinner only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PrefillEvent {
    pub(crate) done: u32,
    pub(crate) total: u32,
}

/// The last event of a generation that ran (whatever made it stop).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DoneEvent {
    pub(crate) tokens_in: u32,
    pub(crate) tokens_out: u32,
    pub(crate) stop_reason: StopReason,
    pub(crate) timings_ms: Timings,
    /// Decode speed as the worker measured it (tokens after the first / decode time).
    pub(crate) decode_tokens_per_s: Option<f64>,
    /// Process id of the worker that served the request.
    #[serde(default)]
    pub(crate) worker_pid: Option<u32>,
    /// How many requests that worker runs at once: what a hive derived for auto slots, so that
    /// `batch` opens that many (absent from older workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slots: Option<u32>,
    /// The node's audit record for this request (seq and hash): the queen's witness of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node_audit: Option<crate::audit::Head>,
    /// Set when the node served the request without recording all of it in its audit trail
    /// (`audit = "best-effort"`): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) audit_warning: Option<String>,
}

/// An error as a JSON body (HTTP errors) or an `error` event (mid-stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl From<&Error> for ErrorBody {
    fn from(err: &Error) -> ErrorBody {
        ErrorBody {
            code: err.wire_code().to_string(),
            message: err.to_string(),
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(body: ErrorBody) -> Error {
        Error::from_wire(&body.code, body.message)
    }
}

/// `GET /health` of a hive. Anyone who can reach the socket learns that a hive answers, and its
/// version and protocol; the rest only a signed request sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HiveHealth {
    pub(crate) status: String,
    pub(crate) version: String,
    pub(crate) protocol: u32,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub(crate) signed: Option<HiveDetail>,
}

/// `GET /v1/keys` of a hive: the keys of its node, by id: those it accepts and those waiting to be approved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeyList {
    pub(crate) enrolled: Vec<String>,
    pub(crate) pending: Vec<String>,
}

/// What `GET /health` of a hive tells a signer only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HiveDetail {
    pub(crate) node: String,
    pub(crate) pid: u32,
    pub(crate) uptime_s: f64,
    /// Requests under way: a queen replaces only an idle hive (absent from older hives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) requests: Option<usize>,
    /// Its workers, as `GET /v1/workers` lists them: a status is one exchange (absent from
    /// older hives, which are asked for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) workers: Option<Vec<WorkerInfo>>,
}

/// `GET /health` of a worker: its status to anyone, the rest to a signer only (the requests it
/// works on are not anyone's business).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerHealth {
    pub(crate) status: String,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub(crate) signed: Option<WorkerDetail>,
}

/// What `GET /health` of a worker tells a signer only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerDetail {
    pub(crate) model: String,
    /// Tokens of context per request.
    pub(crate) n_ctx: u32,
    /// Generations decoded together.
    pub(crate) slots: u32,
    pub(crate) pid: u32,
    /// The generations being decoded now.
    pub(crate) active: Vec<Generation>,
    /// The last generation that ended.
    pub(crate) last: Option<Generation>,
    #[serde(default)]
    pub(crate) offload: Offload,
    /// Prefill passes run since the worker started, and the prompt chunks they carried: more
    /// chunks than passes means prompts that came in together shared a pass.
    #[serde(default)]
    pub(crate) prefill_passes: u64,
    #[serde(default)]
    pub(crate) prefill_chunks: u64,
    /// The most generations decoded at once since the worker started: whether requests were
    /// batched, however quickly they ran.
    #[serde(default)]
    pub(crate) peak_active: usize,
}

/// A generation as the worker sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Generation {
    pub(crate) request_id: String,
    pub(crate) tokens_out: u32,
    pub(crate) stop_reason: Option<StopReason>,
}

/// Where an in-flight request is in the hive.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RequestStage {
    Queued,
    Loading,
    Generating,
}

/// One request the hive is working on, and what is left of its budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RequestInfo {
    pub(crate) request_id: String,
    pub(crate) model: String,
    pub(crate) stage: RequestStage,
    pub(crate) age_ms: u64,
    pub(crate) remaining_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WorkerState {
    Loading,
    Ready,
    Busy,
    Restarting,
    Failed,
}

/// One worker as the hive sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerInfo {
    /// `MODEL@PID` for a running process, else the model's name.
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) state: WorkerState,
    pub(crate) pid: Option<u32>,
    /// The Unix socket it listens on.
    pub(crate) socket: Option<String>,
    pub(crate) restart_count: u32,
    pub(crate) last_exit: Option<String>,
    /// What the last exit most likely was: `crash`, `stuck` or `health` (killed by the hive),
    /// `oom`, `likely_oom`, or `signal` (killed from outside the hive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_exit_reason: Option<String>,
    /// Seconds since the Unix epoch.
    pub(crate) last_restart: Option<u64>,
    pub(crate) started_at: Option<u64>,
    pub(crate) load_ms: Option<f64>,
    /// The layers offloaded and the devices used, once it has loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) offload: Option<Offload>,
    pub(crate) requests_served: u64,
    pub(crate) in_flight: u32,
    /// Requests the worker decodes together: `in_flight` of them are busy.
    #[serde(default)]
    pub(crate) slots: u32,
    pub(crate) queued: u32,
    pub(crate) idle_s: Option<f64>,
    /// The delay chosen before the latest restart.
    pub(crate) last_backoff_ms: Option<u64>,
    /// `closed`, or `open` while restarting is held back (breaker or attempts exhausted).
    pub(crate) breaker: String,
    /// Seconds since the Unix epoch at which restarting is allowed again.
    pub(crate) breaker_closes_at: Option<u64>,
    /// Why restarting is held back.
    pub(crate) failed_reason: Option<String>,
}

/// What llama.cpp offloaded when the worker loaded its model: the layers on a device, and the
/// devices it uses (`CPU` alone when none).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Offload {
    pub(crate) gpu_layers: u32,
    pub(crate) devices: Vec<String>,
}

/// The first line a worker prints on stdout: that it listens on the socket its hive named, or
/// why it could not start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum WorkerHello {
    Ready {
        n_ctx: u32,
        load_ms: f64,
        #[serde(default)]
        offload: Offload,
    },
    Failed {
        message: String,
    },
}

/// Reads an error body a peer sent with a failure status.
pub(crate) async fn error_from_response(response: reqwest::Response, peer: &str) -> Error {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    error_from_body(status, &body, peer)
}

/// The error a peer's failure status and body stand for.
pub(crate) fn error_from_body(status: reqwest::StatusCode, body: &[u8], peer: &str) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) if status == reqwest::StatusCode::UNAUTHORIZED => Error::of_kind(
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
            Error::of_kind(kind, format!("{peer} answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(is_older("0.9.0", "0.10.0"));
        assert!(is_older("0.1.0", "0.1.1-rc1"));
        assert!(!is_older("1.0.0", "1.0.0"));
        assert!(!is_older("2.0.0", "1.9.9"));
        assert!(is_older("garbage", "0.1.0"));
        assert!(!is_older("0.1.0", "garbage"));
    }

    fn params() -> SamplingParams {
        SamplingParams {
            max_tokens: 8,
            temperature: 0.7,
            top_p: 0.9,
            seed: None,
            stop: Vec::new(),
            format: ResponseFormat::Text,
        }
    }

    fn generate() -> GenerateRequest {
        GenerateRequest {
            request_id: "r1".to_string(),
            system: None,
            prompt: "hi".to_string(),
            messages: Vec::new(),
            raw: false,
            params: params(),
        }
    }

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_string(),
        }
    }

    #[test]
    fn plain_requests_keep_their_old_shape_on_the_wire() {
        let json = serde_json::to_value(generate()).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "request_id": "r1", "system": null, "prompt": "hi",
                "params": {"max_tokens": 8, "temperature": 0.7f32, "top_p": 0.9f32, "seed": null}
            })
        );
        // What an older queen or hive sends still reads, with the new fields at their defaults.
        let back: GenerateRequest = serde_json::from_value(json).expect("parse");
        assert!(back.messages.is_empty() && !back.raw);
        assert_eq!(back.params, params());
    }

    #[test]
    fn generation_controls_round_trip() {
        let mut request = GenerateRequest {
            prompt: String::new(),
            messages: vec![
                message(Role::System, "be brief"),
                message(Role::User, "hi"),
                message(Role::Assistant, "hello"),
                message(Role::User, "bye"),
            ],
            ..generate()
        };
        request.params.stop = vec!["\n\n".to_string(), "END".to_string()];
        request.params.format = ResponseFormat::JsonSchema {
            schema: serde_json::json!({"type": "object", "required": ["a"]}),
        };
        let json = serde_json::to_value(&request).expect("serialize");
        assert_eq!(json["messages"][2]["role"], "assistant");
        assert_eq!(json["params"]["format"]["type"], "json_schema");
        assert_eq!(json["params"]["format"]["schema"]["required"][0], "a");
        assert_eq!(json["params"]["stop"][1], "END");
        let back: GenerateRequest = serde_json::from_value(json).expect("parse");
        assert_eq!(back.messages, request.messages);
        assert_eq!(back.params, request.params);
        assert!(back.validate().is_ok());
        // The audit digest covers the conversation, not the empty prompt beside it.
        assert!(
            back.input_text().contains("\"bye\""),
            "{}",
            back.input_text()
        );
        assert_eq!(generate().input_text(), "hi");

        let raw = GenerateRequest {
            raw: true,
            ..generate()
        };
        let json = serde_json::to_value(&raw).expect("serialize");
        assert_eq!(json["raw"], true);
        assert!(
            serde_json::from_value::<GenerateRequest>(json)
                .expect("parse")
                .raw
        );

        let object: ResponseFormat =
            serde_json::from_str(r#"{"type":"json_object"}"#).expect("parse");
        assert_eq!(object, ResponseFormat::JsonObject);
        assert_eq!(
            serde_json::to_string(&StopReason::Stop).expect("serialize"),
            "\"stop\""
        );
        assert!(serde_json::from_str::<Role>("\"tool\"").is_err());
    }

    #[test]
    fn contradictory_inputs_are_invalid() {
        let conversation = vec![message(Role::User, "hi")];
        let bad = [
            GenerateRequest {
                messages: conversation.clone(),
                ..generate()
            },
            GenerateRequest {
                prompt: String::new(),
                system: Some("s".to_string()),
                messages: conversation.clone(),
                ..generate()
            },
            GenerateRequest {
                prompt: String::new(),
                messages: conversation.clone(),
                raw: true,
                ..generate()
            },
            GenerateRequest {
                system: Some("s".to_string()),
                raw: true,
                ..generate()
            },
            GenerateRequest {
                prompt: String::new(),
                messages: vec![message(Role::User, &"x".repeat(MAX_PROMPT_BYTES + 1))],
                ..generate()
            },
        ];
        for request in bad {
            let err = request.validate().expect_err("contradictory");
            assert_eq!(err.code(), 8, "{request:?}");
        }
        let fine = GenerateRequest {
            prompt: String::new(),
            messages: conversation,
            ..generate()
        };
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn stop_strings_and_schemas_are_bounded() {
        let with = |stop: Vec<String>, format: ResponseFormat| SamplingParams {
            stop,
            format,
            ..params()
        };
        let ok = with(
            vec!["x".repeat(MAX_STOP_BYTES); MAX_STOP_STRINGS],
            ResponseFormat::JsonSchema {
                schema: serde_json::json!({"type": "object"}),
            },
        );
        assert!(ok.validate().is_ok());
        let bad = [
            with(
                vec!["x".to_string(); MAX_STOP_STRINGS + 1],
                ResponseFormat::Text,
            ),
            with(vec![String::new()], ResponseFormat::Text),
            with(vec!["x".repeat(MAX_STOP_BYTES + 1)], ResponseFormat::Text),
            with(
                Vec::new(),
                ResponseFormat::JsonSchema {
                    schema: serde_json::json!("object"),
                },
            ),
        ];
        for p in bad {
            let err = p.validate().expect_err("out of bounds");
            assert_eq!(err.code(), 8, "{p:?}");
        }
    }

    #[test]
    fn sampling_bounds() {
        assert!(params().validate().is_ok());
        let bad = [
            SamplingParams {
                max_tokens: 0,
                ..params()
            },
            SamplingParams {
                temperature: -1.0,
                ..params()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..params()
            },
            SamplingParams {
                top_p: 0.0,
                ..params()
            },
            SamplingParams {
                top_p: 1.5,
                ..params()
            },
        ];
        for p in bad {
            let err = p.validate().expect_err("out of bounds");
            assert_eq!(err.code(), 8, "{p:?}");
        }
    }

    fn spec() -> Model {
        Model {
            name: "m".to_string(),
            path: "/models/m.gguf".to_string(),
            sha256: "ab".repeat(32),
            source: Some("hf://o/r/m.gguf".to_string()),
            context: Some(2048),
            slots: Some(2),
            gpu_layers: crate::config::GpuLayers::Layers(0),
            threads: Some(1),
            load_timeout: crate::config::DEFAULT_LOAD_TIMEOUT,
            kv_unified: false,
        }
    }

    #[test]
    fn the_digest_covers_the_node_side_spec_only() {
        let base = model_digest(&spec());
        assert_eq!(base.len(), 64);
        let moved = Model {
            source: None,
            ..spec()
        };
        assert_eq!(model_digest(&moved), base, "the queen-side source counts");
        for changed in [
            Model {
                path: "/other.gguf".to_string(),
                ..spec()
            },
            Model {
                slots: Some(3),
                ..spec()
            },
            Model {
                slots: None,
                ..spec()
            },
            Model {
                context: None,
                ..spec()
            },
        ] {
            assert_ne!(model_digest(&changed), base, "{changed:?}");
        }
        let table = ModelTable::of([&spec()]);
        assert_eq!(table.models[0].source, None);
        assert!(table.validate().is_ok());
        let auto = ModelTable::of([&Model {
            slots: None,
            ..spec()
        }]);
        assert!(auto.validate().is_ok());
    }

    /// A spec with a number of slots is the JSON it was when `slots` was always a number (so
    /// its digest is too), and auto leaves the key out; both read back as they were.
    #[test]
    fn explicit_slots_keep_their_json_and_auto_leaves_the_key_out() {
        let explicit = serde_json::to_string(&node_spec(&spec())).expect("json");
        assert_eq!(
            explicit,
            r#"{"name":"m","path":"/models/m.gguf","sha256":"abababababababababababababababababababababababababababababababab","source":null,"context":2048,"slots":2,"gpu_layers":0,"threads":1,"load_timeout":600000}"#
        );
        let auto = Model {
            slots: None,
            ..spec()
        };
        let json = serde_json::to_string(&node_spec(&auto)).expect("json");
        assert_eq!(json, explicit.replace(r#""slots":2,"#, ""));
        for model in [spec(), auto] {
            let back: Model =
                serde_json::from_str(&serde_json::to_string(&model).expect("json")).expect("read");
            assert_eq!(back, model);
        }
    }

    #[test]
    fn a_model_table_out_of_bounds_is_invalid() {
        let bad = [
            vec![Model {
                name: "../x".to_string(),
                ..spec()
            }],
            vec![spec(), spec()],
            vec![Model {
                sha256: "x".to_string(),
                ..spec()
            }],
            vec![Model {
                slots: Some(0),
                ..spec()
            }],
            vec![Model {
                path: String::new(),
                ..spec()
            }],
            vec![spec(); MAX_MODELS + 1],
        ];
        for models in bad {
            let err = ModelTable { models }.validate().expect_err("out of bounds");
            assert_eq!(err.code(), 8);
        }
    }

    #[test]
    fn error_classes_survive_the_wire() {
        let err = Error::worker("model refused");
        let back: Error = ErrorBody::from(&err).into();
        assert_eq!(back.code(), 7);
        assert_eq!(back.to_string(), "model refused");
    }
}
