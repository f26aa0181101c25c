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
