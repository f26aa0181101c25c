//! A hive on `transport = "http"` that anyone on the network can reach stays its owner's: with a
//! descriptor limit of 1,024, a crowd of 1,100 idle connections neither locks out a signed
//! request nor makes the hive kill its healthy worker; stalled bodies from strangers cost no
//! memory; a flood of unsigned requests writes a handful of audit records.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Env, eventually, free_port, http, model_table};

/// Room for this test's own connections: its soft limit raised to its hard one.
fn raise_own_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(1 << 16), hard).expect("setrlimit");
}

fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn records(env: &Env, event: &str) -> usize {
    std::fs::read_to_string(env.node_dir().join("audit.jsonl"))
        .expect("node audit log")
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
        .count()
}

#[test]
fn a_crowd_of_idle_connections_and_stalled_bodies_neither_starves_nor_swells_an_http_hive() {
    let Some(model) = crate::support::model() else {
        return;
    };
    raise_own_fd_limit();
    let port = free_port();
    let env = Env::custom(|dir, _| {
        format!(
            "{}\n[nodes.n2]\ntransport = \"http\"\nhost = \"127.0.0.1\"\nhive_port = {port}\n\
             remote_dir = {node:?}\nmodels = [\"smollm2\"]\n",
            model_table(&model, crate::support::MODEL_SHA256),
            node = dir.join("node").display().to_string(),
        )
    });
    // The hive as its node would run it, under a descriptor limit of 1,024 (soft and hard).
    let status = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(crate::support::bin())
        .args(["hive", "serve", "--dir"])
        .arg(env.node_dir())
        .args([
            "--port",
            &port.to_string(),
            "--listen",
            "127.0.0.1",
            "--node",
            "n2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the hive");
    drop(status);
    let key = env.node_dir().join("hive.key");
    assert!(
        eventually(Duration::from_secs(20), || key.exists()
            && TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "the hive did not start"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let keys = env.path().join("keys");
        std::fs::create_dir_all(&keys).expect("keys dir");
        std::fs::copy(&key, keys.join("n2.key")).expect("copy the key");
        std::fs::set_permissions(keys.join("n2.key"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let ask = [
        "--node",
        "n2",
        "--prompt",
        "Hi",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ];
    let first = env.infer(&ask);
    first.expect(0);
    let hive = crate::isolation::pids(&env, "n2");
    let (hive_pid, worker_pid) = (hive[0], hive[1]);
    let limits = std::fs::read_to_string(format!("/proc/{hive_pid}/limits")).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a limit on open files");
    assert!(
        open_files.split_whitespace().nth(3) == Some("1024"),
        "{open_files}"
    );

    // 1,100 idle connections, held while the owner's request runs.
    let crowd: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let during = env.infer(&ask);
    during.expect(0);
    assert_eq!(during.text(), first.text());
    env.run(&["hive", "status", "n2"]).expect(0);
    drop(crowd);
    let workers = env.workers_of("n2");
    assert_eq!(workers[0]["pid"], worker_pid, "the worker was replaced");
    assert_eq!(workers[0]["state"], "ready", "{workers:?}");
    assert_eq!(workers[0]["breaker"], "closed", "{workers:?}");
    assert_eq!(workers[0]["restart_count"], 0, "{workers:?}");

    // 100 strangers send headers and 2 MB of body each, and stall.
    let refused_before = records(&env, "auth_failure");
    let before = rss_kb(hive_pid);
    let body = vec![b'x'; 2 << 20];
    let stalled: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let _ = write!(
                s,
                "POST /v1/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n",
                body.len() + 1
            );
            // As much of it as the hive lets through; the last byte never comes.
            let _ = s.write_all(&body);
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let swollen = rss_kb(hive_pid);
    assert!(
        swollen < 64 * 1024,
        "hive RSS {swollen} kB with 100 stalled bodies (was {before} kB)"
    );
    eprintln!("hive RSS: {before} kB before, {swollen} kB with 100 stalled 2 MB bodies");
    drop(stalled);

    // A head too large or with too many headers is refused before anything of it is kept.
    let huge = "a".repeat(300_000);
    let (s, _) = http(
        port,
        "GET",
        "/v1/workers",
        &[("x-rbee-request-id", &huge)],
        b"",
    );
    assert_eq!(s, 431);
    let names: Vec<String> = (0..100).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let (s, _) = http(port, "GET", "/v1/workers", &many, b"");
    assert_eq!(s, 431);

    // 2,000 unsigned requests: with the stalled ones, a handful of records.
    for _ in 0..2000 {
        let (s, _) = http(port, "GET", "/v1/workers", &[], b"");
        assert_eq!(s, 401);
    }
    let added = records(&env, "auth_failure") - refused_before;
    assert!((1..=4).contains(&added), "{added} auth_failure records");
    let last = env.infer(&ask);
    last.expect(0);
    assert_eq!(env.workers_of("n2")[0]["pid"], worker_pid);
}

impl Env {
    /// `worker list` of one node.
    fn workers_of(&self, node: &str) -> Vec<serde_json::Value> {
        let run = self.run(&["worker", "list", "--json", "--node", node]);
        run.expect(0);
        let value: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
        value["workers"].as_array().cloned().unwrap_or_default()
    }
}
