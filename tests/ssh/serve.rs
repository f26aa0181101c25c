//! One SSH connection per node for a whole run: `rbee serve` keeps its connection to a node
//! open across requests and opens it again when it drops; `rbee batch` keeps one for the batch.
//! sshd's own log counts the logins.

use std::process::Command;
use std::time::Duration;

use super::{Fleet, node};
use crate::serve::Serve;
use crate::support::sshd;

/// sshd logs each accepted login at this level.
const LOG_LOGINS: sshd::Options<'static> = sshd::Options {
    host_keys: &["ed25519"],
    extra: "LogLevel INFO\n",
    netns: None,
    listen: None,
    host_ca: None,
    cpuinfo: None,
};

/// One chat completion through `serve` with curl; its text.
fn chat(serve: &Serve) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "-H"])
        .arg(format!("authorization: Bearer {}", serve.key))
        .args(["-H", "content-type: application/json", "-d"])
        .arg(
            r#"{"model": "smollm2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello"}]}"#,
        )
        .arg(format!("{}/chat/completions", serve.base_url()))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(!text.is_empty(), "{body}");
    text
}

#[test]
fn serve_keeps_one_ssh_login_per_node_across_requests_and_logs_in_again_when_it_drops() {
    let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &LOG_LOGINS) else {
        return;
    };
    let sshd = &fleet.servers[0];
    let serve = Serve::start(&fleet.env, &[]);
    // The first request starts the hive (installing it) over the connection serve keeps.
    let first = chat(&serve);
    for _ in 0..7 {
        assert_eq!(chat(&serve), first);
    }
    assert_eq!(sshd.logins(), 1, "{}", sshd.log());

    // The session's own sshd dies, as a dropped link ends it: serve logs in again and the
    // requests keep succeeding.
    assert!(sshd.kill_sessions() > 0, "no session to kill");
    for _ in 0..4 {
        assert_eq!(chat(&serve), first);
    }
    assert!(
        crate::support::eventually(Duration::from_secs(5), || sshd.logins() == 2),
        "{}",
        sshd.log()
    );
    let (code, stderr) = serve.stop();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sshd.logins(), 2, "{}", sshd.log());
}

#[test]
fn a_batch_over_an_ssh_node_logs_in_once() {
    let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &LOG_LOGINS) else {
        return;
    };
    let env = &fleet.env;
    let input = env.path().join("in.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({"id": i, "prompt": format!("Count to {i}"), "max_tokens": 2,
                "temperature": 0.0})
            .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("input");
    let run = env.run(&["batch", "--model", "smollm2", input.to_str().expect("path")]);
    run.expect(0);
    let results = run.json_lines();
    assert_eq!(results.len(), 40);
    assert!(results.iter().all(|r| r["node"] == "a"), "{results:?}");
    assert_eq!(fleet.servers[0].logins(), 1, "{}", fleet.servers[0].log());
}
