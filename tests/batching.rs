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

#[test]
fn concurrent_requests_are_decoded_together_and_match_what_each_gives_alone() {
    let Some(env) = Env::new("") else { return };
    // Alone, one after the other: the reference texts.
    let alone: Vec<Run> = REQUESTS
        .iter()
        .map(|args| {
            let run = env.run(&infer_args(args));
            run.expect(0);
            run
        })
        .collect();
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
