//! A generation whose stream ends before its `done` event: each way maps to the contract's exit
//! code, and the text already printed stays printed.

use std::io::Read;
use std::time::Duration;

use crate::support::{ENDLESS, Env, Run, alive, eventually};

fn hive_pid(env: &Env) -> i32 {
    let text = std::fs::read_to_string(env.node_dir().join("hive.pid")).expect("hive.pid");
    text.trim().parse().expect("a pid")
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

#[test]
fn a_hive_killed_mid_stream_exits_6_after_the_json_tokens_it_sent() {
    let Some(env) = Env::new("") else { return };
    let (mut child, lines) = env.spawn_endless(&[], 3);
    let hive = hive_pid(&env);
    sigkill(hive);
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(6), "stderr: {stderr}");
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("JSON"))
        .collect();
    let error = rest.last().expect("an error line");
    assert_eq!(error["event"], "error", "{rest:?}");
    assert_eq!(error["code"], "hive_unavailable", "{error}");
    assert_eq!(error["exit_code"], 6);
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("`n1`"), "{message}");
    assert!(!message.contains("decoding"), "{message}");
    assert!(stderr.starts_with("rbee: "), "{stderr}");
    assert!(eventually(Duration::from_secs(5), || !alive(hive)));
}

#[test]
fn a_hive_killed_mid_stream_exits_6_and_the_text_printed_stays() {
    let Some(env) = Env::new("") else { return };
    let mut args = vec!["infer"];
    args.extend(ENDLESS);
    let mut child = env.spawn(&args);
    let mut stdout = child.stdout.take().expect("stdout");
    let mut printed = vec![0u8; 16];
    stdout.read_exact(&mut printed).expect("the first bytes");
    sigkill(hive_pid(&env));
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read the rest");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let status = child.wait().expect("wait");
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&[printed.as_slice(), &rest].concat()).into_owned(),
        stderr,
    };
    run.expect(6);
    assert!(
        run.stderr.starts_with("rbee: ") && run.stderr.contains("`n1`"),
        "{}",
        run.stderr
    );
    // What was printed before the hive died stays, ended by a newline.
    assert!(run.stdout.ends_with('\n'), "{:?}", run.stdout);
}

#[test]
fn a_generation_cut_by_a_stopping_hive_exits_6_and_says_the_hive_stopped() {
    let Some(env) = Env::new("") else { return };
    let (mut child, lines) = env.spawn_endless(&[], 3);
    // The hive lets the generation run for its grace period, then stops the worker.
    env.run(&["hive", "stop", "n1"]).expect(0);
    let status = child.wait().expect("wait");
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("JSON"))
        .collect();
    let error = rest.last().expect("an error line");
    assert_eq!(status.code(), Some(6), "{error}");
    assert_eq!(error["code"], "hive_unavailable", "{error}");
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("stopping"), "{message}");
    assert!(!message.contains("restart"), "{message}");
}

/// Kills the worker of an endless generation once it has streamed a few tokens: the exit code
/// and the error event's message.
fn kill_worker_mid_stream(env: &Env) -> (Option<i32>, String) {
    let (mut child, lines) = env.spawn_endless(&[], 3);
    let pid = env.workers()[0]["pid"].as_i64().expect("worker pid") as i32;
    sigkill(pid);
    let status = child.wait().expect("wait");
    let last = lines
        .map(|l| l.expect("read"))
        .last()
        .expect("an error line");
    let error: serde_json::Value = serde_json::from_str(&last).expect("JSON");
    assert_eq!(error["code"], "worker_unavailable", "{error}");
    let message = error["message"].as_str().expect("message").to_string();
    (status.code(), message)
}

#[test]
fn a_worker_killed_mid_stream_exits_7_and_says_what_the_hive_does_about_it() {
    let Some(env) = Env::new("") else { return };
    let (code, message) = kill_worker_mid_stream(&env);
    assert_eq!(code, Some(7), "{message}");
    assert!(message.contains("SIGKILL"), "{message}");
    assert!(message.contains("the hive restarts it in"), "{message}");

    // No restarts allowed: the message must not promise one.
    let Some(env) = Env::new("[restart]\nmax_attempts = 0") else {
        return;
    };
    let (code, message) = kill_worker_mid_stream(&env);
    assert_eq!(code, Some(7), "{message}");
    assert!(
        message.contains("does not restart it") && !message.contains("restarts it in"),
        "{message}"
    );
}
