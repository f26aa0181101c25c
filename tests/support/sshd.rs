//! Real OpenSSH servers on loopback for the tests: own host key, config and authorized_keys
//! in a temporary directory. Each instance stands for one node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) const SSHD: &str = "/usr/sbin/sshd";

pub(crate) struct Sshd {
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
    /// `KEYTYPE BASE64` of the server's (first) host key.
    pub(crate) host_key: String,
    /// Every host key it offers: (ssh-keygen type, `KEYTYPE BASE64`).
    pub(crate) host_keys: Vec<(String, String)>,
    child: Child,
}

/// How a test's sshd differs from the default one.
pub(crate) struct Options<'a> {
    /// ssh-keygen types of its host keys, in order (default: ed25519 only).
    pub(crate) host_keys: &'a [&'a str],
    /// sshd_config lines appended to the default ones (`AllowTcpForwarding no`, ...).
    pub(crate) extra: &'a str,
    pub(crate) netns: Option<(&'a str, &'a str)>,
    /// The address to listen on, when not 127.0.0.1 (or the namespace's address).
    pub(crate) listen: Option<&'a str>,
    /// A certificate authority's private key and the principals (comma-separated) it signs
    /// each host key for: sshd then presents host certificates (`HostCertificate`).
    pub(crate) host_ca: Option<(&'a Path, &'a str)>,
    /// The node's `/proc/cpuinfo`: sshd, and every session it starts, runs in a mount namespace
    /// of its own where this file is bound over it (root only).
    pub(crate) cpuinfo: Option<&'a Path>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            host_keys: &["ed25519"],
            extra: "",
            netns: None,
            listen: None,
            host_ca: None,
            cpuinfo: None,
        }
    }
}

/// A client key pair the test authenticates with.
pub(crate) struct ClientKey {
    pub(crate) private: PathBuf,
    pub(crate) public: String,
}

fn keygen(path: &Path, kind: &str) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (package openssh-client)");
    assert!(status.success(), "ssh-keygen failed");
}

/// Signs `public` (`KEY.pub`, the certificate going to `KEY-cert.pub`) with the CA key `ca`,
/// as `ssh-keygen -s ca ARGS KEY.pub` does.
pub(crate) fn sign(ca: &Path, public: &Path, args: &[&str]) {
    let out = Command::new("ssh-keygen")
        .arg("-s")
        .arg(ca)
        .args(args)
        .arg(public)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen -s");
    assert!(out.status.success(), "ssh-keygen -s: {out:?}");
}

/// Whether sshd can run here; in CI its absence is a failure, elsewhere a skip.
pub(crate) fn available() -> bool {
    let ok = Path::new(SSHD).exists()
        && Command::new("ssh-keygen")
            .arg("-?")
            .stderr(Stdio::null())
            .status()
            .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{SSHD} or ssh-keygen is missing: install openssh-server and openssh-client (scripts/setup.sh does)"
            );
        }
        eprintln!("skipped: {SSHD} not installed (run scripts/setup.sh)");
    }
    ok
}

/// The SHA256 fingerprint of a public key file, as ssh-keygen prints it.
pub(crate) fn fingerprint(public_key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(public_key)
        .output()
        .expect("ssh-keygen -l");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

impl ClientKey {
    pub(crate) fn new(dir: &Path, name: &str, kind: &str) -> ClientKey {
        let private = dir.join(name);
        keygen(&private, kind);
        let public = std::fs::read_to_string(private.with_extension("pub"))
            .expect("read public key")
            .trim()
            .to_string();
        ClientKey { private, public }
    }

    /// The SHA256 fingerprint of the public half.
    pub(crate) fn fingerprint(&self) -> String {
        fingerprint(&self.private.with_extension("pub"))
    }
}

impl Sshd {
    /// Starts sshd on a free loopback port, trusting `authorized` client keys.
    pub(crate) fn start(dir: &Path, authorized: &[&ClientKey]) -> Sshd {
        Sshd::start_in(dir, authorized, None)
    }

    /// The same, inside a network namespace, listening on its address.
    pub(crate) fn start_in(
        dir: &Path,
        authorized: &[&ClientKey],
        netns: Option<(&str, &str)>,
    ) -> Sshd {
        Sshd::start_with(
            dir,
            authorized,
            &Options {
                netns,
                ..Options::default()
            },
        )
    }

    pub(crate) fn start_with(dir: &Path, authorized: &[&ClientKey], options: &Options<'_>) -> Sshd {
        let netns = options.netns;
        let listen = options
            .listen
            .unwrap_or_else(|| netns.map_or("127.0.0.1", |n| n.1));
        std::fs::create_dir_all(dir).expect("sshd dir");
        let mut host_key_lines = String::new();
        for kind in options.host_keys {
            let path = dir.join(format!("host_{kind}"));
            keygen(&path, kind);
            host_key_lines.push_str(&format!("HostKey {}\n", path.display()));
            if let Some((ca, principals)) = options.host_ca {
                sign(
                    ca,
                    &path.with_extension("pub"),
                    &["-h", "-I", "host", "-n", principals],
                );
                host_key_lines.push_str(&format!("HostCertificate {}-cert.pub\n", path.display()));
            }
        }
        let keys: Vec<String> = authorized.iter().map(|k| k.public.clone()).collect();
        std::fs::write(dir.join("authorized_keys"), keys.join("\n") + "\n")
            .expect("authorized_keys");
        if nix::unistd::geteuid().is_root() {
            // sshd's privilege separation directory.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let port = crate::support::free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "{extra}Port {port}\nListenAddress {listen}\n{host_key_lines}AuthorizedKeysFile {ak}\n\
                 PidFile {pid}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nMaxStartups 64\n\
                 MaxSessions 64\nLogLevel ERROR\n",
                extra = options.extra,
                listen = listen,
                ak = dir.join("authorized_keys").display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .expect("sshd_config");
        let mut command = match netns {
            Some((name, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", name, SSHD]);
                c
            }
            None => match options.cpuinfo {
                Some(cpuinfo) => {
                    let mut c = Command::new("unshare");
                    c.args(["--mount", "--propagation", "private", "sh", "-c"])
                        .arg("mount --bind \"$0\" /proc/cpuinfo && exec \"$@\"")
                        .arg(cpuinfo)
                        .arg(SSHD);
                    c
                }
                None => Command::new(SSHD),
            },
        };
        let mut child = command
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("sshd.log")).expect("sshd log"),
            ))
            .spawn()
            .expect("start sshd");
        // Listening, and it is our sshd that listens (not a process that took the port).
        let up = crate::support::eventually(Duration::from_secs(10), || {
            let listening = match netns {
                // Maybe reachable only from inside its namespace.
                Some((name, _)) => Command::new("ip")
                    .args(["netns", "exec", name, "bash", "-c"])
                    .arg(format!("exec 3<>/dev/tcp/{listen}/{port}"))
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                None => std::net::TcpStream::connect((listen, port)).is_ok(),
            };
            listening && matches!(child.try_wait(), Ok(None))
        });
        assert!(
            up,
            "sshd did not listen: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        let host_keys: Vec<(String, String)> = options
            .host_keys
            .iter()
            .map(|kind| {
                let public = std::fs::read_to_string(dir.join(format!("host_{kind}.pub")))
                    .expect("host pub");
                let mut parts = public.split_whitespace();
                let line = format!(
                    "{} {}",
                    parts.next().expect("key type"),
                    parts.next().expect("key data")
                );
                (kind.to_string(), line)
            })
            .collect();
        Sshd {
            port,
            dir: dir.to_path_buf(),
            host_key: host_keys[0].1.clone(),
            host_keys,
            child,
        }
    }

    /// The known_hosts line for this server.
    pub(crate) fn known_hosts_line(&self) -> String {
        self.known_hosts_line_at("127.0.0.1")
    }

    pub(crate) fn known_hosts_line_at(&self, host: &str) -> String {
        format!("[{host}]:{} {}\n", self.port, self.host_key)
    }

    /// The SHA256 fingerprint as ssh-keygen prints it.
    pub(crate) fn fingerprint(&self) -> String {
        self.fingerprint_of(&self.host_keys[0].0)
    }

    /// The same for its host key of ssh-keygen type `kind`.
    pub(crate) fn fingerprint_of(&self, kind: &str) -> String {
        fingerprint(&self.dir.join(format!("host_{kind}.pub")))
    }

    /// How many logins it accepted: the SSH connections made to it that authenticated (its
    /// config must log at `LogLevel INFO` or finer for it to say).
    pub(crate) fn logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// Kills the processes serving its connections (each connection's own sshd), not the
    /// listener: every session open now ends as a dropped link would end it.
    pub(crate) fn kill_sessions(&self) -> usize {
        let listener = self.child.id();
        let mut killed = 0;
        let mut parents = vec![listener];
        while let Some(parent) = parents.pop() {
            for pid in children_of(parent) {
                parents.push(pid);
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
        }
        killed
    }

    /// The node's sshd dies whole: its listener, and every session it holds (a connection kept
    /// open by the queen goes too). The listener is stopped first so that no session starts
    /// while the others are killed.
    pub(crate) fn die(self) {
        let listener = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(listener, nix::sys::signal::Signal::SIGSTOP);
        self.kill_sessions();
    }

    /// Its log (sshd -e writes there).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                // The field after the parenthesised name: state, then the parent's pid.
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The user the tests log in as: the one running them.
pub(crate) fn user() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".to_string())
}

/// OpenSSH's own client as the oracle: whether `ssh` logs in to `127.0.0.1:port` as `user`
/// with `key` and `known_hosts` (`strict`: its StrictHostKeyChecking), and what it printed.
pub(crate) fn openssh_connects(
    port: u16,
    user: &str,
    key: &Path,
    known_hosts: &Path,
    strict: &str,
) -> (bool, String) {
    let out = openssh_run(port, user, key, known_hosts, strict, "true");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ssh ... user@127.0.0.1 COMMAND` with OpenSSH's own client, as `openssh_connects`.
pub(crate) fn openssh_run(
    port: u16,
    user: &str,
    key: &Path,
    known_hosts: &Path,
    strict: &str,
    command: &str,
) -> std::process::Output {
    Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-o")
        .arg(format!("StrictHostKeyChecking={strict}"))
        .arg("-i")
        .arg(key)
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (package openssh-client)")
}
