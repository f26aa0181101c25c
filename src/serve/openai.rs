//! The OpenAI API's shapes as `rbee serve` speaks them: what a chat or completion request may
//! carry (and the fields that would change the output in ways rbee cannot honour, refused by
//! name), the responses and stream chunks, and errors in OpenAI's envelope.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::protocol::{MAX_PROMPT_BYTES, StopReason};

/// An error as an OpenAI client expects it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
    /// Seconds, for 429.
    pub(crate) retry_after: Option<u64>,
    /// `x-should-retry`, which the OpenAI SDKs obey over their own rule (they retry every
    /// 5xx): `false` where a retry cannot help or would undo what ended the request.
    pub(crate) should_retry: Option<bool>,
}

impl ApiError {
    pub(crate) fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    pub(crate) fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(Some(param), message)
        }
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
            should_retry: None,
        }
    }

    pub(crate) fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist or no node serves it"),
            kind: "invalid_request_error",
            param: Some("model".to_string()),
            code: Some("model_not_found"),
            retry_after: None,
            should_retry: None,
        }
    }

    pub(crate) fn busy(model: &str, retry_after: u64) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "every slot for `{model}` is busy and its wait queue is full; try again later"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            should_retry: None,
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("unavailable"),
            retry_after: None,
            should_retry: None,
        }
    }

    pub(crate) fn deadline(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: message.into(),
            kind: "timeout_error",
            param: None,
            code: Some("deadline_exceeded"),
            retry_after: None,
            should_retry: None,
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    /// A method the endpoint does not take (axum's own 405 has an empty body).
    pub(crate) fn method_not_allowed(allowed: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("this endpoint takes {allowed} only"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
            retry_after: None,
            should_retry: None,
        }
    }

    /// The envelope, as the body of a response or the data of a stream's last event.
    pub(crate) fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// A request body that could not be read: over the limit (413), or cut off by the client.
pub(crate) fn unread_body(rejection: &axum::extract::rejection::BytesRejection) -> ApiError {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is over the limit of {} MiB",
            BODY_LIMIT >> 20
        )
    } else {
        format!(
            "the request body could not be read: {}",
            rejection.body_text()
        )
    };
    ApiError {
        status,
        code: (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large"),
        ..ApiError::invalid(None, message)
    }
}

/// axum's default limit on a request body, which the router keeps.
pub(crate) const BODY_LIMIT: usize = 2 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(retry) = self.should_retry {
            response.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Fields that would change the output in a way rbee does not do: refused by name rather than
/// quietly ignored. Each is refused only when set to something other than its no-op value.
fn unsupported(field: &str, value: &Value) -> bool {
    let set = !value.is_null();
    match field {
        "n" => set && value.as_u64() != Some(1),
        "tools" | "functions" | "logit_bias" => match value {
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => set,
        },
        "tool_choice" => set && value.as_str() != Some("none"),
        "function_call" => set && value.as_str() != Some("none"),
        "logprobs" => set && value.as_bool() != Some(false),
        "top_logprobs" => set && value.as_u64() != Some(0),
        "presence_penalty" | "frequency_penalty" => set && value.as_f64() != Some(0.0),
        "best_of" => set && value.as_u64() != Some(1),
        "echo" => set && value.as_bool() != Some(false),
        "suffix" => set && value.as_str().is_none_or(|s| !s.is_empty()),
        "modalities" => {
            set && !value
                .as_array()
                .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
        }
        "audio" | "prediction" | "web_search_options" => set,
        _ => false,
    }
}

const UNSUPPORTED: &[&str] = &[
    "n",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "echo",
    "suffix",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
];

/// The body as a JSON object, with every field that rbee cannot honour refused.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    for field in UNSUPPORTED {
        if let Some(value) = map.get(*field)
            && unsupported(field, value)
        {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported by rbee"),
            ));
        }
    }
    Ok(map)
}

/// A field of the body as `T`, or a 400 naming it.
pub(crate) fn field<T: serde::de::DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|e| ApiError::invalid(Some(name), format!("`{name}`: {e}"))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    System,
    /// OpenAI's newer name for the system role.
    Developer,
    User,
    Assistant,
}

/// A message's content: a string, or a list of parts of which rbee takes text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// The conversation of a chat request, each message's text whole.
pub(crate) fn messages(map: &Map<String, Value>) -> Result<Vec<(Role, String)>, ApiError> {
    let raw: Vec<RawMessage> = field(map, "messages")?
        .ok_or_else(|| ApiError::invalid(Some("messages"), "`messages` is required"))?;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must hold at least one message",
        ));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = 0;
    for (i, m) in raw.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::unsupported(
                    &format!("{param}.role"),
                    format!("messages of role `{other}` are not supported by rbee"),
                ));
            }
        };
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::unsupported(
                                &format!("{param}.content[{j}]"),
                                format!("content parts of type `{kind}` are not supported by rbee"),
                            ));
                        }
                    }
                }
                text
            }
        };
        bytes += text.len();
        out.push((role, text));
    }
    if bytes > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid(
            Some("messages"),
            format!("the messages are over {MAX_PROMPT_BYTES} bytes"),
        ));
    }
    Ok(out)
}

/// `stop`: a string or a list of them.
pub(crate) fn stop(map: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stop {
        One(String),
        Many(Vec<String>),
    }
    Ok(match field::<Stop>(map, "stop")? {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    })
}

/// `stream_options.include_usage`.
pub(crate) fn include_usage(map: &Map<String, Value>) -> Result<bool, ApiError> {
    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: bool,
    }
    Ok(field::<StreamOptions>(map, "stream_options")?.is_some_and(|o| o.include_usage))
}

/// OpenAI's `finish_reason` for how a generation ended; `None` for the ends that are errors.
pub(crate) fn finish_reason(reason: StopReason) -> Option<&'static str> {
    match reason {
        StopReason::MaxTokens | StopReason::ContextFull => Some("length"),
        StopReason::Deadline | StopReason::Cancelled => None,
        _ => Some("stop"),
    }
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u32,
    pub(crate) completion_tokens: u32,
    pub(crate) total_tokens: u32,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
}

impl Envelope {
    /// The fields every object shares, in OpenAI's order; `usage` is added when `Some`
    /// (`Some(Value::Null)`: the null that streamed chunks carry when the client asked for the
    /// usage chunk, as OpenAI sends it).
    fn object(&self, object: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut value = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let (Some(usage), Some(obj)) = (usage, value.as_object_mut()) {
            obj.insert("usage".into(), usage);
        }
        value
    }

    /// `null` usage in a chunk when the client asked for the usage chunk, absent otherwise.
    fn pending(usage: bool) -> Option<Value> {
        usage.then_some(Value::Null)
    }

    pub(crate) fn chat_completion(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = json!([{
            "index": 0,
            "message": { "role": "assistant", "content": text, "refusal": null },
            "logprobs": null,
            "finish_reason": finish,
        }]);
        self.object("chat.completion", choice, Some(json!(usage)))
    }

    /// A chunk of a streamed chat completion.
    pub(crate) fn chat_chunk(&self, delta: Value, finish: Option<&str>, usage: bool) -> Value {
        let choice = json!([{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish,
        }]);
        self.object("chat.completion.chunk", choice, Self::pending(usage))
    }

    /// The last chunk when the client asked for usage: no choices, the counts.
    pub(crate) fn chat_usage_chunk(&self, usage: Usage) -> Value {
        self.object("chat.completion.chunk", json!([]), Some(json!(usage)))
    }

    fn text_choice(text: &str, finish: Option<&str>) -> Value {
        json!([{
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish,
        }])
    }

    pub(crate) fn completion(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = Self::text_choice(text, Some(finish));
        self.object("text_completion", choice, Some(json!(usage)))
    }

    pub(crate) fn completion_chunk(&self, text: &str, finish: Option<&str>, usage: bool) -> Value {
        let choice = Self::text_choice(text, finish);
        self.object("text_completion", choice, Self::pending(usage))
    }

    pub(crate) fn completion_usage_chunk(&self, usage: Usage) -> Value {
        self.object("text_completion", json!([]), Some(json!(usage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_change_the_output_are_refused_by_name_and_no_op_values_pass() {
        let refused = |body: Value| {
            object(body.to_string().as_bytes())
                .err()
                .and_then(|e| e.param)
        };
        assert_eq!(refused(json!({"n": 2})), Some("n".to_string()));
        assert_eq!(refused(json!({"n": 1})), None);
        assert_eq!(
            refused(json!({"tools": [{"type": "function"}]})),
            Some("tools".to_string())
        );
        assert_eq!(refused(json!({"tools": []})), None);
        assert_eq!(refused(json!({"logprobs": true})), Some("logprobs".into()));
        assert_eq!(refused(json!({"logprobs": false})), None);
        assert_eq!(refused(json!({"user": "x", "metadata": {"a": "b"}})), None);
    }

    #[test]
    fn content_is_a_string_or_text_parts() {
        let map = object(
            json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]})
            .to_string()
            .as_bytes(),
        )
        .expect("object");
        let m = messages(&map).expect("messages");
        assert_eq!(
            m,
            vec![(Role::System, "be brief".into()), (Role::User, "ab".into())]
        );
        let map = object(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
                .to_string()
                .as_bytes(),
        )
        .expect("object");
        assert_eq!(
            messages(&map).err().and_then(|e| e.param),
            Some("messages[0].content[0]".into())
        );
    }
}
