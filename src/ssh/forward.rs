//! Unix sockets on this machine whose connections reach a Unix socket on the node through
//! direct-streamlocal channels of a session. The local socket serves only the process that made
//! it: on Linux an abstract socket whose connections must come from this process (their
//! `SO_PEERCRED` pid), elsewhere a socket in a private directory (0700, this user's). So no
//! other user of this machine can ride the connection. Where sshd
//! refuses forwarding, the forward switches to exec channels that run `rbee hive bridge` on the
//! node, which relays its stdio to the socket.
//!
//! OpenSSH answers a refused direct-streamlocal channel and one to a path where nothing listens
//! alike (`SSH2_OPEN_CONNECT_FAILED`, "open failed": `server_request_direct_streamlocal` leaves
//! the reason at its default), so a failed open alone does not tell a refusal from a stopped
//! hive. By default the first failed open switches to the bridge (which reaches a running hive
//! either way); a caller that learns whether the hive runs from the node anyway (its pidfile)
//! can ask for failed opens to fail at once (`fail_fast`) and switch only when the hive runs
//! (`use_bridge`), so a stopped hive costs no bridge command.
//!
//! Through a holder the same holds: the invocation's forward sends its mode with each stream
//! (`Mode`), the holder opens the way as this module would, and says how it went (`Opened`),
//! which the forward learns as if it had opened the channel itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use russh::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::ssh::known_hosts::Checker;
use crate::ssh::mux::{Mode, Opened};
use crate::ssh::remote;

/// A local end of a forward: the socket to connect to, and where on the node it leads.
pub(crate) struct Forward {
    pub(crate) local: PathBuf,
    target: Arc<Mutex<String>>,
    state: Arc<State>,
}

/// What the forward has learnt of sshd's answers, shared with its connections.
struct State {
    node: String,
    /// One of `UNTRIED`, `OPENED` (a channel opened: sshd forwards), `FAILED` (opens failed,
    /// none opened) or `BRIDGED`.
    seen: AtomicU8,
    /// A failed open ends its connection instead of trying the bridge.
    fail_fast: AtomicBool,
    /// The last open failed on a connection proven to forward: nothing listens on the socket.
    absent: AtomicBool,
    /// What the session has proven for every forward and stream it carries (it outlives one
    /// invocation when a holder keeps it): `OPENED` once a channel opened, `BRIDGED` once sshd
    /// refused one outright. A failed open proves neither, so it stays with this forward.
    learnt: Option<Arc<AtomicU8>>,
}

const UNTRIED: u8 = 0;
const OPENED: u8 = 1;
const FAILED: u8 = 2;
const BRIDGED: u8 = 3;

impl State {
    fn new(node: String, learnt: Option<Arc<AtomicU8>>) -> State {
        let seen = learnt
            .as_ref()
            .map_or(UNTRIED, |l| l.load(Ordering::Relaxed));
        State {
            node,
            seen: AtomicU8::new(seen),
            fail_fast: AtomicBool::new(false),
            absent: AtomicBool::new(false),
            learnt,
        }
    }

    fn bridge(&self, path: &str, why: &str) {
        if self.seen.swap(BRIDGED, Ordering::Relaxed) != BRIDGED {
            tracing::info!(
                node = %self.node,
                "sshd refuses forwarding to `{path}` ({why}); carrying requests over \
                 `rbee hive bridge` on the node instead"
            );
        }
    }

    /// A channel opened: sshd forwards.
    fn opened(&self) {
        self.absent.store(false, Ordering::Relaxed);
        for from in [UNTRIED, FAILED] {
            let _ = self
                .seen
                .compare_exchange(from, OPENED, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// An open failed, and none has opened yet.
    fn failed(&self) {
        let _ = self
            .seen
            .compare_exchange(UNTRIED, FAILED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records for the whole session what an answer of sshd proved.
    fn learn(&self, proven: u8) {
        if let Some(learnt) = &self.learnt {
            learnt.store(proven, Ordering::Relaxed);
        }
    }
}

impl Forward {
    /// Where the forward leads, for messages.
    pub(crate) fn describe(&self) -> String {
        format!("`{}` on the node, through SSH", current(&self.target))
    }

    /// Points new connections at another socket on the node (the node's home turned out to be
    /// other than the one remembered).
    pub(crate) fn retarget(&self, remote_socket: &str) {
        if let Ok(mut target) = self.target.lock() {
            *target = remote_socket.to_string();
        }
    }

    /// While on, an open that sshd fails ends its connection at once, without trying the
    /// bridge: the caller asks the node whether its hive runs (`open_failed`, `use_bridge`).
    pub(crate) fn fail_fast(&self, on: bool) {
        self.state.fail_fast.store(on, Ordering::Relaxed);
    }

    /// Whether sshd failed an open and has opened none: it refuses forwarding, or nothing
    /// listens on the hive's socket.
    pub(crate) fn open_failed(&self) -> bool {
        self.state.seen.load(Ordering::Relaxed) == FAILED
    }

    /// Whether the last open failed although sshd is proven to forward on this connection (a
    /// channel opened before): nothing listens on the hive's socket, which no pidfile check
    /// needs to confirm (a hive that runs but is stopped or busy still has its socket listening).
    pub(crate) fn nothing_listens(&self) -> bool {
        self.state.absent.load(Ordering::Relaxed)
    }

    /// Carries the next connections over the bridge: the node's hive runs, and sshd failed the
    /// open to its socket, so it refuses forwarding.
    pub(crate) fn use_bridge(&self) {
        let path = current(&self.target);
        self.state.bridge(
            &path,
            "the hive runs, and sshd failed the channel to its socket",
        );
    }
}

/// Removes the local socket when the forward's task ends or is aborted.
#[cfg_attr(any(target_os = "linux", target_os = "android"), allow(dead_code))]
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What carries a forward's connections: this process's SSH connection, or a holder's.
#[derive(Clone)]
pub(super) enum Via {
    Ssh {
        handle: Arc<client::Handle<Checker>>,
        /// What the session has proven of sshd's forwarding (see `State::learnt`).
        learnt: Arc<AtomicU8>,
    },
    Holder(Arc<crate::ssh::mux::client::Client>),
}

impl Via {
    fn learnt(&self) -> Option<Arc<AtomicU8>> {
        match self {
            Via::Ssh { learnt, .. } => Some(learnt.clone()),
            Via::Holder(_) => None,
        }
    }
}

/// A fresh record of what a session has proven of sshd's forwarding.
pub(super) fn nothing_learnt() -> Arc<AtomicU8> {
    Arc::new(AtomicU8::new(UNTRIED))
}

/// Opens the way to `path` on the node for a holder serving one stream, in the `mode` the
/// invocation's forward asked for; what the session learns stays with the holder's session.
pub(super) async fn open_held(
    handle: &client::Handle<Checker>,
    learnt: &Arc<AtomicU8>,
    node: &str,
    path: &str,
    mode: Mode,
) -> (Opened, Option<Carrier>) {
    let state = State::new(node.to_string(), Some(learnt.clone()));
    match mode {
        Mode::Any => {}
        Mode::FailFast => state.fail_fast.store(true, Ordering::Relaxed),
        Mode::Bridge => state.seen.store(BRIDGED, Ordering::Relaxed),
    }
    open(handle, &state, path).await
}

/// A stream's way to the node once open: its channel, and what the bridge sent past its marker.
pub(super) struct Carrier {
    remote: russh::ChannelStream<client::Msg>,
    pending: Vec<u8>,
}

impl Carrier {
    /// Relays `stream` over the channel until either side ends.
    pub(super) async fn relay<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut self,
        stream: &mut S,
    ) {
        if !self.pending.is_empty() && stream.write_all(&self.pending).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(stream, &mut self.remote).await;
    }
}

pub(super) async fn listen(
    via: Via,
    node: String,
    remote_socket: &str,
) -> Result<(Forward, JoinHandle<()>)> {
    let (listener, local, unlink) = bind_local()?;
    let target = Arc::new(Mutex::new(remote_socket.to_string()));
    let state = Arc::new(State::new(node, via.learnt()));
    let task = {
        let target = target.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let _unlink = unlink;
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors, say: the listener is kept (giving up its name would
                    // let someone else take it while this process still connects to it), and
                    // the forward ends only with its session.
                    Err(e) => {
                        tracing::debug!(node = %state.node, "accepting on the forward: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if !own_process(&stream) {
                    tracing::debug!(
                        node = %state.node,
                        "refused a connection to the forward from another process"
                    );
                    continue;
                }
                let via = via.clone();
                let state = state.clone();
                let path = current(&target);
                tokio::spawn(async move {
                    match &via {
                        Via::Ssh { handle, .. } => connect(handle, &state, &path, stream).await,
                        Via::Holder(client) => through_holder(client, &state, &path, stream).await,
                    }
                });
            }
        })
    };
    Ok((
        Forward {
            local,
            target,
            state,
        },
        task,
    ))
}

/// Only this process's own HTTP client rides the forward: an abstract socket has no file
/// permissions to keep anyone else out. Elsewhere the private directory does.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn own_process(stream: &tokio::net::UnixStream) -> bool {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    pid.and_then(|p| u32::try_from(p).ok()) == Some(std::process::id())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn own_process(_: &tokio::net::UnixStream) -> bool {
    true
}

/// Where a forward's connections go now.
fn current(target: &Mutex<String>) -> String {
    target.lock().map(|t| t.clone()).unwrap_or_default()
}

/// The forward's local end. On Linux an abstract socket, named at random: no file to create
/// and remove for each node (on ext4 that was a fifth of a many-node command's CPU), and none
/// left behind by a process that was killed. Elsewhere a socket in the private run directory,
/// removed when the forward ends.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn bind_local() -> Result<(tokio::net::UnixListener, PathBuf, Option<Unlink>)> {
    use std::os::unix::ffi::OsStringExt;
    let mut tries = 0;
    loop {
        let name = format!(
            "\0rbee-q{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let local = PathBuf::from(std::ffi::OsString::from_vec(name.into_bytes()));
        match tokio::net::UnixListener::bind(&local) {
            Ok(listener) => return Ok((listener, local, None)),
            // Someone holds that name: another draw.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 8 => tries += 1,
            Err(e) => {
                return Err(crate::error::IoError::doing("listen on an abstract socket", e).into());
            }
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn bind_local() -> Result<(tokio::net::UnixListener, PathBuf, Option<Unlink>)> {
    use crate::error::IoContext;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = crate::paths::private_run_dir()?;
    // Once per process: a command over many nodes opens a forward for each.
    static CLEANED: std::sync::Once = std::sync::Once::new();
    CLEANED.call_once(|| remove_stale(&dir));
    let local = dir.join(format!(
        "q{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = tokio::net::UnixListener::bind(&local).at("listen on", &local)?;
    Ok((listener, local.clone(), Some(Unlink(local))))
}

/// Carries one local connection to `path` on the node: a direct-streamlocal channel, or the
/// bridge once sshd has refused one (see the module's note on telling a refusal apart).
async fn connect(
    handle: &client::Handle<Checker>,
    state: &State,
    path: &str,
    mut stream: UnixStream,
) {
    if let (_, Some(carrier)) = open(handle, state, path).await {
        carrier.relay(&mut stream).await;
    }
}

/// Carries one local connection through the node's holder: it opens the way in the mode this
/// forward is in and says how it went, which this forward learns as if it had opened it.
async fn through_holder(
    client: &crate::ssh::mux::client::Client,
    state: &State,
    path: &str,
    mut stream: UnixStream,
) {
    let mode = if state.seen.load(Ordering::Relaxed) == BRIDGED {
        Mode::Bridge
    } else if state.fail_fast.load(Ordering::Relaxed) {
        Mode::FailFast
    } else {
        Mode::Any
    };
    let (mut remote, opened) = match client.stream(path, mode).await {
        Ok(opened) => opened,
        Err(why) => {
            tracing::debug!(node = %state.node, "stream to `{path}`: {why}");
            return;
        }
    };
    match opened {
        Opened::Channel => state.opened(),
        Opened::Bridge { prohibited } => state.bridge(
            path,
            if prohibited {
                "AdministrativelyProhibited"
            } else {
                "sshd failed the channel to its socket"
            },
        ),
        Opened::Failed { forwards } => {
            if forwards {
                state.opened();
                state.absent.store(true, Ordering::Relaxed);
            } else {
                state.failed();
            }
            tracing::debug!(node = %state.node, "sshd failed the channel to `{path}`");
            return;
        }
        Opened::Broken { why } => {
            tracing::debug!(node = %state.node, "stream to `{path}` through the holder: {why}");
            return;
        }
    }
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut remote).await;
}

/// Opens the way to `path` on the node: a direct-streamlocal channel, or the bridge once sshd
/// has refused one; `None` where neither opened (with why, for a holder's invocation).
async fn open(
    handle: &client::Handle<Checker>,
    state: &State,
    path: &str,
) -> (Opened, Option<Carrier>) {
    let node = &state.node;
    let mut prohibited = false;
    if state.seen.load(Ordering::Relaxed) != BRIDGED {
        match handle.channel_open_direct_streamlocal(path).await {
            Ok(channel) => {
                state.opened();
                state.learn(OPENED);
                let carrier = Carrier {
                    remote: channel.into_stream(),
                    pending: Vec::new(),
                };
                return (Opened::Channel, Some(carrier));
            }
            // Only a refusal says so: sshd forwards nothing here.
            Err(russh::Error::ChannelOpenFailure(
                why @ russh::ChannelOpenFailure::AdministrativelyProhibited,
            )) => {
                state.learn(BRIDGED);
                state.bridge(path, &format!("{why:?}"));
                prohibited = true;
            }
            Err(russh::Error::ChannelOpenFailure(why)) => {
                // Once a channel has opened, sshd forwards: nothing listens there now.
                state.failed();
                let seen = state.seen.load(Ordering::Relaxed);
                if seen == OPENED || state.fail_fast.load(Ordering::Relaxed) {
                    tracing::debug!(node = %node, "sshd failed the channel to `{path}` ({why:?})");
                    state.absent.store(seen == OPENED, Ordering::Relaxed);
                    return (
                        Opened::Failed {
                            forwards: seen == OPENED,
                        },
                        None,
                    );
                }
                state.bridge(path, &format!("{why:?}"));
            }
            Err(e) => {
                tracing::debug!(node = %node, "forward to `{path}` failed: {e}");
                return (Opened::Broken { why: e.to_string() }, None);
            }
        }
    }
    match bridge(handle, path).await {
        Ok(carrier) => (Opened::Bridge { prohibited }, Some(carrier)),
        Err(why) => {
            tracing::debug!(node = %node, "bridge to `{path}` failed: {why}");
            (Opened::Broken { why }, None)
        }
    }
}

/// Most of what a login shell may print before the bridge's marker.
const GREETING_LIMIT: usize = 64 * 1024;

/// Starts `rbee hive bridge` in an exec channel, to be relayed to. What the login shell prints
/// before the marker is dropped; the local side is read only after it, so no request byte can
/// reach the shell.
async fn bridge(
    handle: &client::Handle<Checker>,
    path: &str,
) -> std::result::Result<Carrier, String> {
    let marker = remote::marker();
    let channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a session: {e}"))?;
    channel
        .exec(true, remote::under_sh(&remote::bridge(path), &marker))
        .await
        .map_err(|e| format!("cannot run the bridge: {e}"))?;
    let mut remote = channel.into_stream();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = remote.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the bridge ended before its marker".to_string());
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some(rest) = remote::after_marker(&seen, &marker) {
            let pending = rest.to_vec();
            return Ok(Carrier { remote, pending });
        }
        if seen.len() > GREETING_LIMIT {
            return Err("the login shell printed too much before the bridge".to_string());
        }
    }
}

/// Forward sockets of rbee processes that ended without removing theirs.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn remove_stale(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix('q'))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
