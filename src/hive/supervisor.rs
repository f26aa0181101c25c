//! Carries out restart decisions: a worker that exits unexpectedly is started again after its
//! backoff, or held back as failed; a worker that stops answering is killed (and so restarted);
//! workers left behind by a previous hive are cleaned up.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hive::entry::{Entry, Supervision};
use crate::hive::metrics::Metrics;
use crate::hive::policy::{Decision, GiveUp};
use crate::hive::registry::Registry;
use crate::hive::worker_proc::{Exited, KillReason};

/// How often idle workers are asked whether they are alive, and how long they may take.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn supervise(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mut exits: mpsc::UnboundedReceiver<Exited>,
) {
    while let Some(exit) = exits.recv().await {
        let Some(entry) = registry.find(&exit.model) else {
            continue;
        };
        let decision = {
            let mut st = entry.lock();
            // A worker stopped on purpose was taken out of its entry first.
            if st.proc.as_ref().is_none_or(|p| p.pid != exit.pid) {
                continue;
            }
            st.proc = None;
            st.last_exit = Some(exit.status.clone());
            st.last_exit_reason = Some(exit.reason);
            // A hive that is stopping restarts nothing: the exit is told as it was (a crash
            // is a crash), without a restart that will not come or a count toward the breaker.
            (!registry.stopping.is_cancelled())
                .then(|| decide(&registry, &mut st, exit.uptime, &metrics))
        };
        Metrics::add(&metrics.exits, 1);
        metrics.exit_of(&exit.model, exit.reason);
        tracing::warn!(model = %exit.model, pid = exit.pid, status = %exit.status, ?decision, "worker exited unexpectedly");
        let (next, detail) = match decision {
            None => (
                "none",
                serde_json::json!({ "reason": "the hive is stopping" }),
            ),
            Some(Decision::Restart { attempt, delay }) => (
                "restart",
                serde_json::json!({ "attempt": attempt, "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX) }),
            ),
            Some(Decision::GiveUp { reason, .. }) => (
                "give_up",
                serde_json::json!({ "reason": format!("{reason:?}") }),
            ),
        };
        // Queued, not awaited: the next exit and the restart do not wait for the log's lock,
        // and the restart's own records come after this one.
        registry.notes.send(
            "worker_exited",
            serde_json::json!({
                "model": exit.model, "pid": exit.pid, "status": exit.status,
                "reason": exit.reason,
                "uptime_ms": u64::try_from(exit.uptime.as_millis()).unwrap_or(u64::MAX),
                "next": next, "detail": detail,
            }),
        );
        if let Some(Decision::GiveUp { reason, .. }) = decision {
            registry.notes.send(
                "breaker_opened",
                serde_json::json!({ "model": exit.model, "reason": format!("{reason:?}") }),
            );
        }
        if let Some(Decision::Restart { delay, .. }) = decision {
            tokio::spawn(restart_after(
                registry.clone(),
                entry,
                delay,
                metrics.clone(),
            ));
        }
    }
}

fn decide(
    registry: &Registry,
    st: &mut crate::hive::entry::EntryState,
    uptime: Duration,
    metrics: &Metrics,
) -> Decision {
    let now = tokio::time::Instant::now();
    let decision = st
        .history
        .on_exit(&registry.policy, now, uptime, rand::random());
    match decision {
        Decision::Restart { delay, .. } => {
            st.supervision = Supervision::Restarting {
                at: Instant::now() + delay,
            };
            st.last_backoff = Some(delay);
        }
        Decision::GiveUp { reason, until } => {
            st.supervision = Supervision::Failed {
                until: until.into_std(),
            };
            st.failed_reason = Some(match reason {
                GiveUp::Attempts(n) => format!("{n} restarts in a row failed"),
                GiveUp::Breaker(n) => format!(
                    "circuit breaker open after {n} failures within {}",
                    humantime::format_duration(registry.policy.breaker_window)
                ),
            });
            Metrics::add(&metrics.breaker_opens, 1);
        }
    }
    decision
}

async fn restart_after(
    registry: Arc<Registry>,
    entry: Arc<Entry>,
    mut delay: Duration,
    metrics: Arc<Metrics>,
) {
    loop {
        tokio::time::sleep(delay).await;
        let _spawning = entry.spawn_lock().await;
        if registry.stopping.is_cancelled() {
            return;
        }
        let served = registry.served(&entry.name, None).ok();
        let spec = {
            let mut st = entry.lock();
            // An operator (stop, restart) took over in the meantime.
            if !matches!(st.supervision, Supervision::Restarting { .. }) {
                return;
            }
            if served.is_none() {
                // Removed from the node's models since the exit: nothing to bring back.
                st.supervision = Supervision::Normal;
                st.outdated = false;
                tracing::info!(model = %entry.name, "not restarting a model the node no longer serves");
                return;
            }
            st.loading = true;
            st.spec.clone()
        };
        let result = registry.spawn(&spec).await;
        let current = registry.served(&entry.name, None).ok();
        let mut st = entry.lock();
        st.loading = false;
        match result {
            Ok(proc) => {
                entry.started(&spec, &proc);
                tracing::info!(model = %entry.name, pid = proc.pid, "worker restarted");
                registry.notes.send(
                    "worker_restarted",
                    serde_json::json!({ "model": entry.name, "pid": proc.pid }),
                );
                let proc = Arc::new(proc);
                st.proc = Some(proc.clone());
                // Started with the current spec, unless the table changed during the load.
                st.outdated = current.as_ref() != Some(&spec);
                registry.installed(&proc);
                st.supervision = Supervision::Normal;
                st.restart_count += 1;
                st.last_restart = Some(SystemTime::now());
                Metrics::add(&metrics.restarts, 1);
                return;
            }
            Err(e) => {
                tracing::warn!(model = %entry.name, "restart failed: {e}");
                st.last_exit = Some(format!("restart failed: {e}"));
                match decide(&registry, &mut st, Duration::ZERO, &metrics) {
                    Decision::Restart { delay: next, .. } => delay = next,
                    Decision::GiveUp { .. } => return,
                }
            }
        }
    }
}

/// Kills idle workers that missed `misses` health checks in a row; the supervisor restarts
/// them. Busy workers are watched by their request instead (no token for a while).
pub(crate) async fn liveness(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    misses: u32,
    stop: CancellationToken,
) {
    // Missed checks in a row, by worker pid: a new process starts from zero.
    let mut missed: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LIVENESS_EVERY) => {}
        }
        for entry in registry.entries() {
            let proc = {
                let st = entry.lock();
                if st.in_flight > 0 {
                    // It answers its requests: earlier misses are not in a row any more.
                    if let Some(p) = &st.proc {
                        missed.remove(&p.pid);
                    }
                    continue;
                }
                st.proc.clone().filter(|p| p.exit_status().is_none())
            };
            let Some(proc) = proc else { continue };
            let healthy = proc
                .http
                .get(proc.url("/health"))
                .timeout(LIVENESS_TIMEOUT)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy || proc.exit_status().is_some() {
                missed.remove(&proc.pid);
                continue;
            }
            let count = missed.entry(proc.pid).or_default();
            *count += 1;
            if *count < misses {
                tracing::warn!(model = %entry.name, pid = proc.pid, "worker missed a health check ({count} of {misses} in a row)");
                continue;
            }
            missed.remove(&proc.pid);
            tracing::warn!(model = %entry.name, pid = proc.pid, "worker missed {misses} health checks in a row; killing it");
            Metrics::add(&metrics.stuck_kills, 1);
            proc.kill(KillReason::Health);
        }
        // Forget workers that are gone.
        let live: std::collections::HashSet<u32> = registry
            .entries()
            .iter()
            .filter_map(|e| e.lock().proc.as_ref().map(|p| p.pid))
            .collect();
        missed.retain(|pid, _| live.contains(pid));
    }
}

/// Workers of a previous hive on this directory (killed before it could stop them) are killed.
pub(crate) fn kill_orphans(dir: &Path) {
    let marker = format!("--hive-dir\0{}\0", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("worker\0serve\0") && cmdline.contains(&marker) {
            tracing::warn!(pid, "killing a worker left by a previous hive");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
