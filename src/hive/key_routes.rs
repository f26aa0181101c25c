//! The hive's endpoints for its signing keys: rotation (`reload`, `retire`), and the keys of
//! the controlling machines: the list, approving a key that asked to be enrolled, revoking one.
//! Every change is checked, then recorded with the key that asked for it (`by`), then made: a
//! change the node refuses is never recorded as made, and one it cannot record is not made.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};

use crate::auth::layer::Authenticated;
use crate::error::{Error, Result};
use crate::hive::routes::Hive;
use crate::protocol::KeyList;
use crate::server::ApiError;

/// The body of a request naming one key.
#[derive(Debug, serde::Deserialize)]
struct KeyId {
    kid: String,
}

fn key_id(body: &[u8]) -> Result<Option<String>> {
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice::<KeyId>(body)
        .map(|k| Some(k.kid))
        .map_err(|e| Error::invalid(format!("the body must be {{\"kid\": KEY_ID}}: {e}")))
}

async fn record(hive: &Hive, event: &'static str, kid: &str, by: &Authenticated) -> Result<()> {
    hive.audit
        .record_work(
            event,
            None,
            serde_json::json!({ "kid": kid, "by": by.kid() }),
        )
        .await
        .map(|_| ())
}

/// Key rotation, step one: accept the node's next key (`hive.key.next`, or a new key in
/// `keys/`) beside the current ones.
pub(crate) async fn reload(
    State(hive): State<Arc<Hive>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = hive.keys.reload()?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
}

/// Key rotation, step two: with no body the next key becomes `hive.key`; with `{"kid"}` that
/// enrolled key is retired (its machine switched to a new one). The old key is accepted a
/// little longer, for requests signed just before the switch.
pub(crate) async fn retire(
    State(hive): State<Arc<Hive>>,
    Extension(by): Extension<Authenticated>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kid = key_id(&body)?;
    let keys = changed(hive, move |hive| async move {
        let _changing = hive.keys.changing().await;
        match kid {
            Some(kid) => {
                let checked = hive.keys.retire_kid_check(&kid)?;
                record(&hive, "key_retired", &kid, &by).await?;
                hive.keys.retire_checked(checked)
            }
            None => hive.keys.retire(),
        }
    })
    .await?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
}

/// Runs a change to the keys as a task of its own: once its record is written the change is
/// made, even when the client that asked has gone (a dropped handler would stop between the
/// two).
async fn changed<F, Fut>(hive: Arc<Hive>, change: F) -> Result<Vec<String>>
where
    F: FnOnce(Arc<Hive>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>>> + Send + 'static,
{
    tokio::spawn(change(hive))
        .await
        .map_err(|e| Error::internal(format!("the key change failed: {e}")))?
}

pub(crate) async fn list(State(hive): State<Arc<Hive>>) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(hive.keys.list()?))
}

pub(crate) async fn approve(
    State(hive): State<Arc<Hive>>,
    Extension(by): Extension<Authenticated>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kid = key_id(&body)?.ok_or_else(|| Error::invalid("name the key: {\"kid\": KEY_ID}"))?;
    let keys = changed(hive, move |hive| async move {
        let _changing = hive.keys.changing().await;
        let Some(pending) = hive.keys.approve_check(&kid)? else {
            // Enrolled already: nothing changes, nothing to record.
            return Ok(hive.keys.verifier().fingerprints());
        };
        record(&hive, "key_enrolled", &kid, &by).await?;
        let keys = hive.keys.approve_checked(&kid, &pending)?;
        tracing::info!(kid = %kid, by = %by.kid(), "key enrolled");
        Ok(keys)
    })
    .await?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
}

pub(crate) async fn revoke(
    State(hive): State<Arc<Hive>>,
    Extension(by): Extension<Authenticated>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kid = key_id(&body)?.ok_or_else(|| Error::invalid("name the key: {\"kid\": KEY_ID}"))?;
    let keys = changed(hive, move |hive| async move {
        let _changing = hive.keys.changing().await;
        let checked = hive.keys.revoke_check(&kid)?;
        record(&hive, "key_revoked", &kid, &by).await?;
        let keys = hive.keys.revoke_checked(&kid, checked)?;
        tracing::info!(kid = %kid, by = %by.kid(), "key revoked");
        Ok(keys)
    })
    .await?;
    Ok(Json(serde_json::json!({ "accepted": keys })))
}
