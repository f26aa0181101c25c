//! Real workloads and faults: a prompt that fills most of the context on one thread, a stop in
//! the middle of busy traffic, model paths that are not model files.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{ENDLESS, Env, alive, eventually};

/// The hive's stall timeout and drain time (src/hive), which these tests hold it to.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN: Duration = Duration::from_secs(10);

fn signal(pid: i64, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("signal");
}

fn hive_pid(env: &Env) -> i32 {
    let run = env.run(&["--json", "hive", "status", "n1"]);
    run.expect(0);
    let status: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    status["pid"].as_i64().expect("hive pid") as i32
}

/// The hive's in-flight requests (`GET /v1/requests`).
fn requests(env: &Env) -> Vec<serde_json::Value> {
    let (status, body) = env.signed("GET", "/v1/requests", &[], b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// A prompt of about `words` words of varied English, so that it tokenizes to about as many
/// tokens and no two parts of it are the same.
fn long_prompt(words: usize) -> String {
    const WORDS: [&str; 24] = [
        "river", "stone", "garden", "window", "market", "winter", "silver", "forest", "letter",
        "engine", "harbor", "candle", "mountain", "village", "copper", "meadow", "thunder",
        "bridge", "lantern", "orchard", "island", "castle", "valley", "shadow",
    ];
    let mut text = String::from("Summarize the following list of words in one sentence:");
    for i in 0..words {
        text.push(' ');
        text.push_str(WORDS[(i * 7 + i / 24) % WORDS.len()]);
    }
    text
}

/// Words that make a prompt of ~90% of the default 4,096-token context, chat template included.
const LONG_WORDS: usize = 3_640;

/// A `--json infer` child whose stdout is read on a thread: its lines, when the first arrived,
/// and when it ended.
struct Watched {
    child: Arc<Mutex<Child>>,
    seen: Arc<Mutex<Seen>>,
    reader: std::thread::JoinHandle<()>,
}

#[derive(Default, Clone)]
struct Seen {
    lines: Vec<serde_json::Value>,
    first_at: Option<Instant>,
    ended_at: Option<Instant>,
}

impl Watched {
    fn spawn(env: &Env, args: &[&str]) -> Watched {
        let mut all = vec!["--json", "infer"];
        all.extend_from_slice(args);
        let mut child = env.spawn(&all);
        let stdout = child.stdout.take().expect("stdout");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let into = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("read");
                let value = serde_json::from_str(&line).expect("JSON line");
                let mut seen = into.lock().unwrap();
                seen.first_at.get_or_insert_with(Instant::now);
                seen.lines.push(value);
            }
            into.lock().unwrap().ended_at = Some(Instant::now());
        });
        Watched {
            child: Arc::new(Mutex::new(child)),
            seen,
            reader,
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    fn has_token(&self) -> bool {
        self.seen().lines.iter().any(|l| l["event"] == "token")
    }

    /// Waits for the child; its exit code, stderr, and what its stdout carried.
    fn finish(self) -> (i32, String, Seen) {
        self.reader.join().expect("reader");
        let mut child = self.child.lock().unwrap();
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("stderr");
        let seen = self.seen.lock().unwrap().clone();
        (status.code().unwrap_or(-1), stderr, seen)
    }
}

/// Waits until the hive has handed the request to its worker (so the worker is prefilling it).
fn wait_generating(env: &Env) {
    let generating = eventually(Duration::from_secs(30), || {
        requests(env).iter().any(|r| r["stage"] == "generating")
    });
    assert!(generating, "the request never reached the worker");
}

#[test]
fn a_prompt_filling_most_of_the_context_completes_on_one_thread_beside_a_short_request() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let prompt = long_prompt(LONG_WORDS);
    let long_args = [
        "--prompt",
        &prompt,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--timeout",
        "300s",
    ];
    let long = Watched::spawn(&env, &long_args);
    wait_generating(&env);
    // Well into the prefill, which takes many seconds on one thread.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!long.has_token(), "the long prompt was prefilled already");
    let short = Watched::spawn(
        &env,
        &[
            "--prompt",
            "Say hi",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--timeout",
            "300s",
        ],
    );
    let (short_code, short_err, short_seen) = short.finish();
    let (long_code, long_err, long_seen) = long.finish();
    assert_eq!(
        long_code,
        0,
        "the long request failed: {long_err}\nhive.log:\n{}",
        std::fs::read_to_string(env.node_dir().join("hive.log")).unwrap_or_default()
    );
    assert_eq!(short_code, 0, "the short request failed: {short_err}");
    let done = long_seen.lines.last().expect("done").clone();
    assert_eq!(done["event"], "done", "{done}");
    let tokens_in = done["tokens_in"].as_u64().expect("tokens_in");
    assert!(
        (3_600..4_000).contains(&tokens_in),
        "the long prompt is {tokens_in} tokens, not ~90% of 4096"
    );
    assert_eq!(
        done["worker_pid"],
        short_seen.lines.last().expect("done")["worker_pid"],
        "the two requests were not served by the same worker"
    );
    let (short_first, long_first) = (
        short_seen.first_at.expect("short token"),
        long_seen.first_at.expect("long token"),
    );
    assert!(
        short_first < long_first,
        "the short request's first token came {:?} after the long prompt's prefill ended \
         (prefill {}ms)",
        short_first - long_first,
        done["timings_ms"]["prefill"]
    );
    assert!(
        long_seen
            .lines
            .iter()
            .all(|l| l["event"] == "token" || l["event"] == "done"),
        "--json carried other events: {:?}",
        long_seen.lines
    );
    assert_eq!(env.workers()[0]["restart_count"], 0);
}

#[test]
fn a_worker_stopped_in_the_middle_of_a_long_prefill_is_still_replaced_as_stuck() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let pid = env.workers()[0]["pid"].as_i64().expect("pid");
    let prompt = long_prompt(LONG_WORDS);
    let long = Watched::spawn(
        &env,
        &[
            "--prompt",
            &prompt,
            "--max-tokens",
            "8",
            "--timeout",
            "300s",
        ],
    );
    wait_generating(&env);
    std::thread::sleep(Duration::from_millis(1000));
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let (code, stderr, seen) = long.finish();
    let waited = stopped.elapsed();
    assert_eq!(code, 7, "{stderr}");
    let error = seen.lines.last().expect("error line");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("stuck"),
        "{error}"
    );
    assert!(
        waited < STALL_TIMEOUT + Duration::from_secs(5),
        "the stopped worker was caught only after {waited:?}"
    );
    let back = eventually(Duration::from_secs(40), || {
        let w = &env.workers()[0];
        w["state"] == "ready" && w["pid"].as_i64().is_some_and(|p| p != pid)
    });
    assert!(back, "the worker was not replaced: {:?}", env.workers());
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

#[test]
fn a_hive_stopped_under_load_drains_refuses_the_queue_and_exits_by_itself() {
    let Some(env) = Env::new("") else { return };
    // Four slots: of eight clients, four stream and four wait.
    env.edit_config("threads = 1\n", "threads = 1\nslots = 4\n");
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let hive = hive_pid(&env);
    let clients: Vec<Watched> = (0..8)
        .map(|_| Watched::spawn(&env, &[&ENDLESS[..], &["--timeout", "120s"]].concat()))
        .collect();
    let busy = eventually(Duration::from_secs(60), || {
        let queued = requests(&env)
            .iter()
            .filter(|r| r["stage"] == "queued")
            .count();
        clients.iter().filter(|c| c.has_token()).count() == 4 && queued == 4
    });
    assert!(busy, "never saw 4 requests streaming and 4 queued");
    let streaming: Vec<bool> = clients.iter().map(Watched::has_token).collect();

    let stop_began = Instant::now();
    let stop = env.spawn(&["hive", "stop", "n1"]);
    let gone = eventually(DRAIN * 3, || !alive(hive));
    let stop_took = stop_began.elapsed();
    let stop = crate::support::Run::from(stop.wait_with_output().expect("hive stop"));
    stop.expect(0);
    assert!(gone, "the hive survived `hive stop`");
    assert!(
        stop_took < DRAIN + Duration::from_secs(1),
        "the hive took {stop_took:?} to exit; its log:\n{}",
        std::fs::read_to_string(env.node_dir().join("hive.log")).unwrap_or_default()
    );

    for (client, was_streaming) in clients.into_iter().zip(streaming) {
        let (code, stderr, seen) = client.finish();
        let last = seen.lines.last().cloned().unwrap_or_default();
        let message = last["message"].as_str().unwrap_or_default().to_string();
        if was_streaming {
            // A generation may end by itself in the drain; otherwise the drain cuts it.
            match code {
                0 => assert_eq!(last["event"], "done", "{last}"),
                6 => assert!(message.contains("stopping"), "{message}"),
                _ => panic!("a streaming client exited {code}: {stderr}"),
            }
        } else {
            assert_eq!(code, 6, "a queued client: {stderr}");
            assert!(message.contains("stopping"), "{message}");
            assert!(!seen.lines.iter().any(|l| l["event"] == "token"));
            let answered = seen.ended_at.expect("ended") - stop_began;
            assert!(
                answered < DRAIN / 2,
                "a queued client was answered only after {answered:?}"
            );
        }
        assert!(!message.contains("restarts it"), "{message}");
    }

    let log = std::fs::read_to_string(env.node_dir().join("audit.jsonl")).expect("audit");
    let spawned = log.matches("\"worker_spawned\"").count();
    assert_eq!(
        spawned, 1,
        "a worker was spawned after the stop began:\n{log}"
    );
    assert!(
        log.contains("\"hive_stopped\""),
        "no hive_stopped in:\n{log}"
    );
}

#[test]
fn an_infer_during_a_stop_waits_for_the_old_hive_and_starts_a_new_one() {
    let Some(env) = Env::new("") else { return };
    let (mut holder, _lines) = env.spawn_endless(&[], 1);
    let old = std::fs::read_to_string(env.node_dir().join("hive.pid")).expect("pidfile");
    // The stop drains for its grace period while the endless generation runs.
    let stopping = env.spawn(&["hive", "stop", "n1"]);
    std::thread::sleep(Duration::from_millis(500));
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2"]);
    run.expect(0);
    let done = run.done();
    assert!(done["timings_ms"]["hive_start"].is_number(), "{done}");
    let new = std::fs::read_to_string(env.node_dir().join("hive.pid")).expect("pidfile");
    assert_ne!(
        old.trim(),
        new.trim(),
        "the stopping hive served the request"
    );
    // The new hive took the lock the moment the old one let go: the stop still succeeded.
    let stopped = stopping.wait_with_output().expect("wait");
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_stop_with_a_short_timeout_ends_by_its_budget_and_the_hive_still_stops_whole() {
    let Some(env) = Env::new("") else { return };
    let (mut holder, _lines) = env.spawn_endless(&[], 1);
    let pid: i32 = std::fs::read_to_string(env.node_dir().join("hive.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let workers = env.processes();
    assert!(!workers.is_empty(), "no worker runs");
    // The endless generation keeps the hive draining far past two seconds.
    let run = env.run(&["hive", "stop", "n1", "--timeout", "2s"]);
    run.expect(124);
    assert!(
        run.stderr.contains("still stopping")
            && run.stderr.contains("requests in flight")
            && run.stderr.contains(&format!("pid {pid}")),
        "{}",
        run.stderr
    );
    // Not killed half-way: the hive finishes its drain, stops its workers and records it.
    assert!(
        eventually(Duration::from_secs(60), || !alive(pid)),
        "the hive did not stop by itself"
    );
    assert!(
        eventually(Duration::from_secs(10), || env.processes().is_empty()),
        "workers were left behind: {:?}",
        env.processes()
    );
    let audit = crate::support::records(&env.node_dir().join("audit.jsonl"));
    assert!(
        audit.iter().any(|r| r["event"] == "hive_stopped"),
        "no hive_stopped record"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    env.run(&["hive", "status", "n1"]).expect(6);
}

/// The node's audit, after checking it holds one `worker_exited` for `worker`: its SIGABRT told
/// as a crash, with no restart to come.
fn the_abort_recorded_as_a_crash(env: &Env, worker: i32) -> Vec<serde_json::Value> {
    let audit = crate::support::records(&env.node_dir().join("audit.jsonl"));
    let exits: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["event"] == "worker_exited" && r["fields"]["pid"] == worker)
        .collect();
    assert_eq!(exits.len(), 1, "{audit:?}");
    let fields = &exits[0]["fields"];
    assert_eq!(fields["reason"], "crash", "{fields}");
    assert_eq!(fields["next"], "none", "{fields}");
    assert!(
        fields["status"]
            .as_str()
            .is_some_and(|s| s.contains("SIGABRT")),
        "{fields}"
    );
    audit
}

#[test]
fn a_worker_that_crashes_in_its_stop_grace_is_recorded_as_a_crash() {
    use nix::sys::signal::{Signal, kill};
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let worker = env.workers()[0]["pid"].as_i64().expect("worker pid") as i32;
    let pid = nix::unistd::Pid::from_raw(worker);
    // Suspended, the worker keeps the hive's SIGTERM pending; an abort sent meanwhile is
    // delivered first when it resumes (the lower signal number), so it dies by SIGABRT within
    // its stop's grace.
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let stopping = env.spawn(&["worker", "stop", "--node", "n1", "--model", "smollm2"]);
    let term_pending = || {
        std::fs::read_to_string(format!("/proc/{worker}/status")).is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("ShdPnd:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
        })
    };
    assert!(
        eventually(Duration::from_secs(20), term_pending),
        "the hive sent no SIGTERM"
    );
    kill(pid, Signal::SIGABRT).expect("SIGABRT");
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let stopped = stopping.wait_with_output().expect("wait");
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    let audit = the_abort_recorded_as_a_crash(&env, worker);
    // The worker is gone and not restarted: it was being stopped.
    assert!(!alive(worker));
    assert!(!audit.iter().any(|r| r["event"] == "worker_restarted"));
}

#[test]
fn a_worker_that_crashes_while_the_hive_drains_for_a_stop_is_recorded_as_a_crash() {
    let Some(env) = Env::new("") else { return };
    let (mut holder, _lines) = env.spawn_endless(&[], 1);
    let worker = env.workers()[0]["pid"].as_i64().expect("worker pid") as i32;
    // The stop drains while the endless generation runs; the worker crashes meanwhile (an
    // abort, as a failed llama.cpp assertion ends it).
    let stopping = env.spawn(&["hive", "stop", "n1"]);
    assert!(
        eventually(Duration::from_secs(20), || {
            std::fs::read_to_string(env.node_dir().join("hive.log"))
                .is_ok_and(|log| log.contains("shutdown requested"))
        }),
        "the hive was not asked to stop"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGABRT,
    )
    .expect("crash the worker");
    let stopped = stopping.wait_with_output().expect("wait");
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    let _ = holder.kill();
    let _ = holder.wait();
    // No restart is promised by a hive that is stopping, and none happened.
    let audit = the_abort_recorded_as_a_crash(&env, worker);
    assert!(!audit.iter().any(|r| r["event"] == "worker_restarted"));
    assert!(audit.iter().any(|r| r["event"] == "hive_stopped"));
}

/// A generation whose text a stop string holds back sends no token for as long as the text may
/// still become the stop string: the worker still says it is alive, so the hive does not kill
/// it as stuck. Here a stop string of the generation's own first ~250 bytes (then a byte it
/// never writes) holds everything back until the text parts from it, and the worker is slowed
/// (stopped most of the time, by a factor sized from its free speed) until a token arrives: the
/// hold lasts well past the hive's stall timeout, as it does on a slow machine with a large model.
#[test]
fn a_generation_held_back_by_a_stop_string_past_the_stall_timeout_is_not_killed_as_stuck() {
    let Some(env) = Env::new("") else { return };
    let prompt = "Write a long story about a dragon.";
    let args = [
        "--prompt",
        prompt,
        "--max-tokens",
        "100",
        "--temperature",
        "0",
    ];
    let free = env.infer(&args);
    free.expect(0);
    let text = free.text();
    // The faster of two free runs sizes the slowdown: one slowed by a busy machine would size
    // it too small, and the held run could then outpace it.
    let again = env.infer(&args);
    again.expect(0);
    let rate_of = |run: &crate::support::Run| run.done()["decode_tokens_per_s"].as_f64();
    let done = if rate_of(&again) > rate_of(&free) {
        again.done()
    } else {
        free.done()
    };
    let pid = env.workers()[0]["pid"].as_i64().expect("pid");
    let mut cut = text.len().min(250);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    assert!(cut >= 200, "too short a text to hold back: {text:?}");
    let stop = format!("{}\u{7}", &text[..cut]);
    // The worker runs `run` in every `run + paused`, slowed enough that the text before the stop
    // string takes ~2.5 stall timeouts to decode however fast this machine decodes it freely.
    // It is slowed before the request goes, so none of the text comes at full speed; the
    // prompt's prefill is slowed too, and sends nothing either, so the factor stays low enough
    // for the prefill and the first `progress` after it (2.5 s) to fit well in the timeout.
    let secs = |v: &serde_json::Value| v.as_f64().expect("a number");
    let rate = secs(&done["decode_tokens_per_s"]);
    let free_secs = secs(&done["tokens_out"]) * cut as f64 / text.len() as f64 / rate;
    let prefill_secs = secs(&done["timings_ms"]["prefill"]) / 1000.0;
    let slowdown = (2.5 * STALL_TIMEOUT.as_secs_f64() / free_secs)
        .min(4.0 / prefill_secs.max(1e-3))
        .clamp(2.0, 1000.0);
    // At most a second stopped at a time, so the hive's health checks (every 2 s) get answers.
    let run = Duration::from_secs(1)
        .div_f64(slowdown)
        .clamp(Duration::from_millis(1), Duration::from_millis(5));
    let paused = run.mul_f64(slowdown - 1.0);
    let mut held_args = args.to_vec();
    held_args.extend(["--stop", &stop, "--timeout", "300s"]);
    let worker = nix::unistd::Pid::from_raw(pid as i32);
    use nix::sys::signal::{Signal, kill};
    kill(worker, Signal::SIGSTOP).expect("SIGSTOP");
    let throttled = Instant::now();
    let held = Watched::spawn(&env, &held_args);
    // Ends when a token comes, the request ends, or the worker is gone (killed).
    loop {
        let _ = kill(worker, Signal::SIGCONT);
        let resumed = Instant::now();
        std::thread::sleep(run);
        if held.has_token() || held.seen().ended_at.is_some() {
            break;
        }
        if kill(worker, Signal::SIGSTOP).is_err() {
            break;
        }
        // A sleep on a busy machine overshoots: the pause follows the time the worker really
        // ran, so that the slowdown holds.
        // Never more than a second, so the health checks still get answers.
        let ran = resumed.elapsed().mul_f64(slowdown - 1.0);
        std::thread::sleep(paused.max(ran).min(Duration::from_secs(1)));
    }
    let hold = throttled.elapsed();
    let (code, stderr, seen) = held.finish();
    assert_eq!(code, 0, "{stderr}\n{:?}", seen.lines.last());
    assert!(
        hold > STALL_TIMEOUT,
        "the text was held back for only {hold:?}, within the stall timeout: nothing was tested"
    );
    let out: String = seen
        .lines
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["text"].as_str().expect("text").to_string())
        .collect();
    assert_eq!(
        out, text,
        "the held-back text came out other than the free one"
    );
    let worker = &env.workers()[0];
    assert_eq!(worker["pid"].as_i64(), Some(pid), "{worker}");
    assert_eq!(worker["restart_count"], 0, "{worker}");
}
