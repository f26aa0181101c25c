//! Every request signed: forgeries refused with their class on the hive and on the worker,
//! private key files, rotation without failures, hostile input refused cleanly.

use std::time::Duration;

use crate::support::{Env, fresh_nonce, http, sign_with, unix_now};

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

#[test]
fn forged_stale_and_replayed_requests_are_refused_by_the_hive() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let key = env.node_key();
    let now = unix_now();
    let send = |method: &str, path: &str, sig: Option<&str>, body: &[u8]| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(sig) = sig {
            headers.push(("x-rbee-signature", sig));
        }
        http(env.port, method, path, &headers, body)
    };
    let (s, b) = send("GET", "/v1/workers", None, b"");
    rejected(s, &b, "missing");
    let (s, b) = send("GET", "/v1/workers", Some("hmac please"), b"");
    rejected(s, &b, "malformed");
    let foreign = sign_with(
        &random_key(),
        "GET",
        "/v1/workers",
        b"",
        now,
        &fresh_nonce(),
    );
    let (s, b) = send("GET", "/v1/workers", Some(&foreign), b"");
    rejected(s, &b, "unknown_key");
    // The right key id on a signature made with another key.
    let right = sign_with(&key, "GET", "/v1/workers", b"", now, &fresh_nonce());
    let kid = right.split(',').next().expect("kid").to_string();
    let forged = format!("{kid},{}", foreign.split_once(',').expect("rest").1);
    let (s, b) = send("GET", "/v1/workers", Some(&forged), b"");
    rejected(s, &b, "bad_signature");
    // Body and path changed after signing.
    let sig = sign_with(&key, "POST", "/v1/infer", b"{\"a\":1}", now, &fresh_nonce());
    let (s, b) = send("POST", "/v1/infer", Some(&sig), b"{\"a\":2}");
    rejected(s, &b, "bad_signature");
    let sig = sign_with(&key, "GET", "/v1/workers", b"", now, &fresh_nonce());
    let (s, b) = send("GET", "/v1/requests", Some(&sig), b"");
    rejected(s, &b, "bad_signature");
    // Ten minutes old, ten minutes ahead.
    for ts in [now - 600, now + 600] {
        let sig = sign_with(&key, "GET", "/v1/workers", b"", ts, &fresh_nonce());
        let (s, b) = send("GET", "/v1/workers", Some(&sig), b"");
        rejected(s, &b, "stale");
    }
    // A correct request passes, once.
    let sig = sign_with(&key, "GET", "/v1/workers", b"", now, &fresh_nonce());
    let (s, b) = send("GET", "/v1/workers", Some(&sig), b"");
    assert_eq!(s, 200, "{b}");
    let (s, b) = send("GET", "/v1/workers", Some(&sig), b"");
    rejected(s, &b, "replayed");
    // Health and metrics stay open; nothing secret leaks anywhere.
    assert_eq!(send("GET", "/health", None, b"").0, 200);
    assert_eq!(send("GET", "/metrics", None, b"").0, 200);
    let log = std::fs::read_to_string(env.node_dir().join("hive.log")).expect("log");
    assert!(!log.contains(key.trim()), "the key is in the log");
    let rejection = log
        .lines()
        .find(|l| l.contains("request rejected") && l.contains("replayed"))
        .expect("rejections are logged");
    assert!(
        rejection.contains("/v1/workers") && rejection.contains("peer=127.0.0.1"),
        "{rejection}"
    );
}

#[test]
fn the_worker_refuses_requests_not_signed_by_its_hive() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let port = env.workers()[0]["port"].as_u64().expect("port") as u16;
    let body = br#"{"request_id":"x","system":null,"prompt":"Hi","params":{"max_tokens":2,"temperature":0.0,"top_p":1.0,"seed":null}}"#;
    let json = [("content-type", "application/json")];
    let (s, b) = http(port, "POST", "/v1/generate", &json, body);
    rejected(s, &b, "missing");
    let (s, b) = http(
        port,
        "POST",
        "/v1/generate",
        &[json[0], ("x-rbee-signature", "v1 nope")],
        body,
    );
    rejected(s, &b, "malformed");
    // Even the node's own key is not the worker's: each hive start makes a key for its workers.
    let sig = sign_with(
        &env.node_key(),
        "POST",
        "/v1/generate",
        body,
        unix_now(),
        &fresh_nonce(),
    );
    let (s, b) = http(
        port,
        "POST",
        "/v1/generate",
        &[json[0], ("x-rbee-signature", &sig)],
        body,
    );
    rejected(s, &b, "unknown_key");
    assert_eq!(http(port, "GET", "/health", &[], b"").0, 200);
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
        "model": {"name": "../etc", "path": "/x", "sha256": crate::support::MODEL_SHA256,
                  "source": null, "context": null, "slots": 1, "gpu_layers": 0, "threads": 1},
        "params": {"max_tokens": 0, "temperature": 0.0, "top_p": 1.0, "seed": null}
    });
    let (s, b) = env.signed("POST", "/v1/infer", &[], body.to_string().as_bytes());
    assert_eq!(s, 400, "{b}");
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}
