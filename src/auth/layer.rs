//! The axum layer that checks every request's signature before a handler sees it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ExitKind};
use crate::protocol::ErrorBody;

/// Largest request body any route accepts; the signature layer reads at most this much.
pub(crate) const BODY_LIMIT: usize = crate::protocol::MAX_PROMPT_BYTES * 2 + 16 * 1024;

/// Largest answer body the layer reads to sign it: the hive's JSON answers are lists of a
/// few workers or requests.
const ANSWER_LIMIT: usize = 16 << 20;

/// What the signature layer checks with, and where it records what it decided.
pub(crate) struct Guard {
    verifier: std::sync::Arc<crate::auth::Verifier>,
    audit: Option<crate::audit::Audit>,
    refusals: std::sync::Mutex<Refusals>,
    /// Sign every answer to an authenticated request (the hive, whose answers cross a network
    /// or an SSH forward); a worker, reached only by its hive on a private socket, does not.
    proves_answers: bool,
}

impl Guard {
    pub(crate) fn new(
        verifier: std::sync::Arc<crate::auth::Verifier>,
        audit: Option<crate::audit::Audit>,
    ) -> Guard {
        Guard {
            verifier,
            audit,
            refusals: std::sync::Mutex::default(),
            proves_answers: false,
        }
    }

    /// Signs every answer to an authenticated request with the key that signed it (see
    /// `auth::proof`).
    pub(crate) fn proving_answers(mut self) -> Guard {
        self.proves_answers = true;
        self
    }
}

/// How often one source's refusals of one class are recorded: once a minute, the record naming
/// how many came since the last one. A flood of unsigned requests writes a handful of records.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Sources remembered at most; past this the counts start over (a flood from many sources
/// costs this much memory, not more).
const REFUSAL_SOURCES: usize = 4096;

#[derive(Default)]
struct Refusals {
    /// By (source, class): when the last record was written, and the refusals since.
    seen: std::collections::HashMap<(String, &'static str), (std::time::Instant, u64)>,
}

impl Refusals {
    /// Whether this refusal gets a record now, and how many of the same were left out before it.
    fn record(&mut self, source: &str, class: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.seen.len() >= REFUSAL_SOURCES {
            self.seen.clear();
        }
        match self.seen.get_mut(&(source.to_string(), class)) {
            Some((at, skipped)) if now.duration_since(*at) < REFUSAL_WINDOW => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                let left_out = *skipped;
                *at = now;
                *skipped = 0;
                Some(left_out)
            }
            None => {
                self.seen.insert((source.to_string(), class), (now, 0));
                Some(0)
            }
        }
    }
}

/// A record the signature layer could not write for a request it let through
/// (`audit = "best-effort"`): the handler passes the reason on to the client.
#[derive(Debug, Clone)]
pub(crate) struct LostRecord(pub(crate) String);

/// Put on a request whose signature verified, so that an open route (`GET /health`) can tell a
/// signer, who may see more, from anyone else; it holds what the answer is proven with.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    key: crate::auth::Key,
    nonce: String,
}

impl Authenticated {
    /// The id of the key that signed the request: who acted, for the audit trail.
    pub(crate) fn kid(&self) -> String {
        self.key.fingerprint()
    }

    /// The chain that signs the events of a streamed answer, seeded with the request's nonce.
    pub(crate) fn chain(&self) -> crate::auth::EventChain {
        crate::auth::EventChain::new(&self.key, &self.nonce)
    }
}

async fn proven(signer: Option<&Authenticated>, response: Response) -> Response {
    match signer {
        Some(signer) => prove(response, signer).await,
        None => response,
    }
}

/// Adds the `x-rbee-response` header: the key's HMAC over the request's nonce, the status and
/// the body (read whole; an event stream's events are signed one by one instead).
async fn prove(response: Response, signer: &Authenticated) -> Response {
    use crate::auth::proof::{Body, RESPONSE_HEADER, sign_response};
    let (mut parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    let stream = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (header, body) = if stream {
        let header = sign_response(&signer.key, &signer.nonce, status, Body::Stream);
        (header, body)
    } else {
        match axum::body::to_bytes(body, ANSWER_LIMIT).await {
            Ok(bytes) => {
                let header = sign_response(&signer.key, &signer.nonce, status, Body::Whole(&bytes));
                (header, axum::body::Body::from(bytes))
            }
            Err(e) => {
                let err = Error::internal(format!("cannot read the answer to sign it: {e}"));
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(ErrorBody::from(&err)),
                )
                    .into_response();
            }
        }
    };
    // Hex and ASCII only: always a valid header value.
    if let Ok(value) = axum::http::HeaderValue::from_str(&header) {
        parts.headers.insert(RESPONSE_HEADER, value);
    }
    Response::from_parts(parts, body)
}

/// Axum layer: every request but `GET /health` and `GET /metrics` must carry a valid signature;
/// those two may carry one, and then it is checked like any other.
pub(crate) async fn require_signature(
    axum::extract::State(guard): axum::extract::State<std::sync::Arc<Guard>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read = request.method() == axum::http::Method::GET;
    let open = read && matches!(request.uri().path(), "/health" | "/metrics");
    // Reads of state that change nothing on the node: what `hive status` and `worker list` ask.
    let status_read =
        open || (read && matches!(request.uri().path(), "/v1/workers" | "/v1/requests"));
    if open
        && !request
            .headers()
            .contains_key(crate::auth::SIGNATURE_HEADER)
    {
        return next.run(request).await;
    }
    let (peer, source) = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::server::Peer>>()
        .map_or_else(
            || ("-".to_string(), "-".to_string()),
            |c| (c.0.to_string(), c.0.source.clone()),
        );
    let (parts, body) = request.into_parts();
    let header = parts
        .headers
        .get(crate::auth::SIGNATURE_HEADER)
        .and_then(|h| h.to_str().ok());
    // Who is not a signer gets nothing read of the body: a stalled or huge body from a stranger
    // costs no memory.
    let early = guard.verifier.precheck(header);
    let bytes = if early.is_ok() {
        axum::body::to_bytes(body, BODY_LIMIT).await
    } else {
        Ok(axum::body::Bytes::new())
    };
    let Ok(bytes) = bytes else {
        let err = Error::invalid(format!("the request body is over {BODY_LIMIT} bytes"));
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(ErrorBody::from(&err))).into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let covered_header = |name: &str| {
        parts
            .headers
            .get(name)
            .map_or(Some(""), |h| h.to_str().ok())
    };
    let result = match (
        early,
        covered_header(crate::deadline::BUDGET_HEADER),
        covered_header(crate::protocol::REQUEST_ID_HEADER),
    ) {
        (Err(reject), _, _) => Err(reject),
        // A covered header that is not text cannot have been signed as sent.
        (Ok(()), None, _) | (Ok(()), _, None) => Err(crate::auth::Reject::BadSignature),
        (Ok(()), Some(budget_ms), Some(request_id)) => guard.verifier.authenticate(
            parts.method.as_str(),
            &path,
            crate::auth::Covered {
                budget_ms,
                request_id,
            },
            header,
            &bytes,
        ),
    };
    // Who signed the request gets an answer proven with the same key, over its nonce.
    let signer = match (&result, header.and_then(|h| crate::auth::parse(h).ok())) {
        (Ok(key), Some(sig)) => Some(Authenticated {
            key: key.clone(),
            nonce: sig.nonce.to_string(),
        }),
        _ => None,
    };
    let proof = signer.as_ref().filter(|_| guard.proves_answers);
    let mut lost = None;
    // A signed status read is not work on the node: only its refusals go to the audit log, or
    // every `infer` would write one more record for its health check, and every `hive status`
    // one more synced write per node.
    let audited = !(status_read && result.is_ok());
    if let Some(audit) = guard.audit.as_ref().filter(|_| audited) {
        // Nothing here is authenticated yet (and the request id header never is): what goes in
        // the record is capped, so no request can make a record of any size.
        let untrusted = |text: &str| crate::audit::bounded(text, crate::audit::UNTRUSTED_BYTES);
        let request_id = parts
            .headers
            .get(crate::protocol::REQUEST_ID_HEADER)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
        let kid = header
            .and_then(|h| crate::auth::parse(h).ok())
            .map(|s| untrusted(s.kid));
        let (event, fields) = match &result {
            Ok(key) => (
                "auth_success",
                serde_json::json!({ "kid": key.fingerprint(), "peer": peer, "path": untrusted(&path) }),
            ),
            Err(reject) => (
                "auth_failure",
                serde_json::json!({
                    "kid": kid,
                    "peer": peer,
                    "path": untrusted(&path),
                    "reason": reject.class(),
                }),
            ),
        };
        if result.is_ok() {
            // What an authenticated request goes on to do is work the node must record.
            match audit.record_work(event, request_id, fields).await {
                Ok(crate::audit::Recorded::Kept(_)) => {}
                Ok(crate::audit::Recorded::Lost(why)) => lost = Some(LostRecord(why)),
                Err(err) => {
                    let status = crate::server::status_for(err.kind());
                    return proven(proof, (status, Json(ErrorBody::from(&err))).into_response())
                        .await;
                }
            }
        } else if let Err(reject) = &result {
            let left_out = guard
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(&source, reject.class());
            if let Some(left_out) = left_out {
                let mut fields = fields;
                fields["refused_since_last_record"] = serde_json::json!(left_out);
                audit.note(event, request_id, fields).await;
            }
        }
    }
    match (result, signer.clone()) {
        (Ok(key), Some(signer)) => {
            tracing::debug!(kid = %key.fingerprint(), peer = %peer, path = %path, "request authenticated");
            let mut request =
                axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            if let Some(lost) = lost {
                request.extensions_mut().insert(lost);
            }
            let proof = proof.cloned();
            request.extensions_mut().insert(signer);
            proven(proof.as_ref(), next.run(request).await).await
        }
        (Ok(_), None) => {
            // A request that verified has a header that parses: this cannot be reached.
            let err = Error::internal("an authenticated request without its signature");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ErrorBody::from(&err)),
            )
                .into_response()
        }
        (Err(reject), _) => {
            // The path is the stranger's: capped as in the audit record.
            let path = crate::audit::bounded(&path, crate::audit::UNTRUSTED_BYTES);
            tracing::warn!(peer = %peer, path = %path, reason = reject.class(), "request rejected");
            let err = Error::of_kind(
                ExitKind::Unauthenticated,
                format!("{} ({})", reject.explain(), reject.class()),
            );
            (StatusCode::UNAUTHORIZED, Json(ErrorBody::from(&err))).into_response()
        }
    }
}
