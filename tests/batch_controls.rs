//! `rbee batch` on local nodes: input from stdin, a budget per item, retries that run out, a
//! second Ctrl-C, and a progress bar drawn on a terminal only.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::support::{Env, MODEL_SHA256, Run, eventually, model, model_table, results};

const LONG: &str = "Write a long, detailed essay about the history of the bicycle.";

fn line(id: &str, prompt: &str, max_tokens: u32) -> String {
    serde_json::json!({"id": id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
        .to_string()
}

/// One local node whose model has `slots` slots.
fn env_with_slots(slots: u32) -> Option<Env> {
    let model = model()?;
    Some(Env::custom(|dir, port| {
        format!(
            "{}slots = {slots}\n\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {:?}\n\
             hive_port = {port}\nmodels = [\"smollm2\"]\n",
            model_table(&model, MODEL_SHA256),
            dir.join("node").display().to_string(),
        )
    }))
}

fn by_id(lines: &[serde_json::Value]) -> HashMap<String, serde_json::Value> {
    let mut seen = HashMap::new();
    for l in lines {
        let id = l["id"].as_str().expect("id").to_string();
        assert!(seen.insert(id, l.clone()).is_none(), "twice: {l}");
    }
    seen
}

#[test]
fn a_batch_read_from_stdin_answers_every_item_on_stdout() {
    let Some(env) = Env::new("") else { return };
    let input: String = (0..5)
        .map(|i| line(&format!("s{i}"), &format!("Say {i}"), 3) + "\n")
        .collect();
    let run = env.run_with_stdin(&["batch", "-"], input.as_bytes());
    run.expect(0);
    let seen = by_id(&run.json_lines());
    assert_eq!(seen.len(), 5, "{}", run.stdout);
    for i in 0..5 {
        let l = &seen[&format!("s{i}")];
        assert_eq!(l["node"], "n1", "{l}");
        assert!(l["text"].as_str().is_some_and(|t| !t.is_empty()), "{l}");
    }
}

#[test]
fn the_timeout_is_a_budget_for_each_item_not_for_the_batch() {
    // One slot: items run one after another, so the last ones start long after the batch did.
    let Some(env) = env_with_slots(1) else { return };
    let input = env.path().join("in.jsonl");
    let mut lines = vec![line("warm", "Hi", 2), line("long", LONG, 4000)];
    lines.extend((0..4).map(|i| line(&format!("after{i}"), &format!("Say {i}"), 3)));
    std::fs::write(&input, lines.join("\n") + "\n").expect("input");
    let run = env.run(&["batch", "--timeout", "3s", input.to_str().expect("path")]);
    run.expect(9);
    assert!(
        run.stderr.contains("some items failed: 1 of 6"),
        "{}",
        run.stderr
    );
    let seen = by_id(&run.json_lines());
    let long = &seen["long"];
    assert_eq!(long["error"]["exit_code"], 124, "{long}");
    // The items after the long one had a budget of their own, although the batch as a whole
    // had run past 3 s by the time they started.
    for i in 0..4 {
        let l = &seen[&format!("after{i}")];
        assert!(l["error"].is_null(), "{l}");
    }
}

#[test]
fn items_on_a_fleet_where_every_node_fails_are_error_lines_once_their_retries_are_spent() {
    let Some(model) = model() else { return };
    // Neither node can start a hive: each remote_dir lies under a regular file.
    let env = Env::custom(|dir, _| {
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, "").expect("blocker");
        let mut text = model_table(&model, MODEL_SHA256);
        for n in ["a", "b"] {
            text.push_str(&format!(
                "\n[nodes.{n}]\ntransport = \"local\"\nremote_dir = {:?}\nmodels = [\"smollm2\"]\n",
                blocker.join(n).display().to_string()
            ));
        }
        text
    });
    let input = env.path().join("in.jsonl");
    let lines: Vec<String> = (0..3).map(|i| line(&format!("x{i}"), "Hi", 2)).collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("input");
    let run = env.run(&[
        "batch",
        "--retries",
        "1",
        "--timeout",
        "20s",
        input.to_str().expect("path"),
    ]);
    run.expect(9);
    assert!(
        run.stderr.contains("some items failed: 3 of 3"),
        "{}",
        run.stderr
    );
    let seen = by_id(&run.json_lines());
    assert_eq!(seen.len(), 3, "{}", run.stdout);
    for l in seen.values() {
        let code = l["error"]["exit_code"].as_i64().unwrap_or_default();
        assert!(code != 0 && code != 9, "{l}");
        assert!(
            l["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{l}"
        );
    }
}

#[test]
fn a_second_ctrl_c_cancels_the_items_in_flight_and_leaves_them_for_a_rerun() {
    let Some(env) = env_with_slots(2) else { return };
    let input = env.path().join("in.jsonl");
    let output = env.path().join("out.jsonl");
    let mut lines = vec![line("warm", "Hi", 2)];
    lines.extend((0..4).map(|i| line(&format!("long{i}"), LONG, 3000)));
    std::fs::write(&input, lines.join("\n") + "\n").expect("input");
    let args = [
        "batch",
        "--output",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ];
    let child = env.spawn(&args);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    // The warm-up item is written, and long items are decoding on the node.
    assert!(
        eventually(Duration::from_secs(60), || results(&output).len() == 1
            && env.workers().first().is_some_and(|w| w["in_flight"] == 2)),
        "the long items did not start"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("second SIGINT");
    let run = Run::from(child.wait_with_output().expect("wait"));
    run.expect(130);
    assert!(
        run.stderr.contains("Ctrl-C again cancels them"),
        "{}",
        run.stderr
    );
    // Only the warm-up item made it: the cancelled ones are not in the output, as a rerun
    // would otherwise skip them.
    let written = results(&output);
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["id"], "warm");
    // And they stopped on the node, long before 3000 tokens each.
    assert!(
        eventually(Duration::from_secs(5), || env
            .workers()
            .first()
            .is_some_and(|w| w["in_flight"] == 0)),
        "the cancelled items still run on the node: {:?}",
        env.workers()
    );
}

#[test]
fn the_progress_bar_is_drawn_on_a_terminal_and_never_into_a_pipe() {
    let Some(env) = env_with_slots(2) else { return };
    let input = env.path().join("in.jsonl");
    let lines: Vec<String> = (0..6).map(|i| line(&format!("p{i}"), LONG, 40)).collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("input");
    let out = env.path().join("out.jsonl");
    let batch = format!(
        "{} batch --output {} {}",
        crate::support::bin().display(),
        out.display(),
        input.display()
    );
    // `script` gives the command a pseudo-terminal and copies what it drew to our stdout.
    let tty = Run::from(
        env.command_of(Path::new("script"), &["-qefc", &batch, "/dev/null"])
            .output()
            .expect("run script"),
    );
    tty.expect(0);
    assert!(tty.stdout.contains("ETA"), "{}", tty.stdout);
    assert!(tty.stdout.contains("in flight n1"), "{}", tty.stdout);
    assert_eq!(results(&out).len(), 6);
    std::fs::remove_file(&out).expect("rm");
    let piped = env.run(&[
        "batch",
        "--output",
        out.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    piped.expect(0);
    assert!(!piped.stderr.contains("ETA"), "{}", piped.stderr);
    assert!(!piped.stderr.contains('\r'), "{:?}", piped.stderr);
    assert_eq!(results(&out).len(), 6);
}

/// A batch file that cannot be read, or an `--output` that cannot be opened, is a usage error
/// (exit 2) naming the path, before any item runs: not an internal error.
#[test]
fn an_unreadable_batch_or_output_is_a_usage_error_naming_the_path() {
    let Some(env) = Env::new("") else { return };
    let missing = env.path().join("absent.jsonl");
    let missing = missing.to_str().expect("path");
    let dir = env.path().to_str().expect("path");
    for path in [missing, dir] {
        let run = env.run(&["batch", path]);
        run.expect(2);
        assert!(run.stderr.contains(path), "{}", run.stderr);
    }
    let input = env.path().join("in.jsonl");
    std::fs::write(&input, line("o1", "Hi", 2) + "\n").expect("write the input");
    let output = env.path().join("no-such-dir").join("out.jsonl");
    let run = env.run(&[
        "batch",
        "--output",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    run.expect(2);
    assert!(run.stderr.contains("no-such-dir"), "{}", run.stderr);
}
