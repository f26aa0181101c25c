//! `rbee nodes hold` (hidden): the background process that holds one node's SSH session for
//! later invocations. It reads its `Start` on stdin, connects (the host key checked as on a
//! direct connect), listens on its socket, says `Ready` on stdout, then serves same-user
//! connections until the session has been unused for `persist`, the node closes it, or
//! `rbee nodes disconnect` asks it to end.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::{
    Answer, FRAME_ERROR, FRAME_EXIT, FRAME_STDERR, FRAME_STDOUT, Op, PROTOCOL, Ready, Request,
    Start, VERSION, read_msg, write_frame, write_msg,
};
use crate::error::{Error, IoError, Result};
use crate::ssh::Session;

/// Longest wait for a connection's request: a client that says nothing is dropped.
const REQUEST_WAIT: Duration = Duration::from_secs(2);
/// How long a pinged connection is kept for the invocation's first command or stream. The
/// invocation holds it while it lives; it counts as use, so the holder stays meanwhile.
const SPARE_WAIT: Duration = Duration::from_secs(30);

/// Use of the session: connections open now, and when the last one ended.
struct Usage {
    active: AtomicUsize,
    last: Mutex<Instant>,
    exit: Notify,
}

/// Counts one connection as using the session while it lives.
struct InUse(Arc<Usage>);

impl InUse {
    fn new(usage: &Arc<Usage>) -> InUse {
        usage.active.fetch_add(1, Ordering::SeqCst);
        InUse(usage.clone())
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last.lock() {
            *last = Instant::now();
        }
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the holder; its errors go to its log (stderr), the invocation that started it learns
/// of a failed connect from its `Ready` line.
pub(crate) fn run() -> Result<()> {
    // Detached from the invocation's terminal and process group: Ctrl-C or a closed terminal
    // there must not end a connection that other invocations use.
    let _ = nix::unistd::setsid();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| IoError::doing("start the runtime", e))?;
    let result = runtime.block_on(hold());
    if let Err(e) = &result {
        tracing::warn!("holder ended: {e}");
    }
    runtime.shutdown_background();
    result
}

async fn hold() -> Result<()> {
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .map_err(|e| IoError::doing("read the holder's start", e))?;
    let start: Start = serde_json::from_str(&line)
        .map_err(|e| Error::internal(format!("the holder's start is not valid: {e}")))?;
    let deadline = Instant::now() + Duration::from_millis(start.budget_ms);
    let mut stdout = tokio::io::stdout();
    let session = match Session::connect(&start.target, deadline, start.accept_new).await {
        Ok(session) => session,
        Err(e) => {
            let code = e.code();
            let message = e.to_string();
            let ready = match e {
                Error::Ssh(ssh) => Ready::Failed {
                    ssh: Some(*ssh),
                    code,
                    message,
                },
                _ => Ready::Failed {
                    ssh: None,
                    code,
                    message,
                },
            };
            say(&mut stdout, &ready).await;
            return Ok(());
        }
    };
    let listener = UnixListener::bind(&start.socket)
        .map_err(|e| IoError::at("listen on", &start.socket, e))?;
    let ino = std::fs::metadata(&start.socket).map(|m| m.ino()).ok();
    let _unlink = Unlink {
        path: start.socket.clone(),
        ino,
    };
    let accepted = match &session.host_key {
        crate::ssh::HostKey::Accepted { fingerprint } => Some(fingerprint.clone()),
        _ => None,
    };
    say(&mut stdout, &Ready::Ready { accepted }).await;
    // The invocation that started it reads one line; nothing else goes to stdout.
    drop(stdout);
    tracing::info!(node = %start.target.node, socket = %start.socket.display(), "holding");
    let session = Arc::new(session);
    let usage = Arc::new(Usage {
        active: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
        exit: Notify::new(),
    });
    let persist = Duration::from_millis(start.persist_ms);
    let uid = nix::unistd::geteuid().as_raw();
    let mut tick = tokio::time::interval(
        Duration::from_millis(250).min(persist.max(Duration::from_millis(10))),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| IoError::doing("watch SIGTERM", e))?;
    loop {
        tokio::select! {
            biased;
            _ = usage.exit.notified() => {
                if session.is_closed() {
                    tracing::info!(node = %start.target.node, "the SSH connection ended");
                } else {
                    tracing::info!(node = %start.target.node, "asked to disconnect");
                }
                break;
            }
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == uid => {}
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid(), "refused a connection of another user");
                        continue;
                    }
                    Err(_) => continue,
                }
                let session = session.clone();
                let in_use = InUse::new(&usage);
                tokio::spawn(async move { serve(&session, stream, in_use).await });
            }
            _ = tick.tick() => {
                if session.is_closed() {
                    tracing::info!(node = %start.target.node, "the SSH connection ended");
                    break;
                }
                let idle = usage.last.lock().map(|l| l.elapsed()).unwrap_or_default();
                if usage.active.load(Ordering::SeqCst) == 0 && idle >= persist {
                    tracing::info!(node = %start.target.node, "unused for {persist:?}: closing");
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn say(stdout: &mut tokio::io::Stdout, ready: &Ready) {
    let mut line = serde_json::to_vec(ready).unwrap_or_default();
    line.push(b'\n');
    let _ = stdout.write_all(&line).await;
    let _ = stdout.flush().await;
}

/// One connection: its request, the answer, then what it asked for. After a ping the same
/// connection may ask once more (the invocation's first command or stream).
async fn serve(session: &Session, mut stream: UnixStream, in_use: InUse) {
    let mut wait = REQUEST_WAIT;
    loop {
        let request = match tokio::time::timeout(wait, read_msg::<_, Request>(&mut stream)).await {
            Ok(Ok(request)) => request,
            Ok(Err(e)) if wait == REQUEST_WAIT => {
                // Another version's request may not parse: say who this is, so it bypasses.
                let _ = write_msg(&mut stream, &answer(false, Some(e.to_string()))).await;
                return;
            }
            // The pinging invocation closed its spare, or left it unused.
            Ok(Err(_)) | Err(_) => return,
        };
        if request.protocol != PROTOCOL || request.version != VERSION {
            let _ = write_msg(&mut stream, &answer(false, Some("another version".into()))).await;
            return;
        }
        // A connection that has ended (its keep-alives went unanswered, the node closed it) is
        // not handed out until the next tick notices: the invocation replaces this holder at
        // once.
        if ended(session).await {
            let gone = Answer {
                gone: true,
                ..answer(false, Some("its SSH connection has ended".into()))
            };
            let _ = write_msg(&mut stream, &gone).await;
            in_use.0.exit.notify_one();
            return;
        }
        if write_msg(&mut stream, &answer(true, None)).await.is_err() {
            return;
        }
        match request.op {
            Op::Ping if wait == REQUEST_WAIT => {
                wait = SPARE_WAIT;
                continue;
            }
            Op::Ping => {}
            Op::Exit => {
                in_use.0.exit.notify_one();
            }
            Op::Exec { command } => {
                let (reader, mut writer) = stream.into_split();
                let result = session.exec_wrapped(&command, reader).await;
                let _ = match result {
                    Ok(out) => {
                        let mut sent = write_frame(&mut writer, FRAME_STDOUT, &out.stdout).await;
                        if sent.is_ok() {
                            sent = write_frame(&mut writer, FRAME_STDERR, &out.stderr).await;
                        }
                        if let (Ok(()), Some(code)) = (&sent, out.code) {
                            sent = write_frame(&mut writer, FRAME_EXIT, &code.to_be_bytes()).await;
                        }
                        sent
                    }
                    Err(e) => write_frame(&mut writer, FRAME_ERROR, e.to_string().as_bytes()).await,
                };
                let _ = writer.shutdown().await;
                ended_with_session(session, &in_use);
            }
            Op::Stream { path, mode } => {
                let (opened, carrier) = session.open_stream(&path, mode).await;
                if write_msg(&mut stream, &opened).await.is_ok()
                    && let Some(carrier) = carrier
                {
                    carrier.relay(&mut stream).await;
                }
                ended_with_session(session, &in_use);
            }
        }
        return;
    }
}

/// Whether the SSH connection has ended, once the session's own task has had its turn: a close
/// that reached this process with the request is seen, not raced.
async fn ended(session: &Session) -> bool {
    for _ in 0..4 {
        if session.is_closed() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    session.is_closed()
}

/// A command or stream that ended with the SSH connection ends the holder now, so that its
/// socket is gone by the time the invocation asks whether the connection was lost.
fn ended_with_session(session: &Session, in_use: &InUse) {
    if session.is_closed() {
        in_use.0.exit.notify_one();
    }
}

fn answer(ok: bool, why: Option<String>) -> Answer {
    Answer {
        protocol: PROTOCOL,
        version: VERSION.to_string(),
        ok,
        why,
        gone: false,
    }
}

/// Removes the socket when the holder ends, unless another holder has bound that path since.
struct Unlink {
    path: PathBuf,
    ino: Option<u64>,
}

impl Drop for Unlink {
    fn drop(&mut self) {
        if same_file(&self.path, self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn same_file(path: &Path, ino: Option<u64>) -> bool {
    std::fs::metadata(path).map(|m| m.ino()).ok() == ino && ino.is_some()
}
