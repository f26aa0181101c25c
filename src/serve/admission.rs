//! Admission: each model takes as many requests at once as the nodes serving it have slots
//! together, and keeps a bounded number waiting for one; a request beyond both is turned away
//! at once (429) rather than queued without end. A node counts the slots its hive reports for
//! the model (none while the breaker holds its worker), and its configured slots until its hive
//! has reported.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::protocol::{WorkerInfo, WorkerState};

/// The gates of every model some node serves.
pub(crate) struct Admission {
    gates: HashMap<String, Gate>,
    max_queue: usize,
}

struct Gate {
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    /// Permits to take out of use as they come back: the slots shrank while they were held.
    owed: Arc<AtomicUsize>,
    /// Each serving node's configured slots and the slots it counts now, and their sum (the
    /// permits the gate has, held and free, less those owed).
    nodes: Mutex<(NodeSlots, usize)>,
}

/// Per node: its configured slots for the model, and those it counts now.
type NodeSlots = HashMap<String, (usize, usize)>;

impl Gate {
    fn new(nodes: HashMap<String, usize>) -> Gate {
        let total = nodes.values().sum::<usize>().max(1);
        Gate {
            slots: Arc::new(Semaphore::new(total)),
            waiting: Arc::new(AtomicUsize::new(0)),
            owed: Arc::new(AtomicUsize::new(0)),
            nodes: Mutex::new((nodes.into_iter().map(|(n, s)| (n, (s, s))).collect(), total)),
        }
    }

    /// The node's slots for the model, as its hive now counts them.
    fn set(&self, node: &str, slots: impl FnOnce(usize) -> usize) {
        let mut guard = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let (nodes, total) = &mut *guard;
        let Some((configured, now)) = nodes.get_mut(node) else {
            return;
        };
        *now = slots(*configured);
        // At least one, so that a request goes on to placement, which says why no node serves.
        let wanted = nodes.values().map(|(_, now)| now).sum::<usize>().max(1);
        if wanted > *total {
            let grow = wanted - *total;
            let owed = self
                .owed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                    Some(o - o.min(grow))
                })
                .unwrap_or(0);
            self.slots.add_permits(grow - owed.min(grow));
        } else if wanted < *total {
            let shrink = *total - wanted;
            let forgotten = self.slots.forget_permits(shrink);
            self.owed.fetch_add(shrink - forgotten, Ordering::SeqCst);
        }
        *total = wanted;
    }
}

/// A request's slot: held until the request ends, however it ends.
pub(crate) struct Permit {
    slot: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
}

impl Permit {
    fn new(slot: OwnedSemaphorePermit, gate: &Gate) -> Permit {
        Permit {
            slot: Some(slot),
            owed: gate.owed.clone(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A slot the gate no longer has goes out of use instead of back to the waiters.
        let owed = self
            .owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| o.checked_sub(1));
        if owed.is_ok()
            && let Some(slot) = self.slot.take()
        {
            slot.forget();
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every slot and the wait queue are full.
    Full,
    /// No gate for the model (no node serves it).
    Unknown,
}

/// Counts a waiting request for as long as it waits, however the wait ends (a client that goes
/// away drops it).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(crate) fn new(config: &Config, max_queue: usize) -> Admission {
        let mut capacity: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for node in config.nodes.values() {
            for name in &node.models {
                if let Some(model) = config.models.get(name) {
                    capacity.entry(name.clone()).or_default().insert(
                        node.name.clone(),
                        model.slots_before_report().max(1) as usize,
                    );
                }
            }
        }
        let gates = capacity
            .into_iter()
            .map(|(name, nodes)| (name, Gate::new(nodes)))
            .collect();
        Admission { gates, max_queue }
    }

    /// What a node's hive reported (`None`: it did not answer): each model it serves counts
    /// the slots of its worker there, none while the breaker holds it, and the configured
    /// slots while no worker is loaded (auto: `AUTO_SLOTS_BEFORE_REPORT`), or while its hive
    /// has not derived an auto count yet.
    pub(crate) fn node_seen(&self, node: &str, workers: Option<&[WorkerInfo]>) {
        for (model, gate) in &self.gates {
            let worker = workers.and_then(|ws| ws.iter().find(|w| &w.model == model));
            gate.set(node, |configured| match worker {
                Some(w) if w.state == WorkerState::Failed => 0,
                Some(w) if w.slots > 0 => w.slots as usize,
                _ => configured,
            });
        }
    }

    /// A slot for a request for `model`: at once when one is free, after a wait when the
    /// queue has room, else `Full`.
    pub(crate) async fn admit(&self, model: &str) -> Result<Permit, Refused> {
        let gate = self.gates.get(model).ok_or(Refused::Unknown)?;
        if let Ok(slot) = gate.slots.clone().try_acquire_owned() {
            return Ok(Permit::new(slot, gate));
        }
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        let _waiting = Waiting(gate.waiting.clone());
        match gate.slots.clone().acquire_owned().await {
            Ok(slot) => Ok(Permit::new(slot, gate)),
            // The semaphore is never closed.
            Err(_) => Err(Refused::Full),
        }
    }

    /// Requests waiting for a slot, per model.
    pub(crate) fn queued(&self) -> impl Iterator<Item = (&str, usize)> {
        self.gates
            .iter()
            .map(|(name, gate)| (name.as_str(), gate.waiting.load(Ordering::SeqCst)))
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn admission(slots: usize, max_queue: usize) -> Admission {
        let gate = Gate::new(HashMap::from([("n1".to_string(), slots)]));
        Admission {
            gates: HashMap::from([("m".to_string(), gate)]),
            max_queue,
        }
    }

    #[tokio::test]
    async fn beyond_the_slots_and_the_queue_a_request_is_refused_and_a_freed_slot_goes_to_a_waiter()
    {
        let a = Arc::new(admission(2, 1));
        let first = a.admit("m").await.expect("slot");
        let _second = a.admit("m").await.expect("slot");
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit("m").await.is_ok() }
        });
        while a.queued().map(|(_, n)| n).sum::<usize>() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
        assert_eq!(a.admit("other").await.err(), Some(Refused::Unknown));
        drop(first);
        assert!(waiter.await.expect("join"));
        assert_eq!(a.queued().map(|(_, n)| n).sum::<usize>(), 0);
    }

    fn worker(slots: u32, state: WorkerState) -> WorkerInfo {
        serde_json::from_value(serde_json::json!({
            "id": "m@1", "model": "m", "state": state, "pid": 1, "port": 1, "slots": slots,
            "restart_count": 0, "last_exit": null, "last_restart": null, "started_at": null,
            "load_ms": null, "requests_served": 0, "in_flight": 0, "queued": 0,
            "idle_s": null, "last_backoff_ms": null, "breaker": "closed",
            "breaker_closes_at": null, "failed_reason": null
        }))
        .expect("worker info")
    }

    #[tokio::test]
    async fn the_slots_a_hive_reports_replace_the_configured_ones_and_held_slots_shrink_on_return()
    {
        let a = admission(4, 0);
        // The hive runs the model with 2 slots: a third request finds none.
        a.node_seen("n1", Some(&[worker(2, WorkerState::Ready)]));
        let first = a.admit("m").await.expect("slot");
        let second = a.admit("m").await.expect("slot");
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
        // Down to 1 while both are held: the first one back goes out of use.
        a.node_seen("n1", Some(&[worker(1, WorkerState::Busy)]));
        drop(first);
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
        drop(second);
        let third = a.admit("m").await.expect("slot");
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
        // Held by the breaker: the gate keeps one slot, for placement to say why.
        a.node_seen("n1", Some(&[worker(1, WorkerState::Failed)]));
        drop(third);
        let _fourth = a.admit("m").await.expect("slot");
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
        // No worker loaded: the configured slots again.
        a.node_seen("n1", Some(&[]));
        for _ in 0..3 {
            std::mem::forget(a.admit("m").await.expect("slot"));
        }
        assert_eq!(a.admit("m").await.err(), Some(Refused::Full));
    }

    /// An auto model (the embedded default): 4 until its hive tells the count it chose, then
    /// that count, and 4 again while no worker is loaded (still loading: none told).
    #[tokio::test]
    async fn an_auto_model_counts_four_until_its_hive_tells_its_choice() {
        let config = crate::config::Config::embedded();
        let model = config.models.values().next().expect("the default model");
        assert_eq!(model.slots, None);
        let a = Admission::new(&config, 0);
        let admit_all = |a: &Admission| {
            let mut held = Vec::new();
            while let Some(permit) = a.admit(&model.name).now_or_never().and_then(Result::ok) {
                held.push(permit);
            }
            held.len()
        };
        assert_eq!(admit_all(&a), 4);
        let mut chosen = worker(8, WorkerState::Ready);
        chosen.model = model.name.clone();
        a.node_seen("local", Some(&[chosen.clone()]));
        assert_eq!(admit_all(&a), 8);
        chosen.slots = 0;
        chosen.state = WorkerState::Loading;
        a.node_seen("local", Some(&[chosen]));
        assert_eq!(admit_all(&a), 4);
    }
}
