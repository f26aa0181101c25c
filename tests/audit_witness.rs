//! Both ends witness each other: each node keeps the head of the queen's log with the requests
//! it serves, so the queen's log rewritten, cut or deleted is caught from the nodes.

use crate::support::{Env, rechain, records};

fn queen_log(env: &Env) -> std::path::PathBuf {
    env.path().join("state/audit.jsonl")
}

/// The queen heads (seq) the node kept, oldest first.
fn witnessed(env: &Env) -> Vec<u64> {
    records(&env.node_dir().join("audit.jsonl"))
        .iter()
        .filter_map(|r| r["fields"]["queen_audit"]["seq"].as_u64())
        .collect()
}

fn caught(env: &Env, at: &str) {
    // Alone, the queen's log is a valid chain...
    env.run(&["audit", "verify"]).expect(0);
    // ...but the node's witness disagrees.
    let run = env.run(&["audit", "verify", "--all"]);
    run.expect(1);
    let queen = run.stdout.lines().next().unwrap_or_default();
    assert!(queen.starts_with("queen: BROKEN"), "{}", run.stdout);
    assert!(queen.contains("node `n1`"), "{}", run.stdout);
    assert!(queen.contains(at), "`{at}`: {}", run.stdout);
}

#[test]
fn a_rewritten_cut_or_deleted_queen_log_is_caught_by_the_node() {
    let Some(env) = Env::new("") else { return };
    for prompt in ["Hi", "Hello"] {
        env.infer(&["--prompt", prompt, "--max-tokens", "2"])
            .expect(0);
    }
    let heads = witnessed(&env);
    assert_eq!(
        heads.len(),
        2,
        "the node keeps the queen's head per request"
    );
    let path = queen_log(&env);
    let original = std::fs::read(&path).expect("queen log");
    env.run(&["audit", "verify", "--all"]).expect(0);

    // Rewritten: the first request's prompt length changed, every hash recomputed.
    let mut edited = records(&path);
    for r in &mut edited {
        if r["event"] == "infer_requested" {
            r["fields"]["prompt"]["len"] = serde_json::json!(99);
            break;
        }
    }
    std::fs::write(&path, rechain(edited).join("\n") + "\n").expect("write");
    let first = heads[0];
    caught(&env, &format!("audit.jsonl:{first} (seq {first})"));

    // Cut by three records.
    std::fs::write(&path, &original).expect("restore");
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect();
    let kept = lines.len() - 3;
    assert!(
        kept < heads[1] as usize,
        "the cut must reach a witnessed record"
    );
    std::fs::write(&path, lines[..kept].join("\n") + "\n").expect("cut");
    caught(
        &env,
        &format!("audit.jsonl:{} (seq {})", kept + 1, heads[1]),
    );

    // Deleted.
    std::fs::remove_file(&path).expect("delete");
    caught(&env, "audit.jsonl:1 ");

    std::fs::write(&path, &original).expect("restore");
    let run = env.run(&["--json", "audit", "verify", "--all"]);
    run.expect(0);
    assert_eq!(run.json_lines()[0]["witnessed"], 2, "{}", run.stdout);
}

#[test]
fn a_node_witness_break_names_its_real_line() {
    let Some(env) = Env::new("") else { return };
    for prompt in ["Hi", "Hello"] {
        env.infer(&["--prompt", prompt, "--max-tokens", "2"])
            .expect(0);
    }
    env.run(&["hive", "stop", "n1"]).expect(0);
    let path = env.node_dir().join("audit.jsonl");
    let mut edited = records(&path);
    let first = edited
        .iter()
        .position(|r| r["event"] == "request_started")
        .expect("a request");
    edited[first]["fields"]["prompt"]["len"] = serde_json::json!(99);
    std::fs::write(&path, rechain(edited).join("\n") + "\n").expect("write");
    let run = env.run(&["audit", "verify", "--node", "n1"]);
    run.expect(1);
    let completed = records(&path)
        .iter()
        .position(|r| r["event"] == "request_completed")
        .expect("completed")
        + 1;
    assert!(
        run.stdout
            .contains(&format!("audit.jsonl:{completed} (seq {completed})")),
        "line {completed}: {}",
        run.stdout
    );
    assert!(!run.stdout.contains(":0 "), "{}", run.stdout);
}
