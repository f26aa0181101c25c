//! Test helpers: a private rbee environment per test (its own state directory, nodes.toml and
//! hive port), a builder over the real binary, and process inspection.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) mod mount;
pub(crate) mod netns;
pub(crate) mod sshd;
pub(crate) mod user;

pub(crate) const MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The binary under test: `RBEE_TEST_BIN` when set (a target directory shared by several
/// checkouts holds one `target/release/rbee`, relinked by whichever built last), else cargo's.
pub(crate) fn bin() -> PathBuf {
    std::env::var_os("RBEE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rbee")))
}

/// The test model. In CI a missing model is a failure; elsewhere the test is skipped with a note.
pub(crate) fn model() -> Option<PathBuf> {
    let path = std::env::var_os("RBEE_TEST_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h).join(".cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            })
        })?;
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "the test model is missing at {} (set RBEE_TEST_MODEL, or run scripts/setup.sh)",
            path.display()
        );
    }
    eprintln!(
        "skipped: no test model at {} (run scripts/setup.sh)",
        path.display()
    );
    None
}

/// A free port for a test's hive or sshd. It comes from below the kernel's ephemeral range
/// (32768 and up by default), where the workers and tunnels of other tests bind their own
/// ports, and is never handed out twice in one run.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 5_000) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `[models.smollm2]` table for the test model; one llama.cpp thread, so that tests running
/// side by side do not starve each other.
pub(crate) fn model_table(model: &Path, sha256: &str) -> String {
    format!(
        "[models.smollm2]\npath = {:?}\nsha256 = \"{sha256}\"\nthreads = 1\n",
        model.display().to_string()
    )
}

pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rbee-test-")
        .tempdir()
        .expect("tempdir")
}

/// One private rbee world: state dir, config, node dir and hive port of its own.
pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) config: PathBuf,
}

pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn from(output: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: output
                .status
                .code()
                .unwrap_or_else(|| 128 + output.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The `--json` lines of stdout.
    pub(crate) fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect()
    }

    pub(crate) fn done(&self) -> serde_json::Value {
        let lines = self.json_lines();
        let last = lines.last().cloned().expect("at least one JSON line");
        assert_eq!(
            last["event"], "done",
            "last line is not the done event: {}",
            self.stdout
        );
        last
    }

    pub(crate) fn text(&self) -> String {
        self.json_lines()
            .iter()
            .filter(|l| l["event"] == "token")
            .map(|l| l["text"].as_str().expect("token text").to_string())
            .collect()
    }

    #[track_caller]
    pub(crate) fn expect(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

impl Env {
    /// A local node `n1` serving the test model; `extra` is appended to its node table.
    pub(crate) fn new(extra: &str) -> Option<Env> {
        let model = model()?;
        Some(Env::with_model(&model, MODEL_SHA256, extra))
    }

    pub(crate) fn with_model(model: &Path, sha256: &str, extra: &str) -> Env {
        Env::custom(|dir, port| {
            format!(
                "{}\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {node_dir:?}\n\
                 hive_port = {port}\nmodels = [\"smollm2\"]\n{extra}\n",
                model_table(model, sha256),
                node_dir = dir.join("node").display().to_string(),
            )
        })
    }

    /// An environment whose nodes.toml `config` writes, given its directory and a free port.
    pub(crate) fn custom(config: impl FnOnce(&Path, u16) -> String) -> Env {
        let dir = tempdir();
        let port = free_port();
        let text = config(dir.path(), port);
        Env::from_dir(dir, port, &text)
    }

    pub(crate) fn from_dir(dir: tempfile::TempDir, port: u16, config: &str) -> Env {
        let path = dir.path().join("nodes.toml");
        std::fs::write(&path, config).expect("write nodes.toml");
        Env {
            dir,
            port,
            config: path,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn node_dir(&self) -> PathBuf {
        self.path().join("node")
    }

    /// The binary with this environment: its config and state, nothing from the caller's.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        self.command_of(&bin(), args)
    }

    /// The same for a copy of the binary at `program`.
    pub(crate) fn command_of(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(self.path())
            .env("RBEE_CONFIG", &self.config)
            .env("RBEE_HOME", self.path().join("state"))
            // Not this machine's /etc/ssh/ssh_config (Debian's hashes the known_hosts lines
            // rbee writes); the tests of the system file set their own.
            .env("RBEE_SSH_SYSTEM_CONFIG", "none")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    pub(crate) fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("run rbee"))
    }

    pub(crate) fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rbee");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        Run::from(child.wait_with_output().expect("wait rbee"))
    }

    pub(crate) fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rbee")
    }

    /// `infer --json` with the given extra arguments.
    pub(crate) fn infer(&self, args: &[&str]) -> Run {
        let mut all = vec!["--json", "infer"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    pub(crate) fn workers(&self) -> Vec<serde_json::Value> {
        let run = self.run(&["worker", "list", "--json"]);
        run.expect(0);
        let value: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
        value["workers"].as_array().cloned().unwrap_or_default()
    }

    /// Pids of every process started for this environment (hive and workers carry its
    /// directory in their command line).
    pub(crate) fn processes(&self) -> Vec<i32> {
        processes_mentioning(&self.path().display().to_string())
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains("hive\0serve") || cmdline.contains("worker\0serve")
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.command(&["hive", "stop", "--all"]).output();
        // Holders of persistent SSH connections end with the test, not `persist` later.
        let _ = self.command(&["nodes", "disconnect"]).output();
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub(crate) fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Zombies have an empty cmdline and count as gone.
        if cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

pub(crate) fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie ("Z") has exited; only its parent has not collected it yet.
    !stat.is_empty() && stat.split(' ').nth(2).is_none_or(|s| s != "Z")
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub(crate) fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where a test reaches a server: a TCP port on loopback, or a Unix socket.
#[derive(Debug, Clone)]
pub(crate) enum At {
    Port(u16),
    Socket(PathBuf),
}

impl From<u16> for At {
    fn from(port: u16) -> At {
        At::Port(port)
    }
}

impl From<&Path> for At {
    fn from(path: &Path) -> At {
        At::Socket(path.to_path_buf())
    }
}

impl From<PathBuf> for At {
    fn from(path: PathBuf) -> At {
        At::Socket(path)
    }
}

impl From<&PathBuf> for At {
    fn from(path: &PathBuf) -> At {
        At::Socket(path.clone())
    }
}

/// A plain HTTP/1.0 exchange with a server on loopback or a Unix socket: (status, body).
pub(crate) fn http(
    at: impl Into<At>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::Read;
    let mut stream: Box<dyn ReadWrite> = match at.into() {
        At::Port(port) => {
            let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            tcp.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            Box::new(tcp)
        }
        At::Socket(path) => {
            let unix = std::os::unix::net::UnixStream::connect(&path)
                .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
            unix.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            Box::new(unix)
        }
    };
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    // A server that refuses a large head or body answers and closes before reading all of it;
    // on a Unix socket the rest of the write then fails, and the answer is still there to read.
    let _ = stream.write_all(request.as_bytes());
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub(crate) trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// `GET /health` of the hive's worker for the test model, signed with the worker key (only a
/// signer sees what the worker works on).
pub(crate) fn worker_health(env: &Env) -> serde_json::Value {
    let key = std::fs::read_to_string(env.node_dir().join("worker.key")).expect("worker key");
    let sig = sign_with(&key, "GET", "/health", b"", unix_now(), &fresh_nonce());
    let (status, body) = http(
        env.worker_socket(),
        "GET",
        "/health",
        &[("x-rbee-signature", &sig)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

pub(crate) fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME"))
}

pub(crate) fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Signs a request that carries no budget or request id header, the way the README documents.
pub(crate) fn sign_with(
    key_hex: &str,
    method: &str,
    path: &str,
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> String {
    sign_covering(key_hex, method, path, ("", ""), body, ts, nonce)
}

/// Signs a request the way the README documents it, written independently of rbee's code;
/// `covered` is the budget and request id headers' values (empty when the request has none).
pub(crate) fn sign_covering(
    key_hex: &str,
    method: &str,
    path: &str,
    covered: (&str, &str),
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> String {
    use hmac::Mac;
    use sha2::Digest;
    let key = hex::decode(key_hex.trim()).expect("hex key");
    let kid = hex::encode(&sha2::Sha256::digest(&key)[..8]);
    let body_sha = hex::encode(sha2::Sha256::digest(body));
    let (budget, request_id) = covered;
    let canonical = format!(
        "RBEE-HMAC-SHA256\n{method}\n{path}\n{ts}\n{nonce}\n{body_sha}\n{kid}\n{budget}\n{request_id}"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(canonical.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("v1 kid={kid},ts={ts},nonce={nonce},sig={sig}")
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

pub(crate) fn fresh_nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:016x}{:016x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl Env {
    /// The hive's Unix socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.node_dir().join("hive.sock")
    }

    /// The Unix socket of the test model's worker, as the hive lists it.
    pub(crate) fn worker_socket(&self) -> PathBuf {
        let workers = self.workers();
        PathBuf::from(workers[0]["socket"].as_str().expect("worker socket"))
    }

    /// The local node's signing key (hex).
    pub(crate) fn node_key(&self) -> String {
        std::fs::read_to_string(self.node_dir().join("hive.key")).expect("node key")
    }

    /// A signed request to the hive.
    pub(crate) fn signed(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let covered = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or("", |(_, v)| *v)
        };
        let header = sign_covering(
            &self.node_key(),
            method,
            path,
            (covered("x-rbee-budget-ms"), covered("x-rbee-request-id")),
            body,
            unix_now(),
            &fresh_nonce(),
        );
        let mut all = vec![
            ("x-rbee-signature", header.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        http(self.socket(), method, path, &all, body)
    }
}

/// Near-uniform sampling, so the generation runs until something stops it. At temperature 5
/// the end-of-generation token still comes up now and then (once within 37 tokens was seen),
/// so the seed is fixed to one that fills the whole 4,096-token context without it: sampling
/// is the same batched or alone.
pub(crate) const ENDLESS: [&str; 10] = [
    "--prompt",
    "Tell me a story.",
    "--temperature",
    "5",
    "--top-p",
    "1",
    "--max-tokens",
    "100000",
    "--seed",
    "1",
];

pub(crate) type Lines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

impl Env {
    /// `--json infer` of an endless generation (plus `extra`), once its first `tokens` arrived.
    pub(crate) fn spawn_endless(&self, extra: &[&str], tokens: usize) -> (Child, Lines) {
        use std::io::BufRead;
        let mut args = vec!["--json", "infer"];
        args.extend(ENDLESS);
        args.extend_from_slice(extra);
        let mut child = self.spawn(&args);
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        for _ in 0..tokens {
            lines.next().expect("a token").expect("read");
        }
        (child, lines)
    }

    /// Rewrites nodes.toml, replacing `from` with `to`.
    pub(crate) fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read nodes.toml");
        assert!(text.contains(from), "nodes.toml has no `{from}`");
        std::fs::write(&self.config, text.replace(from, to)).expect("write nodes.toml");
    }

    /// `text` added at the end of nodes.toml (a top-level table, such as `[restart]`).
    pub(crate) fn append_config(&self, text: &str) {
        let config = std::fs::read_to_string(&self.config).expect("read nodes.toml");
        std::fs::write(&self.config, format!("{config}\n{text}")).expect("write nodes.toml");
    }

    /// A second model on node `n1`: the test model's file under another name.
    pub(crate) fn add_model(&self, name: &str) {
        let model = model().expect("model");
        let text = std::fs::read_to_string(&self.config).expect("read nodes.toml");
        let table = format!(
            "[models.{name}]\npath = {:?}\nsha256 = \"{MODEL_SHA256}\"\nthreads = 1\n",
            model.display().to_string(),
        );
        std::fs::write(&self.config, format!("{table}{text}")).expect("write nodes.toml");
        self.edit_config(
            "models = [\"smollm2\"]",
            &format!("models = [\"smollm2\", \"{name}\"]"),
        );
    }
}

/// An audit log's records after `edit`, every `prev` and `hash` recomputed the way the README
/// defines the chain (`hash = sha256(prev ‖ record without hash)`, keys sorted, compact JSON),
/// so the result verifies on its own: what someone rewriting a log would do.
pub(crate) fn rechain(records: Vec<serde_json::Value>) -> Vec<String> {
    use sha2::Digest;
    let mut prev = "0".repeat(64);
    records
        .into_iter()
        .map(|mut r| {
            r["prev"] = serde_json::json!(prev);
            let mut without = r.clone();
            without
                .as_object_mut()
                .expect("a record is an object")
                .remove("hash");
            let hash = hex::encode(sha2::Sha256::digest(format!("{prev}{without}").as_bytes()));
            r["hash"] = serde_json::json!(hash);
            prev = hash;
            r.to_string()
        })
        .collect()
}

/// The records of an audit log, parsed.
pub(crate) fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a record: {l:?}: {e}")))
        .collect()
}

/// The JSON lines of a file a command writes (`batch --output`); none while it does not exist.
pub(crate) fn results(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// A worker stopped with SIGSTOP, let go (SIGCONT) when this drops, however the test ends: so
/// that requests queue on its socket and it takes them together.
pub(crate) struct HeldWorker(nix::unistd::Pid);

impl HeldWorker {
    pub(crate) fn stop(pid: i64) -> HeldWorker {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        HeldWorker(pid)
    }

    /// Whether the hive has taken `n` requests to the worker within `limit` (it marks them
    /// `generating` before it sends); a pause then gives it time to write them to the socket.
    pub(crate) fn handed(&self, env: &Env, n: usize, limit: Duration) -> bool {
        let handed = eventually(limit, || {
            let (status, body) = env.signed("GET", "/v1/requests", &[], b"");
            assert_eq!(status, 200, "{body}");
            let list: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
            list.iter().filter(|r| r["stage"] == "generating").count() == n
        });
        std::thread::sleep(Duration::from_millis(500));
        handed
    }
}

impl Drop for HeldWorker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// This machine's audit lock of `env`, held from the test as another rbee (stuck, or on a hung
/// disk) would hold it, until the guard is dropped.
pub(crate) fn hold_audit_lock(env: &Env) -> nix::fcntl::Flock<std::fs::File> {
    hold_audit_lock_in(&env.path().join("state"))
}

/// The lock of the audit log in `dir` (the queen's state directory, or a node's directory),
/// held the same way.
pub(crate) fn hold_audit_lock_in(dir: &Path) -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("audit.lock"))
        .expect("open the lock");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .expect("take the lock")
}
