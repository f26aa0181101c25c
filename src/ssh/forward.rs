//! Unix sockets on this machine whose connections reach a Unix socket on the node through
//! direct-streamlocal channels of a session. The local socket lives in a private directory
//! (0700, this user's), so no other user of this machine can ride the connection. Where sshd
//! refuses forwarding, the first refusal switches the forward to exec channels that run
//! `rbee hive bridge` on the node, which relays its stdio to the socket.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use russh::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::error::{IoContext, Result};
use crate::ssh::known_hosts::Checker;
use crate::ssh::remote;

/// A local end of a forward: the socket to connect to, and where on the node it leads.
pub(crate) struct Forward {
    pub(crate) local: PathBuf,
    target: Arc<Mutex<String>>,
}

impl Forward {
    /// Points new connections at another socket on the node (the node's home turned out to be
    /// other than the one remembered).
    pub(crate) fn retarget(&self, remote_socket: &str) {
        if let Ok(mut target) = self.target.lock() {
            *target = remote_socket.to_string();
        }
    }
}

/// Removes the local socket when the forward's task ends or is aborted.
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
        bridged: Arc<AtomicBool>,
    },
    Holder(Arc<crate::ssh::mux::client::Client>),
}

/// Carries one local connection to `path` on the node.
pub(super) async fn carry(via: &Via, node: &str, path: &str, stream: UnixStream) {
    match via {
        Via::Ssh { handle, bridged } => connect(handle, node, path, bridged, stream).await,
        Via::Holder(client) => client.carry(path, stream).await,
    }
}

pub(super) async fn listen(
    via: Via,
    node: String,
    remote_socket: &str,
) -> Result<(Forward, JoinHandle<()>)> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = crate::paths::private_run_dir()?;
    remove_stale(&dir);
    let local = dir.join(format!(
        "q{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = tokio::net::UnixListener::bind(&local).at("listen on", &local)?;
    let target = Arc::new(Mutex::new(remote_socket.to_string()));
    let unlink = Unlink(local.clone());
    let task = {
        let target = target.clone();
        tokio::spawn(async move {
            let _unlink = unlink;
            while let Ok((stream, _)) = listener.accept().await {
                let via = via.clone();
                let node = node.clone();
                let path = target.lock().map(|t| t.clone()).unwrap_or_default();
                tokio::spawn(async move {
                    carry(&via, &node, &path, stream).await;
                });
            }
        })
    };
    Ok((Forward { local, target }, task))
}

/// Carries one local connection to `path` on the node: a direct-streamlocal channel, or the
/// bridge once sshd has refused one.
async fn connect(
    handle: &client::Handle<Checker>,
    node: &str,
    path: &str,
    bridged: &AtomicBool,
    mut stream: UnixStream,
) {
    if !bridged.load(Ordering::Relaxed) {
        match handle.channel_open_direct_streamlocal(path).await {
            Ok(channel) => {
                let mut remote = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut remote).await;
                return;
            }
            Err(russh::Error::ChannelOpenFailure(why)) => {
                if !bridged.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        node = %node,
                        "sshd refuses forwarding to `{path}` ({why:?}); carrying requests over \
                         `rbee hive bridge` on the node instead"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(node = %node, "forward to `{path}` failed: {e}");
                return;
            }
        }
    }
    if let Err(e) = bridge(handle, path, &mut stream).await {
        tracing::debug!(node = %node, "bridge to `{path}` failed: {e}");
    }
}

/// Most of what a login shell may print before the bridge's marker.
const GREETING_LIMIT: usize = 64 * 1024;

/// Relays `stream` through `rbee hive bridge` in an exec channel. What the login shell prints
/// before the marker is dropped; the local side is read only after it, so no request byte can
/// reach the shell.
async fn bridge(
    handle: &client::Handle<Checker>,
    path: &str,
    stream: &mut UnixStream,
) -> std::result::Result<(), String> {
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
            stream.write_all(rest).await.map_err(|e| e.to_string())?;
            break;
        }
        if seen.len() > GREETING_LIMIT {
            return Err("the login shell printed too much before the bridge".to_string());
        }
    }
    let _ = tokio::io::copy_bidirectional(stream, &mut remote).await;
    Ok(())
}

/// Forward sockets of rbee processes that ended without removing theirs.
fn remove_stale(dir: &Path) {
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
