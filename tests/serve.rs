//! `rbee serve`: the OpenAI API over the fleet, driven by the real `openai` Python SDK against
//! the real binary, a real hive and the real model.

use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::support::{Env, eventually, free_port, http};

/// Whether `python3` has the `openai` and `jsonschema` packages: in CI their absence is a
/// failure; elsewhere the test is skipped with a note.
pub(crate) fn python_sdk() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai, jsonschema"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("python3 lacks the `openai` or `jsonschema` package (run scripts/setup.sh)");
        }
        eprintln!("skipped: python3 lacks the `openai` package (run scripts/setup.sh)");
    }
    ok
}

/// A running `rbee serve` of an environment, with a key made for it.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) key: String,
}

/// A test that fails before `stop` does not leave its server running.
impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Serve {
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Serve {
        let made = env.run(&["--json", "serve", "key", "create", "ci"]);
        made.expect(0);
        let key =
            serde_json::from_str::<serde_json::Value>(made.stdout.trim()).expect("JSON")["key"]
                .as_str()
                .expect("key")
                .to_string();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen];
        args.extend_from_slice(extra);
        let child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rbee serve");
        assert!(
            eventually(Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "rbee serve did not listen"
        );
        Serve { child, port, key }
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// python3 running `tests/serve/NAME` against this server and `model`, with `env` added.
    pub(crate) fn script(&self, name: &str, model: &str, env: &[(&str, &str)]) -> Command {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/serve")
            .join(name);
        let mut command = Command::new("python3");
        command
            .arg(&path)
            .env("RBEE_BASE_URL", self.base_url())
            .env("RBEE_KEY", &self.key)
            .env("RBEE_MODEL", model)
            .envs(env.iter().copied());
        command
    }

    /// Runs a Python script of `tests/serve/` against this server; its stdout.
    pub(crate) fn python(&self, script: &str, model: &str, env: &[(&str, &str)]) -> String {
        let out = self
            .script(script, model, env)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{script} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A streamed chat of up to `max_tokens` by `tests/serve/drain.py`, once it has read its
    /// first token: the client, and its stdout where it prints how the stream ended.
    pub(crate) fn reading(&self, max_tokens: u32) -> (Child, std::io::BufReader<ChildStdout>) {
        use std::io::BufRead;
        let mut client = self
            .script(
                "drain.py",
                "smollm2",
                &[("RBEE_MAX_TOKENS", &max_tokens.to_string())],
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(client.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "reading");
        (client, out)
    }

    /// A 2-token chat, answered 200: the hive runs and the model is loaded.
    pub(crate) fn warm(&self) {
        let auth = format!("Bearer {}", self.key);
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let body = br#"{"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}"#;
        let (status, answer) = http(self.port, "POST", "/v1/chat/completions", &headers, body);
        assert_eq!(status, 200, "{answer}");
    }

    /// SIGTERM, then the exit code and what the server wrote on stderr.
    pub(crate) fn stop(mut self) -> (i32, String) {
        use std::io::Read;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        (status.code().unwrap_or(-1), stderr)
    }
}

#[test]
fn the_openai_sdk_lists_models_chats_streams_with_usage_and_gets_its_errors_by_status() {
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &[]);
    let out = serve.python("sdk.py", "smollm2", &[]);
    let result: serde_json::Value = serde_json::from_str(&out).expect("script JSON");
    let text = result["text"].as_str().expect("text");

    // The same prompt through `infer` gives the same text: the same route, template and sampler.
    let infer = env.infer(&[
        "--system",
        "You answer in one short sentence.",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ]);
    infer.expect(0);
    assert_eq!(infer.text(), text);

    // Only a key's hash is kept, in a file of its owner's alone; the list never shows a key.
    let keys = std::fs::read_to_string(env.path().join("state/serve-keys.json")).expect("keys");
    assert!(!keys.contains(&serve.key));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(env.path().join("state/serve-keys.json"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let list = env.run(&["--json", "serve", "key", "list"]);
    list.expect(0);
    assert!(list.stdout.contains("\"ci\"") && !list.stdout.contains(&serve.key));

    // Each request is one audit record here, naming the key, never the key itself.
    let records = crate::support::records(&env.path().join("state/audit.jsonl"));
    let served: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "infer_completed" && r["fields"]["key"] == "ci")
        .collect();
    assert_eq!(served.len(), 2, "{records:#?}");
    assert!(
        served
            .iter()
            .all(|r| r["fields"]["exit_code"] == 0 && r["fields"]["node"] == "n1")
    );
    let log = std::fs::read_to_string(env.path().join("state/audit.jsonl")).expect("log");
    assert!(!log.contains(&serve.key));

    // A revoked key is refused from the next request on.
    env.run(&["serve", "key", "revoke", "ci"]).expect(0);
    let auth = format!("Bearer {}", serve.key);
    let (status, body) = http(
        serve.port,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(status, 401, "{body}");

    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn generation_controls_json_schema_stop_seed_conversation_and_raw_completions() {
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &[]);
    let out = serve.python("controls.py", "smollm2", &[]);
    let result: serde_json::Value = serde_json::from_str(&out).expect("script JSON");
    // A raw completion is the prompt without the chat template, as `infer --raw` sends it.
    let infer = env.infer(&[
        "--raw",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    infer.expect(0);
    assert_eq!(infer.text(), result["raw"].as_str().expect("raw"));
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn beyond_slots_and_queue_requests_get_429_and_the_others_the_text_they_get_alone() {
    let Some(model) = crate::support::model() else {
        return;
    };
    if !python_sdk() {
        return;
    }
    let env = Env::custom(|dir, _| {
        format!(
            "{}slots = 4\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {:?}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            dir.join("node").display().to_string()
        )
    });
    let serve = Serve::start(&env, &["--max-queue", "4"]);
    let out = serve.python("admission.py", "smollm2", &[]);
    let counts: serde_json::Value = serde_json::from_str(&out).expect("script JSON");
    // 4 slots and 4 waiting: of 16 sent at once, 8 are served and 8 turned away.
    assert_eq!(counts["ok"], 8, "{counts}");
    assert_eq!(counts["busy"], 8, "{counts}");
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_client_that_closes_its_stream_frees_the_nodes_slot_at_once() {
    use std::io::{BufRead, Write};
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &[]);
    let mut client = serve
        .script("disconnect.py", "smollm2", &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = std::io::BufReader::new(client.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "reading");
    let in_flight = |env: &Env| {
        env.workers()
            .iter()
            .map(|w| w["in_flight"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(in_flight(&env), 1, "the generation is not on the node");
    let mut stdin = client.stdin.take().expect("stdin");
    writeln!(stdin).expect("write");
    assert_eq!(lines.next().expect("a line").expect("read"), "closed");
    // The client process is still there; only its stream has gone.
    assert!(
        eventually(Duration::from_secs(1), || in_flight(&env) == 0),
        "the node still works on a request whose client went away"
    );
    drop(stdin);
    client.wait().expect("wait");
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn with_one_of_two_nodes_unreachable_requests_through_serve_still_succeed() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let env = Env::custom(|dir, _| {
        format!(
            "{}[nodes.gone]\ntransport = \"ssh\"\nhost = \"127.0.0.1\"\nport = {}\n\
             models = [\"smollm2\"]\n\
             [nodes.n2]\ntransport = \"local\"\nremote_dir = {:?}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            free_port(),
            dir.join("node2").display().to_string()
        )
    });
    let serve = Serve::start(&env, &[]);
    let auth = format!("authorization: Bearer {}", serve.key);
    for _ in 0..2 {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "-H", &auth, "-H"])
            .arg("content-type: application/json")
            .arg("-d")
            .arg(
                r#"{"model": "smollm2", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "Hello"}]}"#,
            )
            .arg(format!("{}/chat/completions", serve.base_url()))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["object"], "chat.completion");
        assert!(
            !v["choices"][0]["message"]["content"]
                .as_str()
                .expect("text")
                .is_empty()
        );
        assert!(!body.contains("127.0.0.1"), "{body}");
    }
    let records = crate::support::records(&env.path().join("state/audit.jsonl"));
    let attempts: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "infer_attempt")
        .map(|r| (r["fields"]["node"].clone(), r["fields"]["outcome"].clone()))
        .collect();
    assert!(
        attempts.contains(&("gone".into(), "unreachable".into())),
        "{attempts:?}"
    );
    assert!(
        attempts.contains(&("n2".into(), "ok".into())),
        "{attempts:?}"
    );
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_exits_0_and_metrics_health_and_deadlines_answer() {
    use std::io::Read;
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &[]);
    let auth = format!("Bearer {}", serve.key);
    let body = br#"{"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}"#;
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, answer) = http(serve.port, "POST", "/v1/chat/completions", &headers, body);
    assert_eq!(status, 200, "{answer}");

    // A deadline that cannot be met is 504 in OpenAI's envelope.
    let mut late = headers.to_vec();
    late.push(("x-rbee-timeout", "1ms"));
    let (status, answer) = http(serve.port, "POST", "/v1/chat/completions", &late, body);
    assert_eq!(status, 504, "{answer}");
    let error: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(error["error"]["code"], "deadline_exceeded", "{answer}");

    let (status, health) = http(serve.port, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{health}");
    let (status, metrics) = http(serve.port, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains("rbee_serve_requests_total{model=\"smollm2\",node=\"n1\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("rbee_serve_tokens_total{model=\"smollm2\",direction=\"out\"} 4"));
    assert!(metrics.contains("rbee_serve_queued{model=\"smollm2\"} 0"));
    assert!(metrics.contains("rbee_serve_time_to_first_token_seconds_count{model=\"smollm2\"} 1"));

    let (mut client, mut out) = serve.reading(48);
    let port = serve.port;
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    assert!(
        client.wait().expect("wait").success(),
        "the stream was cut: {rest}\nserve said: {stderr}"
    );
    assert!(!stderr.contains("cut off"), "{stderr}");
    let ended: serde_json::Value = serde_json::from_str(&rest).expect("JSON");
    assert!(ended["error"].is_null(), "{rest}\nserve said: {stderr}");
    assert!(
        ["stop", "length"].contains(&ended["finish_reason"].as_str().unwrap_or("")),
        "{rest}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// A stream still generating when the drain time after SIGTERM runs out ends with an error
/// event the SDK raises as an API error (not a cut connection), the generation on the node is
/// cancelled, and serve exits 0 soon after.
#[test]
fn a_stream_still_running_when_the_drain_ends_gets_an_error_event_and_is_cancelled_on_the_node() {
    use std::io::Read;
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &["--drain", "2s"]);
    serve.warm();
    let pid = crate::support::worker_health(&env)["pid"]
        .as_i64()
        .expect("the worker's pid");

    let (mut client, mut out) = serve.reading(400);
    // The stream cannot finish while its worker is stopped.
    let held = crate::support::HeldWorker::stop(pid);
    let asked = std::time::Instant::now();
    let (code, stderr) = serve.stop();
    let took = asked.elapsed();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("drain time (2s) ran out"), "{stderr}");
    // The drain, then the little the cut request takes to send its error (at most 5 s).
    assert!(
        took < Duration::from_secs(8),
        "serve took {took:?} to stop: {stderr}"
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    assert!(client.wait().expect("wait").success(), "{rest}");
    let ended: serde_json::Value = serde_json::from_str(&rest).expect("JSON");
    assert_eq!(
        ended["error"]["class"], "APIError",
        "{rest}\nserve said: {stderr}"
    );
    let message = ended["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("drain time"),
        "{rest}\nserve said: {stderr}"
    );
    assert!(!message.contains("127.0.0.1"), "{rest}");
    assert!(!ended["text"].as_str().unwrap_or("").is_empty(), "{rest}");

    // Let go, the worker hears that the request is gone and drops it.
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || {
            crate::support::worker_health(&env)["active"]
                .as_array()
                .is_some_and(Vec::is_empty)
        }),
        "{}",
        crate::support::worker_health(&env)
    );
    let last = &crate::support::worker_health(&env)["last"];
    assert_eq!(last["stop_reason"], "cancelled", "{last}");
    assert!(
        last["tokens_out"].as_u64().is_some_and(|n| n < 400),
        "{last}"
    );
    let records = crate::support::records(&env.path().join("state/audit.jsonl"));
    let cut = records
        .iter()
        .filter(|r| r["event"] == "infer_completed")
        .find(|r| r["fields"]["exit_code"] == 130);
    assert!(cut.is_some(), "{records:?}");
}

/// The two other requests a drain can cut: one waiting for its whole answer and one still
/// queued for a slot. Each gets the 503 that says why, and the SDK, which retries a 503 by
/// default, does not retry it into a server that has gone (a connection error, which says
/// nothing).
#[test]
fn at_the_drain_end_a_waiting_and_a_queued_request_get_a_503_the_sdk_does_not_retry() {
    let Some(model) = crate::support::model() else {
        return;
    };
    if !python_sdk() {
        return;
    }
    let env = Env::custom(|dir, port| {
        format!(
            "{}slots = 2\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {:?}\n\
             hive_port = {port}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            dir.join("node").display().to_string(),
        )
    });
    let serve = Serve::start(&env, &["--drain", "2s"]);
    serve.warm();
    let pid = crate::support::worker_health(&env)["pid"]
        .as_i64()
        .expect("the worker's pid");

    // One slot streams, held still; the other takes a whole answer; a third request queues.
    let (mut streaming, _out) = serve.reading(400);
    let held = crate::support::HeldWorker::stop(pid);
    let spawn = || {
        serve
            .script("cut.py", "smollm2", &[("RBEE_MAX_TOKENS", "400")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3")
    };
    let waiting = spawn();
    assert!(
        held.handed(&env, 2, Duration::from_secs(20)),
        "the whole-answer request never reached the worker"
    );
    let queued = spawn();
    let queue = |serve: &Serve| {
        let (_, body) = http(serve.port, "GET", "/health", &[], b"");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["queued"]["smollm2"]
            .as_u64()
    };
    assert!(
        eventually(Duration::from_secs(20), || queue(&serve) == Some(1)),
        "the third request never queued: {:?}",
        queue(&serve)
    );

    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("drain time (2s) ran out"), "{stderr}");
    for (what, client) in [("waiting", waiting), ("queued", queued)] {
        let out = client.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{what}: {text}");
        let ended: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            ended["error"]["class"], "InternalServerError",
            "{what}: {text}\nserve said: {stderr}"
        );
        assert_eq!(ended["error"]["status"], 503, "{what}: {text}");
        let message = ended["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("drain time"), "{what}: {text}");
        assert!(!message.contains("127.0.0.1"), "{what}: {text}");
    }
    drop(held);
    let _ = streaming.wait();
}

/// A request the node cannot record in its audit trail (`required`: refused) gets a 503 that
/// says so, which the SDK does not retry: a retry would run the request again into the same
/// trail.
#[test]
fn a_request_the_node_cannot_audit_gets_a_503_the_sdk_does_not_retry() {
    let Some(env) = Env::new("") else { return };
    if !python_sdk() {
        return;
    }
    let serve = Serve::start(&env, &[]);
    serve.warm();
    let Some(ro) = crate::support::mount::Mount::read_only(&env.node_dir()) else {
        return;
    };
    let out = serve.python("cut.py", "smollm2", &[("RBEE_MAX_TOKENS", "4")]);
    drop(ro);
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    let ended: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(ended["error"]["class"], "InternalServerError", "{out}");
    assert_eq!(ended["error"]["status"], 503, "{out}");
    let message = ended["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("audit trail"), "{out}");
    // One request reached serve: the SDK did not send it again.
    let refused = stderr
        .lines()
        .filter(|l| l.contains("audit_unavailable"))
        .count();
    assert_eq!(refused, 1, "{stderr}");
}

/// Another process holding this machine's audit lock (a stuck rbee, a hung disk) holds each
/// request no later than its deadline, and never serve itself: with as many requests waiting on
/// the lock as serve has runtime threads (one a core), /health still answers at once, and once
/// the lock is free the requests are served.
#[test]
fn requests_waiting_on_a_held_audit_lock_do_not_stall_serve() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let env = Env::custom(|dir, port| {
        format!(
            "{}slots = 8\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {:?}\n\
             hive_port = {port}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            dir.join("node").display().to_string(),
        )
    });
    let serve = Serve::start(&env, &[]);
    let auth = format!("Bearer {}", serve.key);
    let body = br#"{"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}"#;
    let post = {
        let (port, auth) = (serve.port, auth.clone());
        move || {
            http(
                port,
                "POST",
                "/v1/chat/completions",
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                    ("x-rbee-timeout", "20s"),
                ],
                body,
            )
        }
    };
    let (status, answer) = post();
    assert_eq!(status, 200, "{answer}");

    let holder = crate::support::hold_audit_lock(&env);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let requests: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(post.clone()))
        .collect();
    // Long enough for each request to reach the lock.
    std::thread::sleep(Duration::from_secs(2));
    let asked = std::time::Instant::now();
    let (status, health) = http(serve.port, "GET", "/health", &[], b"");
    let took = asked.elapsed();
    drop(holder);
    assert_eq!(status, 200, "{health}");
    // A stalled serve answers only when the requests' 20 s deadlines have released its threads.
    assert!(
        took < Duration::from_secs(8),
        "/health took {took:?} while {threads} requests waited on the audit lock"
    );
    for request in requests {
        let (status, answer) = request.join().expect("a request");
        assert_eq!(status, 200, "{answer}");
    }
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn with_no_node_reachable_health_is_503_and_a_request_503_naming_no_host() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let dead = free_port();
    let env = Env::custom(|_, _| {
        format!(
            "{}[nodes.gone]\ntransport = \"ssh\"\nhost = \"127.0.0.1\"\nport = {dead}\n\
             models = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
        )
    });
    let serve = Serve::start(&env, &[]);
    assert!(eventually(Duration::from_secs(10), || {
        http(serve.port, "GET", "/health", &[], b"").0 == 503
    }));
    let auth = format!("Bearer {}", serve.key);
    let (status, answer) = http(
        serve.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        br#"{"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}"#,
    );
    assert_eq!(status, 503, "{answer}");
    let error: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(error["error"]["type"], "server_error", "{answer}");
    assert!(
        !answer.contains("127.0.0.1") && !answer.contains(&dead.to_string()),
        "{answer}"
    );
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    // The details are in serve's log, under the request's id.
    assert!(stderr.contains("gone"), "{stderr}");
}
