//! The queen's HTTP client for one node's hive, over a Unix socket (the hive's own, or the local
//! end of an SSH forward) or, for `transport = "http"`, TCP. Every request goes through
//! `request()`, the one place where the signature is applied, and every answer is taken only
//! once it proved to be the node's (`auth::proof`): a JSON answer by its signature header, a
//! stream by each event's signature, checked in the stream reader before the event is given
//! to the caller. An answer that does not verify is `Error::Unauthenticated` (exit 5).

use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::auth::Covered;
use crate::auth::Key;
use crate::auth::proof::{Body, RESPONSE_HEADER, Unproven, verify_response};
use crate::deadline::{BUDGET_HEADER, Budget};
use crate::error::{Error, Result};
use crate::protocol::error_from_body;
use crate::protocol::{HiveHealth, InferRequest, REQUEST_ID_HEADER, RequestInfo, WorkerInfo};

pub(crate) struct HiveClient {
    pub(crate) node: String,
    /// The URL requests go to; over a socket its host is a name only.
    base: String,
    /// Where the hive is reached, for messages: a socket path, or `host:port`.
    place: String,
    http: reqwest::Client,
    key: Key,
}

impl HiveClient {
    /// A client for the hive of `node` behind the Unix socket at `socket`.
    pub(crate) fn unix(node: &str, socket: &std::path::Path, key: Key) -> Result<HiveClient> {
        Self::unix_at(node, socket, socket.display().to_string(), key)
    }

    /// The same, where messages name the hive's place as `place` (the local end of a forward
    /// says nothing to a user).
    pub(crate) fn unix_at(
        node: &str,
        socket: &std::path::Path,
        place: String,
        key: Key,
    ) -> Result<HiveClient> {
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(HiveClient {
            node: node.to_string(),
            base: "http://hive".to_string(),
            place,
            http,
            key,
        })
    }

    /// Names the hive's place anew (a forward that now leads elsewhere).
    pub(crate) fn set_place(&mut self, place: String) {
        self.place = place;
    }

    /// A client for the hive of `node` at `host:port` (`transport = "http"`).
    pub(crate) fn tcp(node: &str, host: &str, port: u16, key: Key) -> Result<HiveClient> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Ok(HiveClient {
            node: node.to_string(),
            base: format!("http://{host}:{port}"),
            place: format!("{host}:{port}"),
            http,
            key,
        })
    }

    /// Every request to the hive is built here, signed over its method, path, body and the
    /// headers it carries in `covered`; with it comes the nonce its answer is proven over.
    fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (reqwest::RequestBuilder, String) {
        self.request_covering(method, path, Covered::default(), body)
    }

    fn request_covering(
        &self,
        method: Method,
        path: &str,
        covered: Covered<'_>,
        body: Vec<u8>,
    ) -> (reqwest::RequestBuilder, String) {
        let (signature, nonce) =
            crate::auth::sign_nonced(&self.key, method.as_str(), path, covered, &body);
        let mut builder = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(crate::auth::SIGNATURE_HEADER, signature);
        if !covered.budget_ms.is_empty() {
            builder = builder.header(BUDGET_HEADER, covered.budget_ms);
        }
        if !covered.request_id.is_empty() {
            builder = builder.header(REQUEST_ID_HEADER, covered.request_id);
        }
        let builder = if body.is_empty() {
            builder
        } else {
            builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
        };
        (builder, nonce)
    }

    /// Why the answer is not taken, as the error the caller gets.
    fn unproven(&self, why: Unproven) -> Error {
        Error::Unauthenticated(format!(
            "the answer from `{}` ({}) did not verify as the node's: {}; it was not used \
             (something else may answer at the hive's address)",
            self.node,
            self.place,
            why.explain()
        ))
    }

    /// Why a whole answer is not taken. A hive of a protocol from before answers were signed
    /// says so in its health: the way out is to stop it, which goes through its pidfile, never
    /// through what it says; nothing it said is acted on here.
    fn unproven_answer(&self, why: Unproven, body: &[u8]) -> Error {
        match serde_json::from_slice::<HiveHealth>(body) {
            // A hive left running from before an upgrade, with the command that replaces it;
            // nothing it said is used. Still exit 5: what answers may not be the node's.
            Ok(old) if old.protocol < crate::protocol::PROTOCOL_VERSION => {
                Error::Unauthenticated(format!(
                    "the hive answering for `{0}` ({1}) says it is rbee {2} (protocol {3}), older \
                     than this rbee {4} (protocol {5}), and does not sign its answers the way \
                     this rbee checks them, so it cannot prove it is the node's and nothing it \
                     said was used; if it is the node's own older hive, `rbee hive stop {0}` \
                     stops it (through its pidfile) and the next command starts this version",
                    self.node,
                    self.place,
                    old.version,
                    old.protocol,
                    crate::protocol::own_version(),
                    crate::protocol::PROTOCOL_VERSION
                ))
            }
            _ => self.unproven(why),
        }
    }

    /// Checks that a whole answer is the node's own, over the request's nonce; its body on
    /// success. A refusal (401) needs no proof: it fails the request either way, and its
    /// message says why.
    async fn proven(&self, response: reqwest::Response, nonce: &str) -> Result<axum::body::Bytes> {
        let status = response.status();
        let header = response
            .headers()
            .get(RESPONSE_HEADER)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(|e| self.unreachable(e))?;
        if status != reqwest::StatusCode::UNAUTHORIZED {
            verify_response(
                &self.key,
                nonce,
                status.as_u16(),
                Body::Whole(&body),
                header.as_deref(),
            )
            .map_err(|why| self.unproven_answer(why, &body))?;
        }
        if !status.is_success() {
            return Err(error_from_body(
                status,
                &body,
                &format!("hive on `{}`", self.node),
            ));
        }
        Ok(body)
    }

    /// A bodiless request whose answer is JSON.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        timeout: Duration,
    ) -> Result<T> {
        let (request, nonce) = self.request(method, path, Vec::new());
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.json(response, &nonce).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
        nonce: &str,
    ) -> Result<T> {
        let body = self.proven(response, nonce).await?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::hive(format!(
                "hive on `{}` ({}) sent an unreadable answer: {e}",
                self.node, self.place
            ))
        })
    }

    fn unreachable(&self, err: reqwest::Error) -> Error {
        if err.is_timeout() {
            Error::hive(format!(
                "hive on `{}` ({}) did not answer in time",
                self.node, self.place
            ))
        } else {
            Error::hive(format!(
                "hive on `{}` is not reachable at {}: {}",
                self.node,
                self.place,
                crate::error::root_cause(&err)
            ))
        }
    }

    /// `GET /health`, telling the hive's refusal of this machine's signature (401) from every
    /// other failure (no answer, an answer that does not verify).
    pub(crate) async fn health_or_refusal(&self, timeout: Duration) -> Result<Health> {
        let (request, nonce) = self.request(Method::GET, "/health", Vec::new());
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let refused = response.status() == reqwest::StatusCode::UNAUTHORIZED;
        match self.json(response, &nonce).await {
            Ok(health) => Ok(Health::Answered(health)),
            Err(e) if refused => Ok(Health::Refused(e)),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn workers(&self, timeout: Duration) -> Result<Vec<WorkerInfo>> {
        self.call(Method::GET, "/v1/workers", timeout).await
    }

    pub(crate) async fn requests(&self, timeout: Duration) -> Result<Vec<RequestInfo>> {
        self.call(Method::GET, "/v1/requests", timeout).await
    }

    /// Cancels the request `id` in flight on the node (`POST /v1/requests/{id}/cancel`).
    pub(crate) async fn cancel_request(&self, id: &str, timeout: Duration) -> Result<RequestInfo> {
        self.call(Method::POST, &format!("/v1/requests/{id}/cancel"), timeout)
            .await
    }

    /// Removes a model's file from the node (`DELETE /v1/models/{model}`).
    pub(crate) async fn remove_model(
        &self,
        model: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        self.call(Method::DELETE, &format!("/v1/models/{model}"), timeout)
            .await
    }

    pub(crate) async fn stop_worker(&self, model: &str, timeout: Duration) -> Result<bool> {
        let body: serde_json::Value = self
            .call(Method::DELETE, &format!("/v1/workers/{model}"), timeout)
            .await?;
        Ok(body.get("stopped").and_then(serde_json::Value::as_bool) == Some(true))
    }

    pub(crate) async fn restart_worker(
        &self,
        model: &str,
        timeout: Duration,
    ) -> Result<WorkerInfo> {
        let (request, nonce) = self.request(
            Method::POST,
            &format!("/v1/workers/{model}/restart"),
            Vec::new(),
        );
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.json(response, &nonce).await
    }

    /// Loads a model's worker now (`POST /v1/workers/{model}/load`), waiting for it within
    /// `budget`; the load goes on on the node if the budget runs out first.
    pub(crate) async fn load_worker(&self, model: &str, budget: &Budget) -> Result<WorkerInfo> {
        let budget_ms = budget.header_value();
        let covered = Covered {
            budget_ms: &budget_ms,
            request_id: "",
        };
        let (request, nonce) = self.request_covering(
            Method::POST,
            &format!("/v1/workers/{model}/load"),
            covered,
            Vec::new(),
        );
        let response = request
            .timeout(budget.remaining())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.json(response, &nonce).await
    }

    /// The node's log lines (`GET /v1/logs`): the hive's, or `model`'s worker's; the body is an
    /// event stream whose every event is checked as the node's (see `infer`).
    pub(crate) async fn logs(
        &self,
        lines: usize,
        follow: bool,
        model: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut path = format!("/v1/logs?n={lines}");
        if follow {
            path.push_str("&follow=true");
        }
        if let Some(model) = model {
            // Model names are checked names (letters, digits, `-`, `_`, `.`): nothing to escape.
            path.push_str(&format!("&model={model}"));
        }
        let (request, nonce) = self.request(Method::GET, &path, Vec::new());
        self.stream(request, &nonce).await
    }

    /// Key rotation: `reload` (accept the next key too) or `retire` (switch to it).
    pub(crate) async fn keys(&self, step: &str, timeout: Duration) -> Result<()> {
        let _: serde_json::Value = self
            .call(Method::POST, &format!("/v1/keys/{step}"), timeout)
            .await?;
        Ok(())
    }

    /// The node's enrolled keys and those waiting for approval.
    pub(crate) async fn key_list(&self, timeout: Duration) -> Result<crate::protocol::KeyList> {
        self.call(Method::GET, "/v1/keys", timeout).await
    }

    /// A change to one key: `enroll` (approve a waiting key), `revoke`, or `retire` (end it
    /// after the rotation grace); the key ids the node accepts afterwards.
    pub(crate) async fn key_change(
        &self,
        step: &str,
        kid: &str,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let body = serde_json::to_vec(&serde_json::json!({ "kid": kid }))
            .map_err(|e| Error::internal(format!("cannot encode the key id: {e}")))?;
        let (request, nonce) = self.request(Method::POST, &format!("/v1/keys/{step}"), body);
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let body: serde_json::Value = self.json(response, &nonce).await?;
        Ok(body
            .get("accepted")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Asks the hive to stop by a signed request; its pid, as the hive that took the request
    /// says.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> Result<Option<i32>> {
        let body: serde_json::Value = self.call(Method::POST, "/v1/shutdown", timeout).await?;
        Ok(body
            .get("pid")
            .and_then(serde_json::Value::as_i64)
            .and_then(|p| i32::try_from(p).ok()))
    }

    /// Sends the node's models (`PUT /v1/models`): they replace the hive's table.
    pub(crate) async fn update_models(
        &self,
        models: &crate::protocol::ModelTable,
        timeout: Duration,
    ) -> Result<()> {
        let body = serde_json::to_vec(models)
            .map_err(|e| Error::internal(format!("cannot encode the models: {e}")))?;
        let (request, nonce) = self.request(Method::PUT, "/v1/models", body);
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let _: serde_json::Value = self.json(response, &nonce).await?;
        Ok(())
    }

    /// Runs `op`; when the hive answers that it does not serve the model as the queen means it
    /// (`Error::ModelSpec`: a hive started by another queen, or nodes.toml changed since), sends
    /// it the node's models and runs `op` once more, within the same budget. What `infer`,
    /// `batch` and `worker restart` share.
    pub(crate) async fn with_models<T, F, Fut>(
        &self,
        models: &crate::protocol::ModelTable,
        budget: &Budget,
        op: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match op().await {
            Err(Error::ModelSpec(why)) => {
                tracing::info!(node = %self.node, "sending the node's models: {why}");
                self.update_models(models, budget.remaining()).await?;
                op().await
            }
            other => other,
        }
    }

    /// Starts a generation; the response body is the event stream. The answer is the node's
    /// (its signature header verified), and `protocol::sse::events` checks every event of it
    /// before yielding it: an event that does not verify ends the stream with
    /// `Error::Unauthenticated`.
    pub(crate) async fn infer(
        &self,
        request: &InferRequest,
        budget: &Budget,
    ) -> Result<reqwest::Response> {
        let body = serde_json::to_vec(request)
            .map_err(|e| Error::internal(format!("cannot encode the request: {e}")))?;
        let budget_ms = budget.header_value();
        let covered = Covered {
            budget_ms: &budget_ms,
            request_id: &request.request_id,
        };
        let (request, nonce) = self.request_covering(Method::POST, "/v1/infer", covered, body);
        self.stream(request, &nonce).await
    }

    /// Asks the hive to download `model`'s file on the node (`POST /v1/models/{model}/pull`);
    /// the response body is the event stream of its progress, every event checked as for
    /// `infer`. The download has no deadline of its own: it ends when the file is there.
    pub(crate) async fn pull(
        &self,
        model: &str,
        request: &crate::protocol::pull::PullRequest,
    ) -> Result<reqwest::Response> {
        let body = serde_json::to_vec(request)
            .map_err(|e| Error::internal(format!("cannot encode the request: {e}")))?;
        let (request, nonce) =
            self.request(Method::POST, &format!("/v1/models/{model}/pull"), body);
        self.stream(request, &nonce).await
    }

    /// Sends a request whose answer is an event stream: the answer's signature header is
    /// verified, and the stream carries the chain its events must follow.
    async fn stream(
        &self,
        request: reqwest::RequestBuilder,
        nonce: &str,
    ) -> Result<reqwest::Response> {
        let mut response = request.send().await.map_err(|e| self.unreachable(e))?;
        if !response.status().is_success() {
            return Err(self
                .proven(response, nonce)
                .await
                .err()
                .unwrap_or_else(|| Error::internal("a failure status read as a success")));
        }
        let header = response
            .headers()
            .get(RESPONSE_HEADER)
            .and_then(|h| h.to_str().ok());
        verify_response(
            &self.key,
            nonce,
            response.status().as_u16(),
            Body::Stream,
            header,
        )
        .map_err(|why| self.unproven(why))?;
        response
            .extensions_mut()
            .insert(crate::protocol::sse::Proven {
                chain: crate::auth::EventChain::new(&self.key, nonce),
                peer: format!("the hive on `{}` ({})", self.node, self.place),
            });
        Ok(response)
    }
}

/// What a hive's `GET /health` came to.
pub(crate) enum Health {
    Answered(HiveHealth),
    /// The hive answered 401: it does not accept this machine's signature.
    Refused(Error),
}
