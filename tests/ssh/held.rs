//! The persistent connection under faults: a holder opens streams as a direct connection
//! would (a stopped hive fails at once, a refused forward switches to the bridge, and the
//! invocation learns which), a link lost under a held stream is the SSH failure it is (exit 4,
//! the text kept), and a holder whose connection ended is replaced, never used again.

use std::time::Instant;

use super::persist::{holders, holders_in};
use super::{Fleet, node};
use crate::support::Env;
use crate::support::sshd::{Options, Sshd};

/// Commands sshd ran for its sessions so far (its config logs at `VERBOSE`).
fn commands(server: &Sshd) -> usize {
    server.log().matches("Starting session: command").count()
}

/// Held connections to sshd instances that log every session they start.
fn verbose_fleet(names: &[&str], extra: &str) -> Option<Fleet> {
    let specs: Vec<_> = names.iter().map(|n| node(n)).collect();
    let extra = format!("LogLevel VERBOSE\n{extra}");
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    Fleet::build_full(&specs, true, "", &options, "60s")
}

/// `hive status` (`args`, with `--json`) of node `a`, which must read `stopped` (exit 6).
fn stopped(env: &Env, args: &[&str]) -> crate::support::Run {
    let status = env.run(args);
    status.expect(6);
    assert_eq!(
        status.json_lines()[0]["state"],
        "stopped",
        "{}",
        status.stdout
    );
    status
}

#[test]
fn a_stopped_hive_through_a_holder_costs_no_bridge_and_a_pidfile_check_only_when_unproven() {
    let Some(fleet) = verbose_fleet(&["a"], "") else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "start", "a"]).expect(0);
    env.run(&["hive", "stop", "a"]).expect(0);
    let server = &fleet.servers[0];
    // The holder has opened channels to the hive: sshd forwards, so a failed channel means
    // that nothing listens, and no command is run to say so.
    let before = commands(server);
    stopped(env, &["--json", "hive", "status", "a"]);
    assert_eq!(commands(server), before, "{}", server.log());
    // A holder that has never opened a channel to the hive: it cannot know that sshd forwards.
    env.run(&["nodes", "disconnect"]).expect(0);
    env.run(&["hive", "status", "a"]).expect(6);
    let hold_log =
        || std::fs::read_to_string(env.path().join("state/hold.log")).unwrap_or_default();
    let logged = hold_log().len();
    for _ in 0..2 {
        let before = commands(server);
        let status = stopped(env, &["-v", "--json", "hive", "status", "a"]);
        // The pidfile check, and no `rbee hive bridge` beside it.
        assert_eq!(commands(server) - before, 1, "{}", server.log());
        assert!(!status.stderr.contains("hive bridge"), "{}", status.stderr);
    }
    assert_eq!(holders(&fleet).len(), 1);
    let since = hold_log().split_off(logged);
    assert!(!since.contains("hive bridge"), "{since}");
}

#[test]
fn with_forwarding_refused_a_holder_says_so_and_requests_ride_the_bridge() {
    let Some(fleet) = verbose_fleet(&["a"], "DisableForwarding yes\n") else {
        return;
    };
    let env = &fleet.env;
    let start = env.run(&["-v", "hive", "start", "a"]);
    start.expect(0);
    // The invocation learns it from the holder, and says so under `-v`.
    assert!(
        start.stderr.contains("rbee hive bridge"),
        "{}",
        start.stderr
    );
    env.run(&["hive", "status", "a"]).expect(0);
    let done = env
        .infer(&["--node", "a", "--prompt", "Say hi", "--max-tokens", "4"])
        .expect(0)
        .done();
    assert_eq!(done["node"], "a");
    assert!(done["tokens_out"].as_u64().unwrap_or(0) > 0, "{done}");
    env.run(&["hive", "stop", "a"]).expect(0);
    let server = &fleet.servers[0];
    let before = commands(server);
    stopped(env, &["--json", "hive", "status", "a"]);
    assert_eq!(commands(server) - before, 1, "{}", server.log());
    assert_eq!(server.logins(), 1, "{}", server.log());
}

#[test]
fn a_holder_whose_connection_ended_is_replaced_at_once() {
    let Some(fleet) = verbose_fleet(&["a"], "") else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "start", "a"]).expect(0);
    let first = holders(&fleet);
    assert_eq!(first.len(), 1);
    let server = &fleet.servers[0];
    for round in 0..3 {
        // The node dropped the connection a moment ago (SIGKILL returns before the process
        // has gone and its socket is closed): the next invocation must not ride it.
        assert!(server.kill_sessions() > 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let started = Instant::now();
        let status = env.run(&["-v", "--json", "hive", "status", "a"]);
        eprintln!(
            "hive status right after the held connection was dropped: {:?}",
            started.elapsed()
        );
        status.expect(0);
        assert_eq!(
            status.json_lines()[0]["state"],
            "running",
            "{}",
            status.stdout
        );
        assert_eq!(server.logins(), round + 2, "{}", server.log());
        // It started a holder in place of the one whose connection ended, not one of its own.
        assert!(!status.stderr.contains("bypassing"), "{}", status.stderr);
    }
    let now = holders(&fleet);
    let hold_log = std::fs::read_to_string(env.path().join("state/hold.log")).unwrap_or_default();
    assert_eq!(now.len(), 1, "{now:?} {hold_log}");
    assert!(!now.contains(&first[0]), "{now:?} {first:?}");
    env.run(&["hive", "status", "a"]).expect(0);
    assert_eq!(server.logins(), 4, "{}", server.log());
}

#[test]
fn a_link_that_dies_under_a_held_stream_ends_infer_with_exit_4_and_the_text_kept() {
    let Some((ns, server, env)) = super::keepalive::far_node(15, "LogLevel INFO\n", "60s") else {
        return;
    };
    env.infer(&["--node", "far", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let first = holders_in(&env);
    assert_eq!(first.len(), 1);

    super::keepalive::cut_under_an_endless_infer(&env, &ns, "a held infer");
    // The dead holder is not used again: the next invocation logs in anew, and the hive on
    // the far side rode it out.
    env.run(&["hive", "status", "far"]).expect(0);
    assert_eq!(server.logins(), 2, "{}", server.log());
    let now = holders_in(&env);
    assert!(!now.contains(&first[0]), "{now:?} {first:?}");
}
