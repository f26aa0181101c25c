//! `rbee batch` over two SSH nodes: every id once in the output, whether a node dies mid-batch
//! or the batch is interrupted and run again with the same output file.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{Fleet, node};
use crate::support::{eventually, results};

/// `n` prompts with ids `p0`, `p1`, ...: short, greedy answers, so the batch is quick.
fn write_input(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "id": format!("p{i}"),
                "prompt": format!("Count to {i}"),
                "max_tokens": 4,
                "temperature": 0.0,
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("input");
}

/// Asserts that each of the `n` ids is in `lines` exactly once, as a success; returns how many
/// each node served.
#[track_caller]
fn every_id_once(lines: &[serde_json::Value], n: usize) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut by_node: HashMap<String, usize> = HashMap::new();
    for line in lines {
        assert!(line["error"].is_null(), "an item failed: {line}");
        assert_eq!(
            line["tokens_out"].as_u64().map(|t| t <= 4),
            Some(true),
            "{line}"
        );
        *seen
            .entry(line["id"].as_str().expect("id").to_string())
            .or_default() += 1;
        *by_node
            .entry(line["node"].as_str().expect("node").to_string())
            .or_default() += 1;
    }
    for i in 0..n {
        assert_eq!(seen.get(&format!("p{i}")), Some(&1), "p{i} in {seen:?}");
    }
    assert_eq!(lines.len(), n, "{seen:?}");
    by_node
}

#[test]
fn a_batch_is_spread_over_both_nodes_and_every_id_comes_back_once() {
    let Some(fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    let env = &fleet.env;
    let input = env.path().join("in.jsonl");
    write_input(&input, 40);
    // Without --output the results are JSON lines on stdout.
    let run = env.run(&["batch", "--model", "smollm2", input.to_str().expect("path")]);
    run.expect(0);
    let by_node = every_id_once(&run.json_lines(), 40);
    assert!(by_node.get("a").is_some_and(|&n| n > 0), "{by_node:?}");
    assert!(by_node.get("b").is_some_and(|&n| n > 0), "{by_node:?}");
    // Each item is on this machine's record, start and end, as an `infer` is.
    let log = crate::support::records(&env.path().join("state/audit.jsonl"));
    let count = |event: &str| log.iter().filter(|r| r["event"] == event).count();
    assert_eq!(count("infer_requested"), 40);
    assert_eq!(count("infer_completed"), 40);

    // A bad line is named before anything runs.
    std::fs::write(
        &input,
        "{\"id\":1,\"prompt\":\"hi\"}\n{\"id\":1,\"prompt\":\"again\"}\n",
    )
    .expect("input");
    let out = env.path().join("bad.jsonl");
    let run = env.run(&[
        "batch",
        "--output",
        out.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    run.expect(8);
    assert!(
        run.stderr.contains("line 2: duplicate id 1"),
        "{}",
        run.stderr
    );
    assert!(results(&out).is_empty());
}

#[test]
fn when_a_node_dies_mid_batch_the_other_takes_the_rest() {
    let Some(mut fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    let input = fleet.env.path().join("in.jsonl");
    let output = fleet.env.path().join("out.jsonl");
    write_input(&input, 80);
    let child = fleet.env.spawn(&[
        "batch",
        "--output",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    assert!(
        eventually(Duration::from_secs(60), || results(&output).len() >= 10),
        "the batch did not get going"
    );
    // Node a's sshd dies with its sessions: neither a new connection nor the one the batch
    // keeps reaches it.
    fleet.servers.remove(0).die();
    let done = results(&output).len();
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    run.expect(0);
    let lines = results(&output);
    let by_node = every_id_once(&lines, 80);
    assert!(done < 80, "the batch ended before a died; {by_node:?}");
    assert!(by_node.get("b").is_some_and(|&n| n > 0), "{by_node:?}");
}

#[test]
fn an_interrupted_batch_resumes_with_the_same_output_and_runs_each_id_once() {
    // One slot a node, so the batch lasts long enough to interrupt.
    let Some(fleet) = Fleet::build(&[node("a"), node("b")], true, "slots = 1\n") else {
        return;
    };
    let env = &fleet.env;
    let input = env.path().join("in.jsonl");
    let output = env.path().join("out.jsonl");
    write_input(&input, 60);
    let args = [
        "batch",
        "--output",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ];
    let child = env.spawn(&args);
    assert!(
        eventually(Duration::from_secs(60), || results(&output).len() >= 5),
        "the batch did not get going"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let run = crate::support::Run::from(child.wait_with_output().expect("wait"));
    run.expect(130);
    let first = results(&output).len();
    assert!(first < 60, "nothing was left for the rerun");
    let rerun = env.run(&args);
    rerun.expect(0);
    every_id_once(&results(&output), 60);
}

#[test]
fn an_item_the_node_rejects_is_an_error_line_and_the_batch_exits_9() {
    // A small context, so that one prompt is too long for it.
    let Some(fleet) = Fleet::build(&[node("a")], true, "context = 256\n") else {
        return;
    };
    let env = &fleet.env;
    let input = env.path().join("in.jsonl");
    let long = "word ".repeat(600);
    let lines = [
        serde_json::json!({"id": "short1", "prompt": "Hi", "max_tokens": 2}),
        serde_json::json!({"id": "long", "prompt": long, "max_tokens": 2}),
        serde_json::json!({"id": "short2", "prompt": "Hello", "max_tokens": 2}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text).expect("input");
    let run = env.run(&["batch", input.to_str().expect("path")]);
    run.expect(9);
    assert!(
        run.stderr.contains("some items failed: 1 of 3"),
        "{}",
        run.stderr
    );
    let out = run.json_lines();
    assert_eq!(out.len(), 3, "{}", run.stdout);
    let long = out.iter().find(|l| l["id"] == "long").expect("long's line");
    assert_eq!(long["error"]["exit_code"], 8, "{long}");
    assert_eq!(long["error"]["code"], "invalid_request", "{long}");
    for id in ["short1", "short2"] {
        let line = out.iter().find(|l| l["id"] == id).expect("a short line");
        assert_eq!(line["node"], "a", "{line}");
    }
}
