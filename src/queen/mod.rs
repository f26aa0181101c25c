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

/// Records an event in this machine's audit log; a failure to record is reported on stderr and
/// the command goes on.
pub(crate) fn audit_note(
    event: &str,
    request_id: Option<&str>,
    fields: serde_json::Value,
) -> Option<crate::audit::Head> {
    match audit().record(event, request_id, fields) {
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
