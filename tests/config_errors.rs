//! Every configuration mistake names the file, line and key, and exits 3.

use crate::support::{Env, MODEL_SHA256, bin};

fn env_with(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nodes.toml");
    std::fs::write(&path, text).expect("write");
    (dir, path)
}

fn run_with_config(config: &std::path::Path, args: &[&str]) -> crate::support::Run {
    let mut full = vec!["--config", config.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    let dir = config.parent().expect("parent");
    let output = std::process::Command::new(bin())
        .args(&full)
        .current_dir(dir)
        .env("RBEE_HOME", dir.join("state"))
        .env_remove("RBEE_CONFIG")
        .output()
        .expect("run rbee");
    crate::support::Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const MODEL: &str = "[models.m]\npath = \"/nonexistent/m.gguf\"\nsha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n";

#[track_caller]
fn assert_config_error(text: &str, line: usize, needles: &[&str]) {
    let (_dir, path) = env_with(text);
    let run = run_with_config(&path, &["nodes", "list"]);
    run.expect(3);
    let location = format!("{}:{line}:", path.display());
    assert!(
        run.stderr.contains(&location),
        "no `{location}` in: {}",
        run.stderr
    );
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "no `{needle}` in: {}",
            run.stderr
        );
    }
    assert!(run.stdout.is_empty(), "stdout not empty: {}", run.stdout);
}

#[test]
fn unknown_key() {
    let text = format!("{MODEL}[nodes.a]\nhost = \"h\"\nhots = \"x\"\nmodels = [\"m\"]\n");
    assert_config_error(&text, 6, &["unknown field `hots`", "hots = \"x\""]);
}

#[test]
fn unknown_key_in_defaults_and_restart() {
    assert_config_error(
        &format!("[defaults]\ntimeuot = \"5s\"\n{MODEL}"),
        2,
        &["unknown field `timeuot`"],
    );
    assert_config_error(
        &format!("{MODEL}[restart]\nmax_attempt = 3\n"),
        5,
        &["unknown field `max_attempt`"],
    );
}

#[test]
fn wrong_types_and_values() {
    let node = "[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\n";
    assert_config_error(
        &format!("{MODEL}{node}hive_port = \"x\"\n"),
        7,
        &["hive_port"],
    );
    assert_config_error(
        &format!("{MODEL}{node}port = 70000\n"),
        7,
        &["port = 70000"],
    );
    assert_config_error(
        &format!("{MODEL}{node}timeout = \"30\"\n"),
        7,
        &["add a unit"],
    );
    assert_config_error(
        &format!("{MODEL}{node}keep_alive = \"later\"\n"),
        7,
        &["invalid duration"],
    );
    assert_config_error(
        &format!("{MODEL}{node}transport = \"ftp\"\n"),
        7,
        &["transport"],
    );
    assert_config_error(
        "[models.m]\npath = \"/m\"\nsha256 = \"abc\"\n",
        3,
        &["invalid sha256", "64 hex digits"],
    );
}

#[test]
fn missing_required_keys() {
    assert_config_error(
        "[models.m]\npath = \"/m\"\n[nodes.a]\ntransport = \"local\"\n",
        1,
        &["sha256"],
    );
    assert_config_error(
        &format!("{MODEL}[nodes.a]\nmodels = [\"m\"]\n"),
        4,
        &["node `a` has no `host`"],
    );
}

#[test]
fn node_serving_an_undefined_model() {
    let text = format!("{MODEL}[nodes.a]\nhost = \"h\"\nmodels = [\"m\", \"llama\"]\n");
    assert_config_error(&text, 6, &["unknown model `llama`", "`m`"]);
}

#[test]
fn syntax_error() {
    assert_config_error(&format!("{MODEL}[nodes.a\n"), 4, &["nodes.toml"]);
}

#[test]
fn unreadable_file_and_no_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.toml");
    let run = run_with_config(&missing, &["nodes", "list"]);
    run.expect(3);
    assert!(run.stderr.contains("absent.toml"), "{}", run.stderr);

    let (_d, path) = env_with(MODEL);
    let run = run_with_config(&path, &["nodes", "list"]);
    run.expect(3);
    assert!(run.stderr.contains("no nodes defined"), "{}", run.stderr);
}

#[test]
fn unknown_node_or_model_on_the_command_line_lists_the_known_ones() {
    let (_d, path) = env_with(&format!(
        "{MODEL}[nodes.alpha]\ntransport = \"local\"\nmodels = [\"m\"]\n"
    ));
    let run = run_with_config(&path, &["infer", "--node", "beta", "--prompt", "hi"]);
    run.expect(3);
    assert!(run.stderr.contains("unknown node `beta`"), "{}", run.stderr);
    assert!(run.stderr.contains("`alpha`"), "{}", run.stderr);
    let run = run_with_config(&path, &["infer", "--model", "llama", "--prompt", "hi"]);
    run.expect(3);
    assert!(
        run.stderr.contains("unknown model `llama`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("`m`"), "{}", run.stderr);
}

#[test]
fn config_lookup_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, node: &str| {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(
            &path,
            format!("{MODEL}[nodes.{node}]\ntransport = \"local\"\nmodels = [\"m\"]\n"),
        )
        .expect("write");
        path
    };
    let explicit = write("explicit.toml", "from_flag");
    let env_file = write("env.toml", "from_env");
    write("nodes.toml", "from_cwd");
    write("xdg/rbee/nodes.toml", "from_xdg");
    let nodes = |args: &[&str], env: Option<&std::path::Path>, cwd: &std::path::Path| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args)
            .arg("--json")
            .current_dir(cwd)
            .env("XDG_CONFIG_HOME", dir.path().join("xdg"))
            .env("RBEE_HOME", dir.path().join("state"))
            .env_remove("RBEE_CONFIG");
        if let Some(env) = env {
            cmd.env("RBEE_CONFIG", env);
        }
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v["nodes"][0]["name"]
            .as_str()
            .expect("node name")
            .to_string()
    };
    let explicit_arg = explicit.to_str().expect("utf-8");
    let list = ["nodes", "list"];
    let with_flag = ["--config", explicit_arg, "nodes", "list"];
    assert_eq!(nodes(&with_flag, Some(&env_file), dir.path()), "from_flag");
    assert_eq!(nodes(&list, Some(&env_file), dir.path()), "from_env");
    assert_eq!(nodes(&list, None, dir.path()), "from_cwd");
    let elsewhere = dir.path().join("xdg");
    assert_eq!(nodes(&list, None, &elsewhere), "from_xdg");
    // Nothing anywhere: the embedded `local` node.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin())
        .args(["nodes", "list", "--json"])
        .current_dir(empty.path())
        .env("XDG_CONFIG_HOME", empty.path())
        .env("RBEE_HOME", empty.path().join("state"))
        .env_remove("RBEE_CONFIG")
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["source"], "<embedded default>");
    assert_eq!(v["nodes"][0]["name"], "local");
    assert_eq!(v["nodes"][0]["transport"], "local");
    assert_eq!(v["nodes"][0]["hive_port"], 7835);
    assert_eq!(v["models"][0]["sha256"], MODEL_SHA256);
}

#[test]
fn usage_errors_exit_2_and_bad_parameters_exit_8() {
    let Some(env) = Env::new("") else { return };
    env.run(&["infer"]).expect(2);
    env.run(&["infer", "--prompt", "hi", "--max-tokens", "many"])
        .expect(2);
    env.run(&["hive", "launch"]).expect(2);
    for arg in [
        "--temperature=-1",
        "--max-tokens=0",
        "--top-p=1.5",
        "--temperature=NaN",
    ] {
        let run = env.run(&["infer", "--prompt", "hi", arg]);
        run.expect(8);
        assert!(!run.stderr.is_empty());
    }
    env.run(&["infer", "--prompt", "   "]).expect(8);
    // Nothing above needed a hive, so none was started.
    assert!(
        env.processes().is_empty(),
        "a process was started for a rejected request"
    );
}

#[test]
fn durations_too_long_for_the_clock_are_refused_not_a_panic() {
    let text =
        format!("{MODEL}[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\ntimeout = \"500000000000y\"\n");
    let (_dir, path) = env_with(&text);
    for args in [&["nodes", "list"][..], &["hive", "status", "a"][..]] {
        let run = run_with_config(&path, args);
        run.expect(3);
        assert!(
            run.stderr.contains(&format!("{}:7:", path.display())),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("500000000000y"), "{}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    // The same on the command line is a usage error, for every command that takes one.
    let (_dir, path) = env_with(&format!(
        "{MODEL}[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\n"
    ));
    let run = run_with_config(
        &path,
        &["infer", "--timeout", "300000000000y", "--prompt", "hi"],
    );
    run.expect(2);
    assert!(run.stderr.contains("300000000000y"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// A budget, a load bound, a skew or a breaker window of zero would refuse every request (or
/// never trip): refused at its key's line, and `--timeout 0s` as a usage error.
#[test]
fn zero_durations_where_zero_means_nothing_are_refused() {
    let node = "[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\n";
    assert_config_error(
        &format!("{MODEL}{node}timeout = \"0s\"\n"),
        7,
        &["must be more than zero", "timeout"],
    );
    assert_config_error(
        &format!("{MODEL}{node}clock_skew = \"0ms\"\n"),
        7,
        &["must be more than zero"],
    );
    assert_config_error(
        &format!("{MODEL}load_timeout = \"0s\"\n{node}"),
        4,
        &["must be more than zero"],
    );
    assert_config_error(
        &format!("{MODEL}{node}[restart]\nbreaker_window = \"0s\"\n"),
        8,
        &["must be more than zero"],
    );
    let (_dir, path) = env_with(&format!("{MODEL}{node}"));
    for args in [
        &["infer", "--timeout", "0s", "--prompt", "hi"][..],
        &["batch", "--timeout", "0ms", "-"][..],
    ] {
        let run = run_with_config(&path, args);
        run.expect(2);
        assert!(
            run.stderr.contains("must be more than zero"),
            "{}",
            run.stderr
        );
    }
}

/// `rbee --config PATH nodes list`, bounded in time (a FIFO blocks its reader until a writer
/// comes) and in memory (`/dev/zero` never ends), so that a regression fails instead of
/// hanging or starving the machine.
fn run_bounded(config: &std::path::Path) -> crate::support::Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(bin())
        .arg("--config")
        .arg(config)
        .args(["nodes", "list"])
        .current_dir(dir.path())
        .env("RBEE_HOME", dir.path().join("state"))
        .env_remove("RBEE_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rbee");
    let finished = crate::support::eventually(std::time::Duration::from_secs(20), || {
        child.try_wait().expect("try_wait").is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
        panic!("rbee still reads `{}`", config.display());
    }
    crate::support::Run::from(child.wait_with_output().expect("output"))
}

#[track_caller]
fn assert_refused(run: &crate::support::Run, path: &std::path::Path, needle: &str) {
    run.expect(3);
    let named = format!("`{}`", path.display());
    assert!(run.stderr.contains(&named), "no {named} in: {}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "no `{needle}` in: {}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "stdout not empty: {}", run.stdout);
}

#[test]
fn a_fifo_or_a_device_is_refused_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("nodes.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    assert_refused(&run_bounded(&fifo), &fifo, "not a regular file");
    let zero = std::path::Path::new("/dev/zero");
    assert_refused(&run_bounded(zero), zero, "not a regular file");
    assert_refused(&run_bounded(dir.path()), dir.path(), "not a regular file");
}

#[test]
fn a_config_file_over_one_mib_is_refused() {
    let node = "[nodes.a]\nhost = \"h\"\nmodels = [\"m\"]\n";
    let padding = "# padding\n".repeat(110_000);
    let (_dir, path) = env_with(&format!("{MODEL}{node}{padding}"));
    assert_refused(&run_bounded(&path), &path, "1 MiB");
    // Just under the bound is read as usual.
    let padding = "# padding\n".repeat(100_000);
    let (_dir, path) = env_with(&format!("{MODEL}{node}{padding}"));
    run_bounded(&path).expect(0);
}

#[test]
fn bytes_that_are_not_utf8_are_located_by_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nodes.toml");
    let mut text = format!("{MODEL}[nodes.a]\n").into_bytes();
    text.extend_from_slice("host = \"é".as_bytes());
    text.extend_from_slice(b"\xff\"\nmodels = [\"m\"]\n");
    std::fs::write(&path, text).expect("write");
    let run = run_with_config(&path, &["nodes", "list"]);
    run.expect(3);
    let location = format!("{}:5:10:", path.display());
    assert!(
        run.stderr.contains(&location),
        "no `{location}` in: {}",
        run.stderr
    );
    assert!(run.stderr.contains("UTF-8"), "{}", run.stderr);
}
