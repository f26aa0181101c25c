//! Binaries per platform over real SSH: the entry chosen for a node from `[[binaries]]` and the
//! running rbee, content-addressed at `bin/<sha256>/rbee`, the hive running from that path, and
//! `nodes check` reporting what the node is.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Fleet, NodeSpec, node};
use crate::support::{bin, sha256};

fn this_target(fleet: &Fleet) -> String {
    let v = fleet.json(&["version"]);
    v[0]["target"].as_str().expect("target").to_string()
}

fn add_binary(fleet: &Fleet, target: &str, variant: &str, path: &Path, sha: &str) {
    let mut text = std::fs::read_to_string(&fleet.env.config).expect("read");
    text.push_str(&format!(
        "\n[[binaries]]\ntarget = {target:?}\nvariant = {variant:?}\npath = {:?}\nsha256 = {sha:?}\n",
        path.display().to_string()
    ));
    std::fs::write(&fleet.env.config, text).expect("write");
}

/// Checks that no binary reached the node's `bin/`.
fn nothing_uploaded(remote_dir: &Path) {
    let entries: Vec<_> = std::fs::read_dir(remote_dir.join("bin"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "uploaded: {entries:?}");
}

/// The file the hive of `remote_dir` runs, from its `/proc/PID/exe`.
fn hive_exe(remote_dir: &Path) -> (i32, PathBuf) {
    let pid: i32 = std::fs::read_to_string(remote_dir.join("hive.pid"))
        .expect("hive.pid")
        .trim()
        .parse()
        .expect("pid");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    (pid, exe)
}

#[test]
fn a_node_whose_only_entry_is_for_another_target_exits_3_and_gets_nothing() {
    let spec = NodeSpec {
        extra: "binary = \"cuda\"\n",
        ..node("a")
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let target = this_target(&fleet);
    let other = if target.starts_with("x86_64") {
        "aarch64-unknown-linux-gnu"
    } else {
        "x86_64-unknown-linux-gnu"
    };
    add_binary(&fleet, other, "cuda", &bin(), &sha256(&bin()));
    for args in [&["hive", "install", "a"][..], &["hive", "start", "a"][..]] {
        let run = fleet.env.run(args);
        run.expect(3);
        // The node's platform, and the entry to add for it.
        assert!(
            run.stderr.contains(&format!("target = \"{target}\"")),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("variant = \"cuda\""), "{}", run.stderr);
        assert!(
            run.stderr.contains(std::env::consts::ARCH),
            "{}",
            run.stderr
        );
    }
    nothing_uploaded(&fleet.remote_dir("a"));
}

#[test]
fn a_node_whose_cpu_lacks_what_this_build_uses_is_refused_before_anything_is_sent() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test binds a node's /proc/cpuinfo in a mount namespace: run it as root"
        );
        eprintln!("skipped: a node with another /proc/cpuinfo needs root");
        return;
    }
    let dir = crate::support::tempdir();
    // What this build needs, as it reports it; the node lists all of it but the last flag, as
    // an older CPU would.
    let out = std::process::Command::new(bin())
        .args(["--json", "version"])
        .output()
        .expect("rbee version");
    assert!(out.status.success(), "{out:?}");
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).expect("version json");
    let needed: Vec<String> = version["cpu_flags"]
        .as_array()
        .expect("cpu_flags")
        .iter()
        .map(|f| f.as_str().expect("flag").to_string())
        .collect();
    let Some(dropped) = needed.last() else {
        // A build that needs nothing beyond its target's baseline: nothing to refuse.
        return;
    };
    let cpuinfo = dir.path().join("cpuinfo");
    let real = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
    let fake: String = real
        .lines()
        .map(|line| match line.split_once(':') {
            Some((key, flags)) if matches!(key.trim_end(), "flags" | "Features") => {
                let kept: Vec<&str> = flags.split_whitespace().filter(|f| f != dropped).collect();
                format!("{key}: {}\n", kept.join(" "))
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert_ne!(fake, real, "no flags line lists {dropped}");
    std::fs::write(&cpuinfo, fake).expect("write cpuinfo");
    let options = crate::support::sshd::Options {
        cpuinfo: Some(&cpuinfo),
        ..crate::support::sshd::Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &options) else {
        return;
    };
    let check = fleet.env.run(&["--json", "nodes", "check", "a"]);
    check.expect(3);
    let report = &check.json_lines()[0];
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().expect("error");
    assert!(error.contains(&format!("lacks {dropped},")), "{error}");
    assert_eq!(
        report["cpu_missing"],
        serde_json::json!([dropped]),
        "{report}"
    );
    for args in [&["hive", "install", "a"][..], &["hive", "start", "a"][..]] {
        let run = fleet.env.run(args);
        run.expect(3);
        assert!(
            run.stderr.contains(&format!("lacks {dropped},")),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("[[binaries]]"), "{}", run.stderr);
    }
    // Nothing was sent and no hive runs there.
    let remote_dir = fleet.remote_dir("a");
    nothing_uploaded(&remote_dir);
    assert!(!remote_dir.join("hive.pid").exists());
}

#[test]
fn a_listed_build_the_nodes_cpu_cannot_run_is_reported_as_such_when_its_hive_dies() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let target = this_target(&fleet);
    // A build for another CPU, as the node sees it: it dies at once with SIGILL.
    let other = fleet.env.path().join("rbee-other-cpu");
    std::fs::write(&other, "#!/bin/sh\nkill -ILL $$\n").expect("write");
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    add_binary(&fleet, &target, "cpu", &other, &sha256(&other));
    // An error an earlier hive logged is not this start's.
    let remote_dir = fleet.remote_dir("a");
    std::fs::create_dir_all(&remote_dir).expect("remote dir");
    std::fs::write(
        remote_dir.join("hive.log"),
        "2026-01-01T00:00:00Z ERROR rbee::hive: an earlier run's error\n",
    )
    .expect("old log");
    let run = fleet.env.run(&["hive", "start", "a"]);
    run.expect(3);
    assert!(run.stderr.contains("SIGILL"), "{}", run.stderr);
    assert!(run.stderr.contains("[[binaries]]"), "{}", run.stderr);
    assert!(!run.stderr.contains("earlier run"), "{}", run.stderr);
}

#[test]
fn each_variant_lands_at_its_digest_and_the_hive_runs_from_there() {
    let spec = NodeSpec {
        extra: "binary = \"vulkan\"\n",
        ..node("a")
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    let target = this_target(&fleet);
    // Another build for the same target: this binary with bytes appended, so its SHA-256
    // differs while it runs the same.
    let copy = env.path().join("rbee-vulkan");
    let mut bytes = std::fs::read(bin()).expect("read rbee");
    bytes.extend_from_slice(b"\nanother build\n");
    std::fs::write(&copy, &bytes).expect("write copy");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let copy_sha = sha256(&copy);
    let self_sha = sha256(&bin());
    assert_ne!(copy_sha, self_sha);
    add_binary(&fleet, &target, "vulkan", &copy, &copy_sha);
    let dir = fleet.remote_dir("a");
    let copy_at = dir.join(format!("bin/{copy_sha}/rbee"));
    let self_at = dir.join(format!("bin/{self_sha}/rbee"));

    // The node's `binary` picks the copy: it lands at its digest and the hive runs it.
    let install = fleet.json(&["hive", "install", "a"]);
    assert_eq!(install[0]["installed"]["uploaded"], true, "{install:?}");
    assert_eq!(install[0]["installed"]["variant"], "vulkan", "{install:?}");
    assert_eq!(
        install[0]["installed"]["sha256"],
        copy_sha.as_str(),
        "{install:?}"
    );
    assert_eq!(sha256(&copy_at), copy_sha);
    env.run(&["hive", "start", "a"]).expect(0);
    let (pid, exe) = hive_exe(&dir);
    assert_eq!(exe, copy_at);
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);

    // Switching to `cpu` (this rbee) installs it beside the copy while the hive runs: the hive
    // is left alone, still on its own file.
    env.edit_config("binary = \"vulkan\"", "binary = \"cpu\"");
    let install = fleet.json(&["hive", "install", "a"]);
    assert_eq!(install[0]["installed"]["uploaded"], true, "{install:?}");
    assert_eq!(
        install[0]["installed"]["sha256"],
        self_sha.as_str(),
        "{install:?}"
    );
    assert_eq!(sha256(&self_at), self_sha);
    assert_eq!(
        std::fs::read_link(dir.join("bin/rbee")).expect("link"),
        PathBuf::from(format!("{self_sha}/rbee"))
    );
    assert_eq!(hive_exe(&dir), (pid, copy_at.clone()));
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    assert_eq!(
        hive_exe(&dir),
        (pid, copy_at.clone()),
        "the hive was restarted"
    );

    // A restart runs the current one; switching back starts the copy again without an upload
    // (an upload would land a new file, with a new inode).
    env.run(&["hive", "stop", "a"]).expect(0);
    env.run(&["hive", "start", "a"]).expect(0);
    assert_eq!(hive_exe(&dir).1, self_at);
    env.run(&["hive", "stop", "a"]).expect(0);
    let inode = std::fs::metadata(&copy_at).expect("copy").ino();
    env.edit_config("binary = \"cpu\"", "binary = \"vulkan\"");
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    assert_eq!(hive_exe(&dir).1, copy_at);
    assert_eq!(std::fs::metadata(&copy_at).expect("copy").ino(), inode);
    let again = fleet.json(&["hive", "install", "a"]);
    assert_eq!(again[0]["installed"]["uploaded"], false, "{again:?}");
    env.run(&["hive", "stop", "a"]).expect(0);

    // An entry whose file does not match its sha256 is refused before anything is sent.
    std::fs::write(&copy, b"not rbee").expect("overwrite");
    std::fs::remove_dir_all(copy_at.parent().expect("dir")).expect("rm");
    env.run(&["hive", "install", "a"]).expect(3);
    assert!(!copy_at.exists());
}

#[test]
fn nodes_check_on_a_cpu_only_node_reports_platform_libc_no_gpus_and_backends() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let version = fleet.json(&["version"]);
    assert_eq!(version[0]["variant"], "cpu", "{version:?}");
    assert!(
        version[0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x == "CPU")),
        "{version:?}"
    );
    let check = |fleet: &Fleet| {
        let lines = fleet.json(&["nodes", "check", "a"]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines[0].clone()
    };
    let before = check(&fleet);
    assert_eq!(before["ok"], true, "{before}");
    // This machine's CPU runs this build: checked, and nothing is missing.
    assert_eq!(before["cpu_missing"], serde_json::json!([]), "{before}");
    assert_eq!(
        before["platform"],
        format!("Linux {}", std::env::consts::ARCH),
        "{before}"
    );
    assert_eq!(before["target"], version[0]["target"], "{before}");
    assert!(
        before["glibc"]
            .as_str()
            .is_some_and(|g| g.starts_with("2.")),
        "{before}"
    );
    assert_eq!(before["gpus"], serde_json::json!([]), "{before}");
    assert_eq!(before["backends"], version[0]["backends"], "{before}");
    assert_eq!(before["binary"]["variant"], "cpu", "{before}");
    assert_eq!(before["binary"]["origin"], "running", "{before}");
    assert_eq!(before["binary"]["installed"], false, "{before}");
    fleet.env.run(&["hive", "install", "a"]).expect(0);
    let after = check(&fleet);
    assert_eq!(after["binary"]["installed"], true, "{after}");
    assert_eq!(after["binary"]["current"], true, "{after}");
    assert_eq!(after["installed_version"], version[0]["version"], "{after}");
    // From the installed rbee's own `version --json` this time.
    assert_eq!(after["backends"], version[0]["backends"], "{after}");
}

#[test]
fn a_worker_of_a_cpu_build_reports_no_layers_offloaded_and_the_cpu_device() {
    // `gpu_layers` left to `auto`: a binary without a GPU backend offloads nothing.
    let Some(env) = crate::support::Env::new("") else {
        return;
    };
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let expected = serde_json::json!({"gpu_layers": 0, "devices": ["CPU"]});
    let workers = env.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["offload"], expected, "{workers:?}");
    let health = crate::support::worker_health(&env);
    assert_eq!(health["offload"], expected, "{health}");
    let table = env.run(&["worker", "list"]);
    table.expect(0);
    assert!(table.stdout.contains("0 layers on CPU"), "{}", table.stdout);
}

#[test]
fn a_url_entry_is_downloaded_by_the_node_and_checked_there() {
    let spec = NodeSpec {
        extra: "binary = \"cuda\"\n",
        ..node("a")
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    let target = this_target(&fleet);
    let served = env.path().join("served");
    std::fs::create_dir_all(&served).expect("mkdir");
    let mut bytes = std::fs::read(bin()).expect("read rbee");
    bytes.extend_from_slice(b"\ndownloaded build\n");
    std::fs::write(served.join("rbee-cuda"), &bytes).expect("write");
    let sha = sha256(&served.join("rbee-cuda"));
    let port = crate::support::free_port();
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let up = crate::support::eventually(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "the HTTP server did not come up");
    let mut text = std::fs::read_to_string(&env.config).expect("read");
    text.push_str(&format!(
        "\n[[binaries]]\ntarget = {target:?}\nvariant = \"cuda\"\n\
         url = \"http://127.0.0.1:{port}/rbee-cuda\"\nsha256 = {sha:?}\n"
    ));
    std::fs::write(&env.config, &text).expect("write");
    let install = fleet.json(&["hive", "install", "a"]);
    assert_eq!(install[0]["installed"]["uploaded"], true, "{install:?}");
    assert_eq!(install[0]["installed"]["variant"], "cuda", "{install:?}");
    let at = fleet.remote_dir("a").join(format!("bin/{sha}/rbee"));
    assert_eq!(sha256(&at), sha);

    // A server that serves other bytes: refused on the node, nothing left under that digest.
    let wrong = "ef".repeat(32);
    env.edit_config(&format!("sha256 = {sha:?}"), &format!("sha256 = {wrong:?}"));
    let refused = env.run(&["hive", "install", "a"]);
    assert_ne!(refused.code, 0, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("did not match"),
        "{}",
        refused.stderr
    );
    assert!(
        !fleet
            .remote_dir("a")
            .join(format!("bin/{wrong}/rbee"))
            .exists()
    );
    let _ = server.kill();
    let _ = server.wait();
}
