//! ProxyJump: a node reachable only through a bastion (its sshd listens on the loopback of a
//! network namespace, which only the bastion's sshd, in the same namespace, can reach). rbee
//! installs, starts, infers and stops through it, checking each hop's host key, and the
//! bastion's log shows the forward. OpenSSH's client on the same ssh_config is the oracle.

use std::path::{Path, PathBuf};

use crate::support::netns::Netns;
use crate::support::sshd::{self, ClientKey, Options, Sshd};
use crate::support::{Env, MODEL_SHA256, free_port, model_table, tempdir};

#[test]
fn a_node_behind_a_bastion_installs_starts_infers_and_stops_through_it() {
    let Some(model) = crate::support::model() else {
        return;
    };
    if !sshd::available() {
        return;
    }
    let Some(ns) = Netns::create(9) else { return };
    let dir = tempdir();
    let key = ClientKey::new(dir.path(), "client", "ed25519");
    let (bastion, target, known_hosts) = bastion_and_target(&ns, dir.path(), &key);
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host gpu\n  HostName 127.0.0.1\n  Port {}\n  ProxyJump bastion\n\n\
             Host bastion\n  HostName {}\n  Port {}\n\n\
             Host *\n  User {}\n  IdentityFile {}\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n",
            target.port,
            ns.node_ip,
            bastion.port,
            sshd::user(),
            key.private.display(),
            known_hosts.display()
        ),
    )
    .expect("ssh config");
    // OpenSSH on the same file: it reaches the node through the bastion, and not without it.
    let ssh = |args: &[&str]| {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
    };
    let out = ssh(&["gpu", "true"]);
    assert!(out.status.success(), "{out:?}");
    let out = ssh(&[
        "-o",
        "ProxyJump=none",
        "-o",
        "ConnectTimeout=3",
        "gpu",
        "true",
    ]);
    assert!(!out.status.success(), "reached directly: {out:?}");

    let config = format!(
        "{}[nodes.gpu]\nhost = \"gpu\"\nknown_hosts = {:?}\nremote_dir = {:?}\n\
         models = [\"smollm2\"]\npersist = \"0\"\n",
        model_table(&model, MODEL_SHA256),
        known_hosts.display().to_string(),
        dir.path().join("node-gpu").display().to_string(),
    );
    let env = Env::from_dir(dir, free_port(), &config);
    let run = |args: &[&str]| {
        crate::support::Run::from(
            env.command(args)
                .env("HOME", &home)
                .env_remove("SSH_AUTH_SOCK")
                .output()
                .expect("run"),
        )
    };
    run(&["hive", "install", "gpu"]).expect(0);
    run(&["hive", "start", "gpu"]).expect(0);
    let infer = run(&[
        "--json",
        "infer",
        "--node",
        "gpu",
        "--prompt",
        "Say hi",
        "--max-tokens",
        "4",
    ]);
    infer.expect(0);
    assert_eq!(infer.done()["node"], "gpu");
    run(&["hive", "stop", "gpu"]).expect(0);
    let log = bastion.log();
    assert!(
        log.contains(&format!("target 127.0.0.1 port {}", target.port)),
        "the bastion's log shows no forward: {log}"
    );

    // Each hop's host key is checked: a changed bastion key stops the connection there.
    let impostor = ClientKey::new(env.path(), "impostor", "ed25519");
    let impostor_key: Vec<&str> = impostor.public.split_whitespace().take(2).collect();
    std::fs::write(
        &known_hosts,
        format!(
            "[{}]:{} {}\n{}",
            ns.node_ip,
            bastion.port,
            impostor_key.join(" "),
            target.known_hosts_line()
        ),
    )
    .expect("known_hosts");
    let refused = run(&["hive", "status", "gpu"]);
    refused.expect(4);
    assert!(
        refused.stderr.contains("HOST KEY CHANGED"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains(&ns.node_ip), "{}", refused.stderr);
}

#[test]
fn a_proxy_command_carries_the_connection_through_the_bastion() {
    if crate::support::model().is_none() || !sshd::available() {
        return;
    }
    let Some(ns) = Netns::create(11) else { return };
    let dir = tempdir();
    let key = ClientKey::new(dir.path(), "client", "ed25519");
    let (bastion, target, known_hosts) = bastion_and_target(&ns, dir.path(), &key);
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    // The command is OpenSSH's own client, on the same file: `%h` and `%p` are the node's.
    std::fs::write(
        &ssh_config,
        format!(
            "Host gpu\n  HostName 127.0.0.1\n  Port {}\n  \
             ProxyCommand ssh -F \"{}\" -W %h:%p bastion\n  ProxyJump none-such\n\n\
             Host bastion\n  HostName {}\n  Port {}\n  ProxyCommand none\n\n\
             Host *\n  User {}\n  IdentityFile {}\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n",
            target.port,
            home.join(".ssh/config").display(),
            ns.node_ip,
            bastion.port,
            sshd::user(),
            key.private.display(),
            known_hosts.display()
        ),
    )
    .expect("ssh config");
    let ssh = |args: &[&str]| {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(args)
            .env("HOME", &home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
    };
    // The oracle: OpenSSH reaches the node through the command (the later ProxyJump does not
    // apply), and not without it.
    let out = ssh(&["gpu", "true"]);
    assert!(out.status.success(), "{out:?}");
    let out = ssh(&[
        "-o",
        "ProxyCommand=none",
        "-o",
        "ConnectTimeout=3",
        "gpu",
        "true",
    ]);
    assert!(!out.status.success(), "reached directly: {out:?}");

    let config = format!(
        "[nodes.gpu]\nhost = \"gpu\"\nknown_hosts = {:?}\nremote_dir = {:?}\n",
        known_hosts.display().to_string(),
        dir.path().join("node-gpu").display().to_string(),
    );
    let env = Env::from_dir(dir, free_port(), &config);
    let run = |args: &[&str]| {
        crate::support::Run::from(
            env.command(args)
                .env("HOME", &home)
                .env_remove("SSH_AUTH_SOCK")
                .output()
                .expect("run"),
        )
    };
    run(&["hive", "install", "gpu"]).expect(0);
    // Reached and logged in through the command: the hive is simply not running.
    run(&["hive", "status", "gpu"]).expect(6);
    let log = bastion.log();
    assert!(
        log.contains(&format!("target 127.0.0.1 port {}", target.port)),
        "the bastion's log shows no forward: {log}"
    );

    // Without an ssh_config: nodes.toml's `jump` names the bastion, a node of the same file.
    // `nodes trust` records both hops' keys in an empty known_hosts, and they are checked.
    std::fs::remove_file(&ssh_config).expect("rm ssh config");
    let fresh = env.path().join("known_hosts.fresh");
    std::fs::write(
        env.path().join("nodes.toml"),
        format!(
            "[defaults]\nuser = {:?}\nidentity_file = {:?}\nknown_hosts = {:?}\n\n\
             [nodes.bastion]\nhost = {:?}\nport = {}\n\n\
             [nodes.gpu]\nhost = \"127.0.0.1\"\nport = {}\njump = \"bastion\"\n\
             remote_dir = {:?}\n",
            sshd::user(),
            key.private.display().to_string(),
            fresh.display().to_string(),
            ns.node_ip,
            bastion.port,
            target.port,
            env.path().join("node-gpu").display().to_string(),
        ),
    )
    .expect("nodes.toml");
    run(&["hive", "status", "gpu"]).expect(4);
    run(&["nodes", "trust", "gpu"]).expect(0);
    let known = std::fs::read_to_string(&fresh).expect("known_hosts");
    assert!(
        known.contains(&bastion.known_hosts_line_at(&ns.node_ip)),
        "{known}"
    );
    assert!(known.contains(&target.known_hosts_line()), "{known}");
    run(&["hive", "status", "gpu"]).expect(6);
    // A hop that is neither a node nor `[user@]host[:port]` is a configuration error.
    let toml = std::fs::read_to_string(env.path().join("nodes.toml")).expect("nodes.toml");
    std::fs::write(
        env.path().join("nodes.toml"),
        toml.replace("jump = \"bastion\"", "jump = \"bastion, ops@:x\""),
    )
    .expect("nodes.toml");
    run(&["hive", "status", "gpu"]).expect(3);
}

/// A bastion's sshd at the namespace's address (logging each forward) and a target sshd that
/// listens on the namespace's loopback only, so the bastion alone reaches it; both trusted in a
/// known_hosts file under `dir`.
fn bastion_and_target(ns: &Netns, dir: &Path, key: &ClientKey) -> (Sshd, Sshd, PathBuf) {
    let bastion = Sshd::start_with(
        &dir.join("sshd-bastion"),
        &[key],
        &Options {
            netns: Some((&ns.name, &ns.node_ip)),
            extra: "LogLevel DEBUG1\n",
            ..Options::default()
        },
    );
    let target = Sshd::start_with(
        &dir.join("sshd-gpu"),
        &[key],
        &Options {
            netns: Some((&ns.name, &ns.node_ip)),
            listen: Some("127.0.0.1"),
            ..Options::default()
        },
    );
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "{}{}",
            bastion.known_hosts_line_at(&ns.node_ip),
            target.known_hosts_line()
        ),
    )
    .expect("known_hosts");
    (bastion, target, known_hosts)
}
