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

/// Most nodes handled at once by commands over several nodes.
const MAX_PARALLEL_NODES: usize = 64;
/// File descriptors one node may take while it is handled: its SSH connection (or the
/// holder's socket), the forward's listener and a connection or two through it.
const FDS_PER_NODE: u64 = 6;

/// Nodes handled at once by commands over several nodes: as many as the file descriptor limit
/// allows (raised to the hard limit first), at most `MAX_PARALLEL_NODES`. SSH logins to one
/// sshd are paced apart from this (see `ssh::session`), so many nodes behind one sshd stay
/// under its `MaxStartups`.
pub(crate) fn parallel_nodes() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 8;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Room for what the invocation holds besides (stdio, the audit log, the runtime).
    let spare = limit.saturating_sub(64) / FDS_PER_NODE;
    usize::try_from(spare)
        .unwrap_or(MAX_PARALLEL_NODES)
        .clamp(1, MAX_PARALLEL_NODES)
}

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
