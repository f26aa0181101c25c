//! The fleet as `rbee serve` watches it: one task per node keeps the node's connection in the
//! pool (an SSH session with its forward, for SSH nodes), opens it again when it fails, and
//! asks the hive for its workers every second, or at once when a request failed there. A
//! request is placed from what they last saw, in the order `queen::route::rank` would give,
//! without a probe of its own; `/health` and admission's count of slots answer from it too.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Model, Node};
use crate::deadline::Budget;
use crate::error::Error;
use crate::protocol::WorkerInfo;
use crate::queen::generate::{Order, Via};
use crate::queen::node::ConnectOptions;
use crate::queen::pool::Pool;
use crate::queen::route::{self, Skipped, Standing};
use crate::serve::admission::Admission;

const EVERY: Duration = Duration::from_secs(1);
const CONNECT_BUDGET: Duration = Duration::from_secs(5);
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What was last seen of a node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// Whether the watcher has looked at all yet.
    pub(crate) observed: bool,
    /// The node could be reached (a local node always can): its hive runs or can be started.
    pub(crate) reachable: bool,
    /// Its hive answered.
    pub(crate) hive: bool,
    /// Slots free across its workers, as the hive counts them.
    pub(crate) free_slots: u32,
    /// Its workers, as the hive listed them.
    pub(crate) workers: Vec<WorkerInfo>,
    /// Why it could not be reached: its class and message.
    unreachable: Option<(crate::error::ExitKind, String)>,
}

struct Watched {
    node: Node,
    seen: Mutex<Seen>,
    /// Look again now: a request failed there.
    nudge: Notify,
}

pub(crate) struct Fleet {
    nodes: Vec<Arc<Watched>>,
}

impl Fleet {
    /// Starts watching every node that serves a model, over `pool`'s connections, until `stop`.
    pub(crate) fn watch(
        config: &Config,
        connect: ConnectOptions,
        pool: Arc<Pool>,
        admission: Arc<Admission>,
        stop: &CancellationToken,
    ) -> Fleet {
        let mut nodes = Vec::new();
        for node in config.nodes.values().filter(|n| !n.models.is_empty()) {
            let watched = Arc::new(Watched {
                node: node.clone(),
                seen: Mutex::new(Seen::default()),
                nudge: Notify::new(),
            });
            nodes.push(watched.clone());
            tokio::spawn(watch(
                watched,
                connect,
                pool.clone(),
                admission.clone(),
                stop.clone(),
            ));
        }
        Fleet { nodes }
    }

    pub(crate) fn seen(&self) -> Vec<(&str, Seen)> {
        self.nodes
            .iter()
            .map(|w| {
                (
                    w.node.name.as_str(),
                    w.seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                )
            })
            .collect()
    }

    /// Asks the node's watcher to look again now.
    pub(crate) fn nudge(&self, node: &str) {
        if let Some(w) = self.nodes.iter().find(|w| w.node.name == node) {
            w.nudge.notify_one();
        }
    }

    /// The candidates among `nodes` for `model`, best first as `route::rank` orders them (ties
    /// in file order), each over the pool's connection, from what the watchers last saw. A
    /// node seen unreachable or with its worker held by the breaker is left out (an attempt of
    /// its own), unless no other node is left: then the unreachable ones are tried anyway, for
    /// what was seen may be a second old.
    pub(crate) fn order<'a>(&self, nodes: &[&Node], model: &'a Model, pool: &'a Pool) -> Order<'a> {
        let mut ranked: Vec<(Standing, Node)> = Vec::new();
        let mut skipped = Vec::new();
        let mut unreachable = Vec::new();
        for node in nodes {
            let seen = self
                .nodes
                .iter()
                .find(|w| w.node.name == node.name)
                .map(|w| {
                    w.seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone()
                })
                .unwrap_or_default();
            let node = (*node).clone();
            match where_it_stands(&seen, model) {
                Ok(standing) => ranked.push((standing, node)),
                Err(Some((kind, message))) => unreachable.push(Skipped {
                    node,
                    outcome: "unreachable",
                    error: Error::Classified { kind, message },
                    ms: 0.0,
                }),
                Err(None) => skipped.push(Skipped {
                    error: Error::worker(format!(
                        "the worker for `{}` on `{}` is held by its circuit breaker",
                        model.name, node.name
                    )),
                    node,
                    outcome: "breaker_open",
                    ms: 0.0,
                }),
            }
        }
        if ranked.is_empty() {
            ranked.extend(unreachable.drain(..).map(|s| (Standing::Unprobed, s.node)));
        }
        // A stable sort: ties keep the configured order.
        ranked.sort_by_key(|(standing, _)| *standing);
        skipped.extend(unreachable);
        Order {
            model: &model.name,
            candidates: ranked
                .into_iter()
                .map(|(_, node)| (node, Via::Kept(pool)))
                .collect(),
            skipped,
        }
    }
}

/// Where a node stands for `model` by what was seen of it: `Err(Some(why))` when it could not be
/// reached, `Err(None)` when the breaker holds its worker.
fn where_it_stands(
    seen: &Seen,
    model: &Model,
) -> Result<Standing, Option<(crate::error::ExitKind, String)>> {
    if !seen.observed {
        return Ok(Standing::Unprobed);
    }
    if let Some(why) = &seen.unreachable {
        return Err(Some(why.clone()));
    }
    if !seen.hive {
        return Ok(Standing::Stopped);
    }
    route::standing(&seen.workers, model).ok_or(None)
}

async fn watch(
    w: Arc<Watched>,
    connect: ConnectOptions,
    pool: Arc<Pool>,
    admission: Arc<Admission>,
    stop: CancellationToken,
) {
    loop {
        let now = look(&w.node, connect, &pool).await;
        admission.node_seen(&w.node.name, now.hive.then_some(now.workers.as_slice()));
        *w.seen.lock().unwrap_or_else(PoisonError::into_inner) = now;
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = w.nudge.notified() => {}
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One look at the node over its kept connection (opened when there is none).
async fn look(node: &Node, connect: ConnectOptions, pool: &Pool) -> Seen {
    let held = match pool.hold(node, &Budget::new(CONNECT_BUDGET), connect).await {
        Ok(held) => held,
        Err(e) => {
            tracing::debug!(node = %node.name, "not reachable: {e}");
            return Seen {
                observed: true,
                unreachable: Some((e.kind(), e.to_string())),
                ..Seen::default()
            };
        }
    };
    match held.conn.client.workers(ASK_TIMEOUT).await {
        Ok(workers) => {
            held.seen(true);
            Seen {
                observed: true,
                reachable: true,
                hive: true,
                free_slots: workers
                    .iter()
                    .map(|w| w.slots.saturating_sub(w.in_flight))
                    .sum(),
                workers,
                unreachable: None,
            }
        }
        // A hive that is not running (a request starts it), or a connection that broke (the
        // next look opens a fresh one).
        Err(e) => {
            tracing::debug!(node = %node.name, "hive not answering: {e}");
            held.failed().await;
            Seen {
                observed: true,
                reachable: true,
                ..Seen::default()
            }
        }
    }
}
