//! One SSH connection to a node (russh): connecting within the budget (the host key is checked
//! in `known_hosts`, the login made in `auth`), remote commands and uploads, and the forwards the
//! connection keeps open.

use std::path::PathBuf;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use russh::client;
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;

use crate::config::Node;
use crate::error::{Error, Result};
use crate::paths;
use crate::ssh::SshError;
use crate::ssh::auth::authenticate;
use crate::ssh::config as ssh_config;
use crate::ssh::forward;
use crate::ssh::known_hosts::{Checker, HostKey, host_key_error};
use crate::ssh::mux;
use crate::ssh::quick_ack::QuickAck;
use crate::ssh::remote;

/// Longest wait for the TCP connection and SSH handshake, inside the invocation's budget, where
/// ssh_config sets no `ConnectTimeout`.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alives when ssh_config sets none: a link that dies is given up after about 15 s
/// (OpenSSH's own default sends none, and waits for TCP, minutes).
const ALIVE_INTERVAL: u64 = 5;
const ALIVE_COUNT: u32 = 3;

/// Where and as whom to connect, after `~/.ssh/config` has been applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Target {
    pub(crate) node: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) identity_files: Vec<PathBuf>,
    /// `CertificateFile`s: user certificates, each tried with the identity whose key it
    /// certifies (as is `<identity>-cert.pub`).
    #[serde(default)]
    pub(crate) certificate_files: Vec<PathBuf>,
    /// The key nodes.toml names: when it is missing and nothing else authenticates, the
    /// refusal says so (the agent may still hold the key, as OpenSSH allows).
    pub(crate) named_identity: Option<PathBuf>,
    /// The known_hosts files read, in order; a new key is recorded in the first (none: nowhere,
    /// as with `UserKnownHostsFile none`).
    pub(crate) known_hosts: Vec<PathBuf>,
    /// `GlobalKnownHostsFile`s: read too, never written.
    #[serde(default)]
    pub(crate) global_known_hosts: Vec<PathBuf>,
    /// `HashKnownHosts`: a recorded key goes under the host's hashed name.
    #[serde(default)]
    pub(crate) hash_known_hosts: bool,
    /// `StrictHostKeyChecking accept-new`: an unknown host key is recorded.
    #[serde(default)]
    pub(crate) accept_new: bool,
    /// Seconds of silence from the node before a keep-alive is sent (0: none).
    pub(crate) alive_interval: u64,
    /// Keep-alives left unanswered before the connection counts as lost.
    pub(crate) alive_count: u32,
    /// The longest wait for the TCP connection and handshake (`ConnectTimeout`), capped by
    /// the budget.
    pub(crate) connect_timeout: Duration,
    /// `ProxyJump` hops, outermost first.
    pub(crate) jumps: Vec<Target>,
    /// `IdentitiesOnly`: of ssh-agent's keys, only those of `identity_files` are offered.
    pub(crate) identities_only: bool,
    /// `ProxyCommand`, its `%` tokens expanded: its stdin and stdout carry the SSH session.
    pub(crate) proxy_command: Option<String>,
    /// The algorithm lists ssh_config sets for this host.
    #[serde(default)]
    pub(crate) algorithms: crate::ssh::algorithms::Algorithms,
}

impl Target {
    pub(crate) fn for_node(node: &Node) -> Result<Target> {
        let alias = node.host.clone().ok_or_else(|| {
            Error::config(format!("node `{}` has no `host` to connect to", node.name))
        })?;
        let entry = ssh_config::lookup(&alias);
        if let Some(why) = &entry.refused {
            return Err(Error::config(format!(
                "node `{}`: ssh_config for `{alias}`: {why}",
                node.name
            )));
        }
        let user = node
            .user
            .clone()
            .or_else(|| entry.user.clone())
            .unwrap_or_else(user_default);
        // An explicit port in nodes.toml wins; 22 is the default, which the alias may change.
        let port = if node.port != 22 {
            node.port
        } else {
            entry.port.unwrap_or(22)
        };
        let host = entry.host_name.clone().unwrap_or_else(|| alias.clone());
        let local_user = user_default();
        let home = ssh_config::home_token();
        let tokens = ssh_config::Tokens {
            alias: &alias,
            host: &host,
            port,
            user: &user,
            local_user: &local_user,
            home: &home,
        };
        // nodes.toml's `jump` wins over ssh_config's ProxyCommand and ProxyJump.
        let proxy_command = entry
            .proxy_command
            .as_deref()
            .filter(|c| !c.eq_ignore_ascii_case("none") && node.jump.is_none())
            .map(|c| ssh_config::expand_tokens(c, &tokens));
        let mut identity_files = Vec::new();
        let named_identity = node.identity_file.as_deref().map(paths::expand_tilde);
        identity_files.extend(named_identity.clone());
        identity_files.extend(
            entry
                .identity_files
                .iter()
                .map(|f| ssh_config::expand_tilde(&ssh_config::expand_tokens(f, &tokens))),
        );
        if identity_files.is_empty() {
            for default in ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"] {
                identity_files.push(ssh_config::expand_tilde(default));
            }
        }
        let known_hosts = match &node.known_hosts {
            Some(file) => vec![paths::expand_tilde(file)],
            None => known_hosts_files(entry.user_known_hosts.as_deref(), USER_KNOWN_HOSTS, &tokens),
        };
        let global_known_hosts = known_hosts_files(
            entry.global_known_hosts.as_deref(),
            GLOBAL_KNOWN_HOSTS,
            &tokens,
        );
        let certificate_files = expanded(&entry.certificate_files, &tokens);
        Target {
            node: node.name.clone(),
            host,
            identities_only: entry.identities_only.unwrap_or(false),
            port,
            user,
            identity_files,
            certificate_files,
            named_identity,
            known_hosts,
            global_known_hosts,
            hash_known_hosts: entry.hash_known_hosts.unwrap_or(false),
            accept_new: entry.accept_new.unwrap_or(false),
            alive_interval: entry.alive_interval.unwrap_or(ALIVE_INTERVAL),
            alive_count: entry.alive_count.unwrap_or(ALIVE_COUNT),
            connect_timeout: connect_timeout(entry.connect_timeout),
            jumps: Vec::new(),
            proxy_command,
            algorithms: entry.algorithms.clone(),
        }
        .with_jumps(
            node.jump.as_deref().or(entry.proxy_jump.as_deref()),
            &user_default(),
            node.known_hosts.is_some(),
        )
    }

    /// The hops of a `ProxyJump` list (`[user@]host[:port]`, comma-separated; `none`: none),
    /// each resolved through ssh_config as OpenSSH does. A hop logs in with its own
    /// `IdentityFile`s, else the target's keys.
    fn with_jumps(
        mut self,
        spec: Option<&str>,
        default_user: &str,
        explicit_known_hosts: bool,
    ) -> Result<Target> {
        let Some(spec) = spec.filter(|s| !s.eq_ignore_ascii_case("none")) else {
            return Ok(self);
        };
        for hop in spec.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let (user, rest) = match hop.rsplit_once('@') {
                Some((user, rest)) => (Some(user.to_string()), rest),
                None => (None, hop),
            };
            let (alias, port) = match rest.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() => {
                    (host.trim_matches(['[', ']']), port.parse().ok())
                }
                _ => (rest, None),
            };
            let entry = ssh_config::lookup(alias);
            if let Some(why) = &entry.refused {
                return Err(Error::config(format!(
                    "node `{}`: ssh_config for its ProxyJump hop `{alias}`: {why}",
                    self.node
                )));
            }
            let host = entry.host_name.clone().unwrap_or_else(|| alias.to_string());
            let port = port.or(entry.port).unwrap_or(22);
            let user = user
                .or(entry.user.clone())
                .unwrap_or_else(|| default_user.to_string());
            let home = ssh_config::home_token();
            let tokens = ssh_config::Tokens {
                alias,
                host: &host,
                port,
                user: &user,
                local_user: default_user,
                home: &home,
            };
            // The hop's own `UserKnownHostsFile` where its block sets one, unless nodes.toml
            // named the file for the node.
            let known_hosts = match (&entry.user_known_hosts, explicit_known_hosts) {
                (Some(files), false) => known_hosts_files(Some(files), USER_KNOWN_HOSTS, &tokens),
                _ => self.known_hosts.clone(),
            };
            let global_known_hosts = match &entry.global_known_hosts {
                Some(files) => known_hosts_files(Some(files), GLOBAL_KNOWN_HOSTS, &tokens),
                None => self.global_known_hosts.clone(),
            };
            let certificate_files = expanded(&entry.certificate_files, &tokens);
            let mut identity_files = ssh_config::expand(&entry.identity_files);
            if identity_files.is_empty() {
                identity_files = self.identity_files.clone();
            }
            self.jumps.push(Target {
                node: self.node.clone(),
                host,
                port,
                user,
                identity_files,
                certificate_files,
                named_identity: None,
                known_hosts,
                global_known_hosts,
                hash_known_hosts: entry.hash_known_hosts.unwrap_or(self.hash_known_hosts),
                accept_new: entry.accept_new.unwrap_or(self.accept_new),
                identities_only: entry.identities_only.unwrap_or(self.identities_only),
                alive_interval: entry.alive_interval.unwrap_or(ALIVE_INTERVAL),
                alive_count: entry.alive_count.unwrap_or(ALIVE_COUNT),
                connect_timeout: connect_timeout(
                    entry
                        .connect_timeout
                        .or(Some(self.connect_timeout.as_secs())),
                ),
                jumps: Vec::new(),
                proxy_command: None,
                algorithms: entry.algorithms.clone(),
            });
        }
        Ok(self)
    }

    /// `node (user@host:port)`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!(
            "`{}` ({}@{}:{})",
            self.node, self.user, self.host, self.port
        )
    }

    /// The connection or a channel on it failed.
    pub(super) fn broke(&self, detail: impl std::fmt::Display) -> Error {
        Error::from(SshError::Protocol {
            target: self.describe(),
            detail: detail.to_string(),
        })
    }
}

/// Most a command's output (stdout and stderr together) may hold: rbee's own commands print
/// little, and a file read or a log tail that is bigger ends as an error, not as memory.
pub(crate) const OUTPUT_LIMIT: usize = 64 << 20;

pub(crate) fn output_too_large() -> String {
    format!(
        "a command's output passed {} MiB: rbee reads no more of it",
        OUTPUT_LIMIT >> 20
    )
}

/// File names of ssh_config, their `%` tokens and `~` expanded.
fn expanded(files: &[String], tokens: &ssh_config::Tokens<'_>) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| ssh_config::expand_tilde(&ssh_config::expand_tokens(f, tokens)))
        .collect()
}

/// OpenSSH's default `UserKnownHostsFile` and `GlobalKnownHostsFile`.
const USER_KNOWN_HOSTS: &[&str] = &["~/.ssh/known_hosts", "~/.ssh/known_hosts2"];
const GLOBAL_KNOWN_HOSTS: &[&str] = &["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"];

/// The files of a `UserKnownHostsFile` (or `GlobalKnownHostsFile`) list, as OpenSSH reads it:
/// each word with its `%` tokens and `~` expanded, `none` meaning no file; unset, `default`.
fn known_hosts_files(
    words: Option<&[String]>,
    default: &[&str],
    tokens: &ssh_config::Tokens<'_>,
) -> Vec<PathBuf> {
    match words {
        Some(words) if words.iter().any(|w| w.eq_ignore_ascii_case("none")) => Vec::new(),
        Some(words) => words
            .iter()
            .map(|w| ssh_config::expand_tilde(&ssh_config::expand_tokens(w, tokens)))
            .collect(),
        None => default
            .iter()
            .map(|w| ssh_config::expand_tilde(w))
            .collect(),
    }
}

/// `ConnectTimeout` seconds, 0 (or none set) meaning rbee's default.
fn connect_timeout(secs: Option<u64>) -> Duration {
    secs.filter(|s| *s > 0)
        .map_or(CONNECT_TIMEOUT, Duration::from_secs)
}

/// As OpenSSH does: the passwd name of this process's uid, whatever `$USER` says (cron with
/// `env -i` and containers have none).
fn user_default() -> String {
    ssh_config::passwd_name()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".to_string())
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
    link: Link,
    pub(crate) target: Target,
    pub(crate) host_key: HostKey,
    forwards: Mutex<Vec<JoinHandle<()>>>,
    /// The `ProxyCommand` carrying the connection, killed when the session ends.
    _proxy: Option<tokio::process::Child>,
}

/// What carries the session's channels: a russh connection of this process, or the holder
/// process of a persistent one.
enum Link {
    Direct {
        handle: Arc<client::Handle<Checker>>,
        /// The `ProxyJump` hops' connections, outermost first: each carries the next.
        hops: Vec<Arc<client::Handle<Checker>>>,
        /// What sshd's answers to its forwards have proven (`forward::State::learnt`).
        learnt: Arc<AtomicU8>,
    },
    Held(Arc<mux::client::Client>),
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
    /// Connects as `connect` does, or, when `persist` is not zero, through the node's holder
    /// (started now if there is none): the connection then outlives this invocation.
    pub(crate) async fn open(
        target: &Target,
        deadline: Instant,
        accept_new: bool,
        persist: Duration,
    ) -> Result<Session> {
        if !persist.is_zero()
            && let Some(session) = mux::client::reach(target, deadline, accept_new, persist).await?
        {
            return Ok(session);
        }
        Session::connect(target, deadline, accept_new).await
    }

    pub(super) fn held(target: &Target, client: mux::client::Client, host_key: HostKey) -> Session {
        Session {
            link: Link::Held(Arc::new(client)),
            target: target.clone(),
            host_key,
            forwards: Mutex::new(Vec::new()),
            _proxy: None,
        }
    }

    /// Connects and authenticates before `deadline`: through each `ProxyJump` hop in turn (a
    /// `direct-tcpip` channel of one carries the next SSH session, each hop's host key checked
    /// on its own), then to the target.
    pub(crate) async fn connect(
        target: &Target,
        deadline: Instant,
        accept_new: bool,
    ) -> Result<Session> {
        let mut hops: Vec<Arc<client::Handle<Checker>>> = Vec::new();
        for hop in &target.jumps {
            let via = hops.last().map_or(Via::Tcp, Via::Hop);
            let (handle, _) = connect_one(hop, via, deadline, accept_new).await?;
            tracing::debug!(node = %target.node, hop = %hop.describe(), "through a ProxyJump hop");
            hops.push(Arc::new(handle));
        }
        let mut proxy = None;
        let via = match (hops.last(), &target.proxy_command) {
            (Some(hop), _) => Via::Hop(hop),
            (None, Some(command)) => {
                let (child, stream) = proxy_command(target, command)?;
                proxy = Some(child);
                Via::Command(stream)
            }
            (None, None) => Via::Tcp,
        };
        let (handle, host_key) = connect_one(target, via, deadline, accept_new).await?;
        Ok(Session {
            link: Link::Direct {
                handle: Arc::new(handle),
                hops,
                learnt: forward::nothing_learnt(),
            },
            target: target.clone(),
            host_key,
            forwards: Mutex::new(Vec::new()),
            _proxy: proxy,
        })
    }

    /// Runs `command` under `sh -c` through the remote user's login shell, feeding it `input`
    /// on stdin.
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
        // Each command costs sshd a session start (~150 ms): `-vv` shows where they are spent.
        tracing::debug!(node = %self.target.node, "running a command on the node");
        let marker = remote::marker();
        let command = remote::under_sh(command, &marker);
        let mut out = self.exec_wrapped(&command, input).await?;
        // What the login shell printed before `sh` ran (a greeting in ~/.bashrc) is not the
        // command's; with no marker at all, the shell never ran it (nologin, a broken shell).
        match remote::after_marker(&out.stdout, &marker) {
            Some(rest) => out.stdout = rest.to_vec(),
            None => {
                let mut said = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let stderr = out.stderr_text();
                if !stderr.is_empty() {
                    if !said.is_empty() {
                        said.push_str("; ");
                    }
                    said.push_str(&stderr);
                }
                if said.is_empty() {
                    said = "it printed nothing".to_string();
                }
                return Err(Error::from(SshError::Shell {
                    target: self.target.describe(),
                    code: out.code.map_or("?".to_string(), |c| c.to_string()),
                    said,
                }));
            }
        }
        Ok(out)
    }

    /// Runs `command` as it is (already under `sh -c`), over this connection or its holder.
    pub(super) async fn exec_wrapped<R: AsyncRead + Unpin>(
        &self,
        command: &str,
        input: R,
    ) -> Result<Exec> {
        let handle = match &self.link {
            Link::Held(client) => return client.exec(command, input).await,
            Link::Direct { handle, .. } => handle,
        };
        let mut channel = handle.channel_open_session().await.map_err(|e| {
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
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, ext: 1 }
                    if out.stdout.len() + out.stderr.len() + data.len() > OUTPUT_LIMIT =>
                {
                    let _ = channel.close().await;
                    return Err(self.target.broke(output_too_large()));
                }
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

    /// Opens the way to the Unix socket `path` on the node in `mode` (a holder serving a
    /// stream), and says how it went.
    pub(super) async fn open_stream(
        &self,
        path: &str,
        mode: mux::Mode,
    ) -> (mux::Opened, Option<forward::Carrier>) {
        match &self.link {
            Link::Direct { handle, learnt, .. } => {
                forward::open_held(handle, learnt, &self.target.node, path, mode).await
            }
            // A holder connects directly; a held session is an invocation's.
            Link::Held(_) => (
                mux::Opened::Broken {
                    why: "a held session carries no streams for others".to_string(),
                },
                None,
            ),
        }
    }

    fn via(&self) -> forward::Via {
        match &self.link {
            Link::Direct { handle, learnt, .. } => forward::Via::Ssh {
                handle: handle.clone(),
                learnt: learnt.clone(),
            },
            Link::Held(client) => forward::Via::Holder(client.clone()),
        }
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

    /// Whether the connection has ended: the node closed it, or its keep-alives went
    /// unanswered.
    pub(crate) fn is_closed(&self) -> bool {
        match &self.link {
            Link::Direct { handle, hops, .. } => {
                handle.is_closed() || hops.iter().any(|hop| hop.is_closed())
            }
            Link::Held(client) => client.is_closed(),
        }
    }

    /// The error for a connection that ended under a command or a stream.
    pub(crate) fn lost(&self) -> Error {
        Error::from(SshError::Lost {
            target: self.target.describe(),
            keepalive: if self.target.alive_interval > 0 {
                format!(
                    "no answer to {} keep-alives {}s apart (ServerAliveInterval, \
                     ServerAliveCountMax)",
                    self.target.alive_count, self.target.alive_interval
                )
            } else {
                "keep-alives are off (ServerAliveInterval 0)".to_string()
            },
        })
    }

    /// A Unix socket on this machine whose connections reach the Unix socket `remote_socket`
    /// (an absolute path on the node) through direct-streamlocal channels of this connection.
    pub(crate) async fn forward(&self, remote_socket: &str) -> Result<forward::Forward> {
        let (forward, task) =
            forward::listen(self.via(), self.target.node.clone(), remote_socket).await?;
        if let Ok(mut forwards) = self.forwards.lock() {
            forwards.push(task);
        }
        Ok(forward)
    }
}

/// What carries an SSH connection.
enum Via<'a> {
    Tcp,
    /// A `direct-tcpip` channel of the hop before.
    Hop(&'a Arc<client::Handle<Checker>>),
    /// A `ProxyCommand`'s stdout and stdin.
    Command(ProxyStream),
}

type ProxyStream = tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>;

/// Starts `command` as OpenSSH does a `ProxyCommand` (`exec` under a shell; its stderr is the
/// user's), with its stdin and stdout as the transport.
fn proxy_command(target: &Target, command: &str) -> Result<(tokio::process::Child, ProxyStream)> {
    tracing::debug!(node = %target.node, "connecting through ProxyCommand `{command}`");
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {command}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            Error::from(SshError::Unreachable {
                target: target.describe(),
                detail: format!("cannot run ProxyCommand `{command}`: {e}"),
            })
        })?;
    match (child.stdout.take(), child.stdin.take()) {
        (Some(out), Some(input)) => Ok((child, tokio::io::join(out, input))),
        // Both were asked for as pipes, so spawn made both.
        _ => Err(Error::internal("ProxyCommand started without its pipes")),
    }
}

/// Logins under way at once to one sshd from this process: below sshd's default
/// `MaxStartups 10:30:100`, which starts dropping unauthenticated connections beyond 10, so a
/// command over many nodes behind one sshd (or one bastion) waits its turn instead.
const LOGINS_PER_SSHD: usize = 8;

/// Each sshd's (`host`, `port`) semaphore of login turns.
type LoginSlots = Vec<((String, u16), Arc<tokio::sync::Semaphore>)>;

/// The semaphore pacing logins to `host:port`.
fn login_slots(host: &str, port: u16) -> Arc<tokio::sync::Semaphore> {
    static SLOTS: Mutex<LoginSlots> = Mutex::new(Vec::new());
    let Ok(mut slots) = SLOTS.lock() else {
        return Arc::new(tokio::sync::Semaphore::new(LOGINS_PER_SSHD));
    };
    if let Some((_, s)) = slots.iter().find(|(k, _)| k.0 == host && k.1 == port) {
        return s.clone();
    }
    let s = Arc::new(tokio::sync::Semaphore::new(LOGINS_PER_SSHD));
    slots.push(((host.to_string(), port), s.clone()));
    s
}

/// One SSH connection and login to `target`: over TCP, through a `direct-tcpip` channel of
/// the hop before it, or over a `ProxyCommand`'s stdio.
async fn connect_one(
    target: &Target,
    via: Via<'_>,
    deadline: Instant,
    accept_new: bool,
) -> Result<(client::Handle<Checker>, HostKey)> {
    let slots = login_slots(&target.host, target.port);
    // Waiting for a turn spends from the budget like the connect itself.
    let _turn = match tokio::time::timeout_at(deadline.into(), slots.acquire_owned()).await {
        Ok(Ok(turn)) => Some(turn),
        Ok(Err(_)) => None,
        Err(_) => {
            return Err(Error::deadline(format!(
                "the budget ran out while waiting to connect to {}",
                target.describe()
            )));
        }
    };
    let verdict = Arc::new(Mutex::new(None));
    let checker = Checker::new(target, accept_new, verdict.clone());
    let config = Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        keepalive_interval: (target.alive_interval > 0)
            .then(|| Duration::from_secs(target.alive_interval)),
        // russh gives up when a keep-alive finds more than `keepalive_max` unanswered before
        // it; OpenSSH after `ServerAliveCountMax` unanswered in all. 0 would mean never to
        // russh, so a count of 1 waits one interval more.
        keepalive_max: usize::try_from(target.alive_count.saturating_sub(1).max(1))
            .unwrap_or(usize::MAX),
        preferred: crate::ssh::known_hosts::preferred_for(target),
        ..client::Config::default()
    });
    let until = deadline.min(Instant::now() + target.connect_timeout);
    let budget_limited = deadline <= Instant::now() + target.connect_timeout;
    let connect = async {
        match via {
            Via::Command(stream) => client::connect_stream(config, stream, checker).await,
            Via::Tcp => {
                let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                    .await
                    .map_err(russh::Error::from)?;
                tcp.set_nodelay(true).map_err(russh::Error::from)?;
                client::connect_stream(config, QuickAck::new(tcp), checker).await
            }
            Via::Hop(hop) => {
                let channel = hop
                    .channel_open_direct_tcpip(
                        target.host.as_str(),
                        u32::from(target.port),
                        "127.0.0.1",
                        0,
                    )
                    .await?;
                client::connect_stream(config, channel.into_stream(), checker).await
            }
        }
    };
    let mut handle = match tokio::time::timeout_at(until.into(), connect).await {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => {
            let verdict = verdict.lock().ok().and_then(|v| v.clone());
            return Err(host_key_error(target, verdict).unwrap_or_else(|| connect_error(target, e)));
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
                secs: target.connect_timeout.as_secs(),
            }));
        }
    };
    let host_key = verdict
        .lock()
        .ok()
        .and_then(|v| v.clone())
        .unwrap_or(HostKey::Known);
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
    Ok((handle, host_key))
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
