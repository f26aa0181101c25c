//! The audit trail fails closed: a node or a queen that cannot append a record refuses the
//! work it would record (exit 10) unless the node is `audit = "best-effort"`, and no request,
//! however large its unauthenticated parts, can stop a node's trail.

use crate::support::mount::Mount;
use crate::support::{Env, records};

const HI: [&str; 4] = ["--prompt", "Hi", "--max-tokens", "2"];

fn node_log(env: &Env) -> std::path::PathBuf {
    env.node_dir().join("audit.jsonl")
}

#[test]
fn a_node_whose_audit_log_is_read_only_refuses_the_work() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let before = records(&node_log(&env)).len();
    let Some(_ro) = Mount::read_only(&env.node_dir()) else {
        return;
    };
    for _ in 0..2 {
        let run = env.infer(&HI);
        run.expect(10);
        let error = run.json_lines().pop().expect("an error event");
        assert_eq!(error["event"], "error", "{}", run.stdout);
        assert_eq!(error["code"], "audit_unavailable", "{error}");
        assert_eq!(error["exit_code"], 10, "{error}");
        // The node's own reason reaches the user.
        assert!(
            run.stderr.contains("n1") && run.stderr.contains("Read-only file system"),
            "{}",
            run.stderr
        );
        assert!(run.text().is_empty(), "no work was done: {}", run.stdout);
    }
    assert_eq!(records(&node_log(&env)).len(), before);
}

#[test]
fn a_best_effort_node_serves_with_a_warning_on_every_invocation() {
    let Some(env) = Env::new("audit = \"best-effort\"") else {
        return;
    };
    env.infer(&HI).expect(0);
    let Some(_ro) = Mount::read_only(&env.node_dir()) else {
        return;
    };
    for _ in 0..2 {
        let run = env.infer(&HI);
        run.expect(0);
        assert!(!run.text().is_empty(), "{}", run.stdout);
        assert!(
            run.stderr.contains("warning")
                && run.stderr.contains("n1")
                && run.stderr.contains("Read-only file system"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn the_queen_refuses_to_report_work_its_own_log_cannot_record() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let node_before = records(&node_log(&env)).len();
    let Some(_ro) = Mount::read_only(&env.path().join("state")) else {
        return;
    };
    let run = env.infer(&HI);
    run.expect(10);
    assert!(
        run.stderr.contains("Read-only file system"),
        "{}",
        run.stderr
    );
    // Refused before it was sent: the node saw no request.
    assert_eq!(records(&node_log(&env)).len(), node_before);
    let run = env.run(&["audit", "note", "cannot be kept"]);
    run.expect(10);
}

#[test]
fn a_huge_unauthenticated_header_cannot_stop_the_node_trail() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    // A 300 KB header is over what a request's head may take: refused before it is read.
    let (status, body) = crate::support::http(
        env.socket(),
        "POST",
        "/v1/infer",
        &[("x-rbee-request-id", &"r".repeat(300_000))],
        b"{}",
    );
    assert_eq!(status, 431, "{body}");
    // One just under that bound reaches the signature check, and its refusal is recorded.
    let huge = "r".repeat(60_000);
    let (status, body) = crate::support::http(
        env.socket(),
        "POST",
        "/v1/infer",
        &[("x-rbee-request-id", &huge)],
        b"{}",
    );
    assert_eq!(status, 401, "{body}");
    let after_refusal = records(&node_log(&env)).len();
    for _ in 0..2 {
        env.infer(&HI).expect(0);
    }
    let after = records(&node_log(&env));
    let completed = after[after_refusal..]
        .iter()
        .filter(|r| r["event"] == "request_completed")
        .count();
    assert_eq!(completed, 2, "the node's chain stopped growing");
    let run = env.run(&["--json", "audit", "verify", "--all"]);
    run.expect(0);
    assert_eq!(run.json_lines()[1]["witnessed"], 3, "{}", run.stdout);

    // The header is kept as its length, hash and first bytes, never whole.
    let failure = after
        .iter()
        .find(|r| r["event"] == "auth_failure")
        .expect("the refusal is recorded");
    let id = &failure["fields"]["request_id"];
    assert_eq!(id["len"], 60_000, "{}", failure["fields"]);
    assert_eq!(id["sha256"].as_str().map(str::len), Some(64), "{id}");
    let text = std::fs::read_to_string(node_log(&env)).expect("node log");
    assert!(text.lines().all(|l| l.len() < 4096), "an oversized record");
}

/// Another process holding this machine's audit lock (a stuck rbee, a hung disk) does not hold
/// an invocation past its deadline: it ends at its budget, exit 124, naming the lock, and the
/// request is not sent. Once the lock is free, work goes on.
/// `args` run while another process holds this machine's audit lock, released when the run is
/// over or after 40 s should it wait for the lock; with how long it took.
fn run_with_queen_lock_held(
    env: &Env,
    args: &[&str],
) -> (crate::support::Run, std::time::Duration) {
    let holder = crate::support::hold_audit_lock(env);
    let (done, release) = std::sync::mpsc::channel::<()>();
    let releaser = std::thread::spawn(move || {
        let _ = release.recv_timeout(std::time::Duration::from_secs(40));
        drop(holder);
    });
    let started = std::time::Instant::now();
    let run = env.run(args);
    let took = started.elapsed();
    let _ = done.send(());
    releaser.join().expect("releaser");
    (run, took)
}

#[test]
fn a_queen_audit_lock_held_by_another_process_ends_the_invocation_at_its_deadline() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let node_before = records(&node_log(&env)).len();
    let (run, took) = run_with_queen_lock_held(
        &env,
        &[
            "--json",
            "infer",
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
            "--timeout",
            "2s",
        ],
    );
    run.expect(124);
    // The lock was held all the while (for 40 s unless the invocation ended): it ended at its
    // 2 s budget.
    assert!(
        took < std::time::Duration::from_secs(8),
        "the invocation of a 2s budget waited {took:?} for the lock"
    );
    assert!(run.stderr.contains("audit.lock"), "{}", run.stderr);
    assert_eq!(
        records(&node_log(&env)).len(),
        node_before,
        "the request reached the node"
    );
    env.infer(&HI).expect(0);
}

/// An edited nodes.toml is recorded (`config_changed`) before the command runs, outside any
/// budget of its own: with the lock held, that record is given up after a short wait (and
/// made by the next invocation), so the invocation still ends at its deadline.
#[test]
fn a_changed_config_recorded_while_the_queen_audit_lock_is_held_does_not_hold_the_invocation() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    env.append_config("# edited");
    let (run, took) = run_with_queen_lock_held(
        &env,
        &[
            "--json",
            "infer",
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
            "--timeout",
            "2s",
        ],
    );
    run.expect(124);
    assert!(
        took < std::time::Duration::from_secs(8),
        "the invocation of a 2s budget waited {took:?} for the lock"
    );
    assert!(run.stderr.contains("audit.lock"), "{}", run.stderr);
    // Once the lock is free, the next invocation records the change it could not.
    env.infer(&HI).expect(0);
    let changed = records(&env.path().join("state/audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == "config_changed")
        .count();
    assert_eq!(changed, 2, "the first nodes.toml and the edited one");
}

/// Commands whose records have no budget of their own (`hive_started` after `hive start`,
/// `batch_finished`) give a record up after a bounded wait, with a warning naming the lock,
/// instead of waiting as long as another process holds it: a cron job's `hive start` ends.
#[test]
fn a_hive_started_while_the_queen_audit_lock_is_held_ends_with_a_warning() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "stop", "n1"]);
    let (run, took) = run_with_queen_lock_held(&env, &["--json", "hive", "start", "n1"]);
    run.expect(0);
    assert!(
        took < std::time::Duration::from_secs(20),
        "hive start waited {took:?} for the lock"
    );
    assert!(run.stderr.contains("audit.lock"), "{}", run.stderr);
    assert!(run.stdout.contains("\"started\""), "{}", run.stdout);
    env.infer(&HI).expect(0);
    env.run(&["hive", "stop", "n1"]).expect(0);
}

/// The same lock taken once the request is under way (recorded and sent, its first token
/// printed): the record of its end waits for the lock no later than the deadline, so the
/// invocation ends there, exit 10 (`required`: its end is not on record), naming the lock, the
/// text it printed kept.
#[test]
fn a_queen_audit_lock_taken_while_the_request_runs_does_not_hold_its_end_past_the_deadline() {
    let Some(env) = Env::new("") else { return };
    lock_taken_mid_request(&env);
}

/// The same where the request is placed among two nodes, so that each node tried is an
/// `infer_attempt` record of its own, written when the attempt ends: that one waits no later
/// than the deadline either (a warning), and the invocation ends as above.
#[test]
fn a_queen_audit_lock_taken_while_a_placed_request_runs_holds_neither_its_attempt_nor_its_end() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let env = Env::custom(|dir, port| {
        // `b` cannot start a hive (its remote_dir lies under a regular file): `a` serves.
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, "").expect("blocker");
        format!(
            "{}\n[nodes.a]\ntransport = \"local\"\nremote_dir = {:?}\nhive_port = {port}\n\
             models = [\"smollm2\"]\n\n[nodes.b]\ntransport = \"local\"\nremote_dir = {:?}\n\
             hive_port = {}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(&model, crate::support::MODEL_SHA256),
            dir.join("node").display().to_string(),
            blocker.join("b").display().to_string(),
            crate::support::free_port(),
        )
    });
    let (stderr, request_id) = lock_taken_mid_request(&env);
    // The attempt on `a`, which ended under the held lock, is not on record, and the user is
    // told so.
    let mine = records(&env.path().join("state/audit.jsonl"));
    assert!(
        !mine.iter().any(|r| r["event"] == "infer_attempt"
            && r["request_id"] == request_id.as_str()
            && r["fields"]["node"] == "a"),
        "{mine:?}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("warning") && l.contains("audit.lock")),
        "{stderr}"
    );
}

/// Runs a request, takes this machine's audit lock once its first token is printed and holds
/// it for 45 s unless the invocation ends first; checks that it ended at its 10 s budget with
/// exit 10 naming the lock, its text kept. Its stderr, and the request's id.
fn lock_taken_mid_request(env: &Env) -> (String, String) {
    use std::io::Read;
    env.infer(&HI).expect(0);
    let mut child = env
        .command(&[
            "infer",
            "--prompt",
            "Tell me a story about a dragon.",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--timeout",
            "10s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rbee infer");
    let started = std::time::Instant::now();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("a first token");
    // Held still while the lock is taken, so that it cannot finish first on a slow machine (it
    // writes no record while it streams).
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let holder = crate::support::hold_audit_lock(env);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let (done, release) = std::sync::mpsc::channel::<()>();
    let releaser = std::thread::spawn(move || {
        let _ = release.recv_timeout(std::time::Duration::from_secs(45));
        drop(holder);
    });
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read stdout");
    let status = child.wait().expect("wait");
    let took = started.elapsed();
    let _ = done.send(());
    releaser.join().expect("releaser");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(10), "{stderr}");
    // The lock was held for 45 s unless the invocation ended: it ended at its 10 s budget.
    assert!(
        took < std::time::Duration::from_secs(20),
        "an invocation of a 10s budget waited {took:?} for the lock"
    );
    assert!(stderr.contains("audit.lock"), "{stderr}");
    assert!(stderr.contains("cannot record its end"), "{stderr}");
    assert!(
        !rest.trim().is_empty(),
        "the text printed was lost: {rest:?}"
    );
    // The node served and recorded it; this machine has the request but not its end.
    let mine = records(&env.path().join("state/audit.jsonl"));
    let last = mine
        .iter()
        .rev()
        .find(|r| r["event"] != "infer_attempt")
        .expect("a record");
    assert_eq!(last["event"], "infer_requested", "{mine:?}");
    let request_id = last["request_id"].as_str().unwrap_or_default().to_string();
    env.infer(&HI).expect(0);
    (stderr, request_id)
}

/// A hive stopped while another process holds its audit log's lock ends within the stop (its
/// last records wait 3 s, then are given up, and its log says so), instead of staying alive
/// behind the pidfile it has let go.
#[test]
fn a_hive_stopped_while_its_audit_lock_is_held_ends_and_says_its_last_records_were_lost() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let running = env.processes();
    assert!(!running.is_empty(), "no hive runs");
    let holder = crate::support::hold_audit_lock_in(&env.node_dir());
    env.run(&["hive", "stop", "n1"]).expect(0);
    let ended = crate::support::eventually(std::time::Duration::from_secs(10), || {
        running
            .iter()
            .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
    let left: Vec<_> = running
        .iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    drop(holder);
    assert!(ended, "the stopped hive still runs: {left:?}");
    let log = std::fs::read_to_string(env.node_dir().join("hive.log")).expect("hive.log");
    assert!(log.contains("are lost"), "{log}");
    // Nothing was written after the stop, by the hive or a thread it left behind.
    assert!(
        !records(&node_log(&env))
            .iter()
            .any(|r| r["event"] == "hive_stopped"),
        "hive_stopped was written although the lock was held"
    );
}
