//! A connection to one node as the queen needs it: an HTTP client for its hive (at its Unix
//! socket, through an SSH direct-streamlocal forward to that socket, or plain HTTP), and an SSH
//! session where one is needed to run commands there.

use std::time::{Duration, Instant};

use crate::auth::Key;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result, SshError};
use crate::queen::client::HiveClient;
use crate::queen::home;
use crate::ssh::{Forward, HostKey, Session, Target};

/// Choices that apply to every node of an invocation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectOptions {
    /// Record an unknown host key instead of refusing it (a changed key is always refused).
    pub(crate) accept_new_host_key: bool,
}

pub(crate) struct NodeConn {
    pub(crate) node: Node,
    pub(crate) client: HiveClient,
    ssh: Option<Session>,
    /// The local end of the forward to the hive's socket (`transport = "ssh"`), and the home
    /// its remote path was made with, when `remote_dir` needed one.
    forward: Option<(Forward, Option<String>)>,
    options: ConnectOptions,
    /// Time spent reaching the node (SSH connect and authentication).
    pub(crate) connect_time: Duration,
}

impl NodeConn {
    pub(crate) async fn open(
        node: &Node,
        budget: &Budget,
        options: ConnectOptions,
    ) -> Result<NodeConn> {
        let started = Instant::now();
        let key = Key::load_or_create(&node.key_file)?;
        let (client, ssh, forward) = match node.transport {
            Transport::Local => {
                let dir = crate::queen::lifecycle::local_dir(node);
                if let Some(home) = crate::paths::home_dir() {
                    not_the_home(node, &dir.to_string_lossy(), &home.to_string_lossy())?;
                }
                let socket = crate::paths::hive_socket(&dir.to_string_lossy())?;
                let client = HiveClient::unix(&node.name, std::path::Path::new(&socket), key)?;
                (client, None, None)
            }
            Transport::Ssh => {
                let session = connect_ssh(node, budget, options.accept_new_host_key).await?;
                let home = if node.remote_dir.starts_with('/') {
                    None
                } else {
                    match home::cached(&session.target) {
                        Some(home) => Some(home),
                        None => Some(home::learn(&session).await?),
                    }
                };
                let dir = home::absolute(&node.remote_dir, home.as_deref().unwrap_or("/"));
                if let Some(home) = &home {
                    not_the_home(node, &dir, home)?;
                }
                let forward = session.forward(&crate::paths::hive_socket(&dir)?).await?;
                let client =
                    HiveClient::unix_at(&node.name, &forward.local, forward.describe(), key)?;
                (client, Some(session), Some((forward, home)))
            }
            Transport::Http => {
                let target = Target::for_node(node)?;
                let client = HiveClient::tcp(&node.name, &target.host, node.hive_port, key)?;
                (client, None, None)
            }
        };
        Ok(NodeConn {
            node: node.clone(),
            client,
            ssh,
            forward,
            options,
            connect_time: started.elapsed(),
        })
    }

    /// The forward to the hive's socket (`transport = "ssh"`).
    pub(crate) fn forward(&self) -> Option<&Forward> {
        self.forward.as_ref().map(|(forward, _)| forward)
    }

    pub(crate) fn is_local(&self) -> bool {
        self.node.transport == Transport::Local
    }

    /// What the node said its user's home is (at install or start): a home other than the one
    /// the forward was made with is remembered, and the forward follows it.
    pub(crate) fn home_seen(&mut self, seen: &str) -> Result<()> {
        let Some((forward, used)) = self.forward.as_mut() else {
            return Ok(());
        };
        let Some(session) = self.ssh.as_ref() else {
            return Ok(());
        };
        if used.is_none() || used.as_deref() == Some(seen) {
            return Ok(());
        }
        let home = home::checked(&session.target, seen.to_string())?;
        let dir = home::absolute(&self.node.remote_dir, &home);
        forward.retarget(&crate::paths::hive_socket(&dir)?);
        self.client.set_place(forward.describe());
        *used = Some(home);
        Ok(())
    }

    /// Whether its SSH session has ended (never, for a node reached without one).
    pub(crate) fn is_closed(&self) -> bool {
        self.ssh.as_ref().is_some_and(Session::is_closed)
    }

    /// The SSH connection's loss, when it is what broke a stream: no answer to its keep-alives
    /// (the link died), or the node closed it. `None` while it is up or for other transports.
    pub(crate) async fn lost(&self) -> Option<Error> {
        let session = self.ssh.as_ref()?;
        // The stream's end and the connection's may reach this process a moment apart.
        for _ in 0..10 {
            if session.is_closed() {
                return Some(session.lost());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The SSH session, connected on first use for `transport = "http"` nodes.
    pub(crate) async fn ssh(&mut self, budget: &Budget) -> Result<&Session> {
        if self.is_local() {
            return Err(Error::internal(format!(
                "node `{}` is local; there is no SSH session to it",
                self.node.name
            )));
        }
        if self.ssh.is_none() {
            let session = connect_ssh(&self.node, budget, self.options.accept_new_host_key).await?;
            self.ssh = Some(session);
        }
        self.ssh
            .as_ref()
            .ok_or_else(|| Error::internal("ssh session vanished"))
    }
}

/// Refuses a `remote_dir` that is the user's home itself: rbee makes its directory private
/// (0700) and fills it with its sockets, keys and logs, which a home must not get.
fn not_the_home(node: &Node, dir: &str, home: &str) -> Result<()> {
    let strip = |p: &str| p.trim_end_matches('/').to_string();
    if strip(dir) != strip(home) || home.trim_end_matches('/').is_empty() {
        return Ok(());
    }
    Err(Error::config(format!(
        "node `{}`: `remote_dir = {:?}` is the user's home ({home}); rbee makes its remote_dir \
         private (mode 0700) and keeps its binary, keys, sockets and logs there. Set a \
         directory of its own, such as `remote_dir = \"~/.rbee\"`",
        node.name, node.remote_dir
    )))
}

/// Connects to the node over SSH within the budget, and records in this machine's audit log a
/// host key accepted now or refused: every command that reaches a node comes through here.
pub(crate) async fn connect_ssh(node: &Node, budget: &Budget, accept_new: bool) -> Result<Session> {
    if matches!(node.remote_dir.as_str(), "~" | "~/") {
        not_the_home(node, "~", "~")?;
    }
    let target = Target::for_node(node)?;
    let result = Session::open(&target, budget.deadline(), accept_new, node.persist).await;
    match &result {
        Ok(session) => {
            if let HostKey::Accepted { fingerprint } = &session.host_key {
                super::audit_note_within(
                    budget,
                    "host_key_accepted",
                    None,
                    serde_json::json!({ "node": node.name, "fingerprint": fingerprint }),
                );
            }
        }
        Err(Error::Ssh(refused)) => {
            if let Some(fields) = host_key_refused(&node.name, refused) {
                super::audit_note_within(budget, "host_key_refused", None, fields);
            }
        }
        Err(_) => {}
    }
    result
}

/// The audit fields of a refused host key: the node, and the fingerprints it presented and (for
/// a changed key) the one known_hosts holds.
fn host_key_refused(node: &str, err: &SshError) -> Option<serde_json::Value> {
    let fields = match err {
        SshError::HostKeyUnknown { fingerprint, .. } => serde_json::json!({
            "node": node,
            "cause": "unknown",
            "fingerprint": fingerprint,
            "reason": err.to_string(),
        }),
        SshError::HostKeyChanged {
            fingerprint,
            known,
            line,
            ..
        } => serde_json::json!({
            "node": node,
            "cause": "changed",
            "fingerprint": fingerprint,
            "known_fingerprint": known,
            "known_hosts_line": line,
            "reason": err.to_string(),
        }),
        _ => return None,
    };
    Some(fields)
}
