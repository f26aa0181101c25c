//! SSH to nodes through russh: connection and authentication, known_hosts, `~/.ssh/config`
//! aliases, quoting of remote commands.

pub mod config;
pub mod quote;
pub mod session;

pub use session::{Exec, HostKey, Session, Target};
