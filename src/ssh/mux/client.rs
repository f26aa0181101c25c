//! The invocation's side of a held connection: finding the node's holder (or starting one),
//! and running commands and streams through it. A holder that is gone is replaced; one that
//! does not answer within `HANDSHAKE`, or speaks another version, is bypassed: the invocation
//! connects directly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{
    Answer, FRAME_ERROR, FRAME_EXIT, FRAME_STDERR, FRAME_STDOUT, Mode, Op, Opened, PROTOCOL, Ready,
    Request, Start, VERSION, read_frame, read_msg, write_msg,
};
use crate::error::{Error, ExitKind, Result};
use crate::ssh::session::Exec;
use crate::ssh::{HostKey, Session, Target};

/// Longest wait for a holder's answer: past it the holder counts as hung and is bypassed.
const HANDSHAKE: Duration = Duration::from_millis(100);

/// A holder's socket, for a target.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) socket: PathBuf,
    target: Target,
    /// The connection whose ping found the holder alive: the holder waits on it for another
    /// request, so the first command or stream costs no connection of its own.
    spare: Arc<std::sync::Mutex<Option<UnixStream>>>,
}

/// What a look at the socket found.
enum Found {
    Alive(UnixStream),
    /// Nothing listens (no file, or a file left by a holder that died): start one.
    Absent,
    /// Something listens but does not answer in time, or is of another version: leave it be.
    Bypass(String),
}

/// Opens a connection to the holder and asks `op`: the stream, ready for what follows.
async fn ask(socket: &Path, op: Op) -> Found {
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(_) => return Found::Absent,
    };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == nix::unistd::geteuid().as_raw() => {}
        _ => return Found::Bypass("the holder's socket belongs to another user".to_string()),
    }
    handshake(stream, op).await
}

/// Asks `op` over a connection to the holder.
async fn handshake(mut stream: UnixStream, op: Op) -> Found {
    let request = Request {
        protocol: PROTOCOL,
        version: VERSION.to_string(),
        op,
    };
    let exchange = async {
        write_msg(&mut stream, &request).await?;
        read_msg::<_, Answer>(&mut stream).await
    };
    match tokio::time::timeout(HANDSHAKE, exchange).await {
        Err(_) => Found::Bypass(format!("no answer within {}ms", HANDSHAKE.as_millis())),
        // Closed unanswered: a holder on its way out (only one ending closes a same-user
        // connection without a word), to be replaced.
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Found::Absent
        }
        Ok(Err(e)) => Found::Bypass(format!("the handshake failed: {e}")),
        Ok(Ok(answer)) if answer.protocol != PROTOCOL || answer.version != VERSION => {
            Found::Bypass(format!(
                "it is rbee {} (protocol {}), this is {VERSION} (protocol {PROTOCOL})",
                answer.version, answer.protocol
            ))
        }
        // Its connection ended: it is going away, and a new one takes its place.
        Ok(Ok(answer)) if answer.gone => Found::Absent,
        Ok(Ok(answer)) if !answer.ok => Found::Bypass(answer.why.unwrap_or_default()),
        Ok(Ok(_)) => Found::Alive(stream),
    }
}

/// The node's session through its holder: the one running, or a new one started now (which
/// connects, checking the host key, within `deadline`). `None`: connect directly instead.
pub(crate) async fn reach(
    target: &Target,
    deadline: Instant,
    accept_new: bool,
    persist: Duration,
) -> Result<Option<Session>> {
    let socket = super::socket_for(target)?;
    let client = Client {
        socket: socket.clone(),
        target: target.clone(),
        spare: Arc::default(),
    };
    match ask(&socket, Op::Ping).await {
        Found::Alive(stream) => {
            tracing::debug!(node = %target.node, "reusing the held SSH connection");
            if let Ok(mut spare) = client.spare.lock() {
                *spare = Some(stream);
            }
            return Ok(Some(Session::held(target, client, HostKey::Known)));
        }
        Found::Bypass(why) => {
            tracing::info!(node = %target.node, "bypassing the held SSH connection: {why}");
            return Ok(None);
        }
        Found::Absent => {}
    }
    // One invocation starts the holder; the others wait for it and use it.
    let lock_path = socket.with_extension("lock");
    let Some(_lock) = lock(&lock_path, deadline).await else {
        return Ok(None);
    };
    match ask(&socket, Op::Ping).await {
        Found::Alive(_) => return Ok(Some(Session::held(target, client, HostKey::Known))),
        Found::Bypass(_) => return Ok(None),
        Found::Absent => {}
    }
    let _ = std::fs::remove_file(&socket);
    match start(target, &socket, deadline, accept_new, persist).await {
        Ok(Ready::Ready { accepted }) => {
            let host_key = match accepted {
                Some(fingerprint) => HostKey::Accepted { fingerprint },
                None => HostKey::Known,
            };
            Ok(Some(Session::held(target, client, host_key)))
        }
        Ok(Ready::Failed { ssh, code, message }) => Err(match ssh {
            Some(ssh) => Error::from(ssh),
            None => Error::of_kind(ExitKind::from_code(code), message),
        }),
        Err(why) => {
            tracing::info!(node = %target.node, "no holder for the SSH connection: {why}");
            Ok(None)
        }
    }
}

/// Takes the lock on `path`, waiting for another invocation that holds it (it is starting the
/// holder) until `deadline`.
async fn lock(path: &Path, deadline: Instant) -> Option<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Some(lock),
            Err((back, _)) => file = back,
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long a holder that failed to connect gets to end by itself before it is killed.
const FAILED_EXIT: Duration = Duration::from_secs(2);

/// Starts a holder (this binary, `nodes hold`) and waits for its first line.
async fn start(
    target: &Target,
    socket: &Path,
    deadline: Instant,
    accept_new: bool,
    persist: Duration,
) -> std::result::Result<Ready, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let log_path = crate::paths::state_dir().join("hold.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open `{}`: {e}", log_path.display()))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["nodes", "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("cannot start the holder: {e}"))?;
    let start = Start {
        target: target.clone(),
        socket: socket.to_path_buf(),
        persist_ms: u64::try_from(persist.as_millis()).unwrap_or(u64::MAX),
        budget_ms: u64::try_from(
            deadline
                .saturating_duration_since(Instant::now())
                .as_millis(),
        )
        .unwrap_or(u64::MAX),
        accept_new,
    };
    let mut stdin = child.stdin.take().ok_or("the holder has no stdin")?;
    let mut line = serde_json::to_vec(&start).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stdin.write_all(&line).await.map_err(|e| e.to_string())?;
    drop(stdin);
    let stdout = child.stdout.take().ok_or("the holder has no stdout")?;
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut answer = String::new();
    // The holder connects within the same deadline, so a little more covers its answer.
    let wait = deadline.max(Instant::now()) + Duration::from_secs(1);
    match tokio::time::timeout_at(wait.into(), reader.read_line(&mut answer)).await {
        Ok(Ok(n)) if n > 0 => {
            let ready: Ready = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
            if matches!(ready, Ready::Failed { .. }) {
                // It ends by itself once it has said why; waiting for it means no holder of a
                // refused connection outlives the command (a script that checks sees none).
                if tokio::time::timeout(FAILED_EXIT, child.wait())
                    .await
                    .is_err()
                {
                    reap(&mut child).await;
                }
            }
            Ok(ready)
        }
        Ok(_) => {
            reap(&mut child).await;
            Err("the holder ended without answering (see hold.log)".to_string())
        }
        Err(_) => {
            reap(&mut child).await;
            Err("the holder did not answer in time".to_string())
        }
    }
}

/// Kills a holder that is no use, and waits for it, so that no zombie is left for as long as
/// this process lives; one that SIGKILL does not end at once is stuck in the kernel, and not
/// worth holding the command for.
async fn reap(child: &mut tokio::process::Child) {
    let _ = tokio::time::timeout(Duration::from_millis(500), child.kill()).await;
}

/// Asks the holder of `target`, if any, to close its connection and end. `Ok(false)`: there
/// was none (or it did not answer).
pub(crate) async fn disconnect(target: &Target) -> Result<bool> {
    let socket = super::socket_for(target)?;
    match ask(&socket, Op::Exit).await {
        Found::Alive(mut stream) => {
            // It answers, then closes once it has let go of the socket.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let mut rest = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
            })
            .await;
            Ok(true)
        }
        Found::Absent | Found::Bypass(_) => Ok(false),
    }
}

impl Client {
    /// Whether the holder is still there to take connections (it ends with its SSH session).
    pub(crate) fn is_closed(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.socket).is_err()
    }

    async fn open(&self, op: Op) -> std::result::Result<UnixStream, String> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.take());
        if let Some(stream) = spare {
            // Nothing runs before the holder answers, so a spare it has let go of (it waited
            // long enough, or it is another build's) costs only the new connection below.
            match handshake(stream, op.clone()).await {
                Found::Alive(stream) => return Ok(stream),
                Found::Absent => {}
                Found::Bypass(why) => return Err(format!("the connection's holder: {why}")),
            }
        }
        match ask(&self.socket, op).await {
            Found::Alive(stream) => Ok(stream),
            Found::Absent => Err("the connection's holder is gone".to_string()),
            Found::Bypass(why) => Err(format!("the connection's holder: {why}")),
        }
    }

    /// Runs `command` (already under `sh -c`) on the node through the holder, `input` on its
    /// stdin.
    pub(crate) async fn exec<R: AsyncRead + Unpin>(
        &self,
        command: &str,
        mut input: R,
    ) -> Result<Exec> {
        let stream = self
            .open(Op::Exec {
                command: command.to_string(),
            })
            .await
            .map_err(|why| self.target.broke(why))?;
        let (mut reader, mut writer) = stream.into_split();
        let send = async {
            let copied = tokio::io::copy(&mut input, &mut writer).await;
            let _ = writer.shutdown().await;
            copied
        };
        let receive = async {
            let mut out = Exec::default();
            let mut failed = None;
            while let Some((tag, data)) = read_frame(&mut reader).await? {
                if out.stdout.len() + out.stderr.len() + data.len()
                    > crate::ssh::session::OUTPUT_LIMIT
                {
                    failed = Some(crate::ssh::session::output_too_large());
                    break;
                }
                match tag {
                    FRAME_STDOUT => out.stdout.extend_from_slice(&data),
                    FRAME_STDERR => out.stderr.extend_from_slice(&data),
                    FRAME_EXIT if data.len() == 4 => {
                        out.code = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                    }
                    FRAME_ERROR => failed = Some(String::from_utf8_lossy(&data).into_owned()),
                    _ => {}
                }
            }
            std::io::Result::Ok((out, failed))
        };
        let (sent, received) = tokio::join!(send, receive);
        let (out, failed) = received.map_err(|e| self.target.broke(e))?;
        if let Some(why) = failed {
            return Err(self.target.broke(why));
        }
        // A command that had its output but could not take all of its input (it exited first)
        // is judged by its exit status, as over a direct channel.
        if let (None, Err(e)) = (out.code, sent) {
            return Err(self.target.broke(format_args!("sending data failed: {e}")));
        }
        Ok(out)
    }

    /// A stream to the Unix socket `path` on the node through the holder, opened in `mode`,
    /// and how the holder opened it (nothing follows unless it did).
    pub(crate) async fn stream(
        &self,
        path: &str,
        mode: Mode,
    ) -> std::result::Result<(UnixStream, Opened), String> {
        let mut stream = self
            .open(Op::Stream {
                path: path.to_string(),
                mode,
            })
            .await?;
        let opened = read_msg::<_, Opened>(&mut stream)
            .await
            .map_err(|e| format!("the holder did not say how it opened the stream: {e}"))?;
        Ok((stream, opened))
    }
}
