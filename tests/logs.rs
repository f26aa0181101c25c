//! `rbee logs` on a local node: the hive's log rotated by size (at most three older files
//! kept), and the newest lines still printed across a rotation; a stopped hive's log read from
//! the file itself.

use std::path::Path;

use crate::support::{Env, Run};

/// A small rotation size for the hive (`RBEE_LOG_MAX_BYTES`), which it reads when it starts.
const LIMIT: u64 = 600;

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_hive_log_rotates_by_size_and_logs_prints_the_newest_lines() {
    let Some(env) = Env::new("") else { return };
    let run = |args: &[&str]| {
        Run::from(
            env.command(args)
                .env("RBEE_LOG_MAX_BYTES", LIMIT.to_string())
                .output()
                .expect("run rbee"),
        )
    };
    let dir = env.node_dir();
    let numbered = |n: u32| dir.join(format!("hive.log.{n}"));
    // Requests until the log has rotated four times: the oldest of three kept was dropped.
    let mut third = None;
    let mut rotated_past_three = false;
    for _ in 0..60 {
        run(&["infer", "--prompt", "Hi", "--max-tokens", "1"]).expect(0);
        let now = std::fs::read(numbered(3)).ok();
        if third.is_some() && now != third {
            rotated_past_three = true;
            break;
        }
        third = third.or(now);
    }
    assert!(rotated_past_three, "the log did not rotate four times");
    assert!(!numbered(4).exists(), "more than three rotated files kept");
    for n in 1..=3 {
        let size = std::fs::metadata(numbered(n))
            .expect("a rotated file")
            .len();
        // Rotated once past the limit, before the next write: the limit and one write at most.
        assert!(
            size > LIMIT && size < LIMIT + 4096,
            "hive.log.{n}: {size} bytes"
        );
    }

    // The newest lines, across the rotation when the current file holds fewer.
    for n in [2, 12] {
        let logs = run(&["logs", "n1", "-n", &n.to_string()]);
        logs.expect(0);
        let printed: Vec<String> = logs.stdout.lines().map(str::to_string).collect();
        let mut all = lines_of(&numbered(1));
        all.extend(lines_of(&dir.join("hive.log")));
        // The hive may write a line of its own between the read and this one.
        let found = (0..=2).any(|late| {
            let end = all.len().saturating_sub(late);
            all[end.saturating_sub(n)..end] == printed[..]
        });
        assert!(
            found,
            "printed {printed:?}, the files end {:?}",
            &all[all.len().saturating_sub(n + 2)..]
        );
    }
    run(&["hive", "stop", "n1"]).expect(0);

    // A stopped hive's log is read from the file itself.
    let logs = run(&["logs", "n1", "-n", "3"]);
    logs.expect(0);
    let mut all = lines_of(&numbered(1));
    all.extend(lines_of(&dir.join("hive.log")));
    let printed: Vec<String> = logs.stdout.lines().map(str::to_string).collect();
    assert_eq!(printed[..], all[all.len().saturating_sub(3)..]);
}
