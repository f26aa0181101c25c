//! Models fetched by the node itself (`source` a URL): downloaded through redirects, verified,
//! used by `infer`; resumed with a range request after the hive died mid-way; other bytes
//! refused, leaving nothing at the model's path.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{Env, eventually};

/// The test server (`tests/support/file_server.py`) serving `file`, killed when dropped.
struct FileServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl FileServer {
    fn start(dir: &Path, file: &Path, extra: &[&str]) -> FileServer {
        let log = dir.join("server.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/file_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(file)
            .arg(&log)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the file server (python3)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's port");
        let port = line.trim().parse().expect("the server prints its port");
        FileServer { child, port, log }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line"))
            .collect()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file the server serves under the model's own file name, a copy of the test model.
fn served_copy(dir: &Path) -> Option<PathBuf> {
    let model = crate::support::model()?;
    let served = dir.join("served").join("model.gguf");
    std::fs::create_dir_all(served.parent().expect("parent")).expect("mkdir");
    std::fs::copy(model, &served).expect("copy the model");
    Some(served)
}

/// A local node serving `smollm2` from `source`, to be downloaded to `<node>/models/`.
fn env_with_source(source: impl FnOnce(&Path) -> String) -> (Env, PathBuf) {
    let mut target = PathBuf::new();
    let env = Env::custom(|dir, port| {
        target = dir.join("node").join("models").join("smollm2.gguf");
        format!(
            "[models.smollm2]\npath = {path:?}\nsha256 = \"{sha}\"\nsource = {source:?}\n\
             threads = 1\n\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {node_dir:?}\n\
             hive_port = {port}\nmodels = [\"smollm2\"]\n",
            path = target.display().to_string(),
            sha = crate::support::MODEL_SHA256,
            source = source(dir),
            node_dir = dir.join("node").display().to_string(),
        )
    });
    (env, target)
}

fn part_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", path.display()))
}

fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().expect("a result line");
    serde_json::from_str(line).expect("JSON")
}

#[test]
fn a_hugging_face_source_is_downloaded_verified_and_served() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    let server = FileServer::start(staging.path(), &served, &[]);
    let (env, target) = env_with_source(|_| "hf://acme/smol-GGUF/model.gguf".to_string());
    // A token for gated repositories, in the node's directory (0600).
    let node_dir = env.node_dir();
    std::fs::create_dir_all(&node_dir).expect("mkdir");
    let token = node_dir.join("hf-token");
    std::fs::write(&token, "hf_test_token_value\n").expect("token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let pull = |args: &[&str]| {
        crate::support::Run::from(
            env.command(args)
                .env("HF_ENDPOINT", &endpoint)
                .output()
                .expect("run rbee"),
        )
    };
    let run = pull(&["--json", "models", "pull", "--node", "n1", "smollm2"]);
    run.expect(0);
    let done = last_json(&run.stdout);
    assert_eq!(done["action"], "downloaded", "{}", run.stdout);
    assert_eq!(done["sha256"], crate::support::MODEL_SHA256);
    assert_eq!(
        crate::support::sha256(&target),
        crate::support::MODEL_SHA256
    );
    assert!(
        !part_of(&target).exists(),
        "the partial file is left behind"
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains("\"event\":\"progress\"")),
        "no progress in --json: {}",
        run.stdout
    );
    assert!(
        !run.stderr.contains("hf_test_token_value"),
        "{}",
        run.stderr
    );

    // The resolve URL redirected to another host; the token went to the first only.
    let requests = server.requests();
    assert_eq!(
        requests[0]["path"],
        "/acme/smol-GGUF/resolve/main/model.gguf"
    );
    assert_eq!(requests[0]["status"], 302);
    assert_eq!(requests[0]["authorization"], true, "{requests:?}");
    assert_eq!(requests[1]["path"], "/files/model.gguf");
    assert_eq!(requests[1]["status"], 200);
    assert_eq!(requests[1]["authorization"], false, "{requests:?}");
    let log = std::fs::read_to_string(node_dir.join("hive.log")).expect("hive log");
    assert!(
        !log.contains("hf_test_token_value"),
        "the token is in the hive's log"
    );

    // A second pull finds it in place; `infer` uses it.
    let again = pull(&["--json", "models", "pull", "--node", "n1", "smollm2"]);
    again.expect(0);
    assert_eq!(last_json(&again.stdout)["action"], "present");
    assert_eq!(
        server.requests().len(),
        2,
        "a present file was fetched again"
    );
    let infer = env.infer(&["--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"]);
    infer.expect(0);
    let audit = crate::support::records(&node_dir.join("audit.jsonl"));
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "model_pulled" && r["fields"]["outcome"] == "downloaded"),
        "no model_pulled record on the node"
    );
    env.run(&["hive", "stop", "n1"]).expect(0);
}

#[test]
fn a_download_cut_by_the_hive_dying_resumes_from_the_partial_file() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    // Whole-file answers come slowly (4 MB/s), ranged ones at full speed.
    let server = FileServer::start(staging.path(), &served, &["--rate", "4000000"]);
    let url = format!("http://127.0.0.1:{}/redirect/model.gguf", server.port);
    let (env, target) = env_with_source(|_| url.clone());
    let part = part_of(&target);
    let first = env.spawn(&["--json", "models", "pull", "--node", "n1", "smollm2"]);
    assert!(
        eventually(Duration::from_secs(60), || std::fs::metadata(&part)
            .is_ok_and(|m| m.len() >= 2_000_000)),
        "the download did not start"
    );
    let pid: i32 = std::fs::read_to_string(env.node_dir().join("hive.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the hive");
    let cut = first.wait_with_output().expect("wait");
    assert_eq!(
        cut.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    let kept = std::fs::metadata(&part)
        .expect("the partial file is kept")
        .len();
    assert!(kept > 0 && kept < std::fs::metadata(&served).expect("size").len());
    assert!(!target.exists());

    let run = env.run(&["--json", "models", "pull", "--node", "n1", "smollm2"]);
    run.expect(0);
    let done = last_json(&run.stdout);
    assert_eq!(done["action"], "resumed", "{}", run.stdout);
    let from = done["resumed_from"].as_u64().expect("resumed_from");
    assert!(
        from >= kept,
        "resumed at {from}, the partial file held {kept}"
    );
    assert_eq!(
        crate::support::sha256(&target),
        crate::support::MODEL_SHA256
    );
    // The server saw the second pull ask for the rest only.
    let ranged: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/files/model.gguf" && !r["range"].is_null())
        .collect();
    assert_eq!(ranged.len(), 1, "{ranged:?}");
    assert_eq!(ranged[0]["range"], format!("bytes={from}-"));
    assert_eq!(ranged[0]["status"], 206);
    env.run(&["hive", "stop", "n1"]).expect(0);
}

#[test]
fn other_bytes_are_refused_and_leave_no_file() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    let server = FileServer::start(staging.path(), &served, &["--corrupt"]);
    let url = format!("http://127.0.0.1:{}/redirect/model.gguf", server.port);
    let (env, target) = env_with_source(|_| url.clone());
    let run = env.run(&["models", "pull", "--node", "n1", "smollm2"]);
    run.expect(7);
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
    assert!(!target.exists(), "a file was left at the model's path");
    assert!(!part_of(&target).exists(), "the partial file was left");
    env.run(&["hive", "stop", "n1"]).expect(0);
}

#[test]
fn models_hash_prints_a_ready_entry() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    let server = FileServer::start(staging.path(), &served, &[]);
    let env = Env::custom(|_, _| String::new());
    for arg in [
        served.display().to_string(),
        format!("http://127.0.0.1:{}/redirect/model.gguf", server.port),
    ] {
        let run = env.run(&["models", "hash", &arg]);
        run.expect(0);
        let entry: toml::Table = toml::from_str(&run.stdout).expect("a TOML entry");
        let model = &entry["models"]["model"];
        assert_eq!(model["sha256"].as_str(), Some(crate::support::MODEL_SHA256));
        assert_eq!(model["source"].as_str(), Some(arg.as_str()));
    }
}

#[test]
fn a_missing_model_file_is_fetched_on_the_spot_when_its_source_is_a_url() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    let server = FileServer::start(staging.path(), &served, &[]);
    let url = format!("http://127.0.0.1:{}/redirect/model.gguf", server.port);
    let (env, target) = env_with_source(|_| url.clone());
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"]);
    run.expect(0);
    assert_eq!(run.done()["tokens_out"], 2, "{}", run.stdout);
    assert_eq!(
        crate::support::sha256(&target),
        crate::support::MODEL_SHA256
    );
    assert!(server.requests().iter().any(|r| r["status"] == 200));
    env.run(&["hive", "stop", "n1"]).expect(0);
}

#[test]
fn a_missing_model_file_without_a_url_says_how_to_put_it_there() {
    let Some(_) = crate::support::model() else {
        return;
    };
    let env = Env::with_model(
        Path::new("/nonexistent/rbee-test/model.gguf"),
        crate::support::MODEL_SHA256,
        "",
    );
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(7);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains("rbee models push --node n1 smollm2")
            && said.contains("rbee models pull --node n1 smollm2"),
        "{said}"
    );
    env.run(&["hive", "stop", "n1"]).expect(0);
}

/// A pull with the hive's stall limit at one second (`RBEE_DOWNLOAD_STALL`), so that a stalled
/// connection is given up on quickly; the hive inherits it when the pull starts it.
fn pull_with_short_stall(env: &Env) -> crate::support::Run {
    crate::support::Run::from(
        env.command(&["--json", "models", "pull", "--node", "n1", "smollm2"])
            .env("RBEE_DOWNLOAD_STALL", "1s")
            .output()
            .expect("run rbee"),
    )
}

#[test]
fn a_stalled_download_is_retried_and_resumed_where_it_stopped() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    // Whole-file answers send 2 MB and then nothing, keeping the connection open.
    let server = FileServer::start(staging.path(), &served, &["--stall-after", "2000000"]);
    let url = format!("http://127.0.0.1:{}/files/model.gguf", server.port);
    let (env, target) = env_with_source(|_| url.clone());
    let run = pull_with_short_stall(&env);
    run.expect(0);
    assert_eq!(
        crate::support::sha256(&target),
        crate::support::MODEL_SHA256
    );
    assert!(!part_of(&target).exists(), "the partial file is left");
    let retried: Vec<serde_json::Value> = run
        .json_lines()
        .into_iter()
        .filter(|l| l["event"] == "retrying")
        .collect();
    assert_eq!(retried.len(), 1, "{}", run.stdout);
    assert!(
        retried[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("stalled")),
        "{retried:?}"
    );
    // The stalled answer, then one asking for the rest only.
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0]["status"], 200);
    assert!(requests[0]["range"].is_null());
    assert_eq!(requests[1]["range"], "bytes=2000000-", "{requests:?}");
    assert_eq!(requests[1]["status"], 206);
    env.run(&["hive", "stop", "n1"]).expect(0);
}

#[test]
fn a_download_that_always_stalls_ends_after_its_retries_naming_the_url() {
    let staging = crate::support::tempdir();
    let Some(served) = served_copy(staging.path()) else {
        return;
    };
    // Every answer, ranged or not, stalls after 1 MB.
    let server = FileServer::start(
        staging.path(),
        &served,
        &["--stall-after", "1000000", "--stall-ranged"],
    );
    let url = format!(
        "http://127.0.0.1:{}/files/model.gguf?X-Signature=secret-sig",
        server.port
    );
    let (env, target) = env_with_source(|_| url.clone());
    let run = pull_with_short_stall(&env);
    run.expect(7);
    let said = format!("{}{}", run.stdout, run.stderr);
    let shown = format!("http://127.0.0.1:{}/files/model.gguf ", server.port);
    assert!(
        said.contains(&shown) && said.contains("after 5 retries") && said.contains("stalled"),
        "{said}"
    );
    assert!(!said.contains("secret-sig"), "the query is shown: {said}");
    let log = std::fs::read_to_string(env.node_dir().join("hive.log")).expect("hive log");
    assert!(
        !log.contains("secret-sig"),
        "the query is in the hive's log"
    );
    // Six tries, each resuming where the last stalled; the partial file is kept.
    let requests = server.requests();
    assert_eq!(requests.len(), 6, "{requests:?}");
    for (i, r) in requests.iter().enumerate().skip(1) {
        assert_eq!(
            r["range"],
            format!("bytes={}-", i * 1_000_000),
            "{requests:?}"
        );
    }
    assert_eq!(
        std::fs::metadata(part_of(&target))
            .expect("partial file")
            .len(),
        6_000_000
    );
    assert!(!target.exists());
    env.run(&["hive", "stop", "n1"]).expect(0);
}
