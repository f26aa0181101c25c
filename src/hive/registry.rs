//! The hive's workers, one per model: a queue in front of each (as many generations at a time as
//! the model has `slots`, which the worker decodes together), spawning on first use, reuse,
//! unloading after `keep_alive` idle, and the supervision state the supervisor keeps
//! (restarting, failed).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::config::{Model, RestartPolicy};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::hive::policy::History;
use crate::hive::verify::Verifier;
use crate::hive::worker_proc::{Exited, STOP_GRACE, SpawnOptions, WorkerProc, model_path};
use crate::protocol::{WorkerInfo, WorkerState};

pub(crate) struct Registry {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    verifier: Verifier,
    exe: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    pub(crate) keep_alive: Duration,
    pub(crate) policy: RestartPolicy,
    exits: mpsc::UnboundedSender<Exited>,
    /// Signs the hive's requests to its workers; made anew at each hive start.
    pub(crate) worker_key: crate::auth::Key,
    pub(crate) audit: crate::audit::Audit,
}

pub(crate) struct Entry {
    pub(crate) name: String,
    /// One permit per slot. A changed `slots` swaps in a new semaphore; leases on the old one
    /// run out, and the worker holds any excess in its own queue until it respawns.
    queue: Mutex<(u32, Arc<Semaphore>)>,
    spawn_lock: tokio::sync::Mutex<()>,
    state: Mutex<EntryState>,
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
    pub(crate) restart_count: u32,
    pub(crate) last_restart: Option<SystemTime>,
    pub(crate) last_backoff: Option<Duration>,
}

/// A place in a model's queue, held for the length of one generation.
pub(crate) struct Lease {
    entry: Arc<Entry>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.entry.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.served += 1;
        st.last_used = Instant::now();
    }
}

impl Registry {
    pub(crate) fn new(
        exe: PathBuf,
        dir: PathBuf,
        log: PathBuf,
        keep_alive: Duration,
        policy: RestartPolicy,
        exits: mpsc::UnboundedSender<Exited>,
        audit: crate::audit::Audit,
    ) -> Registry {
        Registry {
            entries: Mutex::new(HashMap::new()),
            verifier: Verifier::default(),
            exe,
            dir,
            log,
            keep_alive,
            policy,
            exits,
            worker_key: crate::auth::Key::random(),
            audit,
        }
    }

    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub(crate) fn find(&self, model: &str) -> Option<Arc<Entry>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(model).cloned()
    }

    /// The entry for a model, created on first use; a changed spec replaces the stored one and
    /// takes effect at the next spawn.
    pub(crate) fn entry(&self, model: &Model) -> Arc<Entry> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(model.name.clone()).or_insert_with(|| {
            Arc::new(Entry {
                name: model.name.clone(),
                queue: Mutex::new((model.slots, Arc::new(Semaphore::new(model.slots as usize)))),
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
                    restart_count: 0,
                    last_restart: None,
                    last_backoff: None,
                }),
            })
        });
        entry.lock().spec = model.clone();
        let mut queue = entry.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.0 != model.slots {
            *queue = (model.slots, Arc::new(Semaphore::new(model.slots as usize)));
        }
        drop(queue);
        entry.clone()
    }

    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        let mut infos: Vec<WorkerInfo> = self.entries().iter().filter_map(|e| e.info()).collect();
        infos.sort_by(|a, b| a.model.cmp(&b.model));
        infos
    }

    /// Stops the model's worker; false when none was running.
    pub(crate) async fn stop_worker(&self, model: &str) -> bool {
        let proc = self.find(model).and_then(|e| {
            let mut st = e.lock();
            st.supervision = Supervision::Normal;
            st.proc.take()
        });
        match proc {
            Some(p) => {
                tracing::info!(model, pid = p.pid, "stopping worker");
                p.stop(STOP_GRACE).await;
                true
            }
            None => false,
        }
    }

    pub(crate) async fn stop_all(&self) {
        let procs: Vec<Arc<WorkerProc>> = self
            .entries()
            .iter()
            .filter_map(|e| {
                let mut st = e.lock();
                st.supervision = Supervision::Normal;
                st.proc.take()
            })
            .collect();
        futures::future::join_all(procs.iter().map(|p| p.stop(STOP_GRACE))).await;
    }

    /// Requests in flight across all models.
    pub(crate) fn in_flight(&self) -> u32 {
        self.entries().iter().map(|e| e.lock().in_flight).sum()
    }

    /// Unloads workers idle for `keep_alive`.
    pub(crate) async fn reap(&self) {
        for entry in self.entries() {
            let idle = {
                let mut st = entry.lock();
                let unused = st.in_flight == 0 && st.queued == 0 && !st.loading;
                let alive = st.proc.as_ref().is_some_and(|p| p.exit_status().is_none());
                if unused && alive && st.last_used.elapsed() >= self.keep_alive {
                    st.proc.take()
                } else {
                    None
                }
            };
            if let Some(proc) = idle {
                tracing::info!(model = %entry.name, pid = proc.pid, "unloading idle worker");
                proc.stop(STOP_GRACE).await;
            }
        }
    }

    /// Verifies the model and starts a worker for it within `wait`.
    pub(crate) async fn spawn(&self, spec: &Model, wait: Duration) -> Result<WorkerProc> {
        let path = model_path(spec);
        let verified = tokio::time::timeout(wait, self.verifier.verify(&path, &spec.sha256))
            .await
            .map_err(|_| Error::deadline("the budget ran out while verifying the model file"))?;
        let (event, reason) = match &verified {
            Ok(()) => ("model_verified", None),
            Err(e) => ("model_refused", Some(e.to_string())),
        };
        self.audit
            .note(
                event,
                None,
                serde_json::json!({
                    "model": spec.name,
                    "path": path.display().to_string(),
                    "sha256": spec.sha256,
                    "reason": reason,
                }),
            )
            .await;
        verified?;
        crate::hive::memory::check(&path, spec.context, spec.slots)?;
        let opts = SpawnOptions {
            exe: &self.exe,
            hive_dir: &self.dir,
            log: &self.log,
            exits: self.exits.clone(),
            key: &self.worker_key,
        };
        let proc = WorkerProc::spawn(spec, &opts, wait).await?;
        self.audit
            .note(
                "worker_spawned",
                None,
                serde_json::json!({
                    "model": spec.name, "pid": proc.pid, "port": proc.port, "load_ms": proc.load_ms,
                }),
            )
            .await;
        tracing::info!(model = %spec.name, pid = proc.pid, port = proc.port, load_ms = proc.load_ms, "worker ready");
        Ok(proc)
    }
}

impl Entry {
    pub(crate) fn lock(&self) -> MutexGuard<'_, EntryState> {
        // The state holds plain values; one left half-updated by a panic is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn spawn_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.spawn_lock.lock().await
    }

    /// Waits for this model's turn, until the budget runs out.
    pub(crate) async fn lease(self: &Arc<Self>, budget: &Budget) -> Result<Lease> {
        self.lock().queued += 1;
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone();
        let acquired =
            tokio::time::timeout_at(budget.deadline().into(), queue.acquire_owned()).await;
        let mut st = self.lock();
        st.queued = st.queued.saturating_sub(1);
        match acquired {
            Ok(Ok(permit)) => {
                st.in_flight += 1;
                Ok(Lease {
                    entry: self.clone(),
                    _permit: permit,
                })
            }
            Ok(Err(_)) => Err(Error::hive("the hive is shutting down")),
            Err(_) => Err(Error::deadline(
                "the request's budget ran out while it waited in the queue",
            )),
        }
    }

    /// The running worker, or a new one within the budget; waits out a restart under way and
    /// refuses while restarting is held back. The second value is the load time when this
    /// call started the worker.
    pub(crate) async fn worker(
        &self,
        registry: &Registry,
        budget: &Budget,
    ) -> Result<(Arc<WorkerProc>, Option<f64>)> {
        loop {
            let _spawning = self.spawn_lock.lock().await;
            let spec = {
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
                    (None, _) if st.proc.is_some() => None,
                    (None, Supervision::Failed { .. }) => {
                        // The hold has expired: start afresh.
                        let audit = registry.audit.clone();
                        let fields = serde_json::json!({ "model": self.name, "by": "window" });
                        tokio::spawn(
                            async move { audit.note("breaker_closed", None, fields).await },
                        );
                        st.history.reset();
                        st.supervision = Supervision::Normal;
                        st.failed_reason = None;
                        st.loading = true;
                        Some(st.spec.clone())
                    }
                    (None, Supervision::Normal) => {
                        st.loading = true;
                        Some(st.spec.clone())
                    }
                }
            };
            let Some(spec) = spec else {
                drop(_spawning);
                if budget.is_spent() {
                    return Err(Error::deadline(format!(
                        "the budget ran out while the worker for `{}` restarted",
                        self.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50).min(budget.remaining())).await;
                continue;
            };
            let started = Instant::now();
            let result = registry.spawn(&spec, budget.remaining()).await;
            let mut st = self.lock();
            st.loading = false;
            let proc = Arc::new(result?);
            st.proc = Some(proc.clone());
            return Ok((proc, Some(started.elapsed().as_secs_f64() * 1000.0)));
        }
    }

    pub(crate) fn info(&self) -> Option<WorkerInfo> {
        let st = self.lock();
        let now = Instant::now();
        let proc = st.proc.as_ref().filter(|p| p.exit_status().is_none());
        let state = match (proc, st.supervision) {
            (_, Supervision::Failed { until }) if until > now => WorkerState::Failed,
            (_, Supervision::Restarting { .. }) => WorkerState::Restarting,
            (Some(_), _) if st.in_flight > 0 => WorkerState::Busy,
            (Some(_), _) => WorkerState::Ready,
            (None, _) if st.loading => WorkerState::Loading,
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
            port: proc.map(|p| p.port),
            restart_count: st.restart_count,
            last_exit: st.last_exit.clone(),
            last_restart: st.last_restart.map(epoch_secs),
            started_at: proc.map(|p| epoch_secs(p.started_at)),
            load_ms: proc.map(|p| p.load_ms),
            requests_served: st.served,
            in_flight: st.in_flight,
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
