//! What can go wrong reaching a node over SSH. Each names the node and `user@host:port`
//! (`target`), and callers decide by variant: a changed host key is audited, an authentication
//! refusal means the node is reachable.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum SshError {
    #[error(
        "host key of {target} is not known: {fingerprint}. If that is the \
         node's key, record it with `rbee nodes trust {node}` (or add --accept-new-host-key); \
         it goes to `{}`", known_hosts.display()
    )]
    HostKeyUnknown {
        target: String,
        node: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "HOST KEY CHANGED for {target}: it now presents {fingerprint}, but \
         `{}` line {line} holds {holds}{}. Someone may be intercepting the connection; if \
         the key changed on purpose, delete that line and trust the node again",
        known_hosts.display(),
        known.as_ref().map(|k| format!(" ({k})")).unwrap_or_default()
    )]
    HostKeyChanged {
        target: String,
        node: String,
        fingerprint: String,
        /// The fingerprint of the key known_hosts holds, where it could be read back.
        known: Option<String>,
        known_hosts: PathBuf,
        line: usize,
        /// What that line holds: another key of the type presented, or a key of another type.
        holds: String,
    },
    #[error("cannot check the host key of {target}: {why}")]
    HostKeyUnchecked { target: String, why: String },
    #[error("ssh to {target}: authentication as `{user}` was refused; {tried}")]
    AuthRefused {
        target: String,
        user: String,
        tried: String,
    },
    /// A first factor was accepted (partial success) and the node asks for another that rbee
    /// cannot give (a password, a one-time code).
    #[error(
        "ssh to {target}: the node accepted {accepted} for `{user}` but asks for a second \
         factor ({remaining}), which rbee cannot give: it logs in with keys only. Let this \
         machine's key log in alone (sshd's `AuthenticationMethods` for this user, e.g. in a \
         `Match` block), or reach the node through a connection that has done the second factor"
    )]
    SecondFactor {
        target: String,
        user: String,
        accepted: String,
        remaining: String,
    },
    /// No TCP connection: refused, no route, name not resolved.
    #[error("ssh to {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error("ssh to {target}: no answer within {secs}s")]
    Timeout { target: String, secs: u64 },
    /// The connection or a channel on it failed after the TCP connection was made.
    #[error("ssh to {target}: {detail}")]
    Protocol { target: String, detail: String },
    /// The connection ended while in use: the link died, or the node closed it.
    #[error("ssh to {target}: the connection was lost ({keepalive}, or the node closed it)")]
    Lost { target: String, keepalive: String },
    /// The login shell on the node did not run `sh` (a nologin shell, a shell that fails).
    #[error(
        "ssh to {target}: the login shell did not run the command (exit {code}): {said}; \
         the node's user needs a shell that runs `sh -c`"
    )]
    Shell {
        target: String,
        code: String,
        said: String,
    },
    /// A remote command exited non-zero.
    #[error("ssh to {target}: {what} failed (exit {code}): {stderr}")]
    Command {
        target: String,
        what: String,
        code: String,
        stderr: String,
    },
}

impl SshError {
    /// Whether the node answered on its SSH port (so the failure is not the network's).
    pub(crate) fn reached(&self) -> bool {
        !matches!(
            self,
            SshError::Unreachable { .. } | SshError::Timeout { .. }
        )
    }
}
