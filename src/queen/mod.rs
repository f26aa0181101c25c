//! What only the CLI side does: connecting to a node, the hive client, bringing a hive up and
//! stopping it, installing the binary, keys and models.

pub(crate) mod client;
pub(crate) mod fetch;
pub(crate) mod generate;
pub(crate) mod home;
pub(crate) mod install;
pub(crate) mod lifecycle;
pub(crate) mod node;
pub(crate) mod pool;
pub(crate) mod probe;
pub(crate) mod route;
pub(crate) mod trail;

/// This machine's audit log.
pub(crate) fn audit() -> crate::audit::Audit {
    crate::audit::Audit::new(crate::paths::state_dir().join(crate::audit::FILE), "queen")
}

/// How long past now a record made within a budget may wait for the log's lock, when the
/// budget's deadline is nearer than that: a healthy writer holds the lock for one fsync'd
/// append (or, once in 64 MiB, a rotation that hashes the old file), and work that ran to its
/// deadline still gets its end recorded.
const AUDIT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// This machine's audit log, for records made within `budget` (a request's end, its attempts,
/// a host key seen while connecting): another process holding its lock (a stuck rbee, a hung
/// disk) holds the invocation no later than the budget's deadline, or `AUDIT_GRACE` past now
/// where that is later. A wait that reaches it is a record not written.
pub(crate) fn audit_within(budget: &crate::deadline::Budget) -> crate::audit::Audit {
    audit().until(
        budget
            .deadline()
            .max(std::time::Instant::now() + AUDIT_GRACE),
    )
}

/// The log to record the end of a request in (`infer_completed`) that ended with `outcome`:
/// `audit_within` its budget, except for one interrupted (Ctrl-C, serve's drain cut), whose
/// invocation is stopping now: its wait is `AUDIT_GRACE` from now, whatever budget is left.
pub(crate) fn audit_end(
    budget: &crate::deadline::Budget,
    outcome: &crate::error::Result<()>,
) -> crate::audit::Audit {
    let interrupted = outcome
        .as_ref()
        .is_err_and(|e| matches!(e.kind(), crate::error::ExitKind::Interrupted));
    if interrupted {
        audit().until(std::time::Instant::now() + AUDIT_GRACE)
    } else {
        audit_within(budget)
    }
}

/// Runs `f`, which may block (a record waits for the log's lock and its fsync), called from
/// async code: on serve's multi-thread runtime its worker thread hands its other tasks to the
/// others meanwhile, so that requests waiting on a held lock cannot stall /health or the drain;
/// on a command's single thread there is nothing else to stall.
pub(crate) fn may_block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Records an event in this machine's audit log; a failure to record is reported on stderr and
/// the command goes on. A record outside any budget (a hive started, a batch finished) waits
/// for the log's lock `AUDIT_GRACE` at most: another process holding it must not keep a
/// command (a cron job's `hive start`) from ending.
pub(crate) fn audit_note(
    event: &str,
    request_id: Option<&str>,
    fields: serde_json::Value,
) -> Option<crate::audit::Head> {
    audit_note_waiting(AUDIT_GRACE, event, request_id, fields)
}

/// `audit_note` waiting at most `wait` for the log's lock.
pub(crate) fn audit_note_waiting(
    wait: std::time::Duration,
    event: &str,
    request_id: Option<&str>,
    fields: serde_json::Value,
) -> Option<crate::audit::Head> {
    note_in(
        audit().until(std::time::Instant::now() + wait),
        event,
        request_id,
        fields,
    )
}

/// `audit_note` within a budget (`audit_within`).
pub(crate) fn audit_note_within(
    budget: &crate::deadline::Budget,
    event: &str,
    request_id: Option<&str>,
    fields: serde_json::Value,
) -> Option<crate::audit::Head> {
    note_in(audit_within(budget), event, request_id, fields)
}

fn note_in(
    audit: crate::audit::Audit,
    event: &str,
    request_id: Option<&str>,
    fields: serde_json::Value,
) -> Option<crate::audit::Head> {
    match may_block(|| audit.record(event, request_id, fields)) {
        Ok(head) => Some(head),
        Err(e) => {
            eprintln!("rbee: warning: {e}");
            None
        }
    }
}

/// The models `node` serves, as nodes.toml says: what its hive is given.
pub(crate) fn node_models(
    models: &indexmap::IndexMap<String, crate::config::Model>,
    node: &crate::config::Node,
) -> crate::protocol::ModelTable {
    crate::protocol::ModelTable::of(node.models.iter().filter_map(|m| models.get(m)))
}
