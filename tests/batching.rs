//! Continuous batching: concurrent requests for one model share one worker and one llama.cpp
//! context, one KV sequence each, and each comes out as it would alone.

use std::process::Child;
use std::time::{Duration, Instant};

use crate::support::{Env, Run, worker_health};

/// Requests of different lengths and samplers: greedy, and seeded sampling at two temperatures.
const REQUESTS: [&[&str]; 4] = [
    &[
        "--prompt",
        "Write a long, detailed essay about the history of the bicycle.",
        "--max-tokens",
        "70",
        "--temperature",
        "0",
    ],
    &[
        "--prompt",
        "Tell me a story about a dragon.",
        "--max-tokens",
        "45",
        "--temperature",
        "0.9",
        "--seed",
        "7",
    ],
    &[
        "--prompt",
        "List some uses of copper.",
        "--max-tokens",
        "25",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "42",
    ],
    &[
        "--system",
        "You answer in one short paragraph.",
        "--prompt",
        "How does TCP work?",
        "--max-tokens",
        "55",
        "--temperature",
        "0",
    ],
];

fn infer_args(args: &[&'static str]) -> Vec<&'static str> {
    let mut all = vec!["--json", "infer"];
    all.extend_from_slice(args);
    all
}

/// Gives the model four slots and runs each of `REQUESTS` alone, one after the other: the
/// reference texts.
fn four_slots_and_each_alone(env: &Env) -> Vec<Run> {
    env.edit_config("threads = 1\n", "threads = 1\nslots = 4\n");
    REQUESTS
        .iter()
        .map(|args| {
            let run = env.run(&infer_args(args));
            run.expect(0);
            run
        })
        .collect()
}

#[test]
fn concurrent_requests_are_decoded_together_and_match_what_each_gives_alone() {
    let Some(env) = Env::new("") else { return };
    // Four slots, so that the fifth request waits for one.
    let alone = four_slots_and_each_alone(&env);
    let pid = alone[0].done()["worker_pid"].clone();

    // Together: an endless generation holds one slot and is cancelled part way; the four others
    // join it (one of them waits for a slot until the endless one goes).
    let (mut endless, _lines) = env.spawn_endless(&[], 2);
    let children: Vec<Child> = REQUESTS
        .iter()
        .map(|args| env.spawn(&infer_args(args)))
        .collect();
    let started = Instant::now();
    let mut most_active = 0;
    let mut cancelled = false;
    while started.elapsed() < Duration::from_secs(60) {
        let health = worker_health(&env);
        let active = health["active"].as_array().map_or(0, Vec::len);
        most_active = most_active.max(active);
        if !cancelled && active >= 4 {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(endless.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .expect("SIGINT");
            cancelled = true;
        }
        if cancelled && active == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cancelled, "the worker never decoded 4 generations at once");
    assert!(
        most_active <= 4,
        "the worker decoded {most_active} at once with 4 slots"
    );
    assert_eq!(endless.wait().expect("wait").code(), Some(130));

    for ((args, child), alone) in REQUESTS.iter().zip(children).zip(&alone) {
        let run = Run::from(child.wait_with_output().expect("wait"));
        run.expect(0);
        let (done, reference) = (run.done(), alone.done());
        assert_eq!(done["worker_pid"], pid, "another worker served {args:?}");
        assert_eq!(
            run.text(),
            alone.text(),
            "{args:?} gave another text batched than alone"
        );
        assert_eq!(done["tokens_out"], reference["tokens_out"], "{args:?}");
        assert_eq!(done["stop_reason"], reference["stop_reason"], "{args:?}");
    }
    let workers = env.workers();
    assert_eq!(workers[0]["in_flight"], 0, "{workers:?}");
    assert_eq!(workers[0]["restart_count"], 0, "{workers:?}");
}

/// A model with `kv_unified = true` (one KV cache shared by its slots, as llama-server has it)
/// gets a worker started with that cache, which decodes concurrent requests together and ends
/// each as it asked.
#[test]
fn a_model_with_a_unified_kv_cache_serves_concurrent_requests() {
    let Some(env) = Env::new("") else { return };
    env.edit_config("threads = 1\n", "threads = 1\nkv_unified = true\n");
    let greedy = |prompt: &'static str| {
        infer_args(&[
            "--prompt",
            prompt,
            "--max-tokens",
            "30",
            "--temperature",
            "0",
        ])
    };
    // An endless generation starts the worker and holds one slot; three more join it.
    let (mut endless, _lines) = env.spawn_endless(&[], 2);
    let health = worker_health(&env);
    let pid = health["pid"].as_u64().expect("the worker's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the worker's cmdline");
    assert!(
        cmdline.split(|&b| b == 0).any(|arg| arg == b"--kv-unified"),
        "the worker was not started with a unified KV cache: {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    );
    let prompts = [
        "Write about the history of the bicycle.",
        "List some uses of copper.",
        "How does TCP work?",
    ];
    let children: Vec<Child> = prompts.iter().map(|p| env.spawn(&greedy(p))).collect();
    let started = Instant::now();
    let mut most_active = 0;
    while started.elapsed() < Duration::from_secs(60) && most_active < 4 {
        let active = worker_health(&env)["active"].as_array().map_or(0, Vec::len);
        most_active = most_active.max(active);
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(endless.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    assert_eq!(endless.wait().expect("wait").code(), Some(130));
    assert_eq!(
        most_active, 4,
        "the worker never decoded the 4 requests together"
    );
    for (prompt, child) in prompts.iter().zip(children) {
        let run = Run::from(child.wait_with_output().expect("wait"));
        run.expect(0);
        let done = run.done();
        assert_eq!(done["worker_pid"], pid, "another worker served {prompt:?}");
        assert!(!run.text().is_empty(), "{prompt:?} gave no text");
        let stop = done["stop_reason"].as_str().unwrap_or_default().to_string();
        assert!(
            stop == "max_tokens" && done["tokens_out"] == 30 || stop == "eos",
            "{prompt:?} ended with {done}"
        );
    }
    let workers = env.workers();
    assert_eq!(workers[0]["restart_count"], 0, "{workers:?}");
}

/// Requests that reach the worker together (queued on its socket while it could not run, as a
/// script's parallel calls queue during a pass) are prefilled in one pass, and each still comes
/// out as it does alone: the prompts differ in length, so llama.cpp runs their common length in
/// one ubatch and the rest of the longer ones after it.
#[test]
fn prompts_that_arrive_together_share_one_prefill_pass_and_match_what_each_gives_alone() {
    let Some(env) = Env::new("") else { return };
    let alone = four_slots_and_each_alone(&env);
    let before = worker_health(&env);
    let pid = before["pid"].as_i64().expect("the worker's pid");
    let held = crate::support::HeldWorker::stop(pid);
    let children: Vec<Child> = REQUESTS
        .iter()
        .map(|args| env.spawn(&infer_args(args)))
        .collect();
    // All four wait on the worker's socket.
    let handed = held.handed(&env, REQUESTS.len(), Duration::from_secs(30));
    drop(held);
    assert!(
        handed,
        "the hive never handed the four requests to the worker"
    );
    for ((args, child), alone) in REQUESTS.iter().zip(children).zip(&alone) {
        let run = Run::from(child.wait_with_output().expect("wait"));
        run.expect(0);
        assert_eq!(
            run.done()["worker_pid"],
            pid,
            "another worker served {args:?}"
        );
        assert_eq!(
            run.text(),
            alone.text(),
            "{args:?} gave another text prefilled with the others than alone"
        );
    }
    let after = worker_health(&env);
    let delta =
        |field: &str| after[field].as_u64().unwrap_or(0) - before[field].as_u64().unwrap_or(0);
    let (passes, chunks) = (delta("prefill_passes"), delta("prefill_chunks"));
    // One pass, unless a loaded machine shrank the pass budget below the four prompts: then
    // two, with one prompt cut across them. Alone, each prompt takes a pass of its own.
    assert!(
        chunks >= 4 && passes < 4,
        "the four prompts were not prefilled together ({passes} passes, {chunks} chunks): {after}"
    );
}
