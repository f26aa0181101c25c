//! Auto slots: a model without `slots` gets a count the hive derives on the node from its
//! memory and the model, shown by `worker list` and enforced by the hive's queue; an explicit
//! `slots` stays what it says. The host's available memory is played by
//! `RBEE_TEST_MEM_AVAILABLE`, given to the hive as it starts.

use std::process::Child;
use std::time::Duration;

use crate::support::{ENDLESS, Env, eventually, worker_health};

/// Context per slot in these tests: a small KV cache per slot (11.25 MiB for this model).
const CONTEXT: u32 = 512;

/// What the hive keeps beside the KV cache for this model: the file, a quarter of it, and
/// 128 MiB of overhead (`hive::memory`); and one slot's KV cache at `CONTEXT`.
fn kept_and_one_slot() -> (u64, u64) {
    let model = crate::support::model().expect("the model Env::new found");
    let size = std::fs::metadata(&model).expect("the model").len();
    let shape = rbee::hive::gguf::shape(&model).expect("the model's GGUF header");
    let kv = rbee::hive::memory::kv_bytes(&shape, Some(CONTEXT), 1);
    (size + size / 4 + (128 << 20), kv)
}

/// An environment whose model has `CONTEXT` and the `slots` line given (none: auto), on the CPU.
fn env(slots: &str) -> Option<Env> {
    let env = Env::new("")?;
    env.edit_config(
        "threads = 1\n",
        &format!("threads = 1\ncontext = {CONTEXT}\ngpu_layers = 0\n{slots}"),
    );
    Some(env)
}

/// (Re)starts the node's hive with `memory` bytes standing for the host's available memory.
fn hive_with_memory(env: &Env, memory: u64) {
    env.run(&["hive", "stop", "n1"]).expect(0);
    let out = env
        .command(&["hive", "start", "n1"])
        .env("RBEE_TEST_MEM_AVAILABLE", memory.to_string())
        .output()
        .expect("hive start");
    crate::support::Run::from(out).expect(0);
}

/// The model's worker loaded (one short request), and the slots `worker list --json` shows.
fn loaded_slots(env: &Env) -> u64 {
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let workers = env.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    workers[0]["slots"].as_u64().expect("slots")
}

/// The `slots` of the first worker anywhere in `value` (`hive status --json` nests them).
fn slots_in(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Object(map)
            if map.contains_key("model") && map.contains_key("slots") =>
        {
            map["slots"].as_u64()
        }
        serde_json::Value::Object(map) => map.values().find_map(slots_in),
        serde_json::Value::Array(items) => items.iter().find_map(slots_in),
        _ => None,
    }
}

fn interrupt(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
}

#[test]
fn auto_slots_follow_the_nodes_memory_and_that_many_requests_run_at_once() {
    let Some(env) = env("") else { return };
    let (kept, slot) = kept_and_one_slot();
    // Auto spends half the room beside the weights on KV: 7 slots of room hold 3.
    hive_with_memory(&env, kept + 7 * slot);
    assert_eq!(loaded_slots(&env), 3);

    // Three endless generations decode at once; a fourth waits in the hive's queue.
    let mut children: Vec<Child> = (0..3)
        .map(|_| {
            let mut args = vec!["--json", "infer"];
            args.extend(ENDLESS);
            env.spawn(&args)
        })
        .collect();
    let active = || worker_health(&env)["active"].as_array().map_or(0, Vec::len);
    assert!(
        eventually(Duration::from_secs(60), || active() == 3),
        "three requests never decoded together with 3 auto slots: {}",
        worker_health(&env)
    );
    let mut args = vec!["--json", "infer"];
    args.extend(ENDLESS);
    children.push(env.spawn(&args));
    assert!(
        eventually(Duration::from_secs(30), || env.workers()[0]["queued"] == 1),
        "the fourth request was not queued: {:?}",
        env.workers()
    );
    let workers = env.workers();
    assert_eq!(workers[0]["in_flight"], 3, "{workers:?}");
    assert_eq!(active(), 3, "a fourth generation joined 3 slots");
    for child in &children {
        interrupt(child);
    }
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(130), "{out:?}");
    }

    // Less memory, fewer slots: 5 slots of room hold 2.
    hive_with_memory(&env, kept + 5 * slot);
    assert_eq!(loaded_slots(&env), 2);
    // Room for the weights but not one slot's KV cache: refused before loading, as a model
    // with `slots = 1` would be.
    hive_with_memory(&env, kept + slot - 1);
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(7);
    assert!(run.stderr.contains("not enough memory"), "{}", run.stderr);
    assert!(env.workers().is_empty(), "{:?}", env.workers());
    // Room for exactly one: one, never none.
    hive_with_memory(&env, kept + slot);
    assert_eq!(loaded_slots(&env), 1);
}

#[test]
fn ample_memory_gives_the_cpu_cap_and_an_explicit_count_stays_what_it_says() {
    let Some(env) = env("") else { return };
    let (kept, slot) = kept_and_one_slot();
    // Room for hundreds of slots: the CPU's cap of 8.
    hive_with_memory(&env, kept + 1000 * slot);
    assert_eq!(loaded_slots(&env), 8);
    let status = env.run(&["--json", "hive", "status", "n1"]);
    status.expect(0);
    let status: serde_json::Value = serde_json::from_str(status.stdout.trim()).expect("JSON");
    assert_eq!(slots_in(&status), Some(8), "{status}");
    let table = env.run(&["worker", "list"]);
    table.expect(0);
    assert!(table.stdout.contains(" 0/8 "), "{}", table.stdout);

    // `slots = 2` with the same memory: 2, on the next request's spec.
    env.edit_config("gpu_layers = 0\n", "gpu_layers = 0\nslots = 2\n");
    assert_eq!(loaded_slots(&env), 2);
    assert_eq!(worker_health(&env)["slots"], 2);
    // Back to auto ("auto" spelled out): 8 again.
    env.edit_config("slots = 2\n", "slots = \"auto\"\n");
    assert_eq!(loaded_slots(&env), 8);
    assert_eq!(worker_health(&env)["slots"], 8);
}

#[test]
fn a_batch_opens_as_many_requests_per_node_as_the_hive_gave_auto_slots() {
    let Some(env) = env("") else { return };
    let (kept, slot) = kept_and_one_slot();
    // 13 slots of room: auto takes 6, more than the 4 a queen counts before the hive says.
    hive_with_memory(&env, kept + 13 * slot);
    assert_eq!(loaded_slots(&env), 6);
    // After its first item the batch opens the rest the worker's slots allow: 6 at once.
    let input: String = (0..8)
        .map(|i| {
            serde_json::json!({
                "id": format!("b{i}"), "prompt": "Tell me a story.", "max_tokens": 200,
                "temperature": 5.0, "top_p": 1.0, "seed": i,
            })
            .to_string()
                + "\n"
        })
        .collect();
    let path = env.path().join("in.jsonl");
    std::fs::write(&path, input).expect("input");
    let batch = env.spawn(&["batch", path.to_str().expect("path")]);
    let active = || worker_health(&env)["active"].as_array().map_or(0, Vec::len);
    let mut most = 0;
    let reached = eventually(Duration::from_secs(120), || {
        most = most.max(active());
        most >= 6
    });
    let out = batch.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    assert!(reached, "at most {most} items decoded at once over 6 slots");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 8);
}
