//! The hive's table of workers, one entry per model, and what it does to them as a whole:
//! spawning a worker once its model file is verified, stopping them, and unloading those idle
//! for `keep_alive`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Model, RestartPolicy};
use crate::error::{Error, Result};
use crate::hive::entry::{Entry, Supervision};
use crate::hive::metrics::Metrics;
use crate::hive::verify::Verifier;
use crate::hive::worker_proc::{Exited, STOP_GRACE, SpawnOptions, WorkerProc, model_path};
use crate::protocol::WorkerInfo;

pub(crate) struct Registry {
    /// The node this hive serves, for messages.
    pub(crate) node: String,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// The models this hive serves, as the queen last sent them (`PUT /v1/models`), each with
    /// its digest: requests name a model, and run with the spec found here.
    table: Mutex<HashMap<String, (Model, String)>>,
    verifier: Verifier,
    exe: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    pub(crate) keep_alive: Duration,
    pub(crate) policy: RestartPolicy,
    exits: mpsc::UnboundedSender<Exited>,
    /// Signs the hive's requests to its workers; made anew at each hive start.
    pub(crate) worker_key: crate::auth::Key,
    /// The hive's own records (exits, restarts, loads), written in order off the work's path.
    pub(crate) notes: crate::audit::Notes,
    /// Cancelled when the hive begins to stop: from then on it takes no new work.
    pub(crate) stopping: CancellationToken,
    /// Names each worker's socket: a new one per spawn, so a replacement never binds the path
    /// of a worker that is still going away.
    sockets: AtomicU32,
    /// The hive's metrics: each spawn counts here, whoever asked for it.
    pub(crate) metrics: Arc<Metrics>,
}

impl Registry {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        node: String,
        exe: PathBuf,
        dir: PathBuf,
        log: PathBuf,
        keep_alive: Duration,
        policy: RestartPolicy,
        exits: mpsc::UnboundedSender<Exited>,
        audit: crate::audit::Audit,
        stopping: CancellationToken,
    ) -> Registry {
        Registry {
            node,
            entries: Mutex::new(HashMap::new()),
            table: Mutex::new(HashMap::new()),
            verifier: Verifier::default(),
            exe,
            dir,
            log,
            keep_alive,
            policy,
            exits,
            worker_key: crate::auth::Key::random(),
            notes: crate::audit::Notes::start(audit),
            stopping,
            sockets: AtomicU32::new(0),
            metrics: Arc::default(),
        }
    }

    /// The hive's own log.
    pub(crate) fn log(&self) -> &std::path::Path {
        &self.log
    }

    /// Where a model's worker writes its stderr.
    pub(crate) fn worker_log(&self, model: &str) -> PathBuf {
        self.dir.join(crate::hive::logs::worker_log_name(model))
    }

    /// What a request hears once the hive has begun to stop.
    pub(crate) fn stopping_error(&self) -> Error {
        Error::hive(format!(
            "the hive on `{}` is stopping and takes no new requests; start it again with \
             `rbee hive start {}`",
            self.node, self.node
        ))
    }

    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub(crate) fn find(&self, model: &str) -> Option<Arc<Entry>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(model).cloned()
    }

    /// The entry for a model, created on first use.
    pub(crate) fn entry(&self, model: &Model) -> Arc<Entry> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(model.name.clone())
            .or_insert_with(|| Arc::new(Entry::new(model)))
            .clone()
    }

    /// The spec of a model this hive serves; with `digest`, only when the queen means the
    /// same spec. `ModelSpec` otherwise, which makes the queen send the node's models again.
    pub(crate) fn served(&self, name: &str, digest: Option<&str>) -> Result<Model> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(name) {
            Some((spec, ours)) if digest.is_none_or(|d| d == ours) => Ok(spec.clone()),
            Some(_) => Err(Error::ModelSpec(format!(
                "the hive on `{}` serves `{name}` with another spec than the request's; the \
                 queen sends it the node's models from its nodes.toml",
                self.node
            ))),
            None => Err(Error::ModelSpec(format!(
                "the node `{}` does not serve the model `{name}`; add it to the node's `models` \
                 in nodes.toml",
                self.node
            ))),
        }
    }

    /// Replaces the table with `models` (already validated). A model whose spec changed takes
    /// it from its next spawn and next lease; a worker serving a changed or removed spec is
    /// stopped now when idle, else once idle (`reap`). What changed: names and digests.
    pub(crate) async fn update(&self, models: Vec<Model>) -> serde_json::Value {
        let new: HashMap<String, (Model, String)> = models
            .into_iter()
            .map(|m| {
                let digest = crate::protocol::model_digest(&m);
                (m.name.clone(), (m, digest))
            })
            .collect();
        let old = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *table, new.clone())
        };
        let mut changed = Vec::new();
        for entry in self.entries() {
            let outdated = match new.get(&entry.name) {
                Some((spec, _)) => {
                    let differs = entry.lock().spec != *spec;
                    if differs {
                        entry.respec(spec);
                    }
                    differs
                }
                None => true,
            };
            if outdated {
                changed.push(entry.clone());
            }
        }
        for entry in changed {
            let idle = {
                let mut st = entry.lock();
                st.outdated = st.proc.is_some();
                let unused = st.in_flight == 0 && st.queued == 0 && !st.loading;
                if unused { st.proc.take() } else { None }
            };
            if let Some(proc) = idle {
                entry.lock().outdated = false;
                tracing::info!(model = %entry.name, pid = proc.pid, "stopping a worker whose spec changed");
                self.stop_proc(&entry.name, &proc).await;
            }
        }
        let mut names: Vec<&String> = new.keys().collect();
        names.sort();
        let removed: Vec<&String> = old.keys().filter(|n| !new.contains_key(*n)).collect();
        serde_json::json!({
            "models": names.iter().map(|n| serde_json::json!({"model": n, "digest": new[*n].1})).collect::<Vec<_>>(),
            "removed": removed,
        })
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
                self.stop_proc(model, &p).await;
                true
            }
            None => false,
        }
    }

    pub(crate) async fn stop_all(&self) {
        let procs: Vec<(String, Arc<WorkerProc>)> = self
            .entries()
            .iter()
            .filter_map(|e| {
                let mut st = e.lock();
                st.supervision = Supervision::Normal;
                st.proc.take().map(|p| (e.name.clone(), p))
            })
            .collect();
        futures::future::join_all(procs.iter().map(|(model, p)| self.stop_proc(model, p))).await;
    }

    /// Stops a worker taken out of its entry, and records an exit that was not the answer to
    /// the stop (a crash during its grace), as the supervisor would have.
    pub(crate) async fn stop_proc(&self, model: &str, proc: &WorkerProc) {
        let Some(status) = proc.stop(STOP_GRACE).await else {
            return;
        };
        tracing::warn!(model, pid = proc.pid, status = %status, "worker crashed while being stopped");
        // As its exit was told (a SIGKILL while memory was low reads as the OOM killer's).
        let reason = proc.exited().map_or("crash", |e| e.reason);
        Metrics::add(&self.metrics.exits, 1);
        self.metrics.exit_of(model, reason);
        // Awaited: the stop's reply follows its record.
        self.notes
            .note(
                "worker_exited",
                serde_json::json!({
                    "model": model, "pid": proc.pid, "status": status, "reason": reason,
                    "next": "none",
                    "detail": { "reason": "it crashed while the hive stopped it" },
                }),
            )
            .await;
    }

    /// Called as a worker is put in its entry: one that exited before (while its load ended)
    /// had its exit skipped by the supervisor, which found no worker of that pid in the entry,
    /// so it is told again and the worker restarted, not listed as restarting for ever. Where
    /// the first telling is still queued, the second is skipped in turn (once the first is
    /// taken, the entry holds no worker of that pid).
    pub(crate) fn installed(&self, proc: &WorkerProc) {
        if let Some(exit) = proc.exited() {
            let _ = self.exits.send(exit);
        }
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
                if unused && alive && (st.outdated || st.last_used.elapsed() >= self.keep_alive) {
                    st.outdated = false;
                    st.proc.take()
                } else {
                    None
                }
            };
            if let Some(proc) = idle {
                tracing::info!(model = %entry.name, pid = proc.pid, "unloading idle worker");
                self.stop_proc(&entry.name, &proc).await;
            }
        }
    }

    /// Verifies the model and starts a worker for it, both within its `load_timeout`.
    pub(crate) async fn spawn(&self, spec: &Model) -> Result<WorkerProc> {
        let started = std::time::Instant::now();
        let path = model_path(spec);
        let verified = tokio::time::timeout(
            spec.load_timeout,
            self.verifier.verify(&path, &spec.sha256, &self.stopping),
        )
        .await
        .map_err(|_| {
            Error::worker(format!(
                "verifying the file of `{}` took longer than its load_timeout ({})",
                spec.name,
                humantime::format_duration(spec.load_timeout)
            ))
        })?;
        let (event, reason) = match &verified {
            Ok(()) => ("model_verified", None),
            Err(e) => ("model_refused", Some(e.to_string())),
        };
        // Queued, not awaited, as `worker_spawned` below: a load holds its model's spawn lock.
        self.notes.send(
            event,
            serde_json::json!({
                "model": spec.name,
                "path": path.display().to_string(),
                "sha256": spec.sha256,
                "reason": reason,
            }),
        );
        verified?;
        let slots = crate::hive::memory::plan(&path, spec, &self.exe).await?;
        let n = self.sockets.fetch_add(1, Ordering::Relaxed);
        let socket = self.dir.join(worker_socket_name(n));
        let log = self.worker_log(&spec.name);
        crate::hive::logs::rotate_if_large(&log);
        let opts = SpawnOptions {
            socket: &socket,
            exe: &self.exe,
            hive_dir: &self.dir,
            log: &log,
            node: &self.node,
            exits: self.exits.clone(),
            key: &self.worker_key,
        };
        let wait = spec.load_timeout.saturating_sub(started.elapsed());
        let proc = WorkerProc::spawn(spec, slots, &opts, wait).await?;
        Metrics::add(&self.metrics.spawns, 1);
        self.notes.send(
            "worker_spawned",
            serde_json::json!({
                "model": spec.name, "pid": proc.pid, "load_ms": proc.load_ms,
                "slots": proc.slots,
            }),
        );
        tracing::info!(model = %spec.name, pid = proc.pid, socket = %socket.display(), load_ms = proc.load_ms, slots = proc.slots, "worker ready");
        Ok(proc)
    }
}

/// `w<hex>.sock`: at most `paths::MAX_SOCKET_NAME` bytes, so the queen's check of the node's
/// directory covers every worker's socket too.
pub(crate) fn worker_socket_name(n: u32) -> String {
    format!("w{n:x}.sock")
}

/// Removes worker sockets left by a hive that was killed before it could remove them.
pub(crate) fn remove_stale_sockets(dir: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with('w') && name.ends_with(".sock");
        if ours && entry.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod socket_tests {
    #[test]
    fn worker_socket_names_fit_the_budget_the_queen_checks() {
        assert!(super::worker_socket_name(u32::MAX).len() <= crate::paths::MAX_SOCKET_NAME);
        assert!(crate::paths::HIVE_SOCKET.len() <= crate::paths::MAX_SOCKET_NAME);
    }
}
