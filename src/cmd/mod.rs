//! One module per subcommand; each takes the parsed arguments and the shared context.

pub(crate) mod audit;
pub(crate) mod batch;
pub(crate) mod completions;
pub(crate) mod fleet;
pub(crate) mod hive;
pub(crate) mod infer;
pub(crate) mod logs;
pub(crate) mod models;
pub(crate) mod node_keys;
pub(crate) mod nodes;
pub(crate) mod serve;
pub(crate) mod version;
pub(crate) mod worker;

use std::path::PathBuf;

use crate::config::{Config, Node};
use crate::deadline::Budget;
use crate::error::Result;
use crate::output::Output;
use crate::progress::Progress;
use crate::queen::node::{ConnectOptions, NodeConn};

/// Nodes handled at once by commands over several nodes.
pub(crate) const PARALLEL_NODES: usize = 8;

/// What every command gets: the global options.
pub(crate) struct Context {
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) out: Output,
    pub(crate) progress: Progress,
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

    /// How this command runs requests on nodes: its connect options and spinners.
    pub(crate) fn runner(&self, config: &Config) -> crate::queen::generate::Runner {
        crate::queen::generate::Runner {
            connect: self.connect,
            models: std::sync::Arc::new(config.models.clone()),
            progress: self.progress.clone(),
            note_start: std::io::IsTerminal::is_terminal(&std::io::stderr()) && !self.out.quiet,
        }
    }

    pub(crate) async fn open(&self, node: &Node, budget: &Budget) -> Result<NodeConn> {
        NodeConn::open(node, budget, self.connect).await
    }

    /// This machine's audit log.
    pub(crate) fn audit(&self) -> crate::audit::Audit {
        crate::queen::audit()
    }

    /// Records an event; a failure to record is reported on stderr, the command goes on.
    pub(crate) fn audit_note(
        &self,
        event: &str,
        request_id: Option<&str>,
        fields: serde_json::Value,
    ) -> Option<crate::audit::Head> {
        crate::queen::audit_note(event, request_id, fields)
    }
}
