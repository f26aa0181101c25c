//! `rbee worker cancel`: an operator ends one request in flight from another process.

use std::time::Duration;

use crate::support::{Env, eventually, records, worker_health};

/// The id of a key file: the first 8 bytes of the key's SHA-256, in hex.
fn key_id(path: &std::path::Path) -> String {
    use sha2::Digest;
    let text = std::fs::read_to_string(path).expect("key file");
    let bytes = hex::decode(text.trim()).expect("hex key");
    hex::encode(&sha2::Sha256::digest(&bytes)[..8])
}

#[test]
fn worker_cancel_ends_the_generation_keeps_its_text_exits_130_and_is_audited_with_the_key() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let (mut child, lines) = env.spawn_endless(&["--timeout", "60s"], 3);
    let list = env.run(&["--json", "worker", "list"]);
    list.expect(0);
    let value: serde_json::Value = serde_json::from_str(list.stdout.trim()).expect("JSON");
    let id = value["requests"][0]["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no request in flight: {value}"))
        .to_string();

    let cancel = env.run(&["--json", "worker", "cancel", "--node", "n1", &id]);
    cancel.expect(0);
    let answer: serde_json::Value = serde_json::from_str(cancel.stdout.trim()).expect("JSON");
    assert_eq!(answer["cancelled"]["request_id"], id.as_str(), "{answer}");

    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("a JSON line"))
        .collect();
    let error = rest.last().expect("an error line");
    assert_eq!(error["event"], "error", "{rest:?}");
    assert_eq!(error["code"], "interrupted", "{error}");
    assert_eq!(error["exit_code"], 130, "{error}");
    // The text generated before the cancel (the tokens read above) stays printed: no `done`
    // line replaces it.
    assert!(rest.iter().all(|l| l["event"] != "done"), "{rest:?}");

    // The worker stopped decoding and its slot is free.
    assert!(
        eventually(Duration::from_secs(5), || {
            let h = worker_health(&env);
            h["active"].as_array().is_some_and(Vec::is_empty)
                && h["last"]["request_id"] == id.as_str()
        }),
        "the worker is still decoding after the cancel: {}",
        worker_health(&env)
    );
    assert_eq!(worker_health(&env)["last"]["stop_reason"], "cancelled");
    assert!(
        eventually(Duration::from_secs(5), || env.workers()[0]["in_flight"]
            == 0),
        "{:?}",
        env.workers()
    );

    let cancelled: Vec<serde_json::Value> = records(&env.node_dir().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == "request_cancelled" && r["request_id"] == id.as_str())
        .collect();
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    let by = cancelled[0]["fields"]["by"]
        .as_str()
        .expect("who cancelled");
    // The local node's queen signs with the node's own key.
    assert_eq!(by, key_id(&env.node_dir().join("hive.key")));

    // The generation is over: a second cancel finds nothing, nor does an id never seen.
    env.run(&["worker", "cancel", "--node", "n1", &id])
        .expect(8);
    env.run(&["worker", "cancel", "--node", "n1", "no-such-request"])
        .expect(8);
}

/// An id that is not one (a path, a query, a space) is a usage error (exit 2) before anything
/// is sent: it would name another URL on the hive, or fail the request's signature and leave an
/// `auth_failure` on the node's record for a typo.
#[test]
fn worker_cancel_of_a_malformed_id_is_a_usage_error_and_sends_nothing() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let log = env.node_dir().join("audit.jsonl");
    let before = records(&log).len();
    for id in [
        "../../etc",
        "a b",
        "a?b",
        "a/b",
        "a%2Fb",
        "a#b",
        ".",
        "",
        "ü",
    ] {
        let run = env.run(&["worker", "cancel", "--node", "n1", id]);
        run.expect(2);
        assert!(run.stderr.contains("request id"), "{id:?}: {}", run.stderr);
    }
    let after = records(&log);
    assert_eq!(after.len(), before, "{:?}", &after[before..]);
}
