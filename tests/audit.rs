//! The audit trail: chains on the queen and on every node, tampering named by record, torn
//! tails recovered, many writers at once, restarts, rotation, and the queen's witness of node
//! heads that catches a rewritten node log.

use std::path::Path;

use crate::support::{Env, Run};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(str::to_string)
        .collect()
}

fn queen_log(env: &Env) -> std::path::PathBuf {
    env.path().join("state/audit.jsonl")
}

fn notes(env: &Env, n: usize) {
    for i in 0..n {
        env.run(&["audit", "note", &format!("note {i}")]).expect(0);
    }
}

fn broken(run: &Run, line: usize, why: &str) {
    run.expect(1);
    assert!(
        run.stdout.contains(&format!("audit.jsonl:{line}")),
        "line {line}: {}",
        run.stdout
    );
    assert!(run.stdout.contains(why), "`{why}`: {}", run.stdout);
}

#[test]
fn every_kind_of_tampering_is_named_by_its_record() {
    let Some(env) = Env::new("") else { return };
    notes(&env, 5);
    let path = queen_log(&env);
    let original = lines(&path);
    env.run(&["audit", "verify"]).expect(0);
    let write = |l: &[String]| std::fs::write(&path, l.join("\n") + "\n").expect("write");

    // One byte changed in record 3.
    let mut changed = original.clone();
    changed[2] = changed[2].replace("note 2", "note X");
    write(&changed);
    broken(&env.run(&["audit", "verify"]), 3, "hash does not match");
    // Record 3 deleted: record 4 now sits on line 3 and does not link.
    let mut deleted = original.clone();
    deleted.remove(2);
    write(&deleted);
    broken(&env.run(&["audit", "verify"]), 3, "does not link");
    // Records 2 and 3 swapped.
    let mut swapped = original.clone();
    swapped.swap(1, 2);
    write(&swapped);
    broken(&env.run(&["audit", "verify"]), 2, "does not link");
    // The last line cut in half.
    write(&original);
    let text = std::fs::read_to_string(&path).expect("read");
    let cut = text.len() - original[4].len() / 2 - 1;
    std::fs::write(&path, &text[..cut]).expect("cut");
    broken(&env.run(&["audit", "verify"]), 5, "torn");
    // The next append records the cut, keeps the bytes aside, and the chain is whole again.
    env.run(&["audit", "note", "after the cut"]).expect(0);
    env.run(&["audit", "verify"]).expect(0);
    let after = lines(&path);
    assert_eq!(after.len(), 6);
    let recovered: serde_json::Value = serde_json::from_str(&after[4]).expect("JSON");
    assert_eq!(recovered["event"], "audit_recovered");
    let kept = recovered["fields"]["kept_in"].as_str().expect("kept_in");
    // What was kept is what was left of the cut record.
    let line_start = text.len() - original[4].len() - 1;
    assert_eq!(
        std::fs::read(kept).expect("kept bytes"),
        &text.as_bytes()[line_start..cut]
    );
}

#[test]
fn twenty_processes_appending_at_once_leave_one_valid_chain() {
    let Some(env) = Env::new("") else { return };
    let bin = crate::support::bin();
    let children: Vec<_> = (0..20)
        .map(|p| {
            let script = format!(
                "for i in $(seq 50); do '{}' audit note \"p{p} $i\" || exit 1; done",
                bin.display()
            );
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("RBEE_HOME", env.path().join("state"))
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success());
    }
    let run = env.run(&["--json", "audit", "verify"]);
    run.expect(0);
    assert_eq!(run.json_lines()[0]["records"], 1000);
    let seqs: Vec<u64> = lines(&queen_log(&env))
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let Some(env) = Env::new("") else { return };
    for i in 0..30 {
        let out = env
            .command(&["audit", "note", &format!("rotating {i}")])
            .env("RBEE_AUDIT_MAX_BYTES", "2000")
            .output()
            .expect("run");
        assert!(out.status.success());
    }
    assert!(env.path().join("state/audit.jsonl.1").exists());
    assert!(env.path().join("state/audit.jsonl.2").exists());
    let run = env.run(&["--json", "audit", "verify"]);
    run.expect(0);
    let records = run.json_lines()[0]["records"].as_u64().expect("records");
    assert!(records > 30, "{records}");
    // Tampering in a rotated file is found too.
    let old = env.path().join("state/audit.jsonl.1");
    let text = std::fs::read_to_string(&old).expect("read");
    std::fs::write(&old, text.replacen("rotating 1", "rotating 9", 1)).expect("write");
    let run = env.run(&["audit", "verify"]);
    run.expect(1);
    assert!(run.stdout.contains("audit.jsonl.1:"), "{}", run.stdout);
}

#[test]
fn rotated_files_past_the_retention_bound_are_dropped_saying_so_and_the_rest_verifies() {
    let Some(env) = Env::new("") else { return };
    let mut warnings = Vec::new();
    for i in 0..40 {
        let out = env
            .command(&["audit", "note", &format!("rotating {i}")])
            .env("RBEE_AUDIT_MAX_BYTES", "2000")
            .env("RBEE_AUDIT_KEEP", "2")
            .output()
            .expect("run");
        assert!(out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !stderr.is_empty() {
            warnings.push(stderr);
        }
    }
    let state = env.path().join("state");
    assert!(state.join("audit.jsonl.2").exists());
    assert!(
        !state.join("audit.jsonl.3").exists(),
        "more than 2 rotated files kept"
    );
    assert!(!warnings.is_empty(), "nothing said what was dropped");
    for w in &warnings {
        assert!(
            w.contains("dropped the oldest rotated file") && w.contains("audit.jsonl"),
            "{w}"
        );
    }
    let pruned: Vec<serde_json::Value> = crate::support::records(&state.join("audit.jsonl"))
        .into_iter()
        .chain(crate::support::records(&state.join("audit.jsonl.2")))
        .filter(|r| r["event"] == "audit_pruned")
        .collect();
    assert!(!pruned.is_empty());
    assert!(
        pruned[0]["fields"]["through_seq"].as_u64().is_some(),
        "{}",
        pruned[0]
    );
    let run = env.run(&["--json", "audit", "verify"]);
    run.expect(0);
    // Intact, from the first record kept on.
    let report = &run.json_lines()[0];
    let head = report["head"]["seq"].as_u64().expect("head");
    assert!(
        report["records"].as_u64().expect("records") < head,
        "{report}"
    );
    // What is kept is still checked: a change in a kept rotated file is found.
    let kept = state.join("audit.jsonl.1");
    let text = std::fs::read_to_string(&kept).expect("read");
    let changed = text.replacen("rotating", "rewritten", 1);
    assert_ne!(changed, text);
    std::fs::write(&kept, changed).expect("write");
    env.run(&["audit", "verify"]).expect(1);
}

#[test]
fn the_node_chain_continues_across_restarts_and_the_queen_witnesses_it() {
    let Some(env) = Env::new("") else { return };
    let first = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    env.run(&["hive", "stop", "n1"]).expect(0);
    let second = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    let run = env.run(&["--json", "audit", "verify", "--all"]);
    run.expect(0);
    let reports = run.json_lines();
    assert_eq!(reports[1]["log"], "n1");
    assert_eq!(reports[1]["witnessed"], 2);
    let node_log = lines(&env.node_dir().join("audit.jsonl"));
    let events: Vec<serde_json::Value> = node_log
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let starts: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "hive_started")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2);
    // The restarted hive's first record links to the last record of the one before.
    let restart = starts[1];
    assert_eq!(events[restart]["prev"], events[restart - 1]["hash"]);
    for done in [&first, &second] {
        let head = &done["node_audit"];
        let seq = head["seq"].as_u64().expect("seq") as usize;
        assert_eq!(events[seq - 1]["hash"], head["hash"]);
        assert_eq!(events[seq - 1]["request_id"], done["request_id"]);
    }
    // Prompts never go in, only their hash and length.
    let all = node_log.join("\n") + &lines(&queen_log(&env)).join("\n");
    assert!(!all.contains("\"Hi\""));
}

#[test]
fn status_reads_leave_no_node_record_while_work_does() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let node_log = env.node_dir().join("audit.jsonl");
    let before = lines(&node_log).len();
    for _ in 0..3 {
        let status = env.run(&["--json", "hive", "status", "n1"]);
        status.expect(0);
        // The status carries the worker the infer loaded, from the hive's one answer.
        let workers = &status.json_lines()[0]["workers"];
        assert_eq!(workers[0]["model"], "smollm2", "{}", status.stdout);
        env.run(&["worker", "list", "--node", "n1"]).expect(0);
    }
    assert_eq!(
        lines(&node_log).len(),
        before,
        "a status read wrote to the node's audit log"
    );
    // Work still does, named by the key that asked.
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let added: Vec<serde_json::Value> = lines(&node_log)[before..]
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert!(
        added
            .iter()
            .any(|r| r["event"] == "auth_success" && r["fields"]["kid"].is_string()),
        "{added:?}"
    );
    env.run(&["audit", "verify", "--all"]).expect(0);
}

#[test]
fn a_truncated_node_log_with_a_recomputed_chain_is_still_caught() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    env.infer(&["--prompt", "Hello", "--max-tokens", "2"])
        .expect(0);
    env.run(&["hive", "stop", "n1"]).expect(0);
    let path = env.node_dir().join("audit.jsonl");
    let records: Vec<serde_json::Value> = lines(&path)
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    // Keep the records before the second request, drop the rest, and recompute every hash
    // (rewriting the first request's prompt length on the way) so the chain verifies alone.
    let keep = records
        .iter()
        .position(|r| r["event"] == "request_completed")
        .expect("a completed request")
        + 1;
    let mut prev = "0".repeat(64);
    let mut out = Vec::new();
    for mut r in records.into_iter().take(keep) {
        if r["event"] == "request_started" {
            r["fields"]["prompt"]["len"] = serde_json::json!(99);
        }
        r["prev"] = serde_json::json!(prev);
        let mut without = r.clone();
        without.as_object_mut().expect("object").remove("hash");
        use sha2::Digest;
        let hash = hex::encode(sha2::Sha256::digest(format!("{prev}{without}").as_bytes()));
        r["hash"] = serde_json::json!(hash);
        prev = hash;
        out.push(r.to_string());
    }
    std::fs::write(&path, out.join("\n") + "\n").expect("write");
    // On its own the node log is a valid chain...
    let alone: serde_json::Value = {
        let run = env.run(&["--json", "audit", "tail", "--node", "n1", "-n", "1"]);
        run.expect(0);
        serde_json::from_str(run.stdout.trim()).expect("JSON")
    };
    assert_eq!(alone["hash"], serde_json::json!(prev));
    // ...but the heads the queen witnessed are gone.
    let run = env.run(&["audit", "verify", "--node", "n1"]);
    run.expect(1);
    assert!(
        run.stdout.contains("missing from its log"),
        "{}",
        run.stdout
    );
}

#[test]
fn audit_on_two_ssh_nodes() {
    use crate::support::sshd;
    let Some(model) = crate::support::model() else {
        return;
    };
    if !sshd::available() {
        return;
    }
    let dir = crate::support::tempdir();
    let key = sshd::ClientKey::new(dir.path(), "client", "ed25519");
    let a = sshd::Sshd::start(&dir.path().join("sshd-a"), &[&key]);
    let b = sshd::Sshd::start(&dir.path().join("sshd-b"), &[&key]);
    std::fs::write(
        dir.path().join("known_hosts"),
        a.known_hosts_line() + &b.known_hosts_line(),
    )
    .expect("known_hosts");
    let mut text = crate::support::model_table(&model, crate::support::MODEL_SHA256);
    text.push_str(&format!(
        "[defaults]\nuser = {:?}\nidentity_file = {:?}\nknown_hosts = {:?}\npersist = \"0\"\n",
        sshd::user(),
        key.private.display().to_string(),
        dir.path().join("known_hosts").display().to_string()
    ));
    for (name, server) in [("a", &a), ("b", &b)] {
        text.push_str(&format!(
            "[nodes.{name}]\nhost = \"127.0.0.1\"\nport = {}\nremote_dir = {:?}\nhive_port = {}\nmodels = [\"smollm2\"]\n",
            server.port,
            dir.path().join(format!("node-{name}")).display().to_string(),
            crate::support::free_port()
        ));
    }
    let env = Env::from_dir(dir, crate::support::free_port(), &text);
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let done = env
            .infer(&["--node", name, "--prompt", "Hi", "--max-tokens", "2"])
            .expect(0)
            .done();
        ids.push((name, done["request_id"].as_str().expect("id").to_string()));
    }
    let run = env.run(&["--json", "audit", "verify", "--all"]);
    run.expect(0);
    let reports = run.json_lines();
    assert_eq!(reports.len(), 3);
    for r in &reports[1..] {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["witnessed"], 1, "{r}");
    }
    let queen = std::fs::read_to_string(queen_log(&env)).expect("queen log");
    for (name, id) in ids {
        let node = std::fs::read_to_string(env.path().join(format!("node-{name}/audit.jsonl")))
            .expect("node log");
        assert!(node.contains(&id) && queen.contains(&id), "{name}: {id}");
    }
}
