//! The fleet as `rbee serve` watches it: one task per node keeps a connection to it (an SSH
//! session with its forward, for SSH nodes), opened again when it fails, and asks the hive for
//! its workers every few seconds. `/health` answers from what they last saw.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Node};
use crate::deadline::Budget;
use crate::queen::node::{ConnectOptions, NodeConn};

const EVERY: Duration = Duration::from_secs(5);
const CONNECT_BUDGET: Duration = Duration::from_secs(5);
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What was last seen of a node.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Seen {
    /// The node could be reached (a local node always can): its hive runs or can be started.
    pub(crate) reachable: bool,
    /// Its hive answered.
    pub(crate) hive: bool,
    /// Slots free across its workers, as the hive counts them.
    pub(crate) free_slots: u32,
}

pub(crate) struct Fleet {
    nodes: Vec<(String, Arc<Mutex<Seen>>)>,
}

impl Fleet {
    /// Starts watching every node that serves a model, until `stop`.
    pub(crate) fn watch(
        config: &Config,
        connect: ConnectOptions,
        stop: &CancellationToken,
    ) -> Fleet {
        let mut nodes = Vec::new();
        for node in config.nodes.values().filter(|n| !n.models.is_empty()) {
            let seen = Arc::new(Mutex::new(Seen::default()));
            nodes.push((node.name.clone(), seen.clone()));
            tokio::spawn(watch(node.clone(), connect, seen, stop.clone()));
        }
        Fleet { nodes }
    }

    pub(crate) fn seen(&self) -> Vec<(&str, Seen)> {
        self.nodes
            .iter()
            .map(|(name, seen)| {
                (
                    name.as_str(),
                    *seen.lock().unwrap_or_else(PoisonError::into_inner),
                )
            })
            .collect()
    }
}

async fn watch(
    node: Node,
    connect: ConnectOptions,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut conn: Option<NodeConn> = None;
    loop {
        if conn.is_none() {
            match NodeConn::open(&node, &Budget::new(CONNECT_BUDGET), connect).await {
                Ok(c) => conn = Some(c),
                Err(e) => tracing::debug!(node = %node.name, "not reachable: {e}"),
            }
        }
        let mut now = Seen {
            reachable: conn.is_some(),
            ..Seen::default()
        };
        if let Some(c) = &conn {
            match c.client.workers(ASK_TIMEOUT).await {
                Ok(workers) => {
                    now.hive = true;
                    now.free_slots = workers
                        .iter()
                        .map(|w| w.slots.saturating_sub(w.in_flight))
                        .sum();
                }
                // A hive that is not running, or a connection that broke: the next round opens
                // a fresh one (for a local node that costs nothing).
                Err(e) => {
                    tracing::debug!(node = %node.name, "hive not answering: {e}");
                    conn = None;
                }
            }
        }
        *seen.lock().unwrap_or_else(PoisonError::into_inner) = now;
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}
