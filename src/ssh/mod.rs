//! SSH to nodes through russh: connection and authentication, known_hosts, `~/.ssh/config`
//! aliases, quoting of remote commands.

pub(crate) mod config;
mod error;
pub(crate) mod quote;
pub(crate) mod session;

pub use error::SshError;
pub(crate) use session::{HostKey, Session, Target};
