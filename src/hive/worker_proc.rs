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
    pub(crate) started_at: SystemTime,
    exit: watch::Receiver<Option<String>>,
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
    pub(crate) uptime: Duration,
}

impl WorkerProc {
    pub(crate) async fn spawn(
        model: &Model,
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
            .arg(model.gpu_layers.to_string())
            .arg("--slots")
            .arg(model.slots.to_string())
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
                    "worker for `{}` exited while loading ({status}): {e}; see {}",
                    model.name,
                    opts.log.display()
                )));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(Error::deadline(format!(
                    "loading `{}` did not finish within the request's budget",
                    model.name
                )));
            }
        };
        let load_ms = match hello {
            WorkerHello::Ready { load_ms, .. } => load_ms,
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
        tokio::spawn(watch_exit(
            child,
            exit_tx,
            opts.exits.clone(),
            model.name.clone(),
            opts.socket.to_path_buf(),
        ));
        Ok(WorkerProc {
            pid,
            socket: opts.socket.to_path_buf(),
            http,
            load_ms,
            started_at: SystemTime::now(),
            exit: exit_rx,
            stdin: Mutex::new(stdin),
            _stdout: stdout,
        })
    }

    /// How it exited, once it has.
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// The URL of `path` on this worker; the host part is a name only, `http` connects to the
    /// worker's socket whatever it says.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://worker{path}")
    }

    /// SIGKILL at once: for a worker that is stuck (stopped, or not answering).
    pub(crate) fn kill(&self) {
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGKILL);
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub(crate) async fn stop(&self, grace: Duration) {
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let mut exit = self.exit.clone();
        let _ = kill(pid, Signal::SIGTERM);
        self.stdin.lock().await.take();
        let timed_out = tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_err();
        if timed_out {
            tracing::warn!(pid = self.pid, "worker ignored SIGTERM; killing it");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = exit.wait_for(Option::is_some).await;
        }
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
    tx: watch::Sender<Option<String>>,
    exits: mpsc::UnboundedSender<Exited>,
    model: String,
    socket: PathBuf,
) {
    let started = std::time::Instant::now();
    let pid = child.id().unwrap_or(0);
    let status = match child.wait().await {
        Ok(status) => describe_exit(status),
        Err(e) => format!("unknown ({e})"),
    };
    tracing::info!(model = %model, pid, status = %status, "worker exited");
    // Its socket names a path no one listens on any more; each spawn gets a new one.
    let _ = std::fs::remove_file(&socket);
    let _ = tx.send(Some(status.clone()));
    let _ = exits.send(Exited {
        model,
        pid,
        status,
        uptime: started.elapsed(),
    });
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
