//! One SSH connection to a node (russh): host key checked against known_hosts, key or agent
//! authentication, remote commands, uploads, and a local port forwarded to the hive.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;

use crate::config::Node;
use crate::error::{Error, IoContext, Result};
use crate::paths;
use crate::ssh::SshError;
use crate::ssh::config as ssh_config;

/// Longest wait for the TCP connection and SSH handshake, inside the invocation's budget.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect, after `~/.ssh/config` has been applied.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) node: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) identity_files: Vec<PathBuf>,
    pub(crate) known_hosts: PathBuf,
}

impl Target {
    pub(crate) fn for_node(node: &Node) -> Result<Target> {
        let alias = node.host.clone().ok_or_else(|| {
            Error::config(format!("node `{}` has no `host` to connect to", node.name))
        })?;
        let entry = ssh_config::lookup(&alias);
        let user = node
            .user
            .clone()
            .or(entry.user)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".to_string());
        let mut identity_files = Vec::new();
        if let Some(file) = &node.identity_file {
            identity_files.push(paths::expand_tilde(file));
        }
        identity_files.extend(ssh_config::expand(&entry.identity_files));
        if identity_files.is_empty() {
            for default in ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"] {
                identity_files.push(paths::expand_tilde(default));
            }
        }
        // An explicit port in nodes.toml wins; 22 is the default, which the alias may change.
        let port = if node.port != 22 {
            node.port
        } else {
            entry.port.unwrap_or(22)
        };
        Ok(Target {
            node: node.name.clone(),
            host: entry.host_name.unwrap_or(alias),
            port,
            user,
            identity_files,
            known_hosts: paths::expand_tilde(&node.known_hosts),
        })
    }

    /// `node (user@host:port)`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!(
            "`{}` ({}@{}:{})",
            self.node, self.user, self.host, self.port
        )
    }

    /// The connection or a channel on it failed.
    fn broke(&self, detail: impl std::fmt::Display) -> Error {
        Error::from(SshError::Protocol {
            target: self.describe(),
            detail: detail.to_string(),
        })
    }
}

/// What the host key check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostKey {
    Known,
    /// Unknown, and recorded because the user asked for it.
    Accepted {
        fingerprint: String,
    },
    Unknown {
        fingerprint: String,
    },
    Changed {
        fingerprint: String,
        line: usize,
    },
    Unsupported(String),
}

struct Checker {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    accept_new: bool,
    verdict: Arc<Mutex<Option<HostKey>>>,
}

impl Checker {
    fn decide(&self, key: &PublicKey) -> HostKey {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => HostKey::Known,
            Ok(false) if self.accept_new => {
                match russh::keys::known_hosts::learn_known_hosts_path(
                    &self.host,
                    self.port,
                    key,
                    &self.known_hosts,
                ) {
                    Ok(()) => HostKey::Accepted { fingerprint },
                    Err(e) => HostKey::Unsupported(format!(
                        "cannot record the host key in `{}`: {e}",
                        self.known_hosts.display()
                    )),
                }
            }
            Ok(false) => HostKey::Unknown { fingerprint },
            Err(russh::keys::Error::KeyChanged { line }) => HostKey::Changed { fingerprint, line },
            Err(e) => {
                HostKey::Unsupported(format!("cannot read `{}`: {e}", self.known_hosts.display()))
            }
        }
    }
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let verdict = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.decide(key),
            PublicKeyOrCertificate::Certificate(_) => {
                HostKey::Unsupported("the server presented a host certificate; rbee checks plain host keys against known_hosts".to_string())
            }
        };
        let accepted = matches!(verdict, HostKey::Known | HostKey::Accepted { .. });
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
        Ok(accepted)
    }
}

/// Output of a remote command.
#[derive(Debug, Default)]
pub(crate) struct Exec {
    pub(crate) code: Option<u32>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

impl Exec {
    pub(crate) fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub(crate) fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }

    pub(crate) fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

pub(crate) struct Session {
    handle: Arc<client::Handle<Checker>>,
    pub(crate) target: Target,
    pub(crate) host_key: HostKey,
    forwards: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(forwards) = self.forwards.lock() {
            for task in forwards.iter() {
                task.abort();
            }
        }
    }
}

impl Session {
    /// Connects and authenticates before `deadline`.
    pub(crate) async fn connect(
        target: &Target,
        deadline: Instant,
        accept_new: bool,
    ) -> Result<Session> {
        let verdict = Arc::new(Mutex::new(None));
        let checker = Checker {
            host: target.host.clone(),
            port: target.port,
            known_hosts: target.known_hosts.clone(),
            accept_new,
            verdict: verdict.clone(),
        };
        let config = Arc::new(client::Config {
            nodelay: true,
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            ..client::Config::default()
        });
        let until = deadline.min(Instant::now() + CONNECT_TIMEOUT);
        let budget_limited = deadline <= Instant::now() + CONNECT_TIMEOUT;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(russh::Error::from)?;
            tcp.set_nodelay(true).map_err(russh::Error::from)?;
            client::connect_stream(config, QuickAck(tcp), checker).await
        };
        let handle = match tokio::time::timeout_at(until.into(), connect).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                let verdict = verdict.lock().ok().and_then(|v| v.clone());
                return Err(
                    host_key_error(target, verdict).unwrap_or_else(|| connect_error(target, e))
                );
            }
            Err(_) if budget_limited => {
                return Err(Error::deadline(format!(
                    "the budget ran out while connecting to {}",
                    target.describe()
                )));
            }
            Err(_) => {
                return Err(Error::from(SshError::Timeout {
                    target: target.describe(),
                    secs: CONNECT_TIMEOUT.as_secs(),
                }));
            }
        };
        let host_key = verdict
            .lock()
            .ok()
            .and_then(|v| v.clone())
            .unwrap_or(HostKey::Known);
        let mut handle = handle;
        let auth = tokio::time::timeout_at(deadline.into(), authenticate(&mut handle, target));
        match auth.await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::deadline(format!(
                    "the budget ran out while authenticating to {}",
                    target.describe()
                )));
            }
        }
        Ok(Session {
            handle: Arc::new(handle),
            target: target.clone(),
            host_key,
            forwards: Mutex::new(Vec::new()),
        })
    }

    /// Runs `command` through the remote user's shell, feeding it `input` on stdin.
    pub(crate) async fn exec(&self, command: &str, input: Option<&[u8]>) -> Result<Exec> {
        match input {
            Some(bytes) => self.exec_reader(command, bytes).await,
            None => self.exec_reader(command, tokio::io::empty()).await,
        }
    }

    /// Runs `command`, streaming `input` to its stdin (uploads).
    pub(crate) async fn exec_reader<R: AsyncRead + Unpin>(
        &self,
        command: &str,
        input: R,
    ) -> Result<Exec> {
        let mut channel = self.handle.channel_open_session().await.map_err(|e| {
            self.target
                .broke(format_args!("cannot open a session: {e}"))
        })?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| self.target.broke(format_args!("cannot run a command: {e}")))?;
        channel
            .data(input)
            .await
            .map_err(|e| self.target.broke(format_args!("sending data failed: {e}")))?;
        channel
            .eof()
            .await
            .map_err(|e| self.target.broke(format_args!("sending data failed: {e}")))?;
        let mut out = Exec::default();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => out.code = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.stderr
                        .extend_from_slice(format!("killed by {signal_name:?}").as_bytes());
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Like `exec`, but a non-zero exit is an error naming `what`.
    pub(crate) async fn run(&self, what: &str, command: &str) -> Result<Exec> {
        self.run_reader(what, command, tokio::io::empty()).await
    }

    /// Like `exec_reader`, but a non-zero exit is an error naming `what`.
    pub(crate) async fn run_reader<R: AsyncRead + Unpin>(
        &self,
        what: &str,
        command: &str,
        input: R,
    ) -> Result<Exec> {
        let out = self.exec_reader(command, input).await?;
        if out.ok() {
            Ok(out)
        } else {
            Err(Error::from(SshError::Command {
                target: self.target.describe(),
                what: what.to_string(),
                code: out.code.map_or("?".to_string(), |c| c.to_string()),
                stderr: out.stderr_text(),
            }))
        }
    }

    /// A port on this machine's loopback whose connections reach `127.0.0.1:remote_port` on
    /// the node through direct-tcpip channels of this connection.
    pub(crate) async fn forward(&self, remote_port: u16) -> Result<u16> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .doing("listen on the loopback for a forward")?;
        let local_port = listener
            .local_addr()
            .doing("read the forward's local port")?
            .port();
        let handle = self.handle.clone();
        let node = self.target.node.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let handle = handle.clone();
                let node = node.clone();
                tokio::spawn(async move {
                    let open = handle.channel_open_direct_tcpip(
                        "127.0.0.1",
                        u32::from(remote_port),
                        "127.0.0.1",
                        u32::from(peer.port()),
                    );
                    let channel = open.await;
                    match channel {
                        Ok(channel) => {
                            let mut stream = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                        }
                        Err(e) => {
                            tracing::debug!(node = %node, "tunnel to port {remote_port} refused: {e}");
                        }
                    }
                });
            }
        });
        if let Ok(mut forwards) = self.forwards.lock() {
            forwards.push(task);
        }
        Ok(local_port)
    }
}

/// The connection's socket, acknowledging what the node sends at once. sshd leaves Nagle's
/// algorithm on for connections without a terminal: it holds a small packet back until the one
/// before is acknowledged, and Linux delays acknowledgements by up to 40 ms. That stalled the
/// direct-tcpip confirmation (after sshd's debug messages on login) and every streamed event
/// that followed another within 40 ms, the done event of a short generation included. Quick-ack
/// mode wears off by itself, so it is set again after every read.
struct QuickAck(tokio::net::TcpStream);

impl QuickAck {
    fn rearm(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // Only a latency hint: a socket that refuses it still works.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.rearm();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

fn host_key_error(target: &Target, verdict: Option<HostKey>) -> Option<Error> {
    let err = match verdict? {
        HostKey::Unknown { fingerprint } => SshError::HostKeyUnknown {
            target: target.describe(),
            node: target.node.clone(),
            fingerprint,
            known_hosts: target.known_hosts.clone(),
        },
        HostKey::Changed { fingerprint, line } => SshError::HostKeyChanged {
            target: target.describe(),
            node: target.node.clone(),
            fingerprint,
            known: known_fingerprint(target, line),
            known_hosts: target.known_hosts.clone(),
            line,
        },
        HostKey::Unsupported(why) => SshError::HostKeyUnchecked {
            target: target.describe(),
            why,
        },
        HostKey::Known | HostKey::Accepted { .. } => return None,
    };
    Some(Error::from(err))
}

/// The fingerprint of the key that known_hosts holds for the target at `line`.
fn known_fingerprint(target: &Target, line: usize) -> Option<String> {
    let known = russh::keys::known_hosts::known_host_keys_path(
        &target.host,
        target.port,
        &target.known_hosts,
    )
    .ok()?;
    known
        .into_iter()
        .find(|(l, _)| *l == line)
        .map(|(_, key)| key.fingerprint(HashAlg::Sha256).to_string())
}

/// A failed connection attempt: no TCP connection at all, or a handshake that broke.
fn connect_error(target: &Target, err: russh::Error) -> Error {
    let err = match err {
        russh::Error::IO(e) => SshError::Unreachable {
            target: target.describe(),
            detail: e.to_string(),
        },
        other => SshError::Protocol {
            target: target.describe(),
            detail: other.to_string(),
        },
    };
    Error::from(err)
}

async fn authenticate(handle: &mut client::Handle<Checker>, target: &Target) -> Result<()> {
    let mut tried = Vec::new();
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        match russh::keys::agent::client::AgentClient::connect_env().await {
            Ok(mut agent) => {
                let identities = agent.request_identities().await.unwrap_or_default();
                for identity in identities {
                    let key = identity.public_key().into_owned();
                    let hash = rsa_hash(handle, &key).await;
                    let result = handle
                        .authenticate_publickey_with(&target.user, key, hash, &mut agent)
                        .await;
                    if matches!(result, Ok(r) if r.success()) {
                        return Ok(());
                    }
                }
                tried.push("ssh-agent".to_string());
            }
            Err(e) => tracing::debug!("ssh-agent unavailable: {e}"),
        }
    }
    for file in &target.identity_files {
        if !file.exists() {
            continue;
        }
        let key = match russh::keys::load_secret_key(file, None) {
            Ok(key) => key,
            Err(e) => {
                tried.push(format!("{} (unusable: {e})", file.display()));
                continue;
            }
        };
        let hash = rsa_hash(handle, key.public_key()).await;
        let result = handle
            .authenticate_publickey(
                &target.user,
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|e| target.broke(format_args!("authentication failed: {e}")))?;
        if result.success() {
            return Ok(());
        }
        tried.push(file.display().to_string());
    }
    let tried = if tried.is_empty() {
        "no key found (set `identity_file`, or load a key into ssh-agent)".to_string()
    } else {
        format!("tried {}", tried.join(", "))
    };
    Err(Error::from(SshError::AuthRefused {
        target: target.describe(),
        user: target.user.clone(),
        tried,
    }))
}

async fn rsa_hash(handle: &client::Handle<Checker>, key: &PublicKey) -> Option<HashAlg> {
    if key.algorithm().is_rsa() {
        handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten()
    } else {
        None
    }
}
