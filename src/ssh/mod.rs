//! SSH to nodes through russh: connection and authentication, known_hosts, `~/.ssh/config`
//! aliases, quoting, and every command string run on a node (`remote`).

mod auth;
pub(crate) mod config;
mod error;
mod forward;
mod known_hosts;
mod quick_ack;
pub(crate) mod quote;
pub(crate) mod remote;
pub(crate) mod session;

pub use error::SshError;
pub(crate) use forward::Forward;
pub(crate) use known_hosts::HostKey;
pub(crate) use session::{Session, Target};
