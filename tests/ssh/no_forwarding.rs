//! A node whose sshd refuses forwarding (`DisableForwarding yes`): the first refused channel
//! switches rbee to `rbee hive bridge` over exec channels, and everything works through it; a
//! hive that dies at start is reported at once with its own message. OpenSSH fails a refused
//! channel as it fails one to a socket nothing listens on, so a stopped hive on a node that
//! forwards must not be taken for a refusal: `hive status` then runs no bridge.

use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use super::{Fleet, node};
use crate::support::sshd::Options;

#[test]
fn with_forwarding_refused_start_status_infer_and_stop_ride_the_bridge() {
    let options = Options {
        extra: "DisableForwarding yes\n",
        ..Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &options) else {
        return;
    };
    let env = &fleet.env;
    let started = Instant::now();
    let start = env.run(&["-v", "hive", "start", "a"]);
    eprintln!(
        "a hive start through the bridge took {:?}",
        started.elapsed()
    );
    start.expect(0);
    assert!(
        start.stderr.contains("rbee hive bridge"),
        "{}",
        start.stderr
    );
    let started = Instant::now();
    env.run(&["hive", "status", "a"]).expect(0);
    eprintln!(
        "hive status through the bridge took {:?}",
        started.elapsed()
    );
    let done = env
        .infer(&["--node", "a", "--prompt", "Say hi", "--max-tokens", "4"])
        .expect(0)
        .done();
    assert_eq!(done["node"], "a");
    assert!(done["tokens_out"].as_u64().unwrap_or(0) > 0, "{done}");
    let stop = env.run(&["--json", "hive", "stop", "a"]);
    stop.expect(0);
    assert_eq!(stop.json_lines()[0]["state"], "stopped", "{}", stop.stdout);
    let status = env.run(&["--json", "hive", "status", "a"]);
    status.expect(6);
    assert_eq!(
        status.json_lines()[0]["state"],
        "stopped",
        "{}",
        status.stdout
    );
    assert!(
        env.processes().is_empty(),
        "processes left: {:?}",
        env.processes()
    );

    // A key file the hive refuses: it exits at once, and says why.
    let key = fleet.node_key_file("a");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let started = Instant::now();
    let run = env.run(&["-v", "hive", "start", "a"]);
    let ended = std::time::SystemTime::now();
    eprintln!(
        "a hive that died at start: `hive start` took {:?} in all, {} after the start command",
        started.elapsed(),
        since_hive_starting(&run.stderr, ended)
    );
    run.expect(6);
    assert!(run.stderr.contains("exited during start"), "{}", run.stderr);
    assert!(
        run.stderr.contains("readable by group or others"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_stopped_hive_on_a_node_that_forwards_costs_no_bridge() {
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let specs: Vec<_> = names.iter().map(|n| node(n)).collect();
    let Some(fleet) = Fleet::build_with(&specs, true, "", &Options::default()) else {
        return;
    };
    let env = &fleet.env;
    // A hive that ran once, and stopped: its socket's path is known to the node.
    env.run(&["hive", "start", "a"]).expect(0);
    env.run(&["hive", "stop", "a"]).expect(0);
    let started = Instant::now();
    let one = env.run(&["-v", "--json", "hive", "status", "a"]);
    eprintln!("hive status of 1 stopped node took {:?}", started.elapsed());
    one.expect(6);
    assert_eq!(one.json_lines()[0]["state"], "stopped", "{}", one.stdout);
    assert!(!one.stderr.contains("hive bridge"), "{}", one.stderr);
    let started = Instant::now();
    let all = env.run(&["-v", "--json", "hive", "status", "--all"]);
    eprintln!(
        "hive status of {} stopped nodes took {:?}",
        names.len(),
        started.elapsed()
    );
    all.expect(6);
    let lines = all.json_lines();
    assert_eq!(lines.len(), names.len(), "{}", all.stdout);
    assert!(
        lines.iter().all(|l| l["state"] == "stopped"),
        "{}",
        all.stdout
    );
    assert!(!all.stderr.contains("hive bridge"), "{}", all.stderr);
}

/// How long before `ended` the `-v` log says the hive was started on the node.
fn since_hive_starting(stderr: &str, ended: std::time::SystemTime) -> String {
    let Some(at) = stderr
        .lines()
        .find(|l| l.contains("hive starting"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|ts| humantime::parse_rfc3339(ts).ok())
    else {
        return "? (no `hive starting` in its log)".to_string();
    };
    format!("{:?}", ended.duration_since(at).unwrap_or_default())
}
