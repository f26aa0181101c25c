//! Placing a request on the fleet: every candidate node's hive is asked at once, within a small
//! slice of the budget, what it holds of the model, and the candidates are tried in order of
//! how soon they could start: the model loaded with a free slot, the model loaded (shortest
//! queue), a running hive, a node whose hive must be started. Ties keep the configured order.
//! A node whose worker for the model is held by the circuit breaker is left out.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::config::{Model, Node, Transport};
use crate::deadline::Budget;
use crate::error::Error;
use crate::protocol::{WorkerInfo, WorkerState};
use crate::queen::node::{ConnectOptions, NodeConn};

/// The most of the budget the probes may take together.
const PROBE_SLICE: Duration = Duration::from_millis(1500);

/// How long SSH candidates wait for the nodes reached without a handshake to answer first.
const SSH_HOLD: Duration = Duration::from_millis(20);

/// How soon a node could start on the request, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Standing {
    /// The model is loaded and a slot is free.
    Free,
    /// The model is loaded; every slot is busy and `queued` wait.
    Loaded { queued: u32 },
    /// The hive runs; the model must be loaded.
    Running,
    /// The hive must be started first.
    Stopped,
    /// Not asked: an earlier node in the file already had the model loaded with a free slot,
    /// which no later answer could beat.
    Unprobed,
}

/// A candidate after its probe: where it stands, and the connection made to ask, kept for the
/// request itself (none for a candidate left unprobed).
pub(crate) struct Ranked {
    pub(crate) node: Node,
    pub(crate) standing: Standing,
    pub(crate) conn: Option<NodeConn>,
}

/// A candidate that cannot take the request: unreachable, or its worker held by the breaker.
pub(crate) struct Skipped {
    pub(crate) node: Node,
    pub(crate) outcome: &'static str,
    pub(crate) error: Error,
    pub(crate) ms: f64,
}

/// Where `model`'s worker on a node stands, from the hive's worker list; `None` when the
/// breaker holds it.
pub(crate) fn standing(workers: &[WorkerInfo], model: &Model) -> Option<Standing> {
    let Some(worker) = workers.iter().find(|w| w.model == model.name) else {
        return Some(Standing::Running);
    };
    // The hive's own count of slots, where it tells one (it runs with the spec it was given,
    // and chose the count itself when the model's slots are auto).
    let slots = if worker.slots > 0 {
        worker.slots
    } else {
        model.slots_before_report()
    };
    match worker.state {
        WorkerState::Failed => None,
        WorkerState::Ready | WorkerState::Busy if worker.in_flight < slots => Some(Standing::Free),
        WorkerState::Ready | WorkerState::Busy => Some(Standing::Loaded {
            queued: worker.queued,
        }),
        WorkerState::Loading | WorkerState::Restarting => Some(Standing::Running),
    }
}

/// Probes `nodes` and returns them best first, with those that cannot serve. The ranking is
/// decided as soon as it cannot change: when the first node in file order that has the model
/// loaded with a free slot has answered and so has every node before it, the slower probes
/// (typically SSH nodes still connecting) are dropped and their nodes come last, unprobed, for
/// failover.
///
/// Nodes reached without a handshake (local, plain HTTP) are asked first; SSH nodes join once
/// those have answered, or after `SSH_HOLD`. A local hive answers in about a millisecond, while
/// eight SSH handshakes take tens of milliseconds of this process's CPU: when a local node
/// already decides the ranking, no SSH connection is opened at all.
pub(crate) async fn rank(
    nodes: &[&Node],
    model: &Model,
    budget: &Budget,
    options: ConnectOptions,
) -> (Vec<Ranked>, Vec<Skipped>) {
    let slice =
        Budget::new((budget.remaining() / 10).clamp(Duration::from_millis(200), PROBE_SLICE));
    let ask = |i: usize| {
        let node = nodes[i];
        let slice = &slice;
        async move { (i, probe(node, model, slice, options).await) }
    };
    let (ssh, cheap): (Vec<usize>, Vec<usize>) =
        (0..nodes.len()).partition(|&i| nodes[i].transport == Transport::Ssh);
    let mut held = Some(ssh);
    let mut probes: FuturesUnordered<_> = cheap.into_iter().map(ask).collect();
    if probes.is_empty() {
        probes.extend(held.take().into_iter().flatten().map(ask));
    }
    let hold = tokio::time::sleep(SSH_HOLD);
    tokio::pin!(hold);
    let mut answers: Vec<Option<Result<Ranked, Skipped>>> = nodes.iter().map(|_| None).collect();
    loop {
        tokio::select! {
            next = probes.next() => {
                let Some((i, answer)) = next else { break };
                answers[i] = Some(answer);
                let seen = answers
                    .iter()
                    .map(|a| a.as_ref().map(|r| r.as_ref().ok().map(|r| r.standing)));
                if settled(seen) {
                    break;
                }
                if probes.is_empty() {
                    probes.extend(held.take().into_iter().flatten().map(ask));
                }
            }
            () = &mut hold, if held.is_some() => {
                probes.extend(held.take().into_iter().flatten().map(ask));
            }
        }
    }
    drop(probes);
    let mut ranked = Vec::new();
    let mut skipped = Vec::new();
    for (node, answer) in nodes.iter().zip(answers) {
        match answer {
            Some(Ok(r)) => ranked.push(r),
            Some(Err(s)) => skipped.push(s),
            None => ranked.push(Ranked {
                node: (*node).clone(),
                standing: Standing::Unprobed,
                conn: None,
            }),
        }
    }
    // A stable sort: ties keep the configured order.
    ranked.sort_by_key(|r| r.standing);
    (ranked, skipped)
}

/// Whether the answers so far decide the ranking: some node has a free slot and every node
/// before it in the file has answered. Each answer, in file order: `None` while its probe runs,
/// `Some(None)` for a node that cannot serve, else where it stands.
fn settled(answers: impl IntoIterator<Item = Option<Option<Standing>>>) -> bool {
    for answer in answers {
        match answer {
            None => return false,
            Some(Some(Standing::Free)) => return true,
            Some(_) => {}
        }
    }
    // Every node answered.
    true
}

/// Asks one node's hive where the model stands, on a connection kept for the request.
async fn probe(
    node: &Node,
    model: &Model,
    slice: &Budget,
    options: ConnectOptions,
) -> Result<Ranked, Skipped> {
    let started = std::time::Instant::now();
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut conn = match NodeConn::open(node, slice, options).await {
        Ok(conn) => conn,
        Err(error) => {
            return Err(Skipped {
                node: node.clone(),
                outcome: "unreachable",
                error,
                ms: ms(),
            });
        }
    };
    let standing = match conn.client.workers(slice.remaining()).await {
        Ok(workers) => standing(&workers, model),
        Err(_) => Some(Standing::Stopped),
    };
    conn.connect_time = started.elapsed();
    match standing {
        Some(standing) => Ok(Ranked {
            node: node.clone(),
            standing,
            conn: Some(conn),
        }),
        None => Err(Skipped {
            node: node.clone(),
            outcome: "breaker_open",
            error: Error::worker(format!(
                "the worker for `{}` on `{}` is held by its circuit breaker",
                model.name, node.name
            )),
            ms: ms(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(state: WorkerState, in_flight: u32, queued: u32) -> WorkerInfo {
        serde_json::from_value(serde_json::json!({
            "id": "m@1", "model": "m", "state": state, "pid": 1, "port": 1,
            "restart_count": 0, "last_exit": null, "last_restart": null, "started_at": null,
            "load_ms": null, "requests_served": 0, "in_flight": in_flight, "queued": queued,
            "idle_s": null, "last_backoff_ms": null, "breaker": "closed",
            "breaker_closes_at": null, "failed_reason": null
        }))
        .expect("worker info")
    }

    fn model(slots: u32) -> Model {
        Model {
            name: "m".into(),
            path: "/m".into(),
            sha256: "ab".repeat(32),
            source: None,
            context: None,
            slots: Some(slots),
            gpu_layers: crate::config::GpuLayers::Layers(0),
            threads: None,
            load_timeout: crate::config::DEFAULT_LOAD_TIMEOUT,
            kv_unified: false,
        }
    }

    #[test]
    fn a_loaded_model_with_a_free_slot_comes_first_and_a_held_one_not_at_all() {
        let m = model(4);
        assert_eq!(
            standing(&[worker(WorkerState::Busy, 3, 0)], &m),
            Some(Standing::Free)
        );
        assert_eq!(
            standing(&[worker(WorkerState::Busy, 4, 2)], &m),
            Some(Standing::Loaded { queued: 2 })
        );
        assert_eq!(standing(&[], &m), Some(Standing::Running));
        assert_eq!(
            standing(&[worker(WorkerState::Loading, 0, 0)], &m),
            Some(Standing::Running)
        );
        assert_eq!(standing(&[worker(WorkerState::Failed, 0, 0)], &m), None);
        let mut order = [
            Standing::Stopped,
            Standing::Loaded { queued: 3 },
            Standing::Running,
            Standing::Loaded { queued: 1 },
            Standing::Free,
        ];
        order.sort();
        assert_eq!(
            order,
            [
                Standing::Free,
                Standing::Loaded { queued: 1 },
                Standing::Loaded { queued: 3 },
                Standing::Running,
                Standing::Stopped
            ]
        );
    }

    /// Auto slots: the count the hive tells once it has chosen one, the placeholder before.
    #[test]
    fn auto_slots_count_what_the_hive_chose_and_four_before_it_has() {
        let auto = Model {
            slots: None,
            ..model(1)
        };
        let with = |slots: u32, in_flight: u32| {
            let mut w = worker(WorkerState::Busy, in_flight, 0);
            w.slots = slots;
            standing(&[w], &auto)
        };
        assert_eq!(with(0, 3), Some(Standing::Free));
        assert_eq!(with(0, 4), Some(Standing::Loaded { queued: 0 }));
        assert_eq!(with(8, 7), Some(Standing::Free));
        assert_eq!(with(8, 8), Some(Standing::Loaded { queued: 0 }));
        assert_eq!(with(2, 2), Some(Standing::Loaded { queued: 0 }));
    }

    #[test]
    fn the_ranking_is_settled_once_a_free_node_has_answered_and_every_node_before_it() {
        // A free node whose predecessors answered decides it, whatever comes later.
        let running = Some(Some(Standing::Running));
        let free = Some(Some(Standing::Free));
        let skipped = Some(None);
        assert!(settled([running, skipped, free, None]));
        // An earlier node could still answer free: wait for it.
        assert!(!settled([None, free]));
        // No free node yet: wait for every answer.
        assert!(!settled([running, None]));
        assert!(settled([running, skipped, Some(Some(Standing::Stopped))]));
        assert!(settled([]));
    }
}
