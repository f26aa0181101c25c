//! Every request signed: forgeries refused with their class on the hive and on the worker,
//! private key files, rotation without failures, hostile input refused cleanly.

use std::time::Duration;

use crate::support::{At, Env, fresh_nonce, http, sign_covering, sign_with, unix_now};

fn rejected(status: u16, body: &str, class: &str) {
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":\"unauthenticated\""), "{body}");
    assert!(
        body.contains(&format!("({class})")),
        "expected `{class}`: {body}"
    );
}

fn random_key() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Every way a request can be wrong, against one endpoint: each is refused with its class, a
/// correct request passes once, its replay is refused.
fn forgeries_refused(port: impl Into<At>, key: &str, method: &str, path: &str, body: &[u8]) {
    let port: At = port.into();
    let now = unix_now();
    let send = |path: &str, sig: Option<&str>, body: &[u8]| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(sig) = sig {
            headers.push(("x-rbee-signature", sig));
        }
        http(port.clone(), method, path, &headers, body)
    };
    let (s, b) = send(path, None, body);
    rejected(s, &b, "missing");
    let (s, b) = send(path, Some("hmac please"), body);
    rejected(s, &b, "malformed");
    let foreign = sign_with(&random_key(), method, path, body, now, &fresh_nonce());
    let (s, b) = send(path, Some(&foreign), body);
    rejected(s, &b, "unknown_key");
    // The right key id on a signature made with another key.
    let right = sign_with(key, method, path, body, now, &fresh_nonce());
    let kid = right.split(',').next().expect("kid").to_string();
    let forged = format!("{kid},{}", foreign.split_once(',').expect("rest").1);
    let (s, b) = send(path, Some(&forged), body);
    rejected(s, &b, "bad_signature");
    // Body and path changed after signing.
    let sig = sign_with(key, method, path, body, now, &fresh_nonce());
    let mut changed = body.to_vec();
    changed.push(b' ');
    let (s, b) = send(path, Some(&sig), &changed);
    rejected(s, &b, "bad_signature");
    let sig = sign_with(key, method, path, body, now, &fresh_nonce());
    let (s, b) = send(&format!("{path}?x=1"), Some(&sig), body);
    rejected(s, &b, "bad_signature");
    // The budget and the request id are signed: one added or changed after signing is refused.
    let sig = sign_covering(key, method, path, ("1500", "r1"), body, now, &fresh_nonce());
    let (s, b) = http(
        port.clone(),
        method,
        path,
        &[
            ("content-type", "application/json"),
            ("x-rbee-signature", &sig),
            ("x-rbee-budget-ms", "999999999"),
            ("x-rbee-request-id", "r1"),
        ],
        body,
    );
    rejected(s, &b, "bad_signature");
    let sig = sign_with(key, method, path, body, now, &fresh_nonce());
    let (s, b) = http(
        port.clone(),
        method,
        path,
        &[
            ("content-type", "application/json"),
            ("x-rbee-signature", &sig),
            ("x-rbee-request-id", "someone-else"),
        ],
        body,
    );
    rejected(s, &b, "bad_signature");
    // Ten minutes old, ten minutes ahead, and at the ends of the range.
    for ts in [i64::MIN, i64::MAX] {
        let sig = sign_with(key, method, path, body, ts, &fresh_nonce());
        let (s, b) = send(path, Some(&sig), body);
        rejected(s, &b, "stale");
    }
    for ts in [now - 600, now + 600] {
        let sig = sign_with(key, method, path, body, ts, &fresh_nonce());
        let (s, b) = send(path, Some(&sig), body);
        rejected(s, &b, "stale");
    }
    // A correct request passes, once.
    let sig = sign_with(key, method, path, body, now, &fresh_nonce());
    let (s, b) = send(path, Some(&sig), body);
    assert_eq!(s, 200, "{b}");
    let (s, b) = send(path, Some(&sig), body);
    rejected(s, &b, "replayed");
}

#[test]
fn forged_stale_and_replayed_requests_are_refused_by_the_hive() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let key = env.node_key();
    forgeries_refused(env.socket(), &key, "GET", "/v1/workers", b"");
    forgeries_refused(env.socket(), &key, "DELETE", "/v1/workers/smollm2", b"");
    // Health and metrics stay open; nothing secret leaks anywhere.
    assert_eq!(http(env.socket(), "GET", "/health", &[], b"").0, 200);
    assert_eq!(http(env.socket(), "GET", "/metrics", &[], b"").0, 200);
    let log = std::fs::read_to_string(env.node_dir().join("hive.log")).expect("log");
    assert!(!log.contains(key.trim()), "the key is in the log");
    let rejection = log
        .lines()
        .find(|l| l.contains("request rejected") && l.contains("replayed"))
        .expect("rejections are logged");
    assert!(
        rejection.contains("/v1/workers") && rejection.contains("peer=unix:uid="),
        "{rejection}"
    );
}

#[test]
fn forged_stale_and_replayed_requests_are_refused_by_a_worker() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let port = env.worker_socket();
    let key_file = env.node_dir().join("worker.key");
    let mode = std::fs::metadata(&key_file)
        .expect("worker key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let worker_key = std::fs::read_to_string(&key_file).expect("worker key");
    assert_ne!(worker_key, env.node_key());
    let body = br#"{"request_id":"x","system":null,"prompt":"Hi","params":{"max_tokens":2,"temperature":0.0,"top_p":1.0,"seed":null}}"#;
    forgeries_refused(&port, &worker_key, "POST", "/v1/generate", body);
    // The node's own key is not the worker's.
    let sig = sign_with(
        &env.node_key(),
        "POST",
        "/v1/generate",
        body,
        unix_now(),
        &fresh_nonce(),
    );
    let json = ("content-type", "application/json");
    let (s, b) = http(
        &port,
        "POST",
        "/v1/generate",
        &[json, ("x-rbee-signature", &sig)],
        body,
    );
    rejected(s, &b, "unknown_key");
    assert_eq!(http(&port, "GET", "/health", &[], b"").0, 200);
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn a_key_the_node_does_not_have_exits_5_naming_the_node() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    // The file changes under a running hive, which keeps the key it loaded.
    let path = env.node_dir().join("hive.key");
    std::fs::write(&path, format!("{}\n", random_key())).expect("write");
    let run = env.run(&["infer", "--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(5);
    assert!(
        run.stderr.contains("hive on `n1` rejected the request"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("unknown_key"), "{}", run.stderr);
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    env.run(&["hive", "stop", "n1"]).expect(0);
    let path = env.node_dir().join("hive.key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = env.run(&["infer", "--prompt", "Hi"]);
    run.expect(3);
    assert!(
        run.stderr.contains(&path.display().to_string()),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("chmod 600"), "{}", run.stderr);
}

#[test]
fn rotating_the_key_while_requests_run_fails_none() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let before = env.node_key();
    let failures = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            (0..12)
                .map(|_| env.run(&["infer", "--prompt", "Hi", "--max-tokens", "1"]))
                .filter(|r| r.code != 0)
                .map(|r| r.stderr)
                .collect::<Vec<_>>()
        });
        for _ in 0..3 {
            let run = env.run(&["--json", "hive", "rotate-key", "n1"]);
            run.expect(0);
            assert_eq!(run.json_lines()[0]["state"], "rotated");
            std::thread::sleep(Duration::from_millis(150));
        }
        worker.join().expect("join")
    });
    assert!(
        failures.is_empty(),
        "requests failed during rotation: {failures:?}"
    );
    assert_ne!(env.node_key(), before);
    assert!(!env.node_dir().join("hive.key.next").exists());
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
}

#[test]
fn hostile_input_is_refused_with_a_clear_4xx_and_the_hive_keeps_serving() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let big = vec![b'x'; 3 << 20];
    let (s, b) = env.signed("POST", "/v1/infer", &[], &big);
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("invalid_request"), "{b}");
    let (s, b) = env.signed("POST", "/v1/infer", &[], b"{\"prompt\": \"caf\xe9\"}");
    assert!((400..500).contains(&s), "{s} {b}");
    for bad in [
        ["--max-tokens", "0"],
        ["--max-tokens", "4000000000"],
        ["--temperature=-1", "--seed=1"],
        ["--top-p", "0"],
    ] {
        let mut args = vec!["infer", "--prompt", "Hi"];
        args.extend(bad);
        let run = env.run(&args);
        run.expect(8);
    }
    // Straight to the hive, bypassing the CLI's own checks.
    let body = serde_json::json!({
        "request_id": "h", "system": null, "prompt": "Hi",
        "model": "../etc", "model_digest": "0".repeat(64),
        "params": {"max_tokens": 0, "temperature": 0.0, "top_p": 1.0, "seed": null}
    });
    let (s, b) = env.signed("POST", "/v1/infer", &[], body.to_string().as_bytes());
    assert_eq!(s, 400, "{b}");
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn an_exact_replay_after_the_hive_restarts_is_refused() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let key = env.node_key();
    let sig = sign_with(&key, "GET", "/v1/workers", b"", unix_now(), &fresh_nonce());
    let send = || {
        http(
            env.socket(),
            "GET",
            "/v1/workers",
            &[("x-rbee-signature", sig.as_str())],
            b"",
        )
    };
    let (s, b) = send();
    assert_eq!(s, 200, "{b}");
    env.run(&["hive", "stop", "n1"]).expect(0);
    env.run(&["hive", "start", "n1"]).expect(0);
    let (s, b) = send();
    rejected(s, &b, "replayed");
}

#[test]
fn two_rotations_five_seconds_apart_fail_no_request_for_seventy_seconds() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    env.run(&["hive", "rotate-key", "n1"]).expect(0);
    std::thread::sleep(Duration::from_secs(5));
    env.run(&["hive", "rotate-key", "n1"]).expect(0);
    // Past the first rotation's grace (60 s), where a timer once left only the key the second
    // rotation retired.
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(70) {
        let run = env.run(&["--json", "worker", "list", "--node", "n1"]);
        sent += 1;
        if run.code != 0 {
            failures.push(format!("{:?}: {}", started.elapsed(), run.stderr));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(sent >= 60, "only {sent} requests in 70 s");
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn two_thousand_unsigned_requests_add_a_handful_of_audit_records() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let records = |event: &str| -> usize {
        std::fs::read_to_string(env.node_dir().join("audit.jsonl"))
            .expect("node audit log")
            .lines()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .count()
    };
    let before = records("auth_failure");
    for i in 0..2000 {
        let sig = if i % 2 == 0 {
            None
        } else {
            Some("v1 nonsense")
        };
        let mut headers = vec![("content-type", "application/json")];
        if let Some(sig) = sig {
            headers.push(("x-rbee-signature", sig));
        }
        let (s, _) = http(env.socket(), "GET", "/v1/workers", &headers, b"");
        assert_eq!(s, 401);
    }
    let added = records("auth_failure") - before;
    // One per class (missing, malformed) in the minute this took.
    assert!(
        (1..=4).contains(&added),
        "{added} auth_failure records for 2000 refusals"
    );
    // The hive still serves its owner.
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
}

#[test]
fn invocations_started_at_once_on_a_fresh_node_dir_share_one_whole_key() {
    for _ in 0..10 {
        let Some(env) = Env::new("") else { return };
        let children: Vec<_> = (0..8)
            .map(|_| {
                env.command(&["hive", "status", "n1"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn rbee")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Not running (6), and never a key read half-written (3) or a clash (1).
            assert_eq!(out.status.code(), Some(6), "{stderr}");
            assert!(!stderr.contains("key"), "{stderr}");
        }
        let key = env.node_dir().join("hive.key");
        let meta = std::fs::metadata(&key).expect("the key file");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&key).expect("read");
        assert_eq!(text.trim().len(), 64, "{text:?}");
        assert!(text.trim().chars().all(|c| c.is_ascii_hexdigit()));
        let left: Vec<_> = std::fs::read_dir(env.node_dir())
            .expect("node dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}
