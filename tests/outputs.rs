//! Commands whose output cannot be written: a reader that has gone (`| head`, a closed pipe)
//! ends the command quietly with exit 0, as `infer` does; a full disk (`/dev/full`) is exit 1
//! naming the failure, never a success with nothing written, never a panic.

use std::io::BufRead;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{Env, Run, eventually};

const HI: [&str; 4] = ["--prompt", "Hi", "--max-tokens", "2"];

/// A stdout whose reader has gone already: the write end of a pipe whose read end is closed.
fn closed_pipe() -> Stdio {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    Stdio::from(write)
}

/// A stdout on a full disk.
fn full_disk() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full"),
    )
}

fn run_into(env: &Env, args: &[&str], stdout: Stdio) -> Run {
    Run::from(
        env.command(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .expect("run rbee"),
    )
}

fn assert_quiet(run: &Run, what: &str) {
    run.expect(0);
    assert!(run.stderr.trim().is_empty(), "{what}: {}", run.stderr);
}

fn assert_full(run: &Run, what: &str) {
    run.expect(1);
    assert!(
        run.stderr.contains("No space left on device"),
        "{what}: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
}

#[test]
fn the_audit_trail_printed_into_a_closed_pipe_ends_quietly_and_into_a_full_disk_exits_1() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    for json in [false, true] {
        let mut args = vec!["audit", "tail", "-n", "50"];
        if json {
            args.insert(0, "--json");
        }
        assert_quiet(&run_into(&env, &args, closed_pipe()), "audit tail | (gone)");
        assert_full(
            &run_into(&env, &args, full_disk()),
            "audit tail > /dev/full",
        );
    }
}

#[test]
fn results_printed_into_a_full_disk_exit_1() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    for args in [
        &["worker", "list", "--node", "n1"][..],
        &["--json", "worker", "list", "--node", "n1"],
        &["hive", "status", "n1"],
        &["nodes", "list"],
        &["version"],
    ] {
        assert_full(&run_into(&env, args, full_disk()), &args.join(" "));
        assert_quiet(&run_into(&env, args, closed_pipe()), &args.join(" "));
    }
}

#[test]
fn a_batch_whose_reader_has_gone_ends_quietly_and_one_on_a_full_disk_exits_1() {
    let Some(env) = Env::new("") else { return };
    let input = env.path().join("in.jsonl");
    let lines: String = (0..3)
        .map(|i| {
            serde_json::json!({"id": format!("b{i}"), "prompt": "Hi", "max_tokens": 2}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&input, lines).expect("write the input");
    let input = input.to_str().expect("path");
    assert_quiet(
        &run_into(&env, &["batch", input], closed_pipe()),
        "batch | (gone)",
    );
    assert_full(
        &run_into(&env, &["batch", input], full_disk()),
        "batch > /dev/full",
    );
    // The worker served on.
    env.infer(&HI).expect(0);
}

/// `rbee logs -f | head -1`: once head has its line and goes, the follower ends at once, not
/// at the hive's next line, which on an idle node may be hours away.
#[test]
fn a_followed_log_whose_reader_has_gone_ends_while_the_log_is_quiet() {
    let Some(env) = Env::new("") else { return };
    env.infer(&HI).expect(0);
    let mut follow = env.spawn(&["logs", "n1", "-f", "-n", "1"]);
    let mut stdout = std::io::BufReader::new(follow.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a first line");
    assert!(!first.trim().is_empty(), "no line printed");
    drop(stdout);
    let ended = eventually(Duration::from_secs(5), || {
        follow.try_wait().expect("try_wait").is_some()
    });
    if !ended {
        let _ = follow.kill();
    }
    let run = Run::from(follow.wait_with_output().expect("output"));
    assert!(
        ended,
        "`logs -f` still follows 5 s after its reader went away"
    );
    assert_quiet(&run, "logs -f | (gone)");
}
