//! The hive as a daemon: started on demand and detached, start/stop/status, no leftovers.

use std::process::Stdio;
use std::time::Duration;

use crate::support::{Env, alive, eventually};

#[test]
fn a_script_capturing_the_output_returns_when_rbee_exits() {
    let Some(env) = Env::new("") else { return };
    // If the hive kept the command substitution's pipe open, `sh` would wait for the hive.
    let script = format!(
        "out=$('{}' infer --prompt 'Say hi' --max-tokens 4); printf '%s' \"$out\"",
        crate::support::bin().display()
    );
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg(script)
        .current_dir(env.path())
        .env("RBEE_CONFIG", &env.config)
        .env("RBEE_HOME", env.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sh.spawn().expect("spawn sh");
    let finished = eventually(Duration::from_secs(60), || {
        child.try_wait().expect("try_wait").is_some()
    });
    if !finished {
        let _ = child.kill();
        panic!("the shell still waits: the hive holds the caller's stdout");
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    // The hive outlived the invocation, in a session of its own.
    let hive = env.run(&["--json", "hive", "status", "n1"]);
    hive.expect(0);
    let status: serde_json::Value = serde_json::from_str(hive.stdout.trim()).expect("JSON");
    let pid = status["pid"].as_i64().expect("pid") as i32;
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).expect("getsid");
    assert_eq!(
        sid.as_raw(),
        pid,
        "the hive is not the leader of its own session"
    );
}

#[test]
fn start_status_stop_and_no_leftovers() {
    let Some(env) = Env::new("") else { return };
    // A fixed count for the status line below (auto would be this machine's choice).
    env.edit_config("threads = 1\n", "threads = 1\nslots = 4\n");
    let stopped = env.run(&["--json", "hive", "status", "n1"]);
    stopped.expect(6);
    assert!(
        stopped.stdout.contains("\"state\":\"stopped\""),
        "{}",
        stopped.stdout
    );

    let start = env.run(&["--json", "hive", "start", "n1"]);
    start.expect(0);
    let started: serde_json::Value = serde_json::from_str(start.stdout.trim()).expect("JSON");
    assert_eq!(started["state"], "started");
    let again = env.run(&["--json", "hive", "start", "n1"]);
    again.expect(0);
    let again: serde_json::Value = serde_json::from_str(again.stdout.trim()).expect("JSON");
    assert_eq!(again["state"], "running");
    assert_eq!(again["pid"], started["pid"]);

    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    let worker = done["worker_pid"].as_i64().expect("worker pid") as i32;
    let hive = started["pid"].as_i64().expect("hive pid") as i32;
    let status = env.run(&["hive", "status", "n1"]);
    status.expect(0);
    assert!(status.stdout.contains("running"), "{}", status.stdout);
    assert!(
        status
            .stdout
            .contains("smollm2 (ready, 0/4 busy, 0 queued)"),
        "{}",
        status.stdout
    );
    assert!(env.node_dir().join("hive.pid").exists());
    assert!(env.node_dir().join("hive.log").exists());

    let stop = env.run(&["hive", "stop", "n1"]);
    stop.expect(0);
    assert!(stop.stdout.contains("stopped"), "{}", stop.stdout);
    assert!(!alive(hive), "the hive survived `hive stop`");
    assert!(
        eventually(Duration::from_secs(5), || !alive(worker)),
        "the worker survived `hive stop`"
    );
    assert_eq!(
        env.processes(),
        Vec::<i32>::new(),
        "rbee processes left behind"
    );
    assert!(!env.node_dir().join("hive.pid").exists());
    env.run(&["hive", "stop", "n1"]).expect(0);
    env.run(&["hive", "status", "n1"]).expect(6);
}

#[test]
fn worker_stop_unloads_the_model() {
    let Some(env) = Env::new("") else { return };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    assert_eq!(env.workers().len(), 1);
    env.run(&["worker", "stop", "--node", "n1", "--model", "smollm2"])
        .expect(0);
    assert!(env.workers().is_empty());
    env.run(&["worker", "stop", "--node", "n1", "--model", "smollm2"])
        .expect(7);
    // The same exit code whatever the output format: a script reading JSON sees it too.
    env.run(&[
        "--json", "worker", "stop", "--node", "n1", "--model", "smollm2",
    ])
    .expect(7);
}

#[test]
fn a_hive_killed_with_sigkill_takes_its_workers_along_and_restarts_on_demand() {
    let Some(env) = Env::new("") else { return };
    let done = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    let worker = done["worker_pid"].as_i64().expect("worker pid") as i32;
    let status = env.run(&["--json", "hive", "status", "n1"]);
    let status: serde_json::Value = serde_json::from_str(status.stdout.trim()).expect("JSON");
    let hive = status["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hive),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(
        eventually(Duration::from_secs(10), || !alive(worker)),
        "the worker outlived its hive"
    );
    env.run(&["hive", "status", "n1"]).expect(6);
    // The stale pidfile does not stop the next start.
    let again = env
        .infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(again["timings_ms"]["hive_start"].as_f64().is_some());
}

#[test]
fn the_embedded_default_works_with_no_config_at_all() {
    let Some(_) = crate::support::model() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        std::process::Command::new(crate::support::bin())
            .args(args)
            .current_dir(dir.path())
            .env("RBEE_HOME", dir.path().join("state"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env_remove("RBEE_CONFIG")
            .output()
            .expect("run rbee")
    };
    let out = run(&[
        "infer",
        "--prompt",
        "Why is the sky blue?",
        "--max-tokens",
        "8",
    ]);
    let stop = run(&["hive", "stop"]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(stop.status.success());
    // Its files went where the contract says: <state>/nodes/local.
    assert!(dir.path().join("state/nodes/local/hive.log").exists());
}

#[test]
fn a_hive_that_holds_its_pidfile_but_does_not_answer_is_not_answering() {
    let Some(env) = Env::new("") else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    let text = std::fs::read_to_string(env.node_dir().join("hive.pid")).expect("hive.pid");
    let pid: i32 = text.trim().parse().expect("pid");
    let hive = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(hive, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let json = env.run(&["--json", "hive", "status", "n1"]);
    let table = env.run(&["hive", "status", "n1"]);
    nix::sys::signal::kill(hive, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");

    json.expect(6);
    let status: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("JSON");
    assert_eq!(status["state"], "not_answering", "{status}");
    assert_eq!(status["pid"], pid, "{status}");
    assert_eq!(status["exit_code"], 6, "{status}");
    table.expect(6);
    assert!(
        table.stdout.contains("not_answering") && table.stdout.contains(&pid.to_string()),
        "{}",
        table.stdout
    );
    assert!(
        table.stderr.contains(&format!("pid {pid}")) && table.stderr.contains("rbee hive stop n1"),
        "{}",
        table.stderr
    );
    // Once it answers again it is running, under the same pid.
    let again = env.run(&["--json", "hive", "status", "n1"]);
    again.expect(0);
    let again: serde_json::Value = serde_json::from_str(again.stdout.trim()).expect("JSON");
    assert_eq!(again["state"], "running");
    assert_eq!(again["pid"], pid);
    // `hive stop` ends a suspended hive too, and gracefully: it is woken to handle its SIGTERM
    // rather than left for the SIGKILL 15s later.
    nix::sys::signal::kill(hive, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    env.run(&["hive", "stop", "n1"]).expect(0);
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)),
        "the suspended hive survived `hive stop`"
    );
    assert!(
        !env.node_dir().join("hive.pid").exists(),
        "not a graceful exit"
    );
}
