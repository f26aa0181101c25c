//! A connection to one node as the queen needs it: an HTTP client for its hive (direct on
//! loopback, through an SSH tunnel, or plain HTTP), and an SSH session where one is needed to
//! run commands there.

use std::time::{Duration, Instant};

use crate::auth::Key;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::queen::client::HiveClient;
use crate::ssh::{Session, Target};

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
        let (client, ssh) = match node.transport {
            Transport::Local => (
                HiveClient::new(&node.name, "127.0.0.1", node.hive_port, key)?,
                None,
            ),
            Transport::Ssh => {
                let target = Target::for_node(node)?;
                let session =
                    Session::connect(&target, budget.deadline(), options.accept_new_host_key)
                        .await?;
                let port = session.forward(node.hive_port).await?;
                (
                    HiveClient::new(&node.name, "127.0.0.1", port, key)?,
                    Some(session),
                )
            }
            Transport::Http => {
                let target = Target::for_node(node)?;
                (
                    HiveClient::new(&node.name, &target.host, node.hive_port, key)?,
                    None,
                )
            }
        };
        Ok(NodeConn {
            node: node.clone(),
            client,
            ssh,
            options,
            connect_time: started.elapsed(),
        })
    }

    /// The fingerprint of a host key recorded while connecting, if one was.
    pub(crate) fn accepted_host_key(&self) -> Option<String> {
        match self.ssh.as_ref().map(|s| &s.host_key) {
            Some(crate::ssh::HostKey::Accepted { fingerprint }) => Some(fingerprint.clone()),
            _ => None,
        }
    }

    pub(crate) fn is_local(&self) -> bool {
        self.node.transport == Transport::Local
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
            let target = Target::for_node(&self.node)?;
            let session =
                Session::connect(&target, budget.deadline(), self.options.accept_new_host_key)
                    .await?;
            self.ssh = Some(session);
        }
        self.ssh
            .as_ref()
            .ok_or_else(|| Error::internal("ssh session vanished"))
    }
}
