//! `rbee serve` keeps node hosts, paths and key ids out of its API errors: they go to its own
//! log, under the request id the client was told.

use crate::serve::Serve;
use crate::support::{Env, http};

#[test]
fn a_request_that_fails_on_the_node_names_no_path_and_serve_logs_it_under_its_id() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let dir = crate::support::tempdir();
    let missing = dir.path().join("absent").join("missing-model.gguf");
    let env = Env::with_model(&missing, crate::support::MODEL_SHA256, "");
    let serve = Serve::start(&env, &[]);
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
    let message = error["error"]["message"].as_str().expect("a message");
    for secret in [
        missing.display().to_string(),
        "missing-model".to_string(),
        env.path().display().to_string(),
        env.node_dir().display().to_string(),
    ] {
        assert!(!answer.contains(&secret), "`{secret}` in {answer}");
    }
    let id = message
        .split("request id ")
        .nth(1)
        .map(|s| s.trim_end_matches(')').to_string())
        .expect("the message names the request id");
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    // The cause, with the path, is in serve's log on the request's line.
    let line = stderr
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("no line of request {id} in: {stderr}"));
    assert!(line.contains("missing-model.gguf"), "{line}");
    drop(model);
}

/// `curl -i` with `args`: the status, the head and the body of the answer.
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rest = text.as_str();
    // An interim `100 Continue` (curl asks for one before a large body) comes first.
    while rest.starts_with("HTTP/1.1 100") {
        rest = rest.split_once("\r\n\r\n").map_or("", |(_, r)| r);
    }
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in: {text}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// What axum refuses before a handler runs (a body over the limit, a method the endpoint
/// does not take) comes in the API's error envelope too, which the SDKs parse, and serve
/// answers on.
#[test]
fn a_body_over_the_limit_and_a_wrong_method_are_answered_in_the_envelope() {
    let Some(env) = Env::new("") else { return };
    let serve = Serve::start(&env, &[]);
    let auth = format!("authorization: Bearer {}", serve.key);
    let chat = format!("{}/chat/completions", serve.base_url());
    let big = env.path().join("big.json");
    let content = "a".repeat(3 << 20);
    std::fs::write(
        &big,
        serde_json::json!({
            "model": "smollm2", "max_tokens": 1,
            "messages": [{"role": "user", "content": content}],
        })
        .to_string(),
    )
    .expect("write the body");
    let data = format!("@{}", big.display());
    let (status, _, body) = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        &chat,
    ]);
    assert_eq!(status, 413, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(error["error"]["code"], "request_too_large", "{body}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");

    for (method, path, allowed) in [
        ("GET", chat.clone(), "post"),
        ("PUT", format!("{}/completions", serve.base_url()), "post"),
        ("DELETE", format!("{}/models", serve.base_url()), "get"),
    ] {
        let (status, head, body) = curl(&["-X", method, "-H", &auth, &path]);
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert!(head.contains(&format!("allow: {allowed}")), "{head}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(error["error"]["code"], "method_not_allowed", "{body}");
    }
    // Still serving.
    let (status, _, body) = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}"#,
        &chat,
    ]);
    assert_eq!(status, 200, "{body}");
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
}
