//! Model paths that are not model files: refused at once, or given up at the model's
//! `load_timeout` (a load outlives its request), leaving the hive idle.

use std::time::{Duration, Instant};

use crate::support::{Env, alive};

fn hive_pid(env: &Env) -> i32 {
    let run = env.run(&["--json", "hive", "status", "n1"]);
    run.expect(0);
    let status: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    status["pid"].as_i64().expect("hive pid") as i32
}

/// CPU seconds (user and system, all threads) the process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .expect("sysconf")
        .expect("CLK_TCK") as f64;
    ticks as f64 / hz
}

/// The model's `load_timeout` in these tests: longer than the request's budget (3s).
const LOAD_TIMEOUT_S: u64 = 5;

/// A request for a model at `path` is refused (exit 7, naming the path) or runs out of its
/// budget; either way the hive is idle again within a second (once the load it started has run
/// out of its `load_timeout`), and stops by itself.
fn bad_model_path(path: &std::path::Path, refused: bool) {
    let env = Env::custom(|dir, port| {
        format!(
            "{}load_timeout = \"{LOAD_TIMEOUT_S}s\"\n[nodes.n1]\ntransport = \"local\"\n\
             remote_dir = {node_dir:?}\nhive_port = {port}\nmodels = [\"smollm2\"]\n",
            crate::support::model_table(path, crate::support::MODEL_SHA256),
            node_dir = dir.join("node").display().to_string(),
        )
    });
    let started = Instant::now();
    let run = env.infer(&["--prompt", "Hi", "--max-tokens", "2", "--timeout", "3s"]);
    if refused {
        run.expect(7);
        assert!(
            run.stderr.contains(&path.display().to_string()),
            "the error does not name the path: {}",
            run.stderr
        );
        assert!(run.stderr.contains("not a regular file"), "{}", run.stderr);
    } else {
        run.expect(124);
        // The load goes on after the request, until its load_timeout.
        let until = Duration::from_secs(LOAD_TIMEOUT_S);
        std::thread::sleep(until.saturating_sub(started.elapsed()));
    }
    let hive = hive_pid(&env);
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(hive);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(hive) - before;
    assert!(
        used < 0.1,
        "the hive used {used:.2}s of CPU in the second after the request ended"
    );
    let began = Instant::now();
    env.run(&["hive", "stop", "n1"]).expect(0);
    assert!(!alive(hive));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the idle hive took {:?} to stop",
        began.elapsed()
    );
}

#[test]
fn a_character_device_as_model_path_is_refused() {
    if crate::support::model().is_none() {
        return;
    }
    bad_model_path(std::path::Path::new("/dev/zero"), true);
}

#[test]
fn a_fifo_as_model_path_is_refused() {
    if crate::support::model().is_none() {
        return;
    }
    let dir = crate::support::tempdir();
    let fifo = dir.path().join("model.gguf");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    bad_model_path(&fifo, true);
}

#[test]
fn a_directory_as_model_path_is_refused() {
    if crate::support::model().is_none() {
        return;
    }
    let dir = crate::support::tempdir();
    bad_model_path(dir.path(), true);
}

#[test]
fn hashing_a_huge_model_file_stops_at_its_load_timeout() {
    if crate::support::model().is_none() {
        return;
    }
    let dir = crate::support::tempdir();
    let huge = dir.path().join("huge.gguf");
    // Sparse: no disk used, but hashing all of it takes far longer than the model's
    // load_timeout.
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(1 << 40))
        .expect("sparse file");
    bad_model_path(&huge, false);
}
