//! One module per subcommand; each takes the parsed arguments and the shared context.

pub(crate) mod audit;
pub(crate) mod fleet;
pub(crate) mod hive;
pub(crate) mod infer;
pub(crate) mod models;
pub(crate) mod nodes;
pub(crate) mod worker;

use std::path::PathBuf;

use crate::config::{Config, Node};
use crate::deadline::Budget;
use crate::error::{Error, Result, SshError};
use crate::output::Output;
use crate::queen::node::{ConnectOptions, NodeConn};

/// Nodes handled at once by commands over several nodes.
pub(crate) const PARALLEL_NODES: usize = 8;

/// What every command gets: the global options.
pub(crate) struct Context {
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) out: Output,
    pub(crate) connect: ConnectOptions,
}

impl Context {
    pub(crate) fn config(&self) -> Result<Config> {
        Config::discover(self.config_path.as_deref())
    }

    /// The nodes named on the command line, or all with `--all` (or none named).
    pub(crate) fn selected_nodes(&self, sel: &crate::cli::NodeSelection) -> Result<Vec<Node>> {
        let config = self.config()?;
        let nodes = config.select_nodes(&sel.nodes, sel.all)?;
        Ok(nodes.into_iter().cloned().collect())
    }

    pub(crate) async fn open(&self, node: &Node, budget: &Budget) -> Result<NodeConn> {
        let result = NodeConn::open(node, budget, self.connect).await;
        match &result {
            Ok(conn) => {
                if let Some(fingerprint) = conn.accepted_host_key() {
                    self.audit_note(
                        "host_key_accepted",
                        None,
                        serde_json::json!({ "node": node.name, "fingerprint": fingerprint }),
                    );
                }
            }
            Err(Error::Ssh(refused)) => {
                if let Some(fields) = host_key_refused(&node.name, refused) {
                    self.audit_note("host_key_refused", None, fields);
                }
            }
            Err(_) => {}
        }
        result
    }

    /// This machine's audit log.
    pub(crate) fn audit(&self) -> crate::audit::Audit {
        crate::audit::Audit::new(crate::paths::state_dir().join(crate::audit::FILE), "queen")
    }

    /// Records an event; a failure to record is reported on stderr, the command goes on.
    pub(crate) fn audit_note(
        &self,
        event: &str,
        request_id: Option<&str>,
        fields: serde_json::Value,
    ) -> Option<crate::audit::Head> {
        match self.audit().record(event, request_id, fields) {
            Ok(head) => Some(head),
            Err(e) => {
                eprintln!("rbee: warning: {e}");
                None
            }
        }
    }
}

/// The audit fields of a refused host key: the node, and the fingerprints it presented and (for
/// a changed key) the one known_hosts holds.
fn host_key_refused(node: &str, err: &SshError) -> Option<serde_json::Value> {
    let fields = match err {
        SshError::HostKeyUnknown { fingerprint, .. } => serde_json::json!({
            "node": node,
            "cause": "unknown",
            "fingerprint": fingerprint,
            "reason": err.to_string(),
        }),
        SshError::HostKeyChanged {
            fingerprint,
            known,
            line,
            ..
        } => serde_json::json!({
            "node": node,
            "cause": "changed",
            "fingerprint": fingerprint,
            "known_fingerprint": known,
            "known_hosts_line": line,
            "reason": err.to_string(),
        }),
        _ => return None,
    };
    Some(fields)
}
