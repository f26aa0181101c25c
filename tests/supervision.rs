//! Worker supervision with real processes and signals: restarts with growing backoff, giving up,
//! the circuit breaker, stuck workers, operator restarts, and the metrics that count them.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use crate::support::{Env, eventually, http};

fn signal(pid: i64, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

fn worker(env: &Env) -> serde_json::Value {
    env.workers().into_iter().next().expect("a worker")
}

/// Waits until the worker is ready again under a new pid; returns its info and the wait.
fn wait_restarted(env: &Env, old_pid: i64) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let mut info = serde_json::Value::Null;
    let back = eventually(Duration::from_secs(40), || {
        info = worker(env);
        info["state"] == "ready" && info["pid"].as_i64().is_some_and(|p| p != old_pid)
    });
    assert!(back, "the worker did not come back: {info}");
    (info, started.elapsed())
}

fn metric(env: &Env, name: &str) -> f64 {
    let (status, body) = http(env.socket(), "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric `{name}` in:\n{body}"))
}

/// With the hive's low-memory threshold above what the machine has available, a SIGKILL from
/// outside reads as the OOM killer's (with the default threshold it reads as `signal`, as the
/// test below checks).
#[test]
fn a_worker_sigkilled_while_memory_is_low_reads_as_likely_oom() {
    let Some(env) = Env::new("") else { return };
    let first = env
        .command(&["--json", "infer", "--prompt", "Hi", "--max-tokens", "2"])
        .env("RBEE_LOW_MEMORY_PERCENT", "100")
        .output()
        .expect("run rbee");
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let (info, _) = wait_restarted(&env, pid);
    assert_eq!(info["last_exit_reason"], "likely_oom", "{info}");
    assert!(
        info["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("memory was low")),
        "{info}"
    );
}

#[test]
fn a_worker_killed_mid_generation_fails_the_request_and_comes_back() {
    let Some(env) = Env::new("") else { return };
    let first = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    first.expect(0);
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    let (mut child, lines) = env.spawn_endless(&[], 3);
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7));
    let rest: Vec<String> = lines.map(|l| l.expect("read")).collect();
    let error: serde_json::Value =
        serde_json::from_str(rest.last().expect("error line")).expect("JSON");
    assert_eq!(error["code"], "worker_unavailable");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("SIGKILL"),
        "{error}"
    );

    let (info, waited) = wait_restarted(&env, pid);
    let backoff = info["last_backoff_ms"].as_u64().expect("backoff");
    assert!((1000..2000).contains(&backoff), "{info}");
    assert!(
        waited >= Duration::from_millis(backoff) - Duration::from_millis(300),
        "{waited:?}"
    );
    assert_eq!(info["restart_count"], 1);
    // Killed from outside, on a machine with memory to spare: a signal, not the OOM killer.
    assert_eq!(info["last_exit"], "signal SIGKILL (not sent by the hive)");
    assert_eq!(info["last_exit_reason"], "signal");
    let last = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    last.expect(0);

    assert_eq!(metric(&env, "rbee_worker_restarts_total"), 1.0);
    assert_eq!(metric(&env, "rbee_worker_exits_total"), 1.0);
    assert_eq!(
        metric(
            &env,
            "rbee_worker_exits_by_reason_total{model=\"smollm2\",reason=\"signal\"}"
        ),
        1.0
    );
    assert_eq!(metric(&env, "rbee_requests_total{outcome=\"error\"}"), 1.0);
    assert_eq!(metric(&env, "rbee_requests_total{outcome=\"ok\"}"), 2.0);
    assert_eq!(metric(&env, "rbee_workers{state=\"ready\"}"), 1.0);
    // The tokens of the two requests that finished (either may end early on its end token).
    let tokens = |run: &crate::support::Run| run.done()["tokens_out"].as_f64().expect("tokens");
    assert_eq!(
        metric(&env, "rbee_tokens_generated_total"),
        tokens(&first) + tokens(&last)
    );
    assert_eq!(metric(&env, "rbee_time_to_first_token_seconds_count"), 3.0);
}

#[test]
fn repeated_crashes_back_off_longer_each_time_then_the_worker_is_held_failed() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let mut pid = worker(&env)["pid"].as_i64().expect("pid");
    let mut floor = 1000;
    for restart in 1..=3 {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
        let (info, waited) = wait_restarted(&env, pid);
        let backoff = info["last_backoff_ms"].as_u64().expect("backoff");
        assert!(
            (floor..floor * 2).contains(&backoff),
            "restart {restart}: {info}"
        );
        assert!(waited >= Duration::from_millis(backoff) - Duration::from_millis(300));
        assert_eq!(info["restart_count"], restart);
        pid = info["pid"].as_i64().expect("pid");
        floor *= 2;
    }
    // The fourth crash in a row exhausts max_attempts = 3.
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let mut info = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(5), || {
        info = worker(&env);
        info["state"] == "failed"
    }));
    assert_eq!(info["restart_count"], 3);
    assert_eq!(info["breaker"], "open");
    assert!(info["breaker_closes_at"].as_u64().is_some());
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(7);
    assert!(run.stderr.contains("circuit breaker"), "{}", run.stderr);
    assert!(run.stderr.contains("held back for"), "{}", run.stderr);
    let table = env.run(&["worker", "list"]);
    assert!(table.stdout.contains("failed"), "{}", table.stdout);

    // An operator restart clears it, and the node's audit log says so.
    env.run(&["worker", "restart", "--node", "n1", "--model", "smollm2"])
        .expect(0);
    let info = worker(&env);
    assert_eq!(info["state"], "ready");
    assert_eq!(info["id"], format!("smollm2@{}", info["pid"]));
    let log = std::fs::read_to_string(env.node_dir().join("audit.jsonl")).expect("audit");
    assert!(log.contains("\"breaker_opened\"") && log.contains("\"breaker_closed\""));
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn the_circuit_breaker_opens_after_failures_within_its_window() {
    let Some(env) = Env::new("") else { return };
    env.append_config(
        "[restart]\nmax_attempts = 10\nbackoff_initial = \"100ms\"\nbackoff_max = \"200ms\"\n\
         breaker_failures = 3\nbreaker_window = \"1m\"\n",
    );
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let mut pid = worker(&env)["pid"].as_i64().expect("pid");
    for _ in 0..2 {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
        pid = wait_restarted(&env, pid).0["pid"].as_i64().expect("pid");
    }
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let mut info = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(5), || {
        info = worker(&env);
        info["state"] == "failed"
    }));
    let reason = info["failed_reason"].as_str().expect("reason");
    assert!(
        reason.contains("circuit breaker open after 3 failures within 1m"),
        "{info}"
    );
    assert_eq!(metric(&env, "rbee_breaker_opens_total"), 1.0);
    assert_eq!(metric(&env, "rbee_workers{state=\"failed\"}"), 1.0);
}

#[test]
fn a_stopped_busy_worker_is_detected_as_stuck_and_replaced() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    let (mut child, lines) = env.spawn_endless(&[], 1);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7));
    let rest: Vec<String> = lines.map(|l| l.expect("read")).collect();
    let error: serde_json::Value =
        serde_json::from_str(rest.last().expect("error line")).expect("JSON");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("stuck"),
        "{error}"
    );
    let (info, _) = wait_restarted(&env, pid);
    assert_eq!(info["restart_count"], 1);
    assert_eq!(info["last_exit_reason"], "stuck", "{info}");
    assert_eq!(metric(&env, "rbee_worker_stuck_kills_total"), 1.0);
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn an_idle_worker_that_stops_answering_is_replaced() {
    // One miss is enough here, so that the test does not wait out three.
    let Some(env) = Env::new("health_misses = 1\n") else {
        return;
    };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let (info, _) = wait_restarted(&env, pid);
    assert_eq!(
        info["last_exit"],
        "signal SIGKILL (killed by the hive: it missed its health checks)"
    );
    assert_eq!(info["last_exit_reason"], "health");
    assert_eq!(metric(&env, "rbee_worker_stuck_kills_total"), 1.0);
    assert_eq!(
        metric(
            &env,
            "rbee_worker_exits_by_reason_total{model=\"smollm2\",reason=\"health\"}"
        ),
        1.0
    );
    // The audit trail says why.
    let exited: Vec<serde_json::Value> =
        crate::support::records(&env.node_dir().join("audit.jsonl"))
            .into_iter()
            .filter(|r| r["event"] == "worker_exited")
            .collect();
    assert_eq!(exited.len(), 1, "{exited:?}");
    assert_eq!(exited[0]["fields"]["reason"], "health", "{}", exited[0]);
}

#[test]
fn an_idle_worker_that_misses_one_health_check_is_not_killed() {
    // The default: three misses in a row. A check starts every 5 s and is missed when it
    // starts at least 2 s (its timeout) before the worker continues: a stop of 9 s has one or
    // two such starts, never three.
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(9));
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let info = worker(&env);
    assert_eq!(info["pid"].as_i64(), Some(pid), "{info}");
    assert_eq!(info["restart_count"], 0, "{info}");
    assert_eq!(metric(&env, "rbee_worker_stuck_kills_total"), 0.0);
    // It really missed one: the hive's log says so.
    let log = std::fs::read_to_string(env.node_dir().join("hive.log")).expect("hive.log");
    assert!(
        log.contains("missed a health check (1 of 3 in a row)"),
        "{log}"
    );
    assert!(!log.contains("in a row; killing it"), "{log}");
}

#[test]
fn a_stopping_hive_lets_the_request_in_flight_finish() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let mut child = env.spawn(&[
        "--json",
        "infer",
        "--prompt",
        "Tell me a story.",
        "--temperature",
        "5",
        "--top-p",
        "1",
        "--max-tokens",
        "120",
    ]);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    lines.next().expect("a token").expect("read");
    env.run(&["hive", "stop", "n1"]).expect(0);
    let status = child.wait().expect("wait");
    let rest: Vec<String> = lines.map(|l| l.expect("read")).collect();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    let done: serde_json::Value = serde_json::from_str(rest.last().expect("done")).expect("JSON");
    // At temperature 5 the model may also draw its end token: the generation ran its course
    // either way, and was not cut by the stop.
    match done["stop_reason"].as_str() {
        Some("max_tokens") => assert_eq!(done["tokens_out"], 120),
        Some("eos") => {}
        other => panic!("the stop cut the generation short: {other:?} in {done}"),
    }
    env.run(&["hive", "status", "n1"]).expect(6);
}

/// A node whose audit log another writer holds (a stuck rbee, a hung disk) still restarts its
/// crashed workers, and lists a worker whose exit it has yet to handle; the exits are recorded,
/// in order, once the log is free again.
#[test]
fn workers_that_crash_while_the_nodes_audit_log_is_held_are_listed_and_come_back() {
    let Some(env) = Env::new("") else { return };
    env.add_model("second");
    env.run(&["hive", "start", "n1"]).expect(0);
    for model in ["smollm2", "second"] {
        env.run(&[
            "--json", "worker", "restart", "--node", "n1", "--model", model,
        ])
        .expect(0);
    }
    let pid_of = |model: &str| {
        env.workers()
            .into_iter()
            .find(|w| w["model"] == model)
            .and_then(|w| w["pid"].as_i64())
            .unwrap_or_else(|| panic!("no worker of `{model}`"))
    };
    let pids = [pid_of("smollm2"), pid_of("second")];

    let holder = crate::support::hold_audit_lock_in(&env.node_dir());
    signal(pids[0], nix::sys::signal::Signal::SIGKILL);
    // The first exit reaches the supervisor before the second is sent.
    assert!(
        eventually(Duration::from_secs(10), || env
            .workers()
            .iter()
            .any(|w| w["model"] == "smollm2" && w["pid"] != pids[0])),
        "the first exit was not taken"
    );
    signal(pids[1], nix::sys::signal::Signal::SIGKILL);
    let mut listed = Vec::new();
    let back = eventually(Duration::from_secs(40), || {
        listed = env.workers();
        assert_eq!(
            listed.len(),
            2,
            "a worker went missing from the list: {listed:?}"
        );
        listed
            .iter()
            .all(|w| w["state"] == "ready" && w["pid"].as_i64().is_some_and(|p| !pids.contains(&p)))
    });
    assert!(
        back,
        "the workers did not come back while the log was held: {listed:?}"
    );
    drop(holder);

    // Each exit is recorded before its worker's restart.
    let mut events = Vec::new();
    let recorded = eventually(Duration::from_secs(10), || {
        events = crate::support::records(&env.node_dir().join("audit.jsonl"))
            .into_iter()
            .filter(|r| r["event"] == "worker_exited" || r["event"] == "worker_restarted")
            .map(|r| (r["event"].clone(), r["fields"]["model"].clone()))
            .collect();
        events.len() == 4
    });
    assert!(recorded, "{events:?}");
    for model in ["smollm2", "second"] {
        let of: Vec<_> = events
            .iter()
            .filter(|(_, m)| m == model)
            .map(|(e, _)| e)
            .collect();
        assert_eq!(of, ["worker_exited", "worker_restarted"], "{events:?}");
    }
}

/// A worker that crashed, of a model removed from the node's models during its backoff, is
/// not brought back: the restart finds the model gone.
#[test]
fn a_crashed_worker_of_a_model_removed_meanwhile_is_not_restarted() {
    let Some(env) = Env::new("") else { return };
    env.append_config("[restart]\nbackoff_initial = \"8s\"\nbackoff_max = \"8s\"\n");
    env.add_model("second");
    env.run(&["hive", "start", "n1"]).expect(0);
    env.run(&[
        "--json", "worker", "restart", "--node", "n1", "--model", "second",
    ])
    .expect(0);
    let pid = worker(&env)["pid"].as_i64().expect("pid");
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let mut info = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(5), || {
            info = worker(&env);
            info["state"] == "restarting" && info["last_backoff_ms"].is_u64()
        }),
        "the exit was not taken: {info}"
    );
    let backoff = Duration::from_millis(info["last_backoff_ms"].as_u64().expect("backoff"));
    env.edit_config(
        "models = [\"smollm2\", \"second\"]",
        "models = [\"smollm2\"]",
    );
    env.run(&["hive", "start", "n1"]).expect(0);
    // Past the backoff (jittered), with a load's time besides.
    std::thread::sleep(backoff + Duration::from_secs(5));
    let listed = env.workers();
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(metric(&env, "rbee_worker_restarts_total"), 0.0);
}
