//! rbee as a Unix filter: a reader that stops reading (`| head`) ends the invocation quietly,
//! exit 0 and nothing on stderr, and the generation stops on the node at once.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{ENDLESS, Env, Run, eventually, worker_health};

fn idle(health: &serde_json::Value) -> bool {
    health["active"].as_array().is_some_and(Vec::is_empty)
}

/// `rbee ARGS | head HEAD_ARGS` with the real `head`: rbee's run, and what head printed.
fn piped_into_head(env: &Env, args: &[&str], head_args: &[&str]) -> (Run, String) {
    let mut rbee = env
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rbee");
    let head = Command::new("head")
        .args(head_args)
        .stdin(Stdio::from(rbee.stdout.take().expect("stdout")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn head");
    let head = head.wait_with_output().expect("head");
    assert!(head.status.success(), "head failed");
    // The generation is endless: only a closed pipe ends rbee within this bound.
    if !eventually(Duration::from_secs(20), || {
        rbee.try_wait().expect("try_wait").is_some()
    }) {
        let _ = rbee.kill();
        let _ = rbee.wait();
        panic!("rbee still runs after its reader has gone");
    }
    let run = Run::from(rbee.wait_with_output().expect("rbee output"));
    (run, String::from_utf8_lossy(&head.stdout).into_owned())
}

/// After the reader has gone the worker decodes nothing, and its last generation was cut
/// short as cancelled.
fn assert_worker_stopped(env: &Env) {
    assert!(
        eventually(Duration::from_secs(1), || idle(&worker_health(env))),
        "the worker still decodes a second after its reader has gone: {}",
        worker_health(env)
    );
    let last = &worker_health(env)["last"];
    assert_eq!(last["stop_reason"], "cancelled", "{last}");
    assert!(last["tokens_out"].as_u64().expect("tokens_out") < 100_000);
}

#[test]
fn text_piped_into_head_ends_quietly_and_stops_the_worker() {
    let Some(env) = Env::new("") else { return };
    let mut args = vec!["infer"];
    args.extend(ENDLESS);
    let (run, head) = piped_into_head(&env, &args, &["-c", "20"]);
    run.expect(0);
    assert_eq!(run.stderr, "");
    assert_eq!(head.len(), 20, "{head:?}");
    assert_worker_stopped(&env);
}

#[test]
fn json_piped_into_head_ends_quietly_and_stops_the_worker() {
    let Some(env) = Env::new("") else { return };
    let mut args = vec!["--json", "infer"];
    args.extend(ENDLESS);
    let (run, head) = piped_into_head(&env, &args, &["-1"]);
    run.expect(0);
    assert_eq!(run.stderr, "");
    let line: serde_json::Value = serde_json::from_str(head.trim_end()).expect("a JSON line");
    assert_eq!(line["event"], "token", "{head}");
    assert_worker_stopped(&env);
}

#[test]
fn a_reader_gone_before_the_first_token_takes_the_request_out_of_the_queue() {
    let Some(env) = Env::new("") else { return };
    // One slot, held by another generation: the piped request waits in the hive's queue and
    // writes nothing, so only watching stdout can tell that its reader has gone.
    env.edit_config("threads = 1\n", "threads = 1\nslots = 1\n");
    let (mut holder, _lines) = env.spawn_endless(&[], 1);
    let mut args = vec!["infer", "--prompt", "Hi", "--max-tokens", "4"];
    args.extend(["--timeout", "60s"]);
    let mut queued = env
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rbee");
    assert!(
        eventually(Duration::from_secs(10), || {
            env.workers()
                .first()
                .is_some_and(|w| w["queued"].as_u64() == Some(1))
        }),
        "the second request never queued: {:?}",
        env.workers()
    );
    drop(queued.stdout.take());
    if !eventually(Duration::from_secs(5), || {
        queued.try_wait().expect("try_wait").is_some()
    }) {
        let _ = queued.kill();
        let _ = queued.wait();
        panic!("rbee waits in the queue for a reader that has gone");
    }
    let run = Run::from(queued.wait_with_output().expect("output"));
    run.expect(0);
    assert_eq!(run.stderr, "");
    // The hive let go of it: only the holder's request is in flight, and nothing is queued
    // (a queue count left behind would also keep the model from ever unloading).
    let hive_side = || {
        let run = env.run(&["--json", "worker", "list"]);
        serde_json::from_str::<serde_json::Value>(run.stdout.trim()).expect("JSON")
    };
    assert!(
        eventually(Duration::from_secs(2), || {
            let list = hive_side();
            list["requests"].as_array().map(Vec::len) == Some(1)
                && list["workers"][0]["queued"] == 0
        }),
        "the hive still holds the request: {}",
        hive_side()
    );
    let _ = holder.kill();
    let _ = holder.wait();
}
