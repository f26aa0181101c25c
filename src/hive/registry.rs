//! The hive's workers, one per model: a queue in front of each (one generation at a time until
//! the worker batches), spawning on first use, reuse, and unloading after `keep_alive` idle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Model;
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::hive::verify::Verifier;
use crate::hive::worker_proc::{STOP_GRACE, SpawnOptions, WorkerProc, model_path};
use crate::wire::{WorkerInfo, WorkerState};

pub struct Registry {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    verifier: Verifier,
    exe: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    pub keep_alive: Duration,
}

pub struct Entry {
    queue: Arc<Semaphore>,
    spawn_lock: tokio::sync::Mutex<()>,
    state: Mutex<EntryState>,
}

struct EntryState {
    spec: Model,
    proc: Option<Arc<WorkerProc>>,
    loading: bool,
    queued: u32,
    in_flight: u32,
    served: u64,
    last_used: Instant,
    last_exit: Option<String>,
    restart_count: u32,
    last_restart: Option<SystemTime>,
}

/// A place in a model's queue, held for the length of one generation.
pub struct Lease {
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
    pub fn new(exe: PathBuf, dir: PathBuf, log: PathBuf, keep_alive: Duration) -> Registry {
        Registry {
            entries: Mutex::new(HashMap::new()),
            verifier: Verifier::default(),
            exe,
            dir,
            log,
            keep_alive,
        }
    }

    fn entries(&self) -> Vec<(String, Arc<Entry>)> {
        match self.entries.lock() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(poisoned) => poisoned
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The entry for a model, created on first use; a changed spec replaces the stored one and
    /// takes effect at the next spawn.
    pub fn entry(&self, model: &Model) -> Result<Arc<Entry>> {
        let mut map = self
            .entries
            .lock()
            .map_err(|_| Error::internal("registry lock poisoned"))?;
        let entry = map.entry(model.name.clone()).or_insert_with(|| {
            Arc::new(Entry {
                queue: Arc::new(Semaphore::new(1)),
                spawn_lock: tokio::sync::Mutex::new(()),
                state: Mutex::new(EntryState {
                    spec: model.clone(),
                    proc: None,
                    loading: false,
                    queued: 0,
                    in_flight: 0,
                    served: 0,
                    last_used: Instant::now(),
                    last_exit: None,
                    restart_count: 0,
                    last_restart: None,
                }),
            })
        });
        entry.lock().spec = model.clone();
        Ok(entry.clone())
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut infos: Vec<WorkerInfo> = self
            .entries()
            .into_iter()
            .filter_map(|(name, entry)| entry.info(&name))
            .collect();
        infos.sort_by(|a, b| a.model.cmp(&b.model));
        infos
    }

    /// Stops the model's worker; false when none was running.
    pub async fn stop_worker(&self, model: &str) -> bool {
        let entry = self.entries().into_iter().find(|(n, _)| n == model);
        let proc = entry.and_then(|(_, e)| e.lock().proc.take());
        match proc {
            Some(p) => {
                tracing::info!(model, pid = p.pid, "stopping worker");
                p.stop(STOP_GRACE).await;
                true
            }
            None => false,
        }
    }

    pub async fn stop_all(&self) {
        let procs: Vec<Arc<WorkerProc>> = self
            .entries()
            .into_iter()
            .filter_map(|(_, e)| e.lock().proc.take())
            .collect();
        futures::future::join_all(procs.iter().map(|p| p.stop(STOP_GRACE))).await;
    }

    /// Unloads workers idle for `keep_alive`, and forgets workers that died while idle.
    pub async fn reap(&self) {
        for (name, entry) in self.entries() {
            let idle = {
                let mut st = entry.lock();
                if let Some(status) = st.proc.as_ref().and_then(|p| p.exit_status()) {
                    tracing::warn!(model = %name, %status, "idle worker exited");
                    st.last_exit = Some(status);
                    st.proc = None;
                }
                let unused = st.in_flight == 0 && st.queued == 0 && !st.loading;
                if unused && st.last_used.elapsed() >= self.keep_alive {
                    st.proc.take()
                } else {
                    None
                }
            };
            if let Some(proc) = idle {
                tracing::info!(model = %name, pid = proc.pid, "unloading idle worker");
                proc.stop(STOP_GRACE).await;
            }
        }
    }
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        // The state holds plain counters; one left half-updated by a panic is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this model's turn, until the budget runs out.
    pub async fn lease(self: &Arc<Self>, budget: &Budget) -> Result<Lease> {
        self.lock().queued += 1;
        let acquired =
            tokio::time::timeout_at(budget.deadline().into(), self.queue.clone().acquire_owned())
                .await;
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

    /// The running worker, or a new one (verified, spawned, loaded) within the budget. The
    /// second value is the load time when this call started it.
    pub async fn worker(
        &self,
        registry: &Registry,
        budget: &Budget,
    ) -> Result<(Arc<WorkerProc>, Option<f64>)> {
        let _spawning = self.spawn_lock.lock().await;
        let spec = {
            let mut st = self.lock();
            match st.proc.as_ref().map(|p| (p.clone(), p.exit_status())) {
                Some((proc, None)) => return Ok((proc, None)),
                Some((_, Some(status))) => {
                    st.last_exit = Some(status);
                    st.restart_count += 1;
                    st.last_restart = Some(SystemTime::now());
                    st.proc = None;
                }
                None => {}
            }
            st.loading = true;
            st.spec.clone()
        };
        let started = Instant::now();
        let result = self.spawn(registry, &spec, budget).await;
        let mut st = self.lock();
        st.loading = false;
        let proc = Arc::new(result?);
        st.proc = Some(proc.clone());
        Ok((proc, Some(started.elapsed().as_secs_f64() * 1000.0)))
    }

    async fn spawn(
        &self,
        registry: &Registry,
        spec: &Model,
        budget: &Budget,
    ) -> Result<WorkerProc> {
        let path = model_path(spec);
        tokio::time::timeout(
            budget.remaining(),
            registry.verifier.verify(&path, &spec.sha256),
        )
        .await
        .map_err(|_| Error::deadline("the budget ran out while verifying the model file"))??;
        let opts = SpawnOptions {
            exe: &registry.exe,
            hive_dir: &registry.dir,
            log: &registry.log,
        };
        let proc = WorkerProc::spawn(spec, &opts, budget.remaining()).await?;
        tracing::info!(model = %spec.name, pid = proc.pid, port = proc.port, load_ms = proc.load_ms, "worker ready");
        Ok(proc)
    }

    fn info(&self, name: &str) -> Option<WorkerInfo> {
        let st = self.lock();
        if st.proc.is_none() && !st.loading {
            return None;
        }
        let proc = st.proc.as_ref();
        let state = match proc {
            None => WorkerState::Loading,
            Some(_) if st.in_flight > 0 => WorkerState::Busy,
            Some(_) => WorkerState::Ready,
        };
        Some(WorkerInfo {
            model: name.to_string(),
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
        })
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
