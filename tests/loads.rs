//! Loads that outlive a request: a model load goes on after the request that started it gives
//! up (bounded by the model's `load_timeout`), `models load` and `hive start --preload` load
//! ahead of time, and `worker restart` loads a model that never ran.

use std::time::Duration;

use crate::support::{Env, eventually};

fn ready(env: &Env) -> Option<serde_json::Value> {
    env.workers()
        .into_iter()
        .find(|w| w["model"] == "smollm2" && w["state"] == "ready")
}

#[test]
fn a_load_goes_on_after_the_request_that_started_it_runs_out_of_budget() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    assert!(env.workers().is_empty(), "a fresh hive has no worker");
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2", "--timeout", "300ms"]);
    run.expect(124);
    let last = run.json_lines().pop().expect("a last line");
    assert_eq!(last["code"], "deadline", "{}", run.stdout);
    // The load the request started completes without it.
    assert!(
        eventually(Duration::from_secs(120), || ready(&env).is_some()),
        "the load ended with the request: {:?}",
        env.workers()
    );
    let worker = ready(&env).expect("a ready worker");
    std::thread::sleep(Duration::from_secs(10));
    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(
        done["timings_ms"]["load"].is_null(),
        "the next request loaded again: {done}"
    );
    assert_eq!(done["worker_pid"], worker["pid"]);
    // One load only, as the node's audit trail tells.
    let spawned = crate::support::records(&env.node_dir().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == "worker_spawned")
        .count();
    assert_eq!(spawned, 1);
}

#[test]
fn models_load_starts_the_hive_and_loads_the_model_ahead_of_a_request() {
    let Some(env) = Env::new("") else { return };
    let run = env.run(&["--json", "models", "load", "--node", "n1", "smollm2"]);
    run.expect(0);
    let value: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    assert_eq!(value["worker"]["state"], "ready", "{value}");
    // No spinner off a terminal.
    assert!(!run.stderr.contains("loading"), "{}", run.stderr);
    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(done["timings_ms"]["load"].is_null(), "{done}");
    assert_eq!(done["worker_pid"], value["worker"]["pid"]);
}

#[test]
fn worker_restart_loads_a_model_that_never_ran_and_hive_start_preloads() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    assert!(env.workers().is_empty());
    env.run(&["worker", "restart", "--node", "n1", "--model", "smollm2"])
        .expect(0);
    assert!(ready(&env).is_some(), "{:?}", env.workers());
    env.run(&["hive", "stop", "n1"]).expect(0);
    let run = env.run(&["--json", "hive", "start", "--preload", "n1"]);
    run.expect(0);
    assert!(ready(&env).is_some(), "{}", run.stdout);
    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(done["timings_ms"]["load"].is_null(), "{done}");
}
