//! One model's entry in the hive: a queue in front of its worker (as many generations at a time
//! as the model has `slots`, which the worker decodes together), the worker started on first
//! use, the supervision state the supervisor keeps (restarting, failed), and what
//! `GET /v1/workers` shows of it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::Model;
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::hive::policy::History;
use crate::hive::registry::Registry;
use crate::hive::worker_proc::WorkerProc;
use crate::protocol::{WorkerInfo, WorkerState};

pub(crate) struct Entry {
    pub(crate) name: String,
    queue: Mutex<Queue>,
    spawn_lock: tokio::sync::Mutex<()>,
    state: Mutex<EntryState>,
}

/// One permit per slot. A changed `slots` swaps in a new semaphore; leases on the old one run
/// out, and the worker holds any excess in its own queue until it respawns. With auto slots
/// the count is known once a load has derived it: until then one request at a time goes on
/// (the first starts the load; the others wait for it anyway), and each load's count resizes
/// the semaphore in place, so that the requests waiting on it go on at once.
struct Queue {
    slots: u32,
    /// Whether `slots` is the model's (explicit) or a load's (auto), not the placeholder.
    known: bool,
    permits: Arc<Semaphore>,
    /// Permits to take out of use as they come back: the count shrank while they were held.
    owed: u32,
}

impl Queue {
    fn of(model: &Model) -> Queue {
        let slots = model.slots.unwrap_or(1);
        Queue {
            slots,
            known: model.slots.is_some(),
            permits: Arc::new(Semaphore::new(slots as usize)),
            owed: 0,
        }
    }

    /// The count a load derived for an auto model, applied to the semaphore waiters wait on.
    fn resize(&mut self, slots: u32) {
        self.known = true;
        if slots > self.slots {
            let grow = slots - self.slots;
            let paid = grow.min(self.owed);
            self.owed -= paid;
            self.permits.add_permits((grow - paid) as usize);
        } else {
            let shrink = self.slots - slots;
            let forgotten = self.permits.forget_permits(shrink as usize);
            // At most `shrink`, a u32.
            self.owed += u32::try_from(forgotten).map_or(0, |f| shrink - f);
        }
        self.slots = slots;
    }

    /// A lease's permit coming back: forgotten while the count owes one (a permit of a
    /// semaphore swapped out since goes back to that one, which nothing waits on any more).
    fn give_back(&mut self, permit: OwnedSemaphorePermit) {
        if self.owed > 0 && Arc::ptr_eq(permit.semaphore(), &self.permits) {
            self.owed -= 1;
            permit.forget();
        }
    }
}

/// What the supervisor is doing about a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Supervision {
    /// Running, or not started (no process).
    Normal,
    /// Waiting out a backoff before starting it again.
    Restarting { at: Instant },
    /// Restarting is held back until `until` (breaker open or attempts exhausted).
    Failed { until: Instant },
}

pub(crate) struct EntryState {
    pub(crate) spec: Model,
    pub(crate) proc: Option<Arc<WorkerProc>>,
    pub(crate) loading: bool,
    pub(crate) supervision: Supervision,
    pub(crate) failed_reason: Option<String>,
    pub(crate) history: History,
    pub(crate) queued: u32,
    pub(crate) in_flight: u32,
    pub(crate) served: u64,
    pub(crate) last_used: Instant,
    pub(crate) last_exit: Option<String>,
    /// What that exit most likely was (see `worker_proc::classify`).
    pub(crate) last_exit_reason: Option<&'static str>,
    pub(crate) restart_count: u32,
    pub(crate) last_restart: Option<SystemTime>,
    pub(crate) last_backoff: Option<Duration>,
    /// The running worker serves a spec the hive no longer has (changed or removed by a model
    /// table update): it is stopped once idle, and the next request starts one with the spec.
    pub(crate) outdated: bool,
    /// The load under way, which requests wait on.
    pub(crate) load: Option<LoadWatch>,
}

/// A load's outcome, once there is one: the worker, or the wire code and message of its
/// failure (for each waiter to return as its own error, of the same variant).
pub(crate) type LoadWatch =
    watch::Receiver<Option<std::result::Result<Arc<WorkerProc>, (&'static str, String)>>>;
type LoadOutcome =
    watch::Sender<Option<std::result::Result<Arc<WorkerProc>, (&'static str, String)>>>;

/// One load of a model: verify, spawn, wait for its hello, within `load_timeout`; ends early
/// when the hive begins to stop (the process is killed as it is dropped).
async fn load(entry: Arc<Entry>, registry: Arc<Registry>, spec: Model, tx: LoadOutcome) {
    let _spawning = entry.spawn_lock().await;
    let result = tokio::select! {
        biased;
        () = registry.stopping.cancelled() => Err(registry.stopping_error()),
        result = registry.spawn(&spec) => result,
    };
    let result = match result {
        Ok(proc) if registry.stopping.is_cancelled() => {
            registry.stop_proc(&spec.name, &proc).await;
            Err(registry.stopping_error())
        }
        other => other,
    };
    let current = registry.served(&spec.name, None).ok();
    let outcome = {
        let mut st = entry.lock();
        st.loading = false;
        st.load = None;
        match result {
            Ok(proc) => {
                entry.started(&spec, &proc);
                let proc = Arc::new(proc);
                st.proc = Some(proc.clone());
                // A table update during the load found no worker to mark.
                st.outdated = current.as_ref() != Some(&spec);
                registry.installed(&proc);
                st.last_used = Instant::now();
                Ok(proc)
            }
            Err(e) => {
                tracing::warn!(model = %entry.name, "load failed: {e}");
                Err((e.wire_code(), e.to_string()))
            }
        }
    };
    // No receiver left is fine: the model is loaded for the next request.
    let _ = tx.send(Some(outcome));
}

/// A place in a model's queue, held for the length of one generation.
pub(crate) struct Lease {
    entry: Arc<Entry>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    /// The model's entry this lease holds a place of.
    pub(crate) fn entry(&self) -> &Entry {
        &self.entry
    }
}

/// A request's place in the `queued` count, given back however its wait ends: with a slot, at
/// its deadline, or dropped when its client goes away before its turn.
struct Queued<'a>(&'a Entry);

impl<'a> Queued<'a> {
    fn enter(entry: &'a Entry) -> Queued<'a> {
        entry.lock().queued += 1;
        Queued(entry)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.queued = st.queued.saturating_sub(1);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.entry.queue().give_back(permit);
        }
        let mut st = self.entry.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.served += 1;
        st.last_used = Instant::now();
    }
}

impl Entry {
    pub(super) fn new(model: &Model) -> Entry {
        Entry {
            name: model.name.clone(),
            queue: Mutex::new(Queue::of(model)),
            spawn_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(EntryState {
                spec: model.clone(),
                proc: None,
                loading: false,
                supervision: Supervision::Normal,
                failed_reason: None,
                history: History::default(),
                queued: 0,
                in_flight: 0,
                served: 0,
                last_used: Instant::now(),
                last_exit: None,
                last_exit_reason: None,
                restart_count: 0,
                last_restart: None,
                last_backoff: None,
                outdated: false,
                load: None,
            }),
        }
    }

    /// Takes the model's current spec: it applies from the next spawn, and a changed `slots`
    /// from the next lease (auto: from the next load).
    pub(super) fn respec(&self, model: &Model) {
        let was = std::mem::replace(&mut self.lock().spec, model.clone()).slots;
        if was != model.slots {
            *self.queue() = Queue::of(model);
        }
    }

    /// A worker started for `spec` (a load or a restart): with auto slots, its count becomes
    /// the queue's.
    pub(crate) fn started(&self, spec: &Model, proc: &WorkerProc) {
        if spec.slots.is_none() {
            self.queue().resize(proc.slots);
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Plain counts and a semaphore; one left half-updated by a panic is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EntryState> {
        // The state holds plain values; one left half-updated by a panic is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn spawn_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.spawn_lock.lock().await
    }

    /// Waits for this model's turn, until the budget runs out or the hive begins to stop.
    pub(crate) async fn lease(
        self: &Arc<Self>,
        budget: &Budget,
        registry: &Registry,
    ) -> Result<Lease> {
        let waiting = Queued::enter(self);
        let queue = self.queue().permits.clone();
        let acquired = tokio::select! {
            biased;
            () = registry.stopping.cancelled() => None,
            acquired = tokio::time::timeout_at(budget.deadline().into(), queue.acquire_owned()) => {
                Some(acquired)
            }
        };
        drop(waiting);
        let Some(acquired) = acquired else {
            return Err(registry.stopping_error());
        };
        let mut st = self.lock();
        match acquired {
            Ok(Ok(permit)) => {
                st.in_flight += 1;
                Ok(Lease {
                    entry: self.clone(),
                    permit: Some(permit),
                })
            }
            Ok(Err(_)) => Err(Error::hive("the hive is shutting down")),
            Err(_) => Err(Error::deadline(
                "the request's budget ran out while it waited in the queue",
            )),
        }
    }

    /// The running worker, or the one being loaded, waited for within the budget; starts a
    /// load when none is under way; waits out a restart under way and refuses while restarting
    /// is held back. The second value is how long this call waited for a load.
    ///
    /// A load runs on its own task, bounded by the model's `load_timeout`, not by the budget
    /// of the request that started it: a request that gives up leaves it going, and the next
    /// finds the model loading or ready.
    pub(crate) async fn worker(
        self: &Arc<Self>,
        registry: &Arc<Registry>,
        budget: &Budget,
    ) -> Result<(Arc<WorkerProc>, Option<f64>)> {
        let waited = Instant::now();
        loop {
            // A stopping hive starts no worker, for a request or otherwise.
            if registry.stopping.is_cancelled() {
                return Err(registry.stopping_error());
            }
            let load = {
                let mut st = self.lock();
                let alive = st.proc.clone().filter(|p| p.exit_status().is_none());
                match (alive, st.supervision) {
                    (Some(proc), _) => return Ok((proc, None)),
                    (None, Supervision::Failed { until }) if until > Instant::now() => {
                        return Err(Error::worker(failed_message(&self.name, &st, until)));
                    }
                    // The supervisor has this one (a restart is due, or an exit is being
                    // handled): wait for it below.
                    (None, Supervision::Restarting { .. }) => None,
                    (None, _) if st.load.is_some() => st.load.clone(),
                    (None, _) if st.proc.is_some() => None,
                    (None, Supervision::Failed { .. }) => {
                        // The hold has expired: start afresh.
                        registry.notes.send(
                            "breaker_closed",
                            serde_json::json!({ "model": self.name, "by": "window" }),
                        );
                        st.history.reset();
                        st.supervision = Supervision::Normal;
                        st.failed_reason = None;
                        Some(self.start_load(&mut st, registry))
                    }
                    (None, Supervision::Normal) => Some(self.start_load(&mut st, registry)),
                }
            };
            let Some(mut load) = load else {
                if budget.is_spent() {
                    return Err(Error::deadline(format!(
                        "the budget ran out while the worker for `{}` restarted",
                        self.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50).min(budget.remaining())).await;
                continue;
            };
            let outcome =
                tokio::time::timeout_at(budget.deadline().into(), load.wait_for(Option::is_some))
                    .await;
            let ms = waited.elapsed().as_secs_f64() * 1000.0;
            match outcome {
                Err(_) => {
                    return Err(Error::deadline(format!(
                        "the budget ran out while `{}` loaded; the load goes on (for at most its \
                         load_timeout) and a later request finds it ready",
                        self.name
                    )));
                }
                // The load's task ended without a word: the hive is stopping.
                Ok(Err(_)) => return Err(registry.stopping_error()),
                Ok(Ok(done)) => match done.as_ref() {
                    Some(Ok(proc)) => return Ok((proc.clone(), Some(ms))),
                    Some(Err((code, message))) => {
                        return Err(Error::from_wire(code, message.clone()));
                    }
                    None => continue,
                },
            }
        }
    }

    /// Starts loading the model on a task of its own; its outcome goes to every waiter.
    fn start_load(self: &Arc<Self>, st: &mut EntryState, registry: &Arc<Registry>) -> LoadWatch {
        let (tx, rx) = watch::channel(None);
        st.loading = true;
        st.load = Some(rx.clone());
        tokio::spawn(load(self.clone(), registry.clone(), st.spec.clone(), tx));
        rx
    }

    pub(crate) fn info(&self) -> Option<WorkerInfo> {
        let st = self.lock();
        let now = Instant::now();
        let proc = st.proc.as_ref().filter(|p| p.exit_status().is_none());
        // Exited, and the supervisor has yet to take the exit: it is about to decide on a
        // restart, so the worker is listed as restarting rather than missing.
        let exited = st.proc.as_ref().and_then(|p| p.exited());
        let state = match (proc, st.supervision) {
            (_, Supervision::Failed { until }) if until > now => WorkerState::Failed,
            (_, Supervision::Restarting { .. }) => WorkerState::Restarting,
            (Some(_), _) if st.in_flight > 0 => WorkerState::Busy,
            (Some(_), _) => WorkerState::Ready,
            (None, _) if st.loading => WorkerState::Loading,
            (None, _) if exited.is_some() => WorkerState::Restarting,
            (None, _) => return None,
        };
        let held = match st.supervision {
            Supervision::Failed { until } if until > now => Some(until),
            _ => None,
        };
        Some(WorkerInfo {
            id: proc.map_or_else(|| self.name.clone(), |p| format!("{}@{}", self.name, p.pid)),
            model: self.name.clone(),
            state,
            pid: proc.map(|p| p.pid),
            socket: proc.map(|p| p.socket.display().to_string()),
            restart_count: st.restart_count,
            last_exit: exited
                .as_ref()
                .map(|e| e.status.clone())
                .or_else(|| st.last_exit.clone()),
            last_exit_reason: exited
                .as_ref()
                .map(|e| e.reason)
                .or(st.last_exit_reason)
                .map(str::to_string),
            last_restart: st.last_restart.map(epoch_secs),
            started_at: proc.map(|p| epoch_secs(p.started_at)),
            load_ms: proc.map(|p| p.load_ms),
            offload: proc.map(|p| p.offload.clone()),
            requests_served: st.served,
            in_flight: st.in_flight,
            // Auto before a load has derived the count: none to tell (the queen counts its
            // placeholder).
            slots: Some(self.queue())
                .filter(|q| q.known)
                .map_or(0, |q| q.slots),
            queued: st.queued,
            idle_s: (st.in_flight == 0).then(|| st.last_used.elapsed().as_secs_f64()),
            last_backoff_ms: st
                .last_backoff
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            breaker: if held.is_some() { "open" } else { "closed" }.to_string(),
            breaker_closes_at: held.map(|until| epoch_secs(wall_time(until))),
            failed_reason: held.and(st.failed_reason.clone()),
        })
    }
}

fn failed_message(model: &str, st: &EntryState, until: Instant) -> String {
    let left = until.saturating_duration_since(Instant::now()).as_secs();
    format!(
        "the worker for `{model}` is failed: {}; restarting is held back for {left}s more \
         (until the circuit breaker closes); `rbee worker restart --model {model}` restarts it now",
        st.failed_reason.as_deref().unwrap_or("it kept crashing"),
    )
}

/// The wall-clock time of a monotonic instant, for people.
pub(crate) fn wall_time(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

pub(crate) fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto() -> Model {
        let config = crate::config::Config::embedded();
        let model = config.models.values().next().expect("the default model");
        assert_eq!(model.slots, None, "the default is auto");
        model.clone()
    }

    #[test]
    fn auto_slots_let_one_in_until_a_load_tells_the_count_then_resize_in_place() {
        let mut queue = Queue::of(&auto());
        assert_eq!((queue.slots, queue.known), (1, false));
        let permits = queue.permits.clone();
        let held = permits.clone().try_acquire_owned().expect("the first");
        assert!(permits.clone().try_acquire_owned().is_err());
        // The load derives 3: the same semaphore, so its waiters go on.
        queue.resize(3);
        assert!(queue.known);
        let more: Vec<_> = (0..2)
            .map(|_| permits.clone().try_acquire_owned().expect("a slot"))
            .collect();
        assert!(permits.clone().try_acquire_owned().is_err());
        // The next load derives 1 while 3 are held: 2 are owed, and the first two back are
        // forgotten.
        queue.resize(1);
        assert_eq!(queue.owed, 2);
        queue.give_back(held);
        assert_eq!((queue.owed, permits.available_permits()), (1, 0));
        // Growing to 2 pays the debt first: one more back is one free.
        queue.resize(2);
        assert_eq!(queue.owed, 0);
        let mut more = more.into_iter();
        queue.give_back(more.next().expect("held"));
        assert_eq!(permits.available_permits(), 1);
        queue.give_back(more.next().expect("held"));
        assert_eq!(permits.available_permits(), 2);
        let explicit = Queue::of(&Model {
            slots: Some(5),
            ..auto()
        });
        assert_eq!((explicit.slots, explicit.known), (5, true));
    }
}
