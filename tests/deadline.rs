//! One budget per invocation, honoured on every hop: the worker stops at the deadline, a queued
//! request expires in the queue, Ctrl-C cancels the generation on the worker.

use std::time::Duration;

use crate::support::{Env, eventually, worker_health};

fn warm(env: &Env) {
    env.infer(&["--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
}

#[test]
fn the_deadline_stops_generation_keeps_the_text_and_exits_124() {
    let Some(env) = Env::new("") else { return };
    warm(&env);
    let mut args = crate::support::ENDLESS.to_vec();
    args.extend(["--timeout", "1s"]);
    let run = env.infer(&args);
    run.expect(124);
    assert!(!run.text().is_empty(), "no partial text: {}", run.stdout);
    let last = run.json_lines().pop().expect("a last line");
    assert_eq!(last["event"], "error");
    assert_eq!(last["code"], "deadline");
    assert_eq!(last["exit_code"], 124);
    assert!(
        run.stderr.contains("deadline of 1s exceeded"),
        "{}",
        run.stderr
    );
    // The breakdown once, in the message and in the error event alike.
    assert_eq!(
        run.stderr.matches("deadline of").count(),
        1,
        "{}",
        run.stderr
    );
    let message = last["message"].as_str().expect("a message");
    assert_eq!(message.matches("deadline of").count(), 1, "{message}");
    for stage in ["connect", "queue", "prefill", "decode"] {
        assert!(
            run.stderr.contains(stage),
            "no `{stage}` in: {}",
            run.stderr
        );
    }
    // The worker itself stopped at the deadline, and the hive has nothing in flight.
    assert!(
        eventually(Duration::from_secs(3), || idle(&worker_health(&env))),
        "the worker is still decoding after the deadline"
    );
    let health = worker_health(&env);
    assert_eq!(health["last"]["stop_reason"], "deadline", "{health}");
    assert_eq!(health["last"]["request_id"], last["request_id"]);
    assert!(
        eventually(Duration::from_secs(2), || {
            let workers = env.workers();
            workers[0]["in_flight"] == 0 && workers[0]["state"] == "ready"
        }),
        "the worker is not idle after the deadline"
    );
    // Plain mode: the partial text is on stdout, the breakdown on stderr.
    let mut plain = vec!["infer"];
    plain.extend(args);
    let run = env.run(&plain);
    run.expect(124);
    assert!(!run.stdout.is_empty());
    assert!(
        run.stderr.starts_with("rbee: deadline of 1s exceeded"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_budget_spent_before_the_hive_is_answered_at_once() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let body = serde_json::json!({
        "request_id": "spent",
        "model": "smollm2",
        "model_digest": "0".repeat(64),
        "system": null,
        "prompt": "Hi",
        "params": { "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": null }
    });
    let (status, reply) = env.signed(
        "POST",
        "/v1/infer",
        &[("x-rbee-budget-ms", "0")],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 504, "{reply}");
    assert!(reply.contains("\"code\":\"deadline\""), "{reply}");
    // No model was loaded for it.
    assert!(env.workers().is_empty());
}

#[test]
fn a_queued_request_expires_in_the_queue_without_generating() {
    let Some(env) = Env::new("") else { return };
    // One slot: the holder's generation takes it, the next request has to queue.
    env.edit_config("threads = 1\n", "threads = 1\nslots = 1\n");
    warm(&env);
    let (mut holder, _lines) = env.spawn_endless(&["--timeout", "60s"], 1);

    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "4", "--timeout", "1s"]);
    run.expect(124);
    assert!(
        run.text().is_empty(),
        "the queued request generated: {}",
        run.stdout
    );
    assert!(run.stderr.contains("queue"), "{}", run.stderr);
    let queued_id = run.json_lines().pop().expect("error line")["request_id"].clone();
    // It never reached the worker: the worker is still on the holder's generation.
    let health = worker_health(&env);
    let active = health["active"].as_array().expect("active list");
    assert_eq!(active.len(), 1, "{health}");
    assert_ne!(active[0]["request_id"], queued_id);
    assert_ne!(health["last"]["request_id"], queued_id);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    assert_eq!(holder.wait().expect("wait").code(), Some(130));
}

#[test]
fn ctrl_c_exits_130_and_the_worker_stops_decoding() {
    let Some(env) = Env::new("") else { return };
    warm(&env);
    let (mut child, lines) = env.spawn_endless(&[], 3);
    assert!(
        eventually(Duration::from_secs(5), || !env
            .run(&["--json", "worker", "list"])
            .stdout
            .contains("\"requests\":[]")),
        "the hive does not list the request in flight"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    let rest: Vec<String> = lines.map(|l| l.expect("read")).collect();
    let error: serde_json::Value =
        serde_json::from_str(rest.last().expect("an error line")).expect("JSON");
    assert_eq!(error["code"], "interrupted");
    // The worker noticed its client was gone and stopped long before max_tokens.
    assert!(
        eventually(Duration::from_secs(5), || idle(&worker_health(&env))),
        "the worker is still decoding after Ctrl-C"
    );
    let last = &worker_health(&env)["last"];
    assert_eq!(last["stop_reason"], "cancelled", "{last}");
    assert_eq!(last["request_id"], error["request_id"]);
    assert!(last["tokens_out"].as_u64().expect("tokens") < 100_000);
    assert!(env.workers()[0]["in_flight"] == 0);
}

#[test]
fn in_flight_requests_show_their_remaining_budget() {
    let Some(env) = Env::new("") else { return };
    warm(&env);
    let (mut child, _lines) = env.spawn_endless(&["--timeout", "20s"], 1);
    let list = env.run(&["--json", "worker", "list"]);
    let value: serde_json::Value = serde_json::from_str(list.stdout.trim()).expect("JSON");
    let request = &value["requests"][0];
    assert_eq!(request["stage"], "generating", "{value}");
    assert_eq!(request["model"], "smollm2");
    let remaining = request["remaining_ms"].as_u64().expect("remaining");
    assert!(remaining > 0 && remaining < 20_000, "{remaining}");
    let text = env.run(&["worker", "list"]);
    assert!(text.stdout.contains("BUDGET LEFT"), "{}", text.stdout);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_network_cut_between_queen_and_node_ends_in_124_within_the_budget() {
    use crate::support::netns::Netns;
    use crate::support::sshd::{self, ClientKey, Sshd};
    let Some(model) = crate::support::model() else {
        return;
    };
    if !sshd::available() {
        return;
    }
    let Some(ns) = Netns::create(1) else { return };
    let dir = crate::support::tempdir();
    let key = ClientKey::new(dir.path(), "client", "ed25519");
    let server = Sshd::start_in(
        &dir.path().join("sshd"),
        &[&key],
        Some((&ns.name, &ns.node_ip)),
    );
    std::fs::write(
        dir.path().join("known_hosts"),
        server.known_hosts_line_at(&ns.node_ip),
    )
    .expect("known_hosts");
    let config = format!(
        "{}[nodes.far]\nhost = {:?}\nport = {}\nuser = {:?}\nidentity_file = {:?}\n\
         known_hosts = {:?}\nremote_dir = {:?}\nhive_port = {}\nmodels = [\"smollm2\"]\npersist = \"0\"\n",
        crate::support::model_table(&model, crate::support::MODEL_SHA256),
        ns.node_ip,
        server.port,
        sshd::user(),
        key.private.display().to_string(),
        dir.path().join("known_hosts").display().to_string(),
        dir.path().join("node-far").display().to_string(),
        crate::support::free_port(),
    );
    let env = Env::from_dir(dir, crate::support::free_port(), &config);
    env.infer(&["--node", "far", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);

    let started = std::time::Instant::now();
    let (mut child, _lines) = env.spawn_endless(&["--node", "far", "--timeout", "4s"], 2);
    ns.link(false);
    let status = child.wait().expect("wait");
    let took = started.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    ns.link(true);
    assert_eq!(status.code(), Some(124), "{stderr}");
    assert!(took < Duration::from_millis(5500), "took {took:?}");
    assert!(stderr.contains("deadline of 4s exceeded"), "{stderr}");
    // The hive on the far side rode it out.
    env.run(&["hive", "status", "far"]).expect(0);
    env.infer(&["--node", "far", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

/// The worker decodes nothing.
fn idle(health: &serde_json::Value) -> bool {
    health["active"].as_array().is_some_and(Vec::is_empty)
}
