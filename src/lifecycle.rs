//! A node's hive as a small state machine seen from the queen: probe it (ready, needs a
//! restart, unreachable), start it detached and wait until it is ready, stop it gracefully.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::HiveClient;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::hive::{LOG_FILE, PID_FILE, pidfile};
use crate::paths;
use crate::wire::{HiveHealth, PROTOCOL_VERSION};

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
const STOP_WAIT: Duration = Duration::from_secs(15);

pub enum Probe {
    Ready(HiveHealth),
    /// A hive answers, but of another version or protocol.
    NeedsRestart(HiveHealth),
    Unreachable(Error),
}

pub async fn probe(client: &HiveClient, timeout: Duration) -> Probe {
    match client.health(timeout.min(PROBE_TIMEOUT)).await {
        Ok(h) if h.protocol == PROTOCOL_VERSION && h.version == env!("CARGO_PKG_VERSION") => {
            Probe::Ready(h)
        }
        Ok(h) => Probe::NeedsRestart(h),
        Err(e) => Probe::Unreachable(e),
    }
}

/// The outcome of making sure a hive runs.
pub struct Running {
    pub health: HiveHealth,
    /// Whether this call started it.
    pub started: bool,
    pub elapsed: Duration,
}

/// The node's directory on this machine (local transport only).
pub fn local_dir(node: &Node) -> PathBuf {
    paths::expand_tilde(&node.remote_dir)
}

pub async fn ensure_running(node: &Node, client: &HiveClient, budget: &Budget) -> Result<Running> {
    let t0 = Instant::now();
    match probe(client, budget.remaining()).await {
        Probe::Ready(health) => Ok(Running {
            health,
            started: false,
            elapsed: t0.elapsed(),
        }),
        Probe::NeedsRestart(h) => {
            tracing::info!(node = %node.name, version = %h.version, protocol = h.protocol, "restarting a hive of another version");
            stop(node, client).await?;
            start(node, client, budget, t0).await
        }
        Probe::Unreachable(e) => {
            tracing::debug!(node = %node.name, "hive not reachable ({e}); starting it");
            start(node, client, budget, t0).await
        }
    }
}

async fn start(node: &Node, client: &HiveClient, budget: &Budget, t0: Instant) -> Result<Running> {
    if node.transport != Transport::Local {
        return Err(Error::hive(format!(
            "cannot start the hive on `{}`: only `transport = \"local\"` nodes are supported by this build",
            node.name
        )));
    }
    let dir = local_dir(node);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::hive(format!("cannot create `{}`: {e}", dir.display())))?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("hive")
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .arg("--port")
        .arg(node.hive_port.to_string())
        .arg("--node")
        .arg(&node.name)
        .arg("--keep-alive")
        .arg(format!("{}ms", node.keep_alive.as_millis()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::hive(format!("cannot start the hive on `{}`: {e}", node.name)))?;
    tracing::info!(node = %node.name, pid = child.id(), "hive starting");

    let mut last_error;
    let mut exited_at: Option<Instant> = None;
    loop {
        match probe(client, budget.remaining()).await {
            Probe::Ready(health) => {
                return Ok(Running {
                    health,
                    started: true,
                    elapsed: t0.elapsed(),
                });
            }
            Probe::NeedsRestart(h) => {
                last_error = format!("a hive of version {} answers", h.version)
            }
            Probe::Unreachable(e) => last_error = e.message,
        }
        // Our child may exit because a concurrent `rbee` started the hive first; give that
        // one a moment to answer before reporting the failure.
        if exited_at.is_none() && matches!(child.try_wait(), Ok(Some(_))) {
            exited_at = Some(Instant::now());
        }
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            return Err(Error::hive(format!(
                "the hive on `{}` exited during start: {}",
                node.name,
                log_tail(&dir.join(LOG_FILE)).unwrap_or(last_error)
            )));
        }
        if budget.is_spent() {
            return Err(Error::deadline(format!(
                "the hive on `{}` was not ready within the budget ({last_error})",
                node.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20).min(budget.remaining())).await;
    }
}

/// The last error line of a hive log, for a message a person can act on.
fn log_tail(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .map(|l| l.split("ERROR").last().unwrap_or(l).trim().to_string())
}

pub enum Stopped {
    Stopped { pid: i32 },
    NotRunning,
}

/// Asks the hive to shut down, waits for its process to go, and kills it if it will not.
pub async fn stop(node: &Node, client: &HiveClient) -> Result<Stopped> {
    let pid = match probe(client, PROBE_TIMEOUT).await {
        Probe::Ready(h) | Probe::NeedsRestart(h) => {
            let pid = i32::try_from(h.pid).unwrap_or(i32::MAX);
            if let Err(e) = client.shutdown(PROBE_TIMEOUT).await {
                tracing::warn!(node = %node.name, "shutdown request failed ({e}); sending SIGTERM");
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            pid
        }
        Probe::Unreachable(_) if node.transport == Transport::Local => {
            // Not answering, but maybe alive (stuck, or still starting): the pidfile knows.
            let pidfile = local_dir(node).join(PID_FILE);
            match pidfile::read_pid(&pidfile).filter(|_| pidfile::is_locked(&pidfile)) {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    pid
                }
                None => return Ok(Stopped::NotRunning),
            }
        }
        Probe::Unreachable(_) => return Ok(Stopped::NotRunning),
    };
    if !wait_gone(pid, STOP_WAIT).await {
        tracing::warn!(node = %node.name, pid, "hive did not stop in time; killing it");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        if !wait_gone(pid, Duration::from_secs(2)).await {
            return Err(Error::hive(format!(
                "the hive on `{}` (pid {pid}) did not stop",
                node.name
            )));
        }
    }
    Ok(Stopped::Stopped { pid })
}

pub fn is_alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

async fn wait_gone(pid: i32, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if !is_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !is_alive(pid)
}
