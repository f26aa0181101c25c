//! `rbee logs`: a node's hive log and a model's worker log, read over the node's SSH
//! connection; `-f` follows what the hive writes afterwards; a stopped hive's log is read over
//! SSH.

use std::io::BufRead;
use std::time::Duration;

use super::{Fleet, node};

#[test]
fn logs_prints_the_last_lines_of_an_ssh_nodes_hive_log_and_follows_new_ones() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    // Two requests: the hive's log then holds more than five lines.
    for _ in 0..2 {
        env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
            .expect(0);
    }
    let run = env.run(&["logs", "a", "-n", "5"]);
    run.expect(0);
    let printed: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(printed.len(), 5, "{}", run.stdout);
    // They are the node's own lines, in order, as its file has them.
    let file = std::fs::read_to_string(fleet.remote_dir("a").join("hive.log")).expect("log");
    let lines: Vec<&str> = file.lines().collect();
    assert!(
        lines.windows(5).any(|w| w == printed.as_slice()),
        "printed:\n{}\nfile:\n{file}",
        run.stdout
    );
    // The worker's own log, apart from the hive's.
    let worker = env.run(&["logs", "a", "--model", "smollm2", "-n", "3"]);
    worker.expect(0);
    assert!(!worker.stdout.is_empty());
    assert!(
        fleet.remote_dir("a").join("worker-smollm2.log").is_file(),
        "no worker log"
    );

    // Following: a line the hive writes afterwards arrives.
    let mut child = env.spawn(&["logs", "a", "-f", "-n", "0"]);
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    env.run(&["worker", "stop", "--node", "a", "--model", "smollm2"])
        .expect(0);
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("stopping worker") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "no followed line; saw: {seen:?}");
    env.run(&["hive", "stop", "a"]).expect(0);
}

#[test]
fn logs_of_an_ssh_node_whose_hive_is_stopped_are_read_over_ssh() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    env.run(&["hive", "stop", "a"]).expect(0);
    let last = |name: &str, n: usize| -> Vec<String> {
        let file = std::fs::read_to_string(fleet.remote_dir("a").join(name)).expect("log");
        let lines: Vec<String> = file.lines().map(str::to_string).collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    };
    let run = env.run(&["logs", "a", "-n", "5"]);
    run.expect(0);
    let printed: Vec<String> = run.stdout.lines().map(str::to_string).collect();
    assert_eq!(printed, last("hive.log", 5), "{}", run.stderr);
    let worker = env.run(&["logs", "a", "--model", "smollm2", "-n", "3"]);
    worker.expect(0);
    let printed: Vec<String> = worker.stdout.lines().map(str::to_string).collect();
    assert_eq!(printed, last("worker-smollm2.log", 3));
    // Following needs a hive that writes: the lines, then exit 6 saying how to start it.
    let follow = env.run(&["logs", "a", "-f", "-n", "2"]);
    follow.expect(6);
    assert_eq!(follow.stdout.lines().count(), 2, "{}", follow.stdout);
    assert!(
        follow.stderr.contains("rbee hive start a"),
        "{}",
        follow.stderr
    );
    // Reading the log started no hive.
    assert!(
        !fleet.remote_dir("a").join("hive.sock").exists()
            || std::os::unix::net::UnixStream::connect(fleet.remote_dir("a").join("hive.sock"))
                .is_err(),
        "a hive answers"
    );
}

#[test]
fn a_log_line_bigger_than_a_command_may_print_is_an_error_not_memory() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "start", "a"]).expect(0);
    env.run(&["hive", "stop", "a"]).expect(0);
    // One line of 80 MiB at the end of the stopped hive's log: its tail is the whole line.
    let log = fleet.remote_dir("a").join("hive.log");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("log");
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..80 {
        std::io::Write::write_all(&mut file, &chunk).expect("write");
    }
    drop(file);
    let run = env.run(&["logs", "a", "-n", "1"]);
    run.expect(4);
    assert!(run.stdout.is_empty(), "{} bytes printed", run.stdout.len());
    assert!(run.stderr.contains("64 MiB"), "{}", run.stderr);
    // The connection still serves what fits.
    std::fs::write(&log, "one\ntwo\n").expect("write");
    let run = env.run(&["logs", "a", "-n", "1"]);
    run.expect(0);
    assert_eq!(run.stdout.trim(), "two");
}
