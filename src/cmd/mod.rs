//! One module per subcommand; each takes the parsed arguments and the shared context.

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

/// Nodes handled at once by commands over several nodes.
pub const PARALLEL_NODES: usize = 8;

/// What every command gets: the global options.
pub struct Context {
    pub config_path: Option<PathBuf>,
    pub out: Output,
    pub connect: ConnectOptions,
}

impl Context {
    pub fn config(&self) -> Result<Config> {
        Config::discover(self.config_path.as_deref())
    }

    pub async fn open(&self, node: &Node, budget: &Budget) -> Result<NodeConn> {
        NodeConn::open(node, budget, self.connect).await
    }
}
