//! The fleet as one machine: `infer --model M` without a pinned node is placed on the best
//! node serving M, and moves to the next one while nothing of the answer has come back.

use std::time::{Duration, Instant};

use super::{Fleet, node};
use crate::support::eventually;

/// The worker of `node` as `worker list` shows it, if it has one.
fn worker_of(fleet: &Fleet, node: &str) -> serde_json::Value {
    let lines = fleet.json(&["worker", "list", "--node", node]);
    lines
        .first()
        .and_then(|l| l["workers"].as_array())
        .and_then(|w| w.iter().find(|w| w["model"] == "smollm2"))
        .cloned()
        .unwrap_or_default()
}

fn attempts(done: &serde_json::Value) -> Vec<(String, String)> {
    done["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("no attempts in {done}"))
        .iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap_or_default().to_string(),
                a["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_request_fails_over_past_an_unreachable_node_and_a_held_worker() {
    let Some(mut fleet) = Fleet::new(&[node("a"), node("b"), node("c")]) else {
        return;
    };
    // A worker that dies once is held: no restarts in a row are allowed.
    let config = std::fs::read_to_string(&fleet.env.config).expect("config");
    std::fs::write(
        &fleet.env.config,
        format!("{config}\n[restart]\nmax_attempts = 0\n"),
    )
    .expect("config");
    let env = &fleet.env;
    env.infer(&["--node", "b", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let pid = worker_of(&fleet, "b")["pid"]
        .as_i64()
        .expect("b's worker pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill b's worker");
    assert!(
        eventually(Duration::from_secs(10), || worker_of(&fleet, "b")["state"]
            == "failed"),
        "b's worker was not held"
    );
    // Node a's sshd goes away.
    drop(fleet.servers.remove(0));
    let env = &fleet.env;

    let run = env.infer(&["--model", "smollm2", "--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(0);
    let done = run.done();
    assert_eq!(done["node"], "c", "{done}");
    let tried = attempts(&done);
    assert!(
        tried.contains(&("a".into(), "unreachable".into())),
        "{tried:?}"
    );
    assert!(
        tried.contains(&("b".into(), "breaker_open".into())),
        "{tried:?}"
    );
    assert_eq!(tried.last(), Some(&("c".into(), "ok".into())), "{tried:?}");
    // Each attempt is on this machine's record.
    let trail = env.run(&["--json", "audit", "tail", "-n", "100000"]);
    let recorded: Vec<String> = trail
        .json_lines()
        .iter()
        .filter(|r| r["event"] == "infer_attempt")
        .map(|r| r["fields"]["node"].as_str().unwrap_or_default().to_string())
        .collect();
    for n in ["a", "b", "c"] {
        assert!(recorded.iter().any(|r| r == n), "{recorded:?}");
    }
}

#[test]
fn a_node_with_the_model_loaded_and_a_free_slot_is_chosen_first() {
    // A fixed count for the status line below (auto would be this machine's choice).
    let Some(fleet) = Fleet::build(&[node("a"), node("b")], true, "slots = 4\n") else {
        return;
    };
    let env = &fleet.env;
    // Both hives run; only b has the model loaded.
    env.run(&["hive", "start", "--all"]).expect(0);
    env.infer(&["--node", "b", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    assert!(worker_of(&fleet, "a").is_null(), "a has a worker already");
    for selector in [&["--model", "smollm2"][..], &["--node", "a,b"][..]] {
        let mut args = selector.to_vec();
        args.extend(["--prompt", "Hi", "--max-tokens", "1"]);
        let run = env.infer(&args);
        run.expect(0);
        let done = run.done();
        assert_eq!(done["node"], "b", "{selector:?}: {done}");
        assert!(done["timings_ms"]["load"].is_null(), "{done}");
    }
    // What the choice was made from, as `hive status` shows it.
    let status = env.run(&["hive", "status", "b"]);
    status.expect(0);
    assert!(
        status
            .stdout
            .contains("smollm2 (ready, 0/4 busy, 0 queued)"),
        "{}",
        status.stdout
    );
    // Pinned to a: it runs there, loading the model.
    let run = env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"]);
    run.expect(0);
    assert_eq!(run.done()["node"], "a");
}

#[test]
fn when_every_candidate_is_down_the_last_failure_decides_and_every_node_is_named() {
    let Some(mut fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    fleet.servers.clear();
    let env = &fleet.env;
    let started = Instant::now();
    let run = env.run(&[
        "infer",
        "--model",
        "smollm2",
        "--prompt",
        "Hi",
        "--timeout",
        "20s",
    ]);
    let took = started.elapsed();
    run.expect(4);
    for n in ["`a`", "`b`"] {
        assert!(run.stderr.contains(n), "{}", run.stderr);
    }
    assert!(
        run.stderr.contains("no node could serve `smollm2`"),
        "{}",
        run.stderr
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_free_node_first_in_the_file_is_chosen_without_waiting_for_a_node_that_never_answers() {
    let Some(mut fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    fleet
        .env
        .infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    // b's sshd gives way to a listener that accepts and never says a word: its probe could
    // only end when the probe's slice of the budget runs out.
    let port = fleet.servers[1].port;
    drop(fleet.servers.remove(1));
    let tarpit = std::net::TcpListener::bind(("127.0.0.1", port)).expect("b's port");
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for conn in tarpit.incoming().take(4) {
            conns.push(conn);
        }
        conns
    });
    let run = fleet
        .env
        .infer(&["--model", "smollm2", "--prompt", "Hi", "--max-tokens", "1"]);
    run.expect(0);
    let done = run.done();
    assert_eq!(done["node"], "a", "{done}");
    // b was never waited for: it is no attempt (a probe that ran out would be "unreachable").
    assert_eq!(attempts(&done), [("a".into(), "ok".into())], "{done}");
    drop(held);
}

#[test]
fn a_local_node_that_decides_the_choice_opens_no_ssh_connection() {
    let local = super::NodeSpec {
        name: "a",
        remote_dir: None,
        extra: "transport = \"local\"\n",
    };
    let Some(mut fleet) = Fleet::new(&[local, node("b")]) else {
        return;
    };
    fleet
        .env
        .infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    // b's sshd gives way to a listener that only counts the connections made to it: the kernel
    // completes each connect into its backlog whether or not it is accepted.
    let port = fleet.servers[1].port;
    drop(fleet.servers.remove(1));
    let counter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("b's port");
    counter.set_nonblocking(true).expect("nonblocking");
    let run = fleet
        .env
        .infer(&["--model", "smollm2", "--prompt", "Hi", "--max-tokens", "1"]);
    run.expect(0);
    let done = run.done();
    assert_eq!(done["node"], "a", "{done}");
    let connections = std::iter::from_fn(|| counter.accept().ok()).count();
    assert_eq!(
        connections, 0,
        "b was dialled although the loaded local node first in the file decided the choice"
    );
}
