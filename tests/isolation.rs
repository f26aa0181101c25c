//! A hive that nobody else can reach, starve or impersonate: hives and workers listen on Unix
//! sockets in their node's private directory, two users (or two state directories) on one
//! machine never meet, a stop acts only on this node's own hive, and an unsigned health check
//! learns nothing private.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{Env, alive, eventually, free_port, http};

/// rbee on the embedded default (no nodes.toml anywhere) with its state in `dir/state`.
fn embedded(dir: &Path) -> Command {
    let mut cmd = Command::new(crate::support::bin());
    cmd.current_dir(dir)
        .env("RBEE_HOME", dir.join("state"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("RBEE_CONFIG")
        .env_remove("XDG_STATE_HOME")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn done_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a done line");
    let done: serde_json::Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(done["event"], "done", "{stdout}");
    done
}

fn hive_pid(dir: &Path) -> i32 {
    let out = embedded(dir)
        .args(["--json", "hive", "status"])
        .output()
        .expect("rbee");
    let status: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    status["pid"].as_i64().expect("hive pid") as i32
}

/// Stops whatever hives a test left on its embedded default.
struct Cleanup<'a>(&'a [&'a Path]);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for dir in self.0 {
            let _ = embedded(dir).args(["hive", "stop"]).output();
        }
    }
}

#[test]
fn two_state_dirs_on_the_embedded_default_share_a_machine_and_stop_only_their_own_hive() {
    let Some(_) = crate::support::model() else {
        return;
    };
    let a = crate::support::tempdir();
    let b = crate::support::tempdir();
    let dirs = [a.path(), b.path()];
    let _cleanup = Cleanup(&dirs);
    let infer = ["--json", "infer", "--prompt", "Hi", "--max-tokens", "2"];
    // At the same time: both start a hive of their own on the same default settings.
    let children: Vec<_> = dirs
        .iter()
        .map(|dir| {
            embedded(dir)
                .args(infer)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("rbee")
        })
        .collect();
    for child in children {
        let done = done_of(&child.wait_with_output().expect("wait"));
        assert!(
            done["timings_ms"]["hive_start"].as_f64().is_some(),
            "{done}"
        );
    }
    let (hive_a, hive_b) = (hive_pid(a.path()), hive_pid(b.path()));
    assert_ne!(hive_a, hive_b);

    let stop = embedded(a.path())
        .args(["hive", "stop"])
        .output()
        .expect("rbee");
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(!alive(hive_a), "`hive stop` left its own hive running");
    assert!(
        alive(hive_b),
        "`hive stop` stopped the other state dir's hive"
    );
    // The other one is still warm: no hive start, no model load.
    let warm = done_of(&embedded(b.path()).args(infer).output().expect("rbee"));
    assert!(warm["timings_ms"]["hive_start"].is_null(), "{warm}");
    assert!(warm["timings_ms"]["load"].is_null(), "{warm}");
    assert_eq!(hive_pid(b.path()), hive_b);

    let stop = embedded(b.path())
        .args(["hive", "stop"])
        .output()
        .expect("rbee");
    assert!(stop.status.success());
    assert!(!alive(hive_b));
}

/// The TCP listeners of `pids`, as `ss -ltnp` shows them.
pub(crate) fn tcp_listeners_of(pids: &[i32]) -> Vec<String> {
    let out = Command::new("ss")
        .arg("-ltnpH")
        .output()
        .expect("ss (package iproute2)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| pids.iter().any(|p| l.contains(&format!("pid={p},"))))
        .map(str::to_string)
        .collect()
}

/// The hive's and the worker's pids of a node that has served a request.
pub(crate) fn pids(env: &Env, node: &str) -> Vec<i32> {
    let status = env.run(&["--json", "hive", "status", node]);
    status.expect(0);
    let status: serde_json::Value =
        serde_json::from_str(status.stdout.lines().next().expect("a line")).expect("JSON");
    let worker = env.run(&["--json", "worker", "list", "--node", node]);
    worker.expect(0);
    let worker: serde_json::Value = serde_json::from_str(worker.stdout.trim()).expect("JSON");
    vec![
        status["pid"].as_i64().expect("hive pid") as i32,
        worker["workers"][0]["pid"].as_i64().expect("worker pid") as i32,
    ]
}

#[test]
fn a_local_hive_and_its_worker_listen_on_no_tcp_port_but_the_metrics_one() {
    let metrics = free_port();
    let Some(env) = Env::new(&format!("metrics_port = {metrics}")) else {
        return;
    };
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let pids = pids(&env, "n1");
    let listeners = tcp_listeners_of(&pids);
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert!(
        listeners[0].contains(&format!("0.0.0.0:{metrics} ")),
        "{listeners:?}"
    );
    assert!(
        listeners[0].contains(&format!("pid={},", pids[0])),
        "{listeners:?}"
    );
    // The metrics port serves the metrics and nothing else of the hive.
    let (status, body) = http(metrics, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rbee_"), "{body}");
    assert_eq!(http(metrics, "GET", "/health", &[], b"").0, 404);
    assert_eq!(http(metrics, "GET", "/v1/workers", &[], b"").0, 404);
    assert_eq!(http(metrics, "POST", "/v1/shutdown", &[], b"").0, 404);
}

fn curl(socket: &Path, path: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn an_unsigned_health_check_tells_only_that_a_hive_answers_and_its_version() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let socket = env.socket();
    let hive = curl(&socket, "/health");
    let mut keys: Vec<&str> = hive
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["protocol", "status", "version"], "{hive}");
    // A signer sees the rest.
    let (status, body) = env.signed("GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let signed: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(signed["pid"].as_u64().is_some(), "{signed}");
    assert_eq!(signed["node"], "n1");
    // The worker says whether it is busy, not whose requests it serves.
    let worker = curl(&env.worker_socket(), "/health");
    assert_eq!(
        worker
            .as_object()
            .expect("object")
            .keys()
            .collect::<Vec<_>>(),
        ["status"],
        "{worker}"
    );
    assert!(crate::support::worker_health(&env)["last"]["request_id"].is_string());
    // Only the node's user can reach the sockets.
    use std::os::unix::fs::PermissionsExt;
    for path in [env.node_dir(), socket] {
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o077;
        assert_eq!(mode, 0, "{} is open to others", path.display());
    }
}

#[test]
fn a_hive_stop_signals_no_pid_that_an_impostor_on_the_socket_reports() {
    let Some(env) = Env::new("") else { return };
    // Something that is not this node's hive answers on its socket, and claims a pid.
    let bystander = Command::new("sleep").arg("60").spawn().expect("sleep");
    let pid = bystander.id();
    std::fs::create_dir_all(env.node_dir()).expect("node dir");
    let listener = std::os::unix::net::UnixListener::bind(env.socket()).expect("bind the impostor");
    let impostor = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = format!(
                r#"{{"status":"ok","version":"{}","protocol":1,"node":"n1","pid":{pid},"uptime_s":1.0,"stopping":true}}"#,
                env!("CARGO_PKG_VERSION")
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let stop = env.run(&["--json", "hive", "stop", "n1"]);
    stop.expect(0);
    assert!(stop.stdout.contains("not_running"), "{}", stop.stdout);
    std::thread::sleep(Duration::from_millis(200));
    let mut bystander = bystander;
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "`hive stop` killed a process named by whatever answered on the socket"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    drop(impostor);
}

#[test]
fn a_remote_dir_too_long_for_a_socket_is_refused_naming_the_path_and_the_limit() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let env = Env::custom(|dir, _| {
        let long = dir.join("d".repeat(100));
        format!(
            "{}\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {:?}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            long.display().to_string()
        )
    });
    let run = env.run(&["infer", "--prompt", "Hi", "--max-tokens", "1"]);
    run.expect(3);
    let long = env.path().join("d".repeat(100)).join("hive.sock");
    assert!(
        run.stderr.contains(&long.display().to_string()),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("107 bytes"), "{}", run.stderr);
    assert!(run.stderr.contains("remote_dir"), "{}", run.stderr);
    assert!(
        eventually(Duration::from_secs(1), || env.processes().is_empty()),
        "a hive started anyway"
    );
}
