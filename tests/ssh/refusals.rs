//! What rbee reports when a node, or this machine, refuses: a changed host key, a client key
//! the node does not take, a port where nothing listens, a key file this user may not read.

use std::os::unix::fs::PermissionsExt;

use super::{Fleet, node};
use crate::support::sshd::ClientKey;
use crate::support::{Env, free_port, user};

/// The `fields` of this machine's audit records of `event`, oldest first.
fn audit_fields(env: &Env, event: &str) -> Vec<serde_json::Value> {
    let run = env.run(&["--json", "audit", "tail", "-n", "100000"]);
    run.expect(0);
    run.json_lines()
        .into_iter()
        .filter(|r| r["event"] == event)
        .map(|r| r["fields"].clone())
        .collect()
}

#[test]
fn a_changed_host_key_is_audited_with_both_fingerprints_by_every_command() {
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let impostor = ClientKey::new(env.path(), "impostor", "ed25519");
    let impostor_key: Vec<&str> = impostor.public.split_whitespace().take(2).collect();
    std::fs::write(
        fleet.known_hosts(),
        format!(
            "[127.0.0.1]:{} {}\n",
            fleet.servers[0].port,
            impostor_key.join(" ")
        ),
    )
    .expect("known_hosts");
    let presented = fleet.servers[0].fingerprint();
    let known = impostor.fingerprint();
    assert_ne!(presented, known);
    // Each way of reaching a node meets the changed key; each refusal leaves its own record.
    let commands: [&[&str]; 4] = [
        &["hive", "status", "a"],
        &["--accept-new-host-key", "hive", "status", "a"],
        &["nodes", "check", "a"],
        &["nodes", "trust", "a"],
    ];
    for (i, args) in commands.iter().enumerate() {
        let run = env.run(args);
        run.expect(4);
        let refused = audit_fields(env, "host_key_refused");
        assert_eq!(
            refused.len(),
            i + 1,
            "`rbee {}` did not record host_key_refused; records: {refused:?}\nstdout: {}\nstderr: {}",
            args.join(" "),
            run.stdout,
            run.stderr
        );
        let record = &refused[i];
        assert_eq!(record["node"], "a", "{record}");
        assert_eq!(record["fingerprint"], presented.as_str(), "{record}");
        assert_eq!(record["known_fingerprint"], known.as_str(), "{record}");
    }
}

#[test]
fn nodes_check_tells_a_refused_client_key_from_an_unreachable_node() {
    let Some(fleet) = Fleet::new(&[node("a"), node("b")]) else {
        return;
    };
    let env = &fleet.env;
    // Node a answers, but takes only another key.
    let stranger = ClientKey::new(env.path(), "stranger", "ed25519");
    std::fs::write(
        fleet.servers[0].dir.join("authorized_keys"),
        format!("{}\n", stranger.public),
    )
    .expect("authorized_keys");
    // Nothing listens at node b's port.
    env.edit_config(
        &format!("port = {}", fleet.servers[1].port),
        &format!("port = {}", free_port()),
    );
    let run = env.run(&["--json", "nodes", "check", "a", "b"]);
    run.expect(4);
    let lines = run.json_lines();
    let check = |name: &str| {
        lines
            .iter()
            .find(|l| l["node"] == name)
            .unwrap_or_else(|| panic!("no check of `{name}`: {lines:?}"))
            .clone()
    };
    let a = check("a");
    assert_eq!(a["reachable"], true, "{a}");
    assert_eq!(a["authenticated"], false, "{a}");
    assert_eq!(a["ok"], false, "{a}");
    let error = a["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("authentication") && error.contains("refused"),
        "{a}"
    );
    let b = check("b");
    assert_eq!(b["reachable"], false, "{b}");
    assert_eq!(b["authenticated"], false, "{b}");
    assert_eq!(b["ok"], false, "{b}");
}

#[test]
fn a_key_file_this_user_may_not_read_or_create_is_named() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let Some(user) = user::unprivileged() else {
        return;
    };
    let env = &fleet.env;
    let root = env.path();
    // The user may enter the environment and read nodes.toml and known_hosts, but not write
    // beside nodes.toml, as with a shared /etc/rbee/nodes.toml.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    user.own(&fleet.key.private);
    let state = root.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    user.own(&state);
    let rbee = user.binary(root);
    let keys = root.join("keys");
    let key_file = keys.join("a.key");

    // An identity file of another user's (root's here).
    let root_only = ClientKey::new(root, "root_only", "ed25519");
    env.edit_config(
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
        &format!(
            "identity_file = {:?}",
            root_only.private.display().to_string()
        ),
    );
    std::fs::create_dir_all(&keys).expect("keys dir");
    user.own(&keys);
    let run = env.run_as(&user, &rbee, &["hive", "status", "a"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&root_only.private.display().to_string()),
        "{}",
        run.stderr
    );
    env.edit_config(
        &format!(
            "identity_file = {:?}",
            root_only.private.display().to_string()
        ),
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
    );

    // The node's signing key, created by another user (root here), private to them.
    std::fs::remove_file(&key_file).expect("the key the user created");
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let run = env.run_as(&user, &rbee, &["hive", "status", "a"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(&key_file.display().to_string()),
        "{}",
        run.stderr
    );

    // No key yet, and the directory beside nodes.toml is not this user's to write.
    std::fs::remove_dir_all(&keys).expect("rm keys");
    let run = env.run_as(&user, &rbee, &["hive", "status", "a"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(&key_file.display().to_string()),
        "exit {}: {}",
        run.code,
        run.stderr
    );
    assert!(!keys.exists());
}

#[test]
fn an_identity_file_that_does_not_exist_is_named_in_the_refusal() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.edit_config(
        &format!(
            "identity_file = {:?}",
            fleet.key.private.display().to_string()
        ),
        "identity_file = \"/nonexistent/rbee-key\"",
    );
    let run = env
        .command(&["hive", "status", "a"])
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("`/nonexistent/rbee-key`") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("no key found"), "{stderr}");
}

#[test]
fn a_second_factor_the_node_asks_for_is_named_not_called_a_refusal() {
    for methods in ["publickey,password", "publickey,keyboard-interactive"] {
        let extra = format!(
            "AuthenticationMethods {methods}\nPasswordAuthentication yes\n\
             KbdInteractiveAuthentication yes\n"
        );
        let options = crate::support::sshd::Options {
            extra: &extra,
            ..Default::default()
        };
        let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &options) else {
            return;
        };
        let run = fleet.env.run(&["hive", "status", "a"]);
        run.expect(4);
        assert!(
            run.stderr.contains("second factor"),
            "{methods}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("was refused"),
            "{methods}: {}",
            run.stderr
        );
    }
}
