//! A node's hive as a small state machine seen from the queen: probe it (ready, needs a
//! restart, unreachable), start it detached (locally, or over SSH after installing) and wait
//! until it is ready, stop it: by a signed request, else through the process that holds the
//! pidfile's lock, never through a pid that something answering on the socket reported.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::Node;
use crate::deadline::Budget;
use crate::error::{Error, IoContext, Result};
use crate::hive::{LOG_FILE, PID_FILE, pidfile};
use crate::paths;
use crate::progress::Progress;
use crate::protocol::{HiveHealth, ModelTable, is_older, own_protocol, own_version};
use crate::queen::client::HiveClient;
use crate::queen::install;
use crate::queen::node::NodeConn;
use crate::ssh::remote;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a stopping hive may take before it is killed: the longest it takes by itself (its
/// drain, its workers' stop, its last record), and a margin.
const STOP_WAIT: Duration = crate::hive::LONGEST_STOP.saturating_add(Duration::from_millis(500));

pub(crate) enum Probe {
    Ready(HiveHealth),
    /// A hive of an older rbee, idle: this queen replaces it with its own version.
    NeedsRestart(HiveHealth),
    /// A hive this queen cannot talk to and must leave alone: another protocol, and newer than
    /// this rbee or busy.
    Incompatible(HiveHealth),
    /// A hive answers, and refuses this machine's signature (401).
    Refused(Error),
    Unreachable(Error),
}

pub(crate) async fn probe(client: &HiveClient, timeout: Duration) -> Probe {
    let timeout = timeout.min(PROBE_TIMEOUT);
    match client.health_or_refusal(timeout).await {
        Ok(crate::queen::client::Health::Refused(e)) => Probe::Refused(e),
        Ok(crate::queen::client::Health::Answered(mut h)) => {
            // A hive from before its health counted its requests is asked for them, so that
            // whether it is idle is known, not guessed.
            if let Some(detail) = h.signed.as_mut().filter(|d| d.requests.is_none())
                && is_older(&h.version, &own_version())
            {
                detail.requests = client.requests(timeout).await.ok().map(|r| r.len());
            }
            negotiate(h)
        }
        Err(e) => Probe::Unreachable(e),
    }
}

/// What a queen does with a hive that answers: use it when it speaks this protocol; replace it
/// only when it is older than this rbee and idle (so two machines on two versions do not take
/// turns stopping each other's hive: the newer one replaces, the older one uses what it
/// finds); otherwise leave it alone.
fn negotiate(h: HiveHealth) -> Probe {
    let (version, protocol) = (own_version(), own_protocol());
    if h.protocol == protocol && h.version == version {
        return Probe::Ready(h);
    }
    let idle = h.signed.as_ref().and_then(|d| d.requests) == Some(0);
    if is_older(&h.version, &version) && idle {
        return Probe::NeedsRestart(h);
    }
    if h.protocol == protocol {
        Probe::Ready(h)
    } else {
        Probe::Incompatible(h)
    }
}

/// Why a hive of another protocol is left running, and what to run instead.
pub(crate) fn incompatible(node: &Node, h: &HiveHealth) -> Error {
    let (version, protocol) = (own_version(), own_protocol());
    let what = if is_older(&version, &h.version) {
        format!(
            "install rbee {} or later on this machine, or stop that hive with `rbee hive stop {}` \
             to start this version (its models and requests go with it)",
            h.version, node.name
        )
    } else {
        let busy = match h.signed.as_ref().and_then(|d| d.requests) {
            Some(n) => format!("{n} requests under way"),
            None => "whether requests are under way is unknown".to_string(),
        };
        format!(
            "it is busy ({busy}) and is not stopped for them; run this again once it is idle, or \
             stop it with `rbee hive stop {}`",
            node.name
        )
    };
    Error::hive(format!(
        "the hive on `{}` runs rbee {} (protocol {}), and this is rbee {version} (protocol \
         {protocol}), which cannot talk to it; it was left running: {what}",
        node.name, h.version, h.protocol
    ))
}

/// The outcome of making sure a hive runs.
pub(crate) struct Running {
    pub(crate) health: HiveHealth,
    /// Whether this call started it.
    pub(crate) started: bool,
    pub(crate) elapsed: Duration,
}

/// The node's directory on this machine (local transport only).
pub(crate) fn local_dir(node: &Node) -> PathBuf {
    paths::expand_tilde(&node.remote_dir)
}

/// Makes sure the node's hive runs; one this call starts gets `models` (the node's, from
/// nodes.toml) before it is used.
pub(crate) async fn ensure_running(
    conn: &mut NodeConn,
    models: &ModelTable,
    budget: &Budget,
    progress: &Progress,
) -> Result<Running> {
    let running = running(conn, budget, progress).await?;
    if running.started {
        conn.client
            .update_models(models, budget.remaining())
            .await?;
    }
    Ok(running)
}

async fn running(conn: &mut NodeConn, budget: &Budget, progress: &Progress) -> Result<Running> {
    let t0 = Instant::now();
    let mut probed = probe(&conn.client, budget.remaining()).await;
    // A hive on its way out takes no new work: wait for it to let go of its pidfile, then
    // start the next one. Another queen waiting for the same may start it first, the moment
    // the lock is free: a lock held under another pid is that new hive, asked again.
    while let Probe::Ready(health) = &probed
        && health.status == crate::protocol::HIVE_STOPPING
    {
        let stopping = health.signed.as_ref().map(|d| d.pid);
        tracing::info!(node = %conn.node.name, "the hive is stopping; starting a new one once it is gone");
        loop {
            match lock_holder(conn, budget).await? {
                None => return start(conn, budget, t0, progress).await,
                Some(pid) if stopping.is_some_and(|s| s != pid) => break,
                Some(_) => {}
            }
            if budget.is_spent() {
                return Err(Error::deadline(format!(
                    "the budget ran out while the hive on `{}` was stopping",
                    conn.node.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        probed = probe(&conn.client, budget.remaining()).await;
    }
    match probed {
        Probe::Ready(health) => Ok(Running {
            health,
            started: false,
            elapsed: t0.elapsed(),
        }),
        Probe::NeedsRestart(h) => {
            tracing::info!(node = %conn.node.name, version = %h.version, protocol = h.protocol, "replacing an idle hive of an older rbee");
            stop(conn, budget).await?;
            start(conn, budget, t0, progress).await
        }
        Probe::Incompatible(h) => Err(incompatible(&conn.node, &h)),
        // A hive answers but refuses our signature: starting another would not help. Over SSH
        // the node says whether it has this machine's key; one it has not is left waiting for
        // approval, and the refusal says what to run.
        Probe::Refused(e) if !conn.is_local() => {
            let node = conn.node.clone();
            let key = crate::auth::Key::load_or_create(&node.key_file)?;
            let session = conn.ssh(budget).await?;
            match install::enroll_key(session, &node, &key).await? {
                install::Enrollment::Pending => Err(install::not_enrolled(&node, &key)),
                install::Enrollment::Enrolled | install::Enrollment::First => Err(e),
            }
        }
        Probe::Refused(e) => Err(e),
        Probe::Unreachable(e @ Error::Unauthenticated(_)) => Err(e),
        Probe::Unreachable(e) => {
            tracing::debug!(node = %conn.node.name, "hive not reachable ({e}); starting it");
            start(conn, budget, t0, progress).await
        }
    }
}

async fn start(
    conn: &mut NodeConn,
    budget: &Budget,
    t0: Instant,
    progress: &Progress,
) -> Result<Running> {
    // Cleared when this returns, however it returns.
    let _spinner = progress.spinner(format!("starting the hive on `{}`", conn.node.name));
    let mut child = None;
    // The pid of the hive started on an SSH node, watched until it answers.
    // The hive's pid on the node, and its log's size before it started.
    let mut remote_pid: Option<(u32, u64)> = None;
    if conn.is_local() {
        child = Some(spawn_local(&conn.node)?);
    } else {
        let node = conn.node.clone();
        let session = conn.ssh(budget).await?;
        let installed = install::install_binary(session, &node, progress).await?;
        let session = conn.ssh(budget).await?;
        let key = crate::auth::Key::load_or_create(&node.key_file)?;
        if install::enroll_key(session, &node, &key).await? == install::Enrollment::Pending {
            return Err(install::not_enrolled(&node, &key));
        }
        if installed.uploaded {
            tracing::info!(node = %node.name, bytes = installed.bytes, "uploaded rbee");
        }
        let out = session
            .run(
                "starting the hive",
                &remote::start_hive(
                    &node.remote_dir,
                    LOG_FILE,
                    &crate::hive::args::ServeArgs::settings_for(&node),
                ),
            )
            .await?;
        remote_pid = out.stdout_text().split_once(' ').and_then(|(pid, offset)| {
            Some((pid.parse().ok()?, offset.trim().parse().unwrap_or(0)))
        });
        conn.home_seen(&installed.home)?;
    }
    tracing::info!(node = %conn.node.name, "hive starting");

    let mut last_error;
    let mut exited_at: Option<Instant> = None;
    // Due at the first probe that fails, then every REMOTE_WATCH.
    let mut next_watch = Instant::now();
    loop {
        match probe(&conn.client, budget.remaining()).await {
            Probe::Ready(health) => {
                return Ok(Running {
                    health,
                    started: true,
                    elapsed: t0.elapsed(),
                });
            }
            Probe::NeedsRestart(h) | Probe::Incompatible(h) => {
                last_error = format!(
                    "a hive of rbee {} (protocol {}) answers",
                    h.version, h.protocol
                );
            }
            Probe::Refused(e) | Probe::Unreachable(e) => last_error = e.to_string(),
        }
        // Our child may exit because a concurrent `rbee` started the hive first; give that
        // one a moment to answer before reporting the failure.
        if let Some(child) = child.as_mut()
            && exited_at.is_none()
            && matches!(child.try_wait(), Ok(Some(_)))
        {
            exited_at = Some(Instant::now());
        }
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            return Err(Error::hive(format!(
                "the hive on `{}` exited during start: {}",
                conn.node.name,
                log_tail(&local_dir(&conn.node).join(LOG_FILE)).unwrap_or(last_error)
            )));
        }
        // A hive that fails at once on its node says why in its log before it exits.
        if let Some((pid, offset)) = remote_pid
            && Instant::now() >= next_watch
        {
            if let Some(e) = remote_exit(conn, budget, pid, offset).await? {
                return Err(e);
            }
            next_watch = Instant::now() + REMOTE_WATCH;
        }
        if budget.is_spent() {
            return Err(Error::deadline(format!(
                "the hive on `{}` was not ready within the budget ({last_error})",
                conn.node.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20).min(budget.remaining())).await;
    }
}

/// How often a remote hive that does not answer yet is checked for having exited.
const REMOTE_WATCH: Duration = Duration::from_millis(250);

/// Why the hive started on the node as `pid` exited, from its log; `None` while it runs (or
/// another hive holds the pidfile).
async fn remote_exit(
    conn: &mut NodeConn,
    budget: &Budget,
    pid: u32,
    offset: u64,
) -> Result<Option<Error>> {
    let node = conn.node.clone();
    let session = conn.ssh(budget).await?;
    let out = session
        .exec(
            &remote::hive_exited(&node.remote_dir, PID_FILE, LOG_FILE, pid, offset),
            None,
        )
        .await?;
    let text = out.stdout_text();
    let Some(rest) = text.strip_prefix("exited") else {
        return Ok(None);
    };
    let rest = rest.trim();
    let why = match rest.strip_prefix("binary_status=") {
        // 128 + SIGILL from a POSIX shell (ksh93 adds 256): the binary itself cannot run there.
        Some("132" | "260") => {
            return Ok(Some(Error::config(format!(
                "the hive on `{0}` exited during start: `{1}/bin/rbee` dies there with SIGILL \
                 (an instruction the node's CPU lacks), so it was built for another CPU; list a \
                 build for that CPU under [[binaries]] (`rbee nodes check {0}` shows the node's \
                 platform and the entry chosen)",
                node.name,
                node.remote_dir.trim_end_matches('/'),
            ))));
        }
        Some(_) => String::new(),
        None => rest
            .rsplit_once("ERROR")
            .map_or(rest, |(_, why)| why.trim())
            .to_string(),
    };
    let why = if why.is_empty() {
        format!("its log holds no error; `rbee logs {}` shows it", node.name)
    } else {
        why
    };
    Ok(Some(Error::hive(format!(
        "the hive on `{}` exited during start: {why}",
        node.name
    ))))
}

fn spawn_local(node: &Node) -> Result<std::process::Child> {
    let dir = local_dir(node);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::hive(format!("cannot create `{}`: {e}", dir.display())))?;
    let exe = std::env::current_exe().doing("find this rbee binary")?;
    std::process::Command::new(exe)
        .arg("hive")
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .args(crate::hive::args::ServeArgs::settings_for(node))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::hive(format!("cannot start the hive on `{}`: {e}", node.name)))
}

/// The last error line of a hive log, for a message a person can act on.
fn log_tail(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .map(|l| l.split("ERROR").last().unwrap_or(l).trim().to_string())
}

pub(crate) enum Stopped {
    Stopped { pid: i32 },
    NotRunning,
}

/// Asks the hive to shut down by a signed request, waits for it to go, and if it would not
/// take the request or does not go, stops the process that holds its pidfile's lock.
pub(crate) async fn stop(conn: &mut NodeConn, budget: &Budget) -> Result<Stopped> {
    if conn.is_local() {
        return stop_local(conn, budget).await;
    }
    let asked = match conn.client.shutdown(PROBE_TIMEOUT).await {
        Ok(pid) => Some(pid),
        Err(e) => {
            tracing::debug!(node = %conn.node.name, "shutdown request not taken ({e})");
            None
        }
    };
    if let Some(pid) = asked {
        // It stops answering first, then finishes its requests, stops its workers, records
        // `hive_stopped` and lets go of its pidfile: only then is it gone (a new hive started
        // before that would find the lock held). One that is still there after the wait is
        // stopped through its pidfile. A queen waiting to start a new hive takes over the
        // moment the old one lets go: a hive answering, or the lock held, under another pid
        // also means this one is gone, and that new hive must not be stopped.
        let until = Instant::now() + STOP_WAIT;
        let ours = pid.and_then(|p| u32::try_from(p).ok());
        let ends = budget.deadline();
        let another = |p: Option<u32>| ours.is_some() && p.is_some() && p != ours;
        while Instant::now() < until {
            let gone = match probe(&conn.client, PROBE_TIMEOUT).await {
                Probe::Unreachable(_) => {
                    let holder = lock_holder(conn, budget).await?;
                    holder.is_none() || another(holder)
                }
                Probe::Ready(h) | Probe::NeedsRestart(h) | Probe::Incompatible(h) => {
                    another(h.signed.map(|d| d.pid))
                }
                Probe::Refused(_) => false,
            };
            if gone {
                return Ok(Stopped::Stopped {
                    pid: pid.unwrap_or_default(),
                });
            }
            if Instant::now() >= ends {
                return Err(still_stopping(&conn.node, pid, budget));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let node = conn.node.clone();
    let session = conn.ssh(budget).await?;
    // Through its pidfile: SIGTERM, then the wait for it to let go. Only a wait of the whole
    // `STOP_WAIT` ends in SIGKILL; a shorter budget leaves the hive finishing by itself, as a
    // signed stop does, rather than killing its requests and workers half-way.
    let margin = Duration::from_secs(1);
    let whole = budget.remaining() >= STOP_WAIT + margin;
    let wait = if whole {
        STOP_WAIT
    } else {
        budget.remaining().saturating_sub(margin)
    };
    let out = session
        .run(
            "stopping the hive",
            &remote::stop_hive(&node.remote_dir, PID_FILE, wait, whole),
        )
        .await?;
    let text = out.stdout_text();
    let mut lines = text.lines();
    let pid = lines.next().and_then(|l| l.trim().parse().ok());
    match (pid, lines.next().map(str::trim)) {
        (Some(pid), Some("stopping")) => Err(still_stopping(&node, Some(pid), budget)),
        (Some(pid), _) => Ok(Stopped::Stopped { pid }),
        (None, _) => Ok(Stopped::NotRunning),
    }
}

/// A hive that took the request to stop (or SIGTERM) and is still going when the budget ends:
/// it is told, not killed, as it finishes its requests and stops its workers by itself (a kill
/// now would leave them behind).
fn still_stopping(node: &Node, pid: Option<i32>, budget: &Budget) -> Error {
    let pid = pid.map_or(String::new(), |p| format!(" (pid {p})"));
    Error::deadline(format!(
        "the hive on `{}`{pid} is still stopping after the budget of {}: it was waiting for its \
         requests in flight to finish (up to {}) and then for its workers to stop (up to {} \
         each); it goes on stopping by itself: `rbee hive status {}` shows when it is gone",
        node.name,
        humantime::format_duration(budget.total()),
        humantime::format_duration(crate::hive::DRAIN_GRACE),
        humantime::format_duration(crate::hive::worker_proc::STOP_GRACE),
        node.name
    ))
}

/// The pid in the pidfile, if a live process holds its lock: the hive of this directory.
fn locked_pid(pidfile: &std::path::Path) -> Option<i32> {
    pidfile::read_pid(pidfile).filter(|_| pidfile::is_locked(pidfile))
}

async fn stop_local(conn: &NodeConn, budget: &Budget) -> Result<Stopped> {
    let node = &conn.node;
    let pidfile = local_dir(node).join(PID_FILE);
    let held = locked_pid(&pidfile);
    let asked = conn.client.shutdown(PROBE_TIMEOUT).await;
    let pid = match (held, asked) {
        (Some(pid), Ok(_)) => pid,
        (Some(pid), Err(e)) => {
            tracing::warn!(node = %node.name, "shutdown request not taken ({e}); sending SIGTERM to pid {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            // A suspended hive handles its SIGTERM only once woken (as systemd does).
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            pid
        }
        (None, _) => return Ok(Stopped::NotRunning),
    };
    let within = STOP_WAIT.min(budget.remaining());
    if !wait_released(&pidfile, pid, within).await {
        if within < STOP_WAIT && locked_pid(&pidfile) == Some(pid) {
            return Err(still_stopping(node, Some(pid), budget));
        }
        // Still holding the lock: it is still the hive of this directory.
        if locked_pid(&pidfile) == Some(pid) {
            tracing::warn!(node = %node.name, pid, "hive did not stop in time; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if !wait_released(&pidfile, pid, Duration::from_secs(2)).await {
            return Err(Error::hive(format!(
                "the hive on `{}` (pid {pid}) did not stop",
                node.name
            )));
        }
    }
    Ok(Stopped::Stopped { pid })
}

/// The pid of the hive that holds the node's pidfile lock: a live hive, whether it answers or
/// not (stopped with SIGSTOP, overloaded). `None` when no hive runs.
pub(crate) async fn lock_holder(conn: &mut NodeConn, budget: &Budget) -> Result<Option<u32>> {
    if conn.is_local() {
        let pidfile = local_dir(&conn.node).join(PID_FILE);
        return Ok(locked_pid(&pidfile).and_then(|p| u32::try_from(p).ok()));
    }
    let node = conn.node.clone();
    let session = conn.ssh(budget).await?;
    let out = session
        .exec(&remote::pidfile_holder(&node.remote_dir, PID_FILE), None)
        .await?;
    Ok(out.stdout_text().parse().ok())
}

/// Whether the process runs. A zombie has exited: the hive is nobody's child here (it was
/// started detached), and the init process may take its time to collect it.
pub(crate) fn is_alive(pid: i32) -> bool {
    if matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)) {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    state != Some("Z")
}

/// Waits until the process has gone and no lock is held in its name. A lock held under another
/// pid is a new hive that took over the moment this one let go (a queen waiting to start one):
/// this hive has stopped all the same.
async fn wait_released(pidfile: &std::path::Path, pid: i32, limit: Duration) -> bool {
    let released = || !is_alive(pid) && locked_pid(pidfile) != Some(pid);
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if released() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    released()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flock(pidfile: &std::path::Path, script: &str) -> std::process::Child {
        std::process::Command::new("flock")
            .arg("-o")
            .arg(pidfile)
            .args(["sh", "-c", script])
            .arg(pidfile)
            .spawn()
            .expect("flock(1) from util-linux")
    }

    /// The old hive lets go and a new one takes the lock at once, in a gap no poll can see:
    /// the old one has still stopped.
    #[tokio::test]
    async fn a_lock_taken_over_by_another_pid_the_moment_it_is_released_counts_as_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("hive.pid");
        let mut old = flock(&pidfile, "sleep 0.3");
        let old_pid = i32::try_from(old.id()).expect("pid");
        while !pidfile::is_locked(&pidfile) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(&pidfile, format!("{old_pid}\n")).expect("write pid");
        // Waits on the lock, and so holds it from the instant the first lets go.
        let mut new = flock(&pidfile, "echo $PPID > \"$0\"; sleep 5");
        assert!(!wait_released(&pidfile, old_pid, Duration::from_millis(100)).await);
        assert!(wait_released(&pidfile, old_pid, Duration::from_secs(3)).await);
        assert!(pidfile::is_locked(&pidfile), "the new holder let go");
        let _ = new.kill();
        let _ = new.wait();
        let _ = old.wait();
    }
}
