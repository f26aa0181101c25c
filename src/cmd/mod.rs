//! One module per subcommand; each takes the parsed arguments and the shared context.

pub mod audit;
pub mod fleet;
pub mod hive;
pub mod infer;
pub mod models;
pub mod nodes;
pub mod worker;

use std::path::PathBuf;

use crate::config::{Config, Node};
use crate::deadline::Budget;
use crate::error::Result;
use crate::node::{ConnectOptions, NodeConn};
use crate::output::Output;
use crate::progress::Progress;

/// Nodes handled at once by commands over several nodes.
pub const PARALLEL_NODES: usize = 8;

/// What every command gets: the global options.
pub struct Context {
    pub config_path: Option<PathBuf>,
    pub out: Output,
    pub progress: Progress,
    pub connect: ConnectOptions,
}

impl Context {
    pub fn config(&self) -> Result<Config> {
        Config::discover(self.config_path.as_deref())
    }

    /// The nodes named on the command line, or all with `--all` (or none named).
    pub fn selected_nodes(&self, sel: &crate::cli::NodeSelection) -> Result<Vec<Node>> {
        let config = self.config()?;
        let nodes = config.select_nodes(&sel.nodes, sel.all)?;
        Ok(nodes.into_iter().cloned().collect())
    }

    pub async fn open(&self, node: &Node, budget: &Budget) -> Result<NodeConn> {
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
            Err(e) if e.kind == crate::error::ExitKind::Ssh && e.message.contains("host key") => {
                self.audit_note(
                    "host_key_refused",
                    None,
                    serde_json::json!({ "node": node.name, "reason": e.message }),
                );
            }
            Err(_) => {}
        }
        result
    }

    /// This machine's audit log.
    pub fn audit(&self) -> crate::audit::Audit {
        crate::audit::Audit::new(crate::paths::state_dir().join(crate::audit::FILE), "queen")
    }

    /// Records an event; a failure to record is reported on stderr, the command goes on.
    pub fn audit_note(
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
