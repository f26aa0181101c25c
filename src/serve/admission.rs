//! Admission: each model takes as many requests at once as the nodes serving it have slots
//! together, and keeps a bounded number waiting for one; a request beyond both is turned away
//! at once (429) rather than queued without end.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;

/// The gates of every model some node serves.
pub(crate) struct Admission {
    gates: HashMap<String, Gate>,
    max_queue: usize,
}

struct Gate {
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

/// A request's slot: held until the request ends, however it ends.
pub(crate) struct Permit {
    _slot: OwnedSemaphorePermit,
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
        let mut capacity: HashMap<String, usize> = HashMap::new();
        for node in config.nodes.values() {
            for name in &node.models {
                if let Some(model) = config.models.get(name) {
                    *capacity.entry(name.clone()).or_default() += model.slots.max(1) as usize;
                }
            }
        }
        let gates = capacity
            .into_iter()
            .map(|(name, slots)| {
                let gate = Gate {
                    slots: Arc::new(Semaphore::new(slots)),
                    waiting: Arc::new(AtomicUsize::new(0)),
                };
                (name, gate)
            })
            .collect();
        Admission { gates, max_queue }
    }

    /// A slot for a request for `model`: at once when one is free, after a wait when the
    /// queue has room, else `Full`.
    pub(crate) async fn admit(&self, model: &str) -> Result<Permit, Refused> {
        let gate = self.gates.get(model).ok_or(Refused::Unknown)?;
        if let Ok(slot) = gate.slots.clone().try_acquire_owned() {
            return Ok(Permit { _slot: slot });
        }
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        let _waiting = Waiting(gate.waiting.clone());
        match gate.slots.clone().acquire_owned().await {
            Ok(slot) => Ok(Permit { _slot: slot }),
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
    use super::*;

    fn admission(slots: usize, max_queue: usize) -> Admission {
        let gate = Gate {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: Arc::new(AtomicUsize::new(0)),
        };
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
}
