//! Unix sockets on this machine whose connections reach a Unix socket on the node through
//! direct-streamlocal channels of a session. The local socket lives in a private directory
//! (0700, this user's), so no other user of this machine can ride the connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client;
use tokio::task::JoinHandle;

use crate::error::{IoContext, Result};
use crate::ssh::known_hosts::Checker;

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

pub(super) async fn listen(
    handle: Arc<client::Handle<Checker>>,
    node: String,
    remote_socket: &str,
) -> Result<(Forward, JoinHandle<()>)> {
    use std::sync::atomic::{AtomicU32, Ordering};
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
            while let Ok((mut stream, _)) = listener.accept().await {
                let handle = handle.clone();
                let node = node.clone();
                let path = target.lock().map(|t| t.clone()).unwrap_or_default();
                tokio::spawn(async move {
                    match handle.channel_open_direct_streamlocal(path.as_str()).await {
                        Ok(channel) => {
                            let mut remote = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut remote).await;
                        }
                        Err(e) => {
                            tracing::debug!(node = %node, "forward to `{path}` refused: {e}");
                        }
                    }
                });
            }
        })
    };
    Ok((Forward { local, target }, task))
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
