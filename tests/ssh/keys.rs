//! More than one controlling machine: two state and config directories, each with its own key,
//! drive one SSH node. The first key is enrolled first come; the second waits until the first
//! machine approves it, and then each finds the hive the other started. A queen of another rbee
//! (played by `RBEE_TEST_VERSION` and `RBEE_TEST_PROTOCOL`, which only set what the binary
//! tells its peers) is refused naming both versions, and never stops the hive.

use std::path::Path;

use super::{Fleet, key_id, node};
use crate::support::{Env, Run, eventually, free_port, records, tempdir};

/// A second machine driving the same nodes: the same nodes.toml in its own directory, so its
/// own `keys/` and state; the same SSH login and known_hosts.
fn second_machine(fleet: &Fleet) -> Env {
    let text = std::fs::read_to_string(fleet.env.path().join("nodes.toml")).expect("nodes.toml");
    Env::from_dir(tempdir(), free_port(), &text)
}

fn infer(env: &Env) -> Run {
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
}

/// The pid of node `a`'s hive, as `hive status` reports it.
fn hive_pid(env: &Env) -> i64 {
    let run = env.run(&["--json", "hive", "status", "a"]);
    run.expect(0);
    run.json_lines()[0]["pid"].as_i64().expect("pid")
}

fn kid_of(env: &Env) -> String {
    key_id(&env.path().join("keys/a.key"))
}

fn node_records(dir: &Path, event: &str) -> Vec<serde_json::Value> {
    records(&dir.join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

#[test]
fn two_machines_drive_one_node_alternately_once_the_second_is_enrolled() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let first = &fleet.env;
    let second = second_machine(&fleet);
    let remote = fleet.remote_dir("a");

    // A fresh node: the first machine's key is its first key.
    infer(first).expect(0);
    let (kid_a, pid) = (kid_of(first), hive_pid(first));
    assert!(remote.join(format!("keys/{kid_a}.key")).is_file());

    // The second machine is refused, told what to run, and its key waits on the node; the
    // first machine's key and hive are untouched.
    let refused = infer(&second);
    refused.expect(5);
    let kid_b = kid_of(&second);
    let command = format!("rbee nodes enroll a --approve {kid_b}");
    assert!(refused.stderr.contains(&command), "{}", refused.stderr);
    assert!(remote.join(format!("keys/pending/{kid_b}.key")).is_file());
    assert!(!remote.join(format!("keys/{kid_b}.key")).exists());
    assert_eq!(hive_pid(first), pid, "the hive was replaced");
    infer(first).expect(0);

    // A request left waiting for more than a week is neither listed nor approved; asked again,
    // it waits anew.
    let waiting = remote.join(format!("keys/pending/{kid_b}.key"));
    std::fs::File::options()
        .write(true)
        .open(&waiting)
        .expect("open the waiting key")
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86_400))
        .expect("age the waiting key");
    let stale = first.run(&["nodes", "enroll", "a", "--approve", &kid_b]);
    stale.expect(8);
    assert!(
        stale.stderr.contains("rbee nodes enroll"),
        "{}",
        stale.stderr
    );
    assert!(!remote.join(format!("keys/{kid_b}.key")).exists());
    let pending = |env: &Env| {
        let keys = env.run(&["--json", "nodes", "keys", "a"]);
        keys.expect(0);
        keys.json_lines()[0]["pending"].clone()
    };
    assert_eq!(pending(first), serde_json::json!([]));
    second.run(&["nodes", "enroll", "a"]).expect(0);
    assert_eq!(pending(first), serde_json::json!([kid_b]));

    // The first machine sees the waiting key and approves it.
    let keys = first.run(&["--json", "nodes", "keys", "a"]);
    keys.expect(0);
    let listed = &keys.json_lines()[0];
    assert_eq!(listed["enrolled"], serde_json::json!([kid_a]), "{listed}");
    assert_eq!(listed["pending"], serde_json::json!([kid_b]), "{listed}");
    first
        .run(&["nodes", "enroll", "a", "--approve", &kid_b])
        .expect(0);

    // Now each finds the hive the other started, in turn.
    infer(&second).expect(0);
    assert_eq!(
        hive_pid(&second),
        pid,
        "the second machine replaced the hive"
    );
    second.run(&["hive", "stop", "a"]).expect(0);
    infer(&second).expect(0);
    let by_second = hive_pid(&second);
    assert_ne!(by_second, pid);
    infer(first).expect(0);
    assert_eq!(
        hive_pid(first),
        by_second,
        "the first machine replaced the hive"
    );
    first.run(&["hive", "stop", "a"]).expect(0);
    infer(first).expect(0);
    infer(&second).expect(0);

    // The node's audit names who approved which key, and which key each request came with.
    let enrolled = node_records(&remote, "key_enrolled");
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    assert_eq!(enrolled[0]["fields"]["kid"], kid_b.as_str());
    assert_eq!(enrolled[0]["fields"]["by"], kid_a.as_str());
    let signers: std::collections::HashSet<String> = node_records(&remote, "auth_success")
        .iter()
        .filter_map(|r| r["fields"]["kid"].as_str().map(str::to_string))
        .collect();
    assert!(
        signers.contains(&kid_a) && signers.contains(&kid_b),
        "{signers:?}"
    );

    // Revoked, the second machine is refused from its next request on, and told again.
    first.run(&["nodes", "revoke", "a", &kid_b]).expect(0);
    let refused = infer(&second);
    refused.expect(5);
    assert!(refused.stderr.contains(&command), "{}", refused.stderr);
    let revoked = node_records(&remote, "key_revoked");
    assert_eq!(revoked[0]["fields"]["by"], kid_a.as_str(), "{revoked:?}");
    // The last enrolled key is kept: revoking it would lock every machine out.
    let last = first.run(&["nodes", "revoke", "a", &kid_a]);
    last.expect(8);
    infer(first).expect(0);
    // A change the node refused is not in its audit as made.
    assert_eq!(node_records(&remote, "key_revoked").len(), 1);
    assert_eq!(node_records(&remote, "key_enrolled").len(), 1);
}

#[test]
fn a_down_hive_is_never_rekeyed_by_a_machine_the_node_does_not_know() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let first = &fleet.env;
    let second = second_machine(&fleet);
    first.run(&["hive", "start", "a"]).expect(0);
    first.run(&["hive", "stop", "a"]).expect(0);
    // With the hive down, the second machine's start neither replaces the key nor starts a
    // hive the first could not talk to.
    let refused = second.run(&["hive", "start", "a"]);
    refused.expect(5);
    assert!(
        refused.stderr.contains(&format!(
            "rbee nodes enroll a --approve {}",
            kid_of(&second)
        )),
        "{}",
        refused.stderr
    );
    let asked = second.run(&["--json", "nodes", "enroll", "a"]);
    asked.expect(0);
    assert_eq!(asked.json_lines()[0]["state"], "pending");
    infer(first).expect(0);
}

/// The binary playing another rbee: what it tells its peers is `version` and `protocol`.
fn as_release(env: &Env, version: &str, protocol: &str, args: &[&str]) -> Run {
    Run::from(
        env.command(args)
            .env("RBEE_TEST_VERSION", version)
            .env("RBEE_TEST_PROTOCOL", protocol)
            .output()
            .expect("run rbee"),
    )
}

#[test]
fn a_queen_of_another_protocol_is_refused_naming_both_versions_and_never_stops_the_hive() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    infer(env).expect(0);
    let pid = hive_pid(env);
    let ours = env!("CARGO_PKG_VERSION");
    let args = [
        "--json",
        "infer",
        "--node",
        "a",
        "--prompt",
        "Hi",
        "--max-tokens",
        "1",
    ];

    // An older queen of another protocol: the hive is newer, so it stays.
    let older = as_release(env, "0.0.1", "2", &args);
    older.expect(6);
    for named in [
        format!("rbee {ours} (protocol 5)"),
        "rbee 0.0.1 (protocol 2)".to_string(),
    ] {
        assert!(older.stderr.contains(&named), "{named}: {}", older.stderr);
    }
    assert_eq!(hive_pid(env), pid, "an older queen stopped the hive");

    // A newer queen of another protocol replaces only an idle hive: this one is busy.
    let (mut stream, _lines) = env.spawn_endless(&["--node", "a"], 2);
    let newer = as_release(env, "99.0.0", "6", &args);
    newer.expect(6);
    assert!(newer.stderr.contains("busy"), "{}", newer.stderr);
    assert!(
        newer.stderr.contains("rbee 99.0.0 (protocol 6)"),
        "{}",
        newer.stderr
    );
    assert_eq!(hive_pid(env), pid, "a newer queen stopped a busy hive");
    assert!(
        stream.try_wait().expect("wait").is_none(),
        "the stream under way ended"
    );
    let _ = stream.kill();
    let _ = stream.wait();
    infer(env).expect(0);
}

#[test]
fn a_newer_queen_replaces_an_idle_older_hive_and_an_older_queen_uses_a_newer_one() {
    // A local node: the hive a queen starts there inherits what that queen plays.
    let Some(env) = Env::new("") else {
        return;
    };
    let local_pid = |env: &Env| {
        let run = env.run(&["--json", "hive", "status", "n1"]);
        run.expect(0);
        run.json_lines()[0]["pid"].as_i64().expect("pid")
    };
    let args = ["--json", "infer", "--prompt", "Hi", "--max-tokens", "1"];
    let protocol = "5";
    as_release(&env, "0.0.1", protocol, &args).expect(0);
    let old = local_pid(&env);
    // This (newer) rbee replaces the idle older hive.
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let new = local_pid(&env);
    assert_ne!(new, old, "the older hive was not replaced");
    assert!(eventually(std::time::Duration::from_secs(10), || {
        !crate::support::alive(old as i32)
    }));
    // The older queen speaks the same protocol: it uses the newer hive as it is.
    as_release(&env, "0.0.1", protocol, &args).expect(0);
    assert_eq!(
        local_pid(&env),
        new,
        "the older queen replaced a newer hive"
    );
}

/// A hive of an rbee from before answers were signed (protocol 1), on the node's socket.
const OLD_HIVE: &str = r#"
import http.server, json, os, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "version": "0.0.1", "protocol": 1}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass
class S(socketserver.UnixStreamServer):
    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("local", 0)
os.makedirs(os.path.dirname(sys.argv[1]), mode=0o700, exist_ok=True)
S(sys.argv[1], H).serve_forever()
"#;

#[test]
fn an_old_hive_that_cannot_be_talked_to_is_reported_with_the_command_to_run() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let socket = fleet.remote_dir("a").join("hive.sock");
    let mut old = std::process::Command::new("python3")
        .arg("-c")
        .arg(OLD_HIVE)
        .arg(&socket)
        .spawn()
        .expect("python3");
    assert!(eventually(std::time::Duration::from_secs(10), || socket.exists()));
    let run = infer(&fleet.env);
    let _ = old.try_wait();
    let still = old.try_wait().expect("wait").is_none();
    let _ = old.kill();
    let _ = old.wait();
    run.expect(5);
    for named in [
        "rbee 0.0.1 (protocol 1)",
        &format!("rbee {} (protocol 5)", env!("CARGO_PKG_VERSION")),
        "`rbee hive stop a`",
    ] {
        assert!(run.stderr.contains(named), "{named}: {}", run.stderr);
    }
    assert!(still, "the old hive was stopped");
}
