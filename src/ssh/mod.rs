//! SSH to nodes through russh: connection and authentication, known_hosts, `~/.ssh/config`
//! aliases and what rbee does with each of its directives (`directives`), quoting, every command string run on a node (`remote`), and the background process
//! that keeps a node's connection for later invocations (`mux`).

mod algorithms;
mod auth;
pub(crate) mod config;
mod directives;
mod error;
mod forward;
mod host_cert;
mod known_hosts;
pub(crate) mod mux;
mod quick_ack;
pub(crate) mod quote;
pub(crate) mod remote;
pub(crate) mod session;

pub use error::SshError;
pub(crate) use forward::Forward;
pub(crate) use known_hosts::HostKey;
pub(crate) use session::{Session, Target};
