//! This machine's side of the audit trail around one request: its id among the queen heads the
//! nodes keep, and what an invocation does with a record that one end could not keep
//! (`audit = "required"`: exit 10; `"best-effort"`: a warning on stderr each time).

use crate::config::{AuditPolicy, Node};
use crate::error::{Error, Result};
use crate::protocol::{DoneEvent, InferRequest};

/// This machine's log among those the nodes witness: a digest of the host name and the log's
/// path, so that it stays the same when the log itself is deleted, and tells apart the queens
/// (other machines, other state directories) that share a node.
pub(crate) fn audit_id() -> String {
    use sha2::Digest;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let path = super::audit().path;
    let dir = path
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .unwrap_or_else(|| path.clone());
    let digest = sha2::Sha256::digest(format!("{}\n{}", host.trim(), dir.display()).as_bytes());
    hex::encode(&digest[..8])
}

/// Records `infer_requested` for `request` (its prompt and system prompt by digest only, with
/// `extra` fields beside them), and puts the record's head in the request for the node to
/// witness. A record that cannot be written stops the request under `node`'s `required`.
pub(crate) fn record_request(
    audit: &crate::audit::Audit,
    request: &mut InferRequest,
    node: &Node,
    budget: &crate::deadline::Budget,
    extra: serde_json::Value,
) -> Result<()> {
    let mut fields = serde_json::json!({
        "node": node.name,
        "model": request.model,
        "prompt": crate::audit::digest(&request.prompt),
        "system": request.system.as_deref().map(crate::audit::digest),
        "max_tokens": request.params.max_tokens,
        "timeout_ms": u64::try_from(budget.total().as_millis()).unwrap_or(u64::MAX),
    });
    if let (Some(fields), serde_json::Value::Object(extra)) = (fields.as_object_mut(), extra) {
        fields.extend(extra);
    }
    // Another process holding the log's lock (a stuck rbee, a hung disk) must not hold the
    // invocation past its deadline.
    let audit = audit.clone().until(budget.deadline());
    match super::may_block(|| audit.record("infer_requested", Some(&request.request_id), fields)) {
        Ok(head) => {
            request.queen_audit = Some(crate::audit::QueenHead {
                queen: audit_id(),
                seq: head.seq,
                hash: head.hash,
            });
            Ok(())
        }
        // Only the wait for the lock is bounded by the deadline; any other failure to write is
        // the log's, and weighed by the node's policy.
        Err(Error::Deadline(e)) => Err(Error::deadline(format!(
            "the budget of {} ran out before this machine's audit trail could record the \
             request, so it was not sent: {e}",
            humantime::format_duration(budget.total())
        ))),
        Err(e) => unrecorded_request(node, &e),
    }
}

/// The fields of `infer_completed` every face records for a request that ran on `node`
/// (how it ended, its token counts and the node's head from its done event), with `extra`
/// fields of the face's own beside them.
pub(crate) fn completed_fields(
    node: &Node,
    model: &str,
    outcome: &Result<()>,
    done: Option<&DoneEvent>,
    budget: &crate::deadline::Budget,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut fields = serde_json::json!({
        "node": node.name,
        "model": model,
        "exit_code": outcome.as_ref().err().map_or(0, Error::code),
        "stop_reason": done.map(|d| d.stop_reason),
        "tokens_in": done.map(|d| d.tokens_in),
        "tokens_out": done.map(|d| d.tokens_out),
        "duration_ms": u64::try_from(budget.elapsed().as_millis()).unwrap_or(u64::MAX),
        "node_audit": done.and_then(|d| d.node_audit.clone()),
    });
    if let (Some(fields), serde_json::Value::Object(extra)) = (fields.as_object_mut(), extra) {
        fields.extend(extra);
    }
    fields
}

/// `infer_requested` could not be written: the request is not sent (`required`), or it goes
/// out with a warning.
pub(crate) fn unrecorded_request(node: &Node, e: &Error) -> Result<()> {
    match node.audit {
        AuditPolicy::Required => Err(Error::Audit(format!(
            "this machine cannot record the request in its audit trail, so it was not sent: \
             {e}; make the log writable, or set `audit = \"best-effort\"` for node `{}` to go \
             on without it",
            node.name
        ))),
        AuditPolicy::BestEffort => {
            warn_unrecorded("this machine", &e.to_string(), node.audit);
            Ok(())
        }
    }
}

/// The outcome once what each end could not record is weighed: under `required` a generation
/// whose end is not on record, here or on the node, is not a success (exit 10); under
/// `best-effort` each loss is a warning.
pub(crate) fn audited(
    node: &Node,
    outcome: Result<()>,
    done: Option<&DoneEvent>,
    completed: Option<Error>,
) -> Result<()> {
    let mut outcome = outcome;
    if let Some(why) = done.and_then(|d| d.audit_warning.as_deref()) {
        match node.audit {
            AuditPolicy::BestEffort => {
                warn_unrecorded(&format!("node `{}`", node.name), why, node.audit);
            }
            // The hive runs with a `best-effort` it was started with; this machine's setting
            // for the node is the stricter one.
            AuditPolicy::Required if outcome.is_ok() => {
                outcome = Err(Error::Audit(format!(
                    "node `{}` served the request without recording it in its audit trail \
                     ({why}); it is `audit = \"required\"` here, a setting its hive takes when \
                     it next starts (`rbee hive stop {}`)",
                    node.name, node.name
                )));
            }
            AuditPolicy::Required => {
                warn_unrecorded(&format!("node `{}`", node.name), why, node.audit);
            }
        }
    }
    if let Some(e) = completed {
        match node.audit {
            AuditPolicy::Required if outcome.is_ok() => {
                // A lock wait that reached its bound: the log is writable, another process
                // held it (stuck, or on a very slow disk).
                let fix = match e {
                    Error::Deadline(_) => "see which process holds the log's lock",
                    _ => "make the log writable",
                };
                outcome = Err(Error::Audit(format!(
                    "the request ran on `{}`, but this machine cannot record its end in its \
                     audit trail: {e}; {fix}, or set `audit = \"best-effort\"` for the node to \
                     go on without it",
                    node.name
                )));
            }
            _ => warn_unrecorded("this machine", &e.to_string(), node.audit),
        }
    }
    outcome
}

/// The warning of an invocation whose records were lost: on every `best-effort` one, and on a
/// `required` one that failed anyway (its exit code is the failure's).
fn warn_unrecorded(who: &str, why: &str, policy: AuditPolicy) {
    match policy {
        AuditPolicy::BestEffort => eprintln!(
            "rbee: warning: {who} could not record this request in its audit trail (audit = \"best-effort\"): {why}"
        ),
        AuditPolicy::Required => eprintln!(
            "rbee: warning: {who} could not record this request in its audit trail: {why}"
        ),
    }
}
