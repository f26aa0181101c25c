//! `rbee infer` through the real path: CLI -> hive daemon -> worker -> llama.cpp.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use crate::support::{Env, eventually};

const LONG: &str = "Write a long, detailed essay about the history of the bicycle.";

#[test]
fn text_streams_before_the_generation_has_finished() {
    let Some(env) = Env::new("") else { return };
    let mut child = env.spawn(&[
        "--json",
        "infer",
        "--prompt",
        LONG,
        "--max-tokens",
        "120",
        "--temperature",
        "0",
    ]);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first line").expect("read");
    let first: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(first["event"], "token");
    // The first token is on our side of the pipe while rbee is still generating.
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "rbee had already exited when its first token was read"
    );
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("JSON"))
        .collect();
    assert!(child.wait().expect("wait").success());
    let done = rest.last().expect("a done line");
    assert_eq!(done["event"], "done");
    assert_eq!(done["tokens_out"], 120);
    assert!(rest.len() > 50, "only {} lines after the first", rest.len());
}

#[test]
fn max_tokens_bounds_the_output_and_says_why_it_stopped() {
    let Some(env) = Env::new("") else { return };
    let run = env.infer(&["--prompt", LONG, "--max-tokens", "8", "--temperature", "0"]);
    run.expect(0);
    let done = run.done();
    assert_eq!(done["tokens_out"], 8);
    assert_eq!(done["stop_reason"], "max_tokens");
    let tokens = run
        .json_lines()
        .iter()
        .filter(|l| l["event"] == "token")
        .count();
    assert!((1..=8).contains(&tokens), "{tokens} token events");
    assert_eq!(
        run.json_lines()
            .iter()
            .filter(|l| l["event"] == "done")
            .count(),
        1
    );
    // Every field of the contract's done event is there.
    for key in [
        "request_id",
        "node",
        "model",
        "tokens_in",
        "tokens_out",
        "stop_reason",
        "timings_ms",
    ] {
        assert!(!done[key].is_null(), "done event lacks `{key}`: {done}");
    }
    assert_eq!(done["node"], "n1");
    assert_eq!(done["model"], "smollm2");
    assert!(done["tokens_in"].as_u64().expect("tokens_in") > 5);
    assert!(done["timings_ms"]["prefill"].as_f64().expect("prefill") > 0.0);
    assert!(done["timings_ms"]["decode"].as_f64().expect("decode") > 0.0);
}

#[test]
fn a_short_answer_stops_at_end_of_generation() {
    let Some(env) = Env::new("") else { return };
    let run = env.infer(&[
        "--prompt",
        "Reply with the single word: yes",
        "--max-tokens",
        "200",
        "--temperature",
        "0",
    ]);
    run.expect(0);
    let done = run.done();
    assert_eq!(done["stop_reason"], "eos", "{done}");
    assert!(done["tokens_out"].as_u64().expect("tokens_out") < 200);
}

#[test]
fn same_seed_gives_the_same_text() {
    let Some(env) = Env::new("") else { return };
    let args = ["--prompt", "Name three colours.", "--max-tokens", "24"];
    let greedy = |env: &Env| {
        let mut a = args.to_vec();
        a.extend(["--temperature", "0", "--seed", "7"]);
        env.infer(&a).expect(0).text()
    };
    let first = greedy(&env);
    assert!(!first.trim().is_empty());
    assert_eq!(first, greedy(&env));
    // Sampling at a temperature is reproducible with the same seed too.
    let sampled = |seed: &str| {
        let mut a = args.to_vec();
        a.extend(["--temperature", "1.0", "--seed", seed]);
        env.infer(&a).expect(0).text()
    };
    assert_eq!(sampled("42"), sampled("42"));
}

#[test]
fn plain_output_is_the_text_alone() {
    let Some(env) = Env::new("") else { return };
    let args = [
        "--prompt",
        "Name three colours.",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
    ];
    let json = env.infer(&args).expect(0).text();
    let mut plain_args = vec!["infer"];
    plain_args.extend_from_slice(&args);
    let plain = env.run(&plain_args);
    plain.expect(0);
    assert_eq!(
        plain.stdout.trim_end_matches('\n'),
        json.trim_end_matches('\n')
    );
    assert!(plain.stdout.ends_with('\n'));
    // stderr is not a terminal here: no summary line, nothing at all.
    assert_eq!(plain.stderr, "");
}

#[test]
fn prompt_from_stdin() {
    let Some(env) = Env::new("") else { return };
    let args = [
        "--json",
        "infer",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let mut with_flag = args.to_vec();
    with_flag.extend(["--prompt", "What is the capital of France?"]);
    let expected = env.run(&with_flag).expect(0).text();
    let mut from_stdin = args.to_vec();
    from_stdin.extend(["--prompt", "-"]);
    let run = env.run_with_stdin(&from_stdin, b"What is the capital of France?\n");
    run.expect(0);
    assert_eq!(run.text(), expected);
    let bad = env.run_with_stdin(&from_stdin, b"caf\xe9\n");
    bad.expect(8);
    assert!(bad.stderr.contains("not valid UTF-8"), "{}", bad.stderr);
}

#[test]
fn concurrent_invocations_all_succeed_on_one_worker() {
    let Some(env) = Env::new("") else { return };
    let children: Vec<_> = (0..4)
        .map(|i| {
            let prompt = format!("Count from {i} to {}.", i + 5);
            env.spawn(&["--json", "infer", "--prompt", &prompt, "--max-tokens", "16"])
        })
        .collect();
    let mut pids = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let done: serde_json::Value =
            serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON");
        assert_eq!(done["event"], "done");
        pids.push(done["worker_pid"].as_u64().expect("worker pid"));
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "requests were served by several workers: {pids:?}"
    );
    assert_eq!(env.workers().len(), 1);
}

#[test]
fn the_second_invocation_reuses_the_loaded_worker() {
    let Some(env) = Env::new("") else { return };
    let args = ["--prompt", "Hello!", "--max-tokens", "4"];
    let first = env.infer(&args).expect(0).done();
    let second = env.infer(&args).expect(0).done();
    assert_eq!(first["worker_pid"], second["worker_pid"]);
    assert!(
        first["timings_ms"]["load"]
            .as_f64()
            .expect("first call loads")
            > 0.0
    );
    assert!(
        second["timings_ms"]["load"].is_null(),
        "second call loaded again: {second}"
    );
    assert!(first["timings_ms"]["hive_start"].as_f64().is_some());
    assert!(second["timings_ms"]["hive_start"].is_null());
    let workers = env.workers();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0]["requests_served"], 2);
    assert_eq!(workers[0]["pid"], first["worker_pid"]);
}

#[test]
fn an_idle_worker_unloads_after_keep_alive() {
    let Some(env) = Env::new("keep_alive = \"1s\"") else {
        return;
    };
    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    let pid = done["worker_pid"].as_i64().expect("pid") as i32;
    assert!(
        eventually(Duration::from_secs(30), || env.workers().is_empty()),
        "the worker is still listed after keep_alive"
    );
    assert!(eventually(Duration::from_secs(5), || {
        !crate::support::alive(pid)
    }));
    // The hive stays up and loads the model again on demand.
    env.run(&["hive", "status", "n1"]).expect(0);
    let again = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert_ne!(again["worker_pid"], done["worker_pid"]);
    assert!(again["timings_ms"]["load"].as_f64().is_some());
}

#[test]
fn a_model_with_the_wrong_sha256_is_refused() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let wrong = "0".repeat(64);
    let env = Env::with_model(&model, &wrong, "");
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(7);
    assert!(run.stderr.contains("refusing to load"), "{}", run.stderr);
    assert!(run.stderr.contains(&wrong), "{}", run.stderr);
    let error = run.json_lines().pop().expect("an error line");
    assert_eq!(error["event"], "error");
    assert_eq!(error["exit_code"], 7);
    assert!(
        env.workers().is_empty(),
        "a worker was started for a refused model"
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_rejected() {
    let Some(env) = Env::new("") else { return };
    env.edit_config("threads = 1", "threads = 1\ncontext = 256");
    let prompt = "word ".repeat(2000);
    let run = env.infer(&["--prompt", &prompt, "--max-tokens", "4"]);
    run.expect(8);
    assert!(run.stderr.contains("context holds 256"), "{}", run.stderr);
    // The worker survived and serves the next request.
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn a_kv_cache_larger_than_memory_is_refused_before_loading() {
    let Some(env) = Env::new("") else { return };
    let model = crate::support::model().expect("the model Env::new found");
    let shape = rbee::hive::gguf::shape(&model).expect("the model's GGUF header");
    // llama.cpp reports a 360 MiB KV cache for this model at 4 sequences of 4096 tokens.
    assert_eq!(rbee::hive::memory::kv_bytes(&shape, None, 4), 360 << 20);
    // 256 sequences of 131072 tokens: about 720 GiB of KV cache for this model.
    env.edit_config(
        "threads = 1\n",
        "threads = 1\ncontext = 131072\nslots = 256\n",
    );
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(7);
    assert!(run.stderr.contains("not enough memory"), "{}", run.stderr);
    assert!(run.stderr.contains("for the KV cache"), "{}", run.stderr);
    assert!(
        env.workers().is_empty(),
        "a worker was started for a cache that cannot fit"
    );
    // The same model with its default context and slots fits and serves.
    env.edit_config(
        "threads = 1\ncontext = 131072\nslots = 256\n",
        "threads = 1\n",
    );
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}
