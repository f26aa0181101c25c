//! Remote nodes over real SSH: sshd instances on loopback stand for nodes, each with its own
//! remote_dir and hive port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::sshd::{self, ClientKey, Sshd};
use crate::support::{Env, MODEL_SHA256, alive, eventually, free_port, model_table, tempdir};

/// A fleet of nodes, one sshd each, all trusted in one known_hosts file.
struct Fleet {
    env: Env,
    servers: Vec<Sshd>,
    key: ClientKey,
}

struct NodeSpec<'a> {
    name: &'a str,
    remote_dir: Option<&'a str>,
    extra: &'a str,
}

fn node(name: &str) -> NodeSpec<'_> {
    NodeSpec {
        name,
        remote_dir: None,
        extra: "",
    }
}

impl Fleet {
    fn new(nodes: &[NodeSpec<'_>]) -> Option<Fleet> {
        Fleet::build(nodes, true, "")
    }

    fn build(nodes: &[NodeSpec<'_>], trusted: bool, model_extra: &str) -> Option<Fleet> {
        Fleet::build_with(nodes, trusted, model_extra, &sshd::Options::default())
    }

    /// Nodes whose sshd instances all run with `options`.
    fn build_with(
        nodes: &[NodeSpec<'_>],
        trusted: bool,
        model_extra: &str,
        options: &sshd::Options<'_>,
    ) -> Option<Fleet> {
        // Each invocation connects itself, as these tests expect; `persistent` keeps
        // connections, as `persist`'s default does.
        Fleet::build_full(nodes, trusted, model_extra, options, "0")
    }

    /// Nodes whose SSH connections are kept for `persist` by a holder process.
    fn persistent(nodes: &[NodeSpec<'_>], persist: &str) -> Option<Fleet> {
        // sshd logs each login at INFO: the tests count them.
        let options = sshd::Options {
            extra: "LogLevel INFO\n",
            ..sshd::Options::default()
        };
        Fleet::build_full(nodes, true, "", &options, persist)
    }

    fn build_full(
        nodes: &[NodeSpec<'_>],
        trusted: bool,
        model_extra: &str,
        options: &sshd::Options<'_>,
        persist: &str,
    ) -> Option<Fleet> {
        let model = crate::support::model()?;
        if !sshd::available() {
            return None;
        }
        let dir = tempdir();
        let key = ClientKey::new(dir.path(), "client_ed25519", "ed25519");
        let known_hosts = dir.path().join("known_hosts");
        let mut servers = Vec::new();
        let mut text = format!("{}{model_extra}\n", model_table(&model, MODEL_SHA256));
        text.push_str(&format!(
            "[defaults]\nuser = {:?}\nidentity_file = {:?}\nknown_hosts = {:?}\ntimeout = \"60s\"\n\
             persist = {:?}\n\n",
            sshd::user(),
            key.private.display().to_string(),
            known_hosts.display().to_string(),
            persist,
        ));
        let mut lines = String::new();
        for spec in nodes {
            let server = Sshd::start_with(
                &dir.path().join(format!("sshd-{}", spec.name)),
                &[&key],
                options,
            );
            lines.push_str(&server.known_hosts_line());
            let remote_dir = match spec.remote_dir {
                Some(d) => dir.path().join(d),
                None => dir.path().join(format!("node-{}", spec.name)),
            };
            text.push_str(&format!(
                "[nodes.{}]\nhost = \"127.0.0.1\"\nport = {}\nremote_dir = {:?}\nhive_port = {}\n\
                 models = [\"smollm2\"]\n{}\n",
                spec.name,
                server.port,
                remote_dir.display().to_string(),
                free_port(),
                spec.extra,
            ));
            servers.push(server);
        }
        if trusted {
            std::fs::write(&known_hosts, lines).expect("known_hosts");
        }
        let port = free_port();
        Some(Fleet {
            env: Env::from_dir(dir, port, &text),
            servers,
            key,
        })
    }

    fn known_hosts(&self) -> PathBuf {
        self.env.path().join("known_hosts")
    }

    fn remote_dir(&self, name: &str) -> PathBuf {
        self.env.path().join(format!("node-{name}"))
    }

    /// The node's copy of this machine's key: `<remote_dir>/keys/<key id>.key`.
    fn node_key_file(&self, name: &str) -> PathBuf {
        let kid = key_id(&self.env.path().join(format!("keys/{name}.key")));
        self.remote_dir(name).join(format!("keys/{kid}.key"))
    }

    fn json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.env.run(&all).json_lines()
    }
}

/// The id of the key in a key file: the first 8 bytes of its SHA-256, in hex.
fn key_id(path: &Path) -> String {
    use sha2::Digest;
    let text = std::fs::read_to_string(path).expect("key file");
    let bytes = hex::decode(text.trim()).expect("hex key");
    hex::encode(&sha2::Sha256::digest(&bytes)[..8])
}

fn state_of<'a>(lines: &'a [serde_json::Value], node: &str) -> &'a serde_json::Value {
    let line = lines
        .iter()
        .find(|l| l["node"] == node)
        .unwrap_or_else(|| panic!("no line for `{node}` in {lines:?}"));
    &line["state"]
}

#[test]
fn two_nodes_start_status_infer_install_and_stop_over_ssh() {
    let Some(fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    let env = &fleet.env;

    let start = env.run(&["--json", "hive", "start", "--all"]);
    start.expect(0);
    let lines = start.json_lines();
    assert_eq!(state_of(&lines, "a"), "started");
    assert_eq!(state_of(&lines, "b"), "started");
    // The hive of each node lives in that node's remote_dir, with its own binary.
    for name in ["a", "b"] {
        let dir = fleet.remote_dir(name);
        assert!(
            dir.join("bin/rbee").is_file(),
            "no binary in {}",
            dir.display()
        );
        assert!(dir.join("hive.pid").is_file());
    }

    let status = fleet.json(&["hive", "status", "--all"]);
    assert_eq!(state_of(&status, "a"), "running");
    assert_eq!(state_of(&status, "b"), "running");
    assert_ne!(status[0]["pid"], status[1]["pid"]);

    for name in ["a", "b"] {
        let done = env
            .infer(&["--node", name, "--prompt", "Say hi", "--max-tokens", "4"])
            .expect(0)
            .done();
        assert_eq!(done["node"], name);
        assert!(done["timings_ms"]["connect"].as_f64().expect("connect") > 0.0);
        assert!(
            done["timings_ms"]["hive_start"].is_null(),
            "restarted a running hive"
        );
    }

    // The hive start installed the binary; installing again uploads nothing.
    let install = fleet.json(&["hive", "install", "--all"]);
    for line in &install {
        assert_eq!(line["state"], "installed", "{line}");
        assert_eq!(line["installed"]["uploaded"], false, "{line}");
    }

    let stop = fleet.json(&["hive", "stop", "--all"]);
    assert_eq!(state_of(&stop, "a"), "stopped");
    assert_eq!(state_of(&stop, "b"), "stopped");
    let hive_pids: Vec<i32> = status
        .iter()
        .map(|l| l["pid"].as_i64().expect("pid") as i32)
        .collect();
    for pid in hive_pids {
        assert!(
            eventually(Duration::from_secs(5), || !alive(pid)),
            "hive {pid} survived"
        );
    }
    let status = env.run(&["--json", "hive", "status", "--all"]);
    status.expect(6);
    assert_eq!(state_of(&status.json_lines(), "a"), "stopped");
    assert!(
        eventually(Duration::from_secs(5), || env.processes().is_empty()),
        "processes left behind: {:?}",
        env.processes()
    );
}

#[test]
fn an_unknown_host_key_is_refused_with_its_fingerprint_until_trusted() {
    let Some(fleet) = Fleet::build(&[node("a"), node("b")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let run = env.run(&["hive", "status", "a"]);
    run.expect(4);
    assert!(
        run.stderr.contains(&fleet.servers[0].fingerprint()),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("rbee nodes trust a"), "{}", run.stderr);
    assert!(
        !fleet.known_hosts().exists()
            || std::fs::read_to_string(fleet.known_hosts())
                .expect("read")
                .is_empty()
    );

    let trust = env.run(&["nodes", "trust", "a"]);
    trust.expect(0);
    assert!(
        trust.stdout.contains(&fleet.servers[0].fingerprint()),
        "{}",
        trust.stdout
    );
    let recorded = std::fs::read_to_string(fleet.known_hosts()).expect("known_hosts");
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{}", fleet.servers[0].port)),
        "{recorded}"
    );
    // Trusted now: SSH works, the hive is simply not running.
    env.run(&["hive", "status", "a"]).expect(6);
    // The flag records a key in passing.
    env.run(&["hive", "status", "b"]).expect(4);
    env.run(&["--accept-new-host-key", "hive", "status", "b"])
        .expect(6);
    env.run(&["hive", "status", "b"]).expect(6);
}

#[test]
fn a_changed_host_key_is_always_refused() {
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let other = ClientKey::new(env.path(), "impostor", "ed25519");
    let impostor_key: Vec<&str> = other.public.split_whitespace().take(2).collect();
    std::fs::write(
        fleet.known_hosts(),
        format!(
            "[127.0.0.1]:{} {}\n",
            fleet.servers[0].port,
            impostor_key.join(" ")
        ),
    )
    .expect("known_hosts");
    let run = env.run(&["hive", "status", "a"]);
    run.expect(4);
    assert!(run.stderr.contains("HOST KEY CHANGED"), "{}", run.stderr);
    assert!(run.stderr.contains("line 1"), "{}", run.stderr);
    env.run(&["--accept-new-host-key", "hive", "status", "a"])
        .expect(4);
    env.run(&["nodes", "trust", "a"]).expect(4);
}

#[test]
fn a_wrong_client_key_and_a_closed_port_exit_4() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let stranger = ClientKey::new(env.path(), "stranger", "ed25519");
    let config = std::fs::read_to_string(&env.config).expect("config");
    let wrong_key = config.replace(
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
        &format!(
            "identity_file = {:?}",
            stranger.private.display().to_string()
        ),
    );
    std::fs::write(&env.config, &wrong_key).expect("write");
    let run = env.run(&["hive", "status", "a"]);
    run.expect(4);
    assert!(run.stderr.contains("authentication"), "{}", run.stderr);
    assert!(run.stderr.contains("stranger"), "{}", run.stderr);

    let closed = free_port();
    let closed_config = config.replace(
        &format!("port = {}", fleet.servers[0].port),
        &format!("port = {closed}"),
    );
    std::fs::write(&env.config, closed_config).expect("write");
    let started = Instant::now();
    let run = env.run(&["hive", "start", "a"]);
    run.expect(4);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{closed}")),
        "{}",
        run.stderr
    );
}

#[test]
fn an_rsa_client_key_works_too() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let rsa = ClientKey::new(env.path(), "client_rsa", "rsa");
    let authorized = fleet.servers[0].dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{}\n", rsa.public)).expect("authorized_keys");
    env.edit_config(
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
        &format!("identity_file = {:?}", rsa.private.display().to_string()),
    );
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn a_remote_dir_with_a_newline_and_a_backslash_installs_serves_and_stops() {
    // GNU sha256sum escapes such a name in its output; nothing may parse that output.
    let weird = "line\nbreak\\slash";
    let spec = NodeSpec {
        name: "a",
        remote_dir: Some(weird),
        extra: "",
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "install", "a"]).expect(0);
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let dir = env.path().join(weird);
    assert!(
        dir.join("bin/rbee").is_file(),
        "nothing at the literal path"
    );
    // A second install finds the binary and the key in place and sends neither again.
    let again = fleet.json(&["hive", "install", "a"]);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["state"], "installed", "{again:?}");
    assert_eq!(again[0]["installed"]["uploaded"], false, "{again:?}");
    env.run(&["hive", "stop", "a"]).expect(0);
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn a_remote_dir_with_spaces_and_shell_metacharacters_works() {
    let weird = "we ird $(touch PWNED) ;echo x 'q' `touch PWNED2`";
    let spec = NodeSpec {
        name: "a",
        remote_dir: Some(weird),
        extra: "",
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let dir = env.path().join(weird);
    assert!(
        dir.join("bin/rbee").is_file(),
        "nothing at the literal path"
    );
    assert!(dir.join("hive.log").is_file());
    env.run(&["hive", "stop", "a"]).expect(0);
    let home = crate::support::home();
    for stray in [
        env.path().join("PWNED"),
        home.join("PWNED"),
        home.join("PWNED2"),
        PathBuf::from("/PWNED"),
        PathBuf::from("/PWNED2"),
    ] {
        assert!(!stray.exists(), "{} was created", stray.display());
    }
    let entries: Vec<String> = std::fs::read_dir(env.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("we"))
        .collect();
    assert_eq!(entries, vec![weird.to_string()]);
}

#[test]
fn a_hive_killed_on_its_node_is_reported_stopped_and_restarted_by_infer() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    let status = fleet.json(&["hive", "status", "a"]);
    let pid = status[0]["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(eventually(Duration::from_secs(5), || !alive(pid)));
    let status = env.run(&["--json", "hive", "status", "a"]);
    status.expect(6);
    assert_eq!(state_of(&status.json_lines(), "a"), "stopped");
    let done = env
        .infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(
        done["timings_ms"]["hive_start"].as_f64().is_some(),
        "{done}"
    );
}

#[test]
fn one_failing_node_does_not_stop_the_others() {
    let Some(fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    let env = &fleet.env;
    // Node b points at a port where nothing listens.
    env.edit_config(
        &format!("port = {}", fleet.servers[1].port),
        &format!("port = {}", free_port()),
    );
    let run = env.run(&["--json", "hive", "start", "--all"]);
    run.expect(4);
    let lines = run.json_lines();
    assert_eq!(state_of(&lines, "a"), "started");
    assert_eq!(state_of(&lines, "b"), "unreachable");
    assert!(run.stderr.contains("1 of 2 nodes failed"), "{}", run.stderr);
    env.run(&["hive", "status", "a"]).expect(0);
}

#[test]
fn nodes_check_reports_what_it_found() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let before = fleet.json(&["nodes", "check", "a"]);
    assert_eq!(before[0]["ok"], true, "{:?}", before);
    assert_eq!(before[0]["authenticated"], true);
    assert!(before[0]["installed_version"].is_null());
    assert!(before[0]["free_bytes"].as_u64().expect("free") > 0);
    env.run(&["hive", "install", "a"]).expect(0);
    let after = fleet.json(&["nodes", "check", "a"]);
    assert_eq!(after[0]["installed_version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn models_push_resumes_an_interrupted_copy_and_verifies_it() {
    let Some(model) = crate::support::model() else {
        return;
    };
    let source = format!("source = {:?}\n", model.display().to_string());
    let Some(fleet) = Fleet::build(&[node("a")], true, &source) else {
        return;
    };
    let env = &fleet.env;
    // The node keeps its models in its own directory.
    let remote_model = fleet.remote_dir("a").join("models/smollm2.gguf");
    let config = std::fs::read_to_string(&env.config)
        .expect("config")
        .replacen(
            &format!("path = {:?}", model.display().to_string()),
            &format!("path = {:?}", remote_model.display().to_string()),
            1,
        );
    std::fs::write(&env.config, config).expect("write");
    let part = PathBuf::from(format!("{}.part", remote_model.display()));

    // Interrupt a push once some bytes have arrived.
    let mut push = env.spawn(&["models", "push", "--node", "a", "smollm2"]);
    let started = eventually(Duration::from_secs(30), || size(&part) > 0);
    let _ = push.kill();
    let _ = push.wait();
    assert!(started, "the push never wrote anything");
    assert!(
        !remote_model.exists(),
        "the push finished before it could be interrupted"
    );
    // Wait for the node side to flush what it received.
    std::thread::sleep(Duration::from_millis(300));
    let partial = size(&part);
    let total = std::fs::metadata(&model).expect("model").len();
    assert!(partial > 0 && partial < total, "{partial} of {total}");

    let resumed = env.run(&["--json", "models", "push", "--node", "a", "smollm2"]);
    resumed.expect(0);
    let result = &resumed.json_lines()[0];
    assert_eq!(result["action"], "resumed", "{result}");
    assert_eq!(result["resumed_from"].as_u64(), Some(partial));
    assert_eq!(result["bytes_sent"].as_u64(), Some(total - partial));
    assert!(!part.exists());
    assert_eq!(crate::support::sha256(&remote_model), MODEL_SHA256);

    let again = env.run(&["--json", "models", "push", "--node", "a", "smollm2"]);
    again.expect(0);
    assert_eq!(again.json_lines()[0]["action"], "present");
    // The node serves the pushed copy.
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn an_ssh_config_alias_supplies_host_port_user_and_key() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    std::fs::write(
        home.join(".ssh/config"),
        format!(
            "Host lab-*\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  IdentityFile {}\n",
            fleet.servers[0].port,
            sshd::user(),
            fleet.key.private.display()
        ),
    )
    .expect("ssh config");
    let config = std::fs::read_to_string(&env.config).expect("config");
    let config = config
        .replace("host = \"127.0.0.1\"", "host = \"lab-a\"")
        .replace(&format!("port = {}\n", fleet.servers[0].port), "")
        .replace(
            &format!(
                "identity_file = {:?}\n",
                fleet.key.private.display().to_string()
            ),
            "",
        )
        .replace(&format!("user = {:?}\n", sshd::user()), "");
    std::fs::write(&env.config, config).expect("write");
    let run = env
        .command(&["hive", "status", "a"])
        .env("HOME", &home)
        .output()
        .expect("run");
    assert_eq!(
        run.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn ssh_agent_authentication() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let socket = env.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    assert!(eventually(Duration::from_secs(5), || socket.exists()));
    let added = std::process::Command::new("ssh-add")
        .arg(&fleet.key.private)
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add");
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    // No key file: only the agent can authenticate.
    env.edit_config(
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
        "identity_file = \"/nonexistent/key\"",
    );
    env.run(&["hive", "status", "a"]).expect(4);
    let run = env
        .command(&["hive", "status", "a"])
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("run");
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        run.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn transport_http_sends_requests_directly_and_starts_over_ssh() {
    let spec = NodeSpec {
        name: "a",
        remote_dir: None,
        extra: "transport = \"http\"",
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    let done = env
        .infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(done["timings_ms"]["hive_start"].as_f64().is_some());
    // Requests went straight to the hive's port: no SSH connect on a warm call.
    let warm = env
        .infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert!(warm["timings_ms"]["hive_start"].is_null());
    assert!(fleet.remote_dir("a").join("bin/rbee").is_file());
    // The hive of an http node listens beyond the loopback.
    let pid = crate::support::processes_mentioning(&fleet.remote_dir("a").display().to_string())
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("hive\0serve"))
        })
        .expect("the hive process");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(String::from_utf8_lossy(&cmdline).contains("--listen\x000.0.0.0"));
    env.run(&["hive", "stop", "a"]).expect(0);
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn a_budget_too_small_for_the_ssh_connect_exits_124_naming_the_connect() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    // A server that accepts the TCP connection and never speaks SSH.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    env.edit_config(
        &format!("port = {}", fleet.servers[0].port),
        &format!("port = {port}"),
    );
    let started = Instant::now();
    let run = env.run(&[
        "infer",
        "--node",
        "a",
        "--prompt",
        "Hi",
        "--timeout",
        "700ms",
    ]);
    run.expect(124);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        run.stderr.contains("deadline of 700ms exceeded"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("connect"), "{}", run.stderr);
    drop(silent);
}

#[test]
fn the_signing_key_is_installed_on_the_node_and_rotates_over_ssh() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let queen = env.path().join("keys/a.key");
    let remote = fleet.node_key_file("a");
    let read = |p: &Path| std::fs::read_to_string(p).expect("key");
    assert_eq!(read(&queen), read(&remote));
    for path in [&queen, &remote] {
        let mode = std::fs::metadata(path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    let before = read(&queen);
    let run = env.run(&["--json", "hive", "rotate-key", "a"]);
    run.expect(0);
    assert_ne!(read(&queen), before);
    // The new key is enrolled in its own file, the old one's file is gone.
    assert!(!remote.exists(), "the old key's file stays");
    let remote = fleet.node_key_file("a");
    assert_eq!(read(&queen), read(&remote));
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
}

mod bastion;
mod batch;
mod binaries;
mod certificates;
mod fan_out;
mod held;
mod host_keys;
mod keepalive;
mod keys;
mod logs;
mod model_transfers;
mod no_forwarding;
mod persist;
mod pubkey_algorithms;
mod refusals;
mod routing;
mod serve;
mod shells;
mod ssh_config;
mod system_config;
/// A fleet of one node `a` whose model has a `source`, so that `hive install` pushes it into
/// the node's own directory; returns it with the node's binary and model paths.
fn fleet_with_a_model_to_push() -> Option<(Fleet, PathBuf, PathBuf)> {
    let model = crate::support::model()?;
    let source = format!("source = {:?}\n", model.display().to_string());
    let fleet = Fleet::build(&[node("a")], true, &source)?;
    let remote_model = fleet.remote_dir("a").join("models/smollm2.gguf");
    let config = std::fs::read_to_string(&fleet.env.config)
        .expect("config")
        .replacen(
            &format!("path = {:?}", model.display().to_string()),
            &format!("path = {:?}", remote_model.display().to_string()),
            1,
        );
    std::fs::write(&fleet.env.config, config).expect("write");
    let remote_bin = fleet.remote_dir("a").join("bin/rbee");
    Some((fleet, remote_bin, remote_model))
}

/// Runs rbee with its stderr on a pseudo-terminal (24x100) and returns its exit code and
/// everything it wrote there.
fn on_a_terminal(env: &Env, args: &[&str]) -> (i32, String) {
    use std::io::Read;
    let winsize = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&winsize), None).expect("openpty");
    let mut child = env
        .command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(pty.slave))
        .spawn()
        .expect("spawn rbee");
    let mut master = std::fs::File::from(pty.master);
    // The terminal is read while rbee runs, so that a full buffer never blocks it; the read
    // ends (EIO) once rbee, the only holder of the other side, has exited.
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let status = child.wait().expect("wait rbee");
    (status.code().unwrap_or(-1), reader.join().expect("reader"))
}

#[track_caller]
fn assert_no_progress(what: &str, stderr: &str) {
    for needle in ["\r", "\x1b[", "rbee to a", "smollm2 to a", "eta "] {
        assert!(
            !stderr.contains(needle),
            "{what} wrote progress ({needle:?}) on stderr: {stderr:?}"
        );
    }
}

#[test]
fn uploads_show_progress_only_on_a_terminal_and_never_under_q() {
    let Some((fleet, remote_bin, remote_model)) = fleet_with_a_model_to_push() else {
        return;
    };
    let env = &fleet.env;
    let forget = || {
        // Every installed version: the binary is content-addressed under `bin/`.
        let _ = std::fs::remove_dir_all(remote_bin.parent().expect("bin"));
        let _ = std::fs::remove_file(&remote_model);
    };

    // Into a pipe (a script, cron): the results, no progress.
    let piped = env.run(&["hive", "install", "a"]);
    piped.expect(0);
    assert!(
        piped.stdout.contains("uploaded rbee") && piped.stdout.contains("smollm2 uploaded"),
        "{}",
        piped.stdout
    );
    assert_no_progress("`hive install` into a pipe", &piped.stderr);
    let _ = std::fs::remove_file(&remote_model);
    let pushed = env.run(&["models", "push", "--node", "a", "smollm2"]);
    pushed.expect(0);
    assert!(pushed.stdout.contains("uploaded"), "{}", pushed.stdout);
    assert_no_progress("`models push` into a pipe", &pushed.stderr);

    // On a terminal, `-q` and `--json` still mean no progress.
    forget();
    let (code, quiet) = on_a_terminal(env, &["-q", "hive", "install", "a"]);
    assert_eq!(code, 0, "{quiet}");
    assert_eq!(quiet, "", "`-q hive install` on a terminal");
    let _ = std::fs::remove_file(&remote_model);
    let (code, json) = on_a_terminal(env, &["--json", "models", "push", "--node", "a", "smollm2"]);
    assert_eq!(code, 0, "{json}");
    assert_no_progress("`--json models push` on a terminal", &json);

    // A person at a terminal sees both uploads.
    forget();
    let (code, shown) = on_a_terminal(env, &["hive", "install", "a"]);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("rbee to a"),
        "no binary upload bar in {shown:?}"
    );
    assert!(
        shown.contains("smollm2 to a"),
        "no model upload bar in {shown:?}"
    );
    assert!(remote_bin.exists() && remote_model.exists());
}

#[test]
fn a_hive_on_an_ssh_node_killed_mid_stream_exits_6_and_one_stopped_is_not_answering() {
    use nix::sys::signal::{Signal, kill};
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let pid_of_hive = || -> i32 {
        let text = std::fs::read_to_string(fleet.remote_dir("a").join("hive.pid")).expect("pid");
        text.trim().parse().expect("a pid")
    };
    let (mut child, lines) = env.spawn_endless(&["--node", "a"], 3);
    let hive = pid_of_hive();
    kill(nix::unistd::Pid::from_raw(hive), Signal::SIGKILL).expect("SIGKILL");
    assert_eq!(child.wait().expect("wait").code(), Some(6));
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("JSON"))
        .collect();
    let error = rest.last().expect("an error line");
    assert_eq!(error["code"], "hive_unavailable", "{rest:?}");
    assert!(eventually(Duration::from_secs(5), || !alive(hive)));

    env.run(&["hive", "start", "a"]).expect(0);
    let hive = nix::unistd::Pid::from_raw(pid_of_hive());
    kill(hive, Signal::SIGSTOP).expect("SIGSTOP");
    let status = env.run(&["--json", "hive", "status", "a"]);
    kill(hive, Signal::SIGCONT).expect("SIGCONT");
    status.expect(6);
    let line = &status.json_lines()[0];
    assert_eq!(line["state"], "not_answering", "{line}");
    assert_eq!(line["pid"], hive.as_raw(), "{line}");
    env.run(&["hive", "status", "a"]).expect(0);
    // `hive stop` ends a suspended hive on the node too, and waits until it is gone.
    kill(hive, Signal::SIGSTOP).expect("SIGSTOP");
    env.run(&["hive", "stop", "a"]).expect(0);
    assert!(
        eventually(Duration::from_secs(5), || !alive(hive.as_raw())),
        "the suspended hive survived `hive stop`"
    );
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn a_stop_through_the_pidfile_is_bounded_by_its_budget_and_kills_no_draining_hive() {
    use nix::sys::signal::{Signal, kill};
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let (mut holder, _lines) = env.spawn_endless(&["--node", "a"], 1);
    let hive: i32 = std::fs::read_to_string(fleet.remote_dir("a").join("hive.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    // Suspended, the hive takes no signed shutdown: the stop goes through its pidfile (SIGTERM,
    // SIGCONT), and the endless generation keeps it draining past the budget.
    kill(nix::unistd::Pid::from_raw(hive), Signal::SIGSTOP).expect("SIGSTOP");
    let run = env.run(&["hive", "stop", "a", "--timeout", "5s"]);
    run.expect(124);
    assert!(
        run.stderr.contains("still stopping") && run.stderr.contains(&format!("pid {hive}")),
        "{}",
        run.stderr
    );
    assert!(alive(hive), "the draining hive was killed");
    // It finishes by itself, its workers stopped and the stop recorded.
    assert!(
        eventually(Duration::from_secs(60), || !alive(hive)),
        "the hive did not stop by itself"
    );
    let audit = crate::support::records(&fleet.remote_dir("a").join("audit.jsonl"));
    assert!(
        audit.iter().any(|r| r["event"] == "hive_stopped"),
        "no hive_stopped record"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn an_ssh_node_is_reached_through_streamlocal_with_no_tcp_listener_on_either_end() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.infer(&["--node", "a", "--prompt", "Hi", "--max-tokens", "1"])
        .expect(0);
    let pids = crate::isolation::pids(env, "a");
    let listeners = crate::isolation::tcp_listeners_of(&pids);
    assert!(listeners.is_empty(), "{listeners:?}");
    assert!(fleet.remote_dir("a").join("hive.sock").exists());
    // The queen's end of each forward is an abstract socket: no file of it is left in the
    // private run directory (where holders' sockets live, when there are any).
    let run = env.path().join("state/run");
    if run.exists() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&run)
            .expect("run dir")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
    let left: Vec<_> = std::fs::read_dir(&run)
        .into_iter()
        .flatten()
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().starts_with('q'))
        .collect();
    assert!(left.is_empty(), "forward sockets left behind: {left:?}");
    env.run(&["hive", "stop", "a"]).expect(0);
    assert!(
        eventually(Duration::from_secs(5), || pids.iter().all(|p| !alive(*p))),
        "hive or worker survived the stop"
    );
}

/// The local end of a forward is an abstract socket, which no file permission guards: another
/// process connecting to it (of the same user here, the test itself) is dropped unserved, and
/// the invocation's own stream goes on.
#[cfg(target_os = "linux")]
#[test]
fn the_local_end_of_a_forward_serves_its_own_process_only() {
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let (mut child, mut lines) = env.spawn_endless(&["--node", "a"], 2);
    let prefix = format!("@rbee-q{}-", child.id());
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let mut names: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(
        !names.is_empty(),
        "the invocation has no abstract socket named {prefix}..."
    );
    for name in names {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..])
            .expect("an abstract name");
        let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Dropped unserved: the request may not even be taken (a broken pipe), and what is
        // read is the end of the stream, or a reset for the request left unread.
        let written =
            stream.write_all(b"GET /health HTTP/1.1\r\nhost: hive\r\nconnection: close\r\n\r\n");
        if let Err(e) = written {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
        }
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        assert!(
            answer.is_empty(),
            "another process rode the forward: {:?}",
            String::from_utf8_lossy(&answer)
        );
        if let Err(e) = read {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
    }
    for _ in 0..3 {
        let line = lines.next().expect("the stream goes on").expect("read");
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(event["event"], "token", "{event}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_remote_dir_under_the_nodes_home_runs_no_command_once_the_home_is_known() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    // The same directory, written relative to the node user's home (as sshd sees it).
    let home = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .expect("user")
        .expect("user entry")
        .dir;
    let up = "../".repeat(home.components().count() - 1);
    let absolute = fleet.remote_dir("a").display().to_string();
    let relative = format!("~/{up}{}", absolute.trim_start_matches('/'));
    env.edit_config(
        &format!("remote_dir = {absolute:?}"),
        &format!("remote_dir = {relative:?}"),
    );
    let infer = [
        "-vv",
        "--json",
        "infer",
        "--node",
        "a",
        "--prompt",
        "Hi",
        "--max-tokens",
        "1",
    ];
    let cold = env.run(&infer);
    cold.expect(0);
    assert!(
        cold.stderr.contains("running a command on the node"),
        "{}",
        cold.stderr
    );
    let cached = std::fs::read_to_string(env.path().join("state/homes/a.home")).expect("cache");
    assert!(
        cached.ends_with(&format!("\n{}", home.display())),
        "{cached}"
    );
    let warm = env.run(&infer);
    warm.expect(0);
    assert!(
        !warm.stderr.contains("running a command on the node"),
        "a warm infer ran a command on the node"
    );
    assert!(warm.done()["timings_ms"]["hive_start"].is_null());
    env.run(&["hive", "stop", "a"]).expect(0);
    env.run(&["hive", "status", "a"]).expect(6);
}

#[test]
fn a_remote_dir_too_long_for_a_socket_is_refused_before_anything_runs_there() {
    let long = "d".repeat(100);
    let spec = NodeSpec {
        name: "a",
        remote_dir: Some(&long),
        extra: "",
    };
    let Some(fleet) = Fleet::new(&[spec]) else {
        return;
    };
    let env = &fleet.env;
    let run = env.run(&[
        "infer",
        "--node",
        "a",
        "--prompt",
        "Hi",
        "--max-tokens",
        "1",
    ]);
    run.expect(3);
    let path = env.path().join(&long).join("hive.sock");
    assert!(
        run.stderr.contains(&path.display().to_string()),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("107 bytes"), "{}", run.stderr);
    assert!(
        !env.path().join(&long).exists(),
        "something ran on the node"
    );
}
