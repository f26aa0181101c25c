//! One worker process: spawning it, reading its hello line, watching it exit, stopping it
//! (SIGTERM, a grace period, then SIGKILL; "no such process" counts as gone).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, mpsc, watch};

use crate::config::Model;
use crate::error::{Error, IoContext, Result};
use crate::paths;
use crate::protocol::WorkerHello;

pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct WorkerProc {
    pub(crate) pid: u32,
    /// The Unix socket it serves on, and a client that connects there.
    pub(crate) socket: PathBuf,
    pub(crate) http: reqwest::Client,
    pub(crate) load_ms: f64,
    pub(crate) offload: crate::protocol::Offload,
    /// Generations it decodes together: the model's `slots`, or the count the hive derived.
    pub(crate) slots: u32,
    pub(crate) started_at: SystemTime,
    exit: watch::Receiver<Option<Exited>>,
    /// Why the hive killed it, set just before the signal, so that its exit is told as that
    /// and not as a crash.
    killed: std::sync::Arc<std::sync::Mutex<Option<KillReason>>>,
    /// Our end of the worker's stdin: while it is open the worker knows its hive lives.
    stdin: Mutex<Option<ChildStdin>>,
    _stdout: ChildStdout,
}

pub(crate) struct SpawnOptions<'a> {
    /// Where the worker listens, inside the hive's directory.
    pub(crate) socket: &'a Path,
    pub(crate) exe: &'a Path,
    pub(crate) hive_dir: &'a Path,
    pub(crate) log: &'a Path,
    /// The node's name, for messages that say how to read the log.
    pub(crate) node: &'a str,
    /// Where the worker's exit is reported, for the supervisor.
    pub(crate) exits: mpsc::UnboundedSender<Exited>,
    /// The key the hive signs its requests to workers with.
    pub(crate) key: &'a crate::auth::Key,
}

/// A worker process that has exited.
#[derive(Debug, Clone)]
pub(crate) struct Exited {
    pub(crate) model: String,
    pub(crate) pid: u32,
    pub(crate) status: String,
    /// What the exit most likely was: `crash`, a [`KillReason`], `oom`, `likely_oom` or
    /// `signal` (killed from outside the hive).
    pub(crate) reason: &'static str,
    pub(crate) uptime: Duration,
}

/// Why the hive itself killed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillReason {
    /// A request's worker sent nothing for the stall timeout.
    Stuck,
    /// An idle worker missed its health check too many times in a row.
    Health,
}

impl KillReason {
    pub(crate) fn name(self) -> &'static str {
        match self {
            KillReason::Stuck => "stuck",
            KillReason::Health => "health",
        }
    }

    fn told(self) -> &'static str {
        match self {
            KillReason::Stuck => "killed by the hive: it sent nothing during a request",
            KillReason::Health => "killed by the hive: it missed its health checks",
        }
    }
}

/// The node's memory at one moment, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryView {
    /// The kernel's count of OOM kills (`oom_kill` in /proc/vmstat).
    pub(crate) oom_kills: Option<u64>,
    pub(crate) available_kib: Option<u64>,
    pub(crate) total_kib: Option<u64>,
    /// Below this percentage of the total available, memory counts as low.
    pub(crate) low_percent: u64,
}

/// The hive's setting for "memory is low": `RBEE_LOW_MEMORY_PERCENT` (0 to 100) in its
/// environment, 10 when unset or out of range. A test sets it above what the machine has
/// available to see how a kill while memory is short is told.
pub(crate) const LOW_MEMORY_ENV: &str = "RBEE_LOW_MEMORY_PERCENT";

fn low_percent() -> u64 {
    std::env::var(LOW_MEMORY_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|p| *p <= 100)
        .unwrap_or(10)
}

impl MemoryView {
    pub(crate) fn now() -> MemoryView {
        let field = |text: &str, name: &str| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?;
                rest.trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        };
        let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        MemoryView {
            oom_kills: field(&vmstat, "oom_kill "),
            available_kib: field(&meminfo, "MemAvailable:"),
            total_kib: field(&meminfo, "MemTotal:"),
            low_percent: low_percent(),
        }
    }

    /// Under `low_percent` of the memory (a tenth by default) is available: what the OOM
    /// killer acts on.
    fn low(&self) -> bool {
        match (self.available_kib, self.total_kib) {
            (Some(a), Some(t)) => a.saturating_mul(100) < t.saturating_mul(self.low_percent),
            _ => false,
        }
    }
}

/// Tells an exit as it most likely happened: a SIGKILL the hive did not send, while the kernel
/// counted an OOM kill or memory was short, is the OOM killer's; a kill the hive sent is told by
/// its reason; anything else is a crash (or a signal from someone else).
pub(crate) fn classify(
    status: &str,
    sigkill: bool,
    killed: Option<KillReason>,
    at_spawn: MemoryView,
    at_exit: MemoryView,
) -> (String, &'static str) {
    if let Some(reason) = killed {
        return (format!("{status} ({})", reason.told()), reason.name());
    }
    if sigkill {
        if let (Some(before), Some(after)) = (at_spawn.oom_kills, at_exit.oom_kills)
            && after > before
        {
            return (
                format!("{status} (killed by the kernel's OOM killer)"),
                "oom",
            );
        }
        if at_exit.low() {
            return (
                format!(
                    "{status} (likely the OOM killer: memory was low, {} MiB of {} MiB available)",
                    at_exit.available_kib.unwrap_or(0) / 1024,
                    at_exit.total_kib.unwrap_or(0) / 1024
                ),
                "likely_oom",
            );
        }
        return (format!("{status} (not sent by the hive)"), "signal");
    }
    (status.to_string(), "crash")
}

impl WorkerProc {
    /// Starts a worker for `model` with `slots` (its own, or the count the hive derived).
    pub(crate) async fn spawn(
        model: &Model,
        slots: u32,
        opts: &SpawnOptions<'_>,
        wait: Duration,
    ) -> Result<WorkerProc> {
        let model_path = model_path(model);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(opts.log)
            .at("open the log", opts.log)?;
        let mut cmd = Command::new(opts.exe);
        cmd.arg("worker")
            .arg("serve")
            .arg("--model")
            .arg(&model.name)
            .arg("--model-path")
            .arg(&model_path)
            .arg("--gpu-layers")
            .arg(model.gpu_layers.arg())
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--hive-dir")
            .arg(opts.hive_dir)
            .arg("--socket")
            .arg(opts.socket);
        if let Some(context) = model.context {
            cmd.arg("--context").arg(context.to_string());
        }
        if let Some(threads) = model.threads {
            cmd.arg("--threads").arg(threads.to_string());
        }
        if model.kv_unified {
            cmd.arg("--kv-unified");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            Error::worker(format!("cannot start a worker for `{}`: {e}", model.name))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| Error::worker("worker exited before it could be watched"))?;
        let mut stdin = child.stdin.take();
        if let Some(pipe) = stdin.as_mut() {
            use tokio::io::AsyncWriteExt;
            let line = format!("{}\n", opts.key.to_hex());
            pipe.write_all(line.as_bytes())
                .await
                .map_err(|e| Error::worker(format!("cannot hand the worker its key: {e}")))?;
        }
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::internal("worker stdout was not piped"))?;
        let hello = tokio::time::timeout(wait, read_hello(&mut stdout)).await;
        let hello = match hello {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let status = child.wait().await.map(describe_exit).unwrap_or_default();
                return Err(Error::worker(format!(
                    "worker for `{}` exited while loading ({status}): {e}; `rbee logs {} --model \
                     {}` shows its log",
                    model.name, opts.node, model.name
                )));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(Error::worker(format!(
                    "loading `{}` took longer than its load_timeout ({}); raise `load_timeout` \
                     in its [models] table if the node is just slow",
                    model.name,
                    humantime::format_duration(model.load_timeout)
                )));
            }
        };
        let (load_ms, offload) = match hello {
            WorkerHello::Ready {
                load_ms, offload, ..
            } => (load_ms, offload),
            WorkerHello::Failed { message } => {
                let _ = child.wait().await;
                return Err(Error::worker(format!(
                    "worker for `{}` could not load the model: {message}",
                    model.name
                )));
            }
        };
        let http = reqwest::Client::builder()
            .unix_socket(opts.socket)
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let killed = std::sync::Arc::new(std::sync::Mutex::new(None));
        tokio::spawn(watch_exit(
            child,
            exit_tx,
            opts.exits.clone(),
            model.name.clone(),
            opts.socket.to_path_buf(),
            killed.clone(),
        ));
        Ok(WorkerProc {
            pid,
            socket: opts.socket.to_path_buf(),
            http,
            load_ms,
            offload,
            slots,
            started_at: SystemTime::now(),
            exit: exit_rx,
            killed,
            stdin: Mutex::new(stdin),
            _stdout: stdout,
        })
    }

    /// How it exited, once it has.
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exit.borrow().as_ref().map(|e| e.status.clone())
    }

    /// Its exit as the supervisor was told it, once it has exited.
    pub(crate) fn exited(&self) -> Option<Exited> {
        self.exit.borrow().clone()
    }

    /// The URL of `path` on this worker; the host part is a name only, `http` connects to the
    /// worker's socket whatever it says.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://worker{path}")
    }

    /// SIGKILL at once: for a worker that is stuck (stopped, or not answering).
    pub(crate) fn kill(&self, reason: KillReason) {
        if let Ok(mut killed) = self.killed.lock() {
            killed.get_or_insert(reason);
        }
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGKILL);
    }

    /// Stops the worker: SIGTERM (and its stdin closed), `grace` to exit, then SIGKILL. Its exit
    /// when that was not the answer to the stop (it crashed meanwhile: an abort, a signal from
    /// elsewhere), for the caller to record: the supervisor no longer watches a worker taken
    /// out of its entry.
    pub(crate) async fn stop(&self, grace: Duration) -> Option<String> {
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let mut exit = self.exit.clone();
        // One that has exited is reaped already: its pid may be another process's by now.
        if exit.borrow().is_none() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        self.stdin.lock().await.take();
        let timed_out = tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_err();
        if timed_out {
            tracing::warn!(pid = self.pid, "worker ignored SIGTERM; killing it");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = exit.wait_for(Option::is_some).await;
            return None;
        }
        let status = exit.borrow().as_ref()?.status.clone();
        // A worker ends a stop with exit 0, or by SIGTERM itself before its handler is set.
        (!matches!(status.as_str(), "exit code 0" | "signal SIGTERM")).then_some(status)
    }
}

async fn read_hello(stdout: &mut ChildStdout) -> Result<WorkerHello> {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .doing("read the worker's first line")?;
    if line.is_empty() {
        return Err(Error::worker("it printed nothing"));
    }
    serde_json::from_str(&line).map_err(|e| Error::worker(format!("unreadable hello line: {e}")))
}

async fn watch_exit(
    mut child: Child,
    tx: watch::Sender<Option<Exited>>,
    exits: mpsc::UnboundedSender<Exited>,
    model: String,
    socket: PathBuf,
    killed: std::sync::Arc<std::sync::Mutex<Option<KillReason>>>,
) {
    let started = std::time::Instant::now();
    let at_spawn = MemoryView::now();
    let pid = child.id().unwrap_or(0);
    let (status, sigkill) = match child.wait().await {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            (
                describe_exit(status),
                status.signal() == Some(Signal::SIGKILL as i32),
            )
        }
        Err(e) => (format!("unknown ({e})"), false),
    };
    let killed = killed.lock().ok().and_then(|k| *k);
    let (status, reason) = classify(&status, sigkill, killed, at_spawn, MemoryView::now());
    tracing::info!(model = %model, pid, status = %status, "worker exited");
    // Its socket names a path no one listens on any more; each spawn gets a new one.
    let _ = std::fs::remove_file(&socket);
    let exit = Exited {
        model,
        pid,
        status,
        reason,
        uptime: started.elapsed(),
    };
    let _ = tx.send(Some(exit.clone()));
    let _ = exits.send(exit);
}

/// `exit code N` or `signal NAME`, as a person reads it.
pub(crate) fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("signal {}", s.as_str()),
            Err(_) => format!("signal {sig}"),
        }
    } else {
        "unknown".to_string()
    }
}

/// The model path on this node (`~` is this node's home).
pub(crate) fn model_path(model: &Model) -> PathBuf {
    paths::expand_tilde(&model.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(oom_kills: u64, available_mib: u64) -> MemoryView {
        MemoryView {
            oom_kills: Some(oom_kills),
            available_kib: Some(available_mib * 1024),
            total_kib: Some(16 * 1024 * 1024),
            low_percent: 10,
        }
    }

    #[test]
    fn an_exit_is_told_as_what_it_most_likely_was() {
        let plenty = view(0, 8 * 1024);
        let told =
            |sigkill, killed, at_exit| classify("signal SIGKILL", sigkill, killed, plenty, at_exit);
        // The hive's own kill is told by its reason, whatever the memory.
        assert_eq!(
            told(true, Some(KillReason::Health), view(1, 10)).1,
            "health"
        );
        assert_eq!(told(true, Some(KillReason::Stuck), plenty).1, "stuck");
        // The kernel counted an OOM kill while the worker lived.
        let (status, reason) = told(true, None, view(1, 8 * 1024));
        assert_eq!(reason, "oom");
        assert!(status.contains("OOM killer"), "{status}");
        // No count (a kernel or container that hides it), but memory under a tenth.
        let low = view(0, 1024);
        let (status, reason) = told(true, None, low);
        assert_eq!(reason, "likely_oom");
        assert!(
            status.contains("1024 MiB of 16384 MiB available"),
            "{status}"
        );
        assert_eq!(told(true, None, plenty).1, "signal");
        // A crash is a crash, even with memory short.
        assert_eq!(
            classify("exit code 134", false, None, plenty, low),
            ("exit code 134".to_string(), "crash")
        );
    }

    #[test]
    fn the_memory_view_reads_this_machine() {
        let v = MemoryView::now();
        assert!(v.total_kib.is_some_and(|t| t > 0), "{v:?}");
        assert!(v.available_kib.is_some(), "{v:?}");
    }
}
