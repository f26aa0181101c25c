//! One module per subcommand; each takes the parsed arguments and the shared context.

pub mod hive;
pub mod infer;
pub mod nodes;
pub mod worker;

use std::path::PathBuf;

use crate::config::Config;
use crate::error::Result;
use crate::output::Output;

/// What every command gets: the global options.
pub struct Context {
    pub config_path: Option<PathBuf>,
    pub out: Output,
}

impl Context {
    pub fn config(&self) -> Result<Config> {
        Config::discover(self.config_path.as_deref())
    }
}
