//! `PubkeyAcceptedAlgorithms` (and its old name `PubkeyAcceptedKeyTypes`) as OpenSSH reads it,
//! OpenSSH's own client on the same file as the oracle: rbee offers only the keys the list
//! accepts, and a list that accepts nothing rbee can sign with is refused naming its line.

use super::{Fleet, node};

#[test]
fn only_the_keys_the_list_accepts_are_offered_as_openssh_offers_them() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    // The client's only key is ed25519 (an RSA one comes later).
    let key = std::cell::RefCell::new(fleet.key.private.clone());
    let rbee = || {
        let out = env
            .command(&["hive", "status", "a"])
            .env("HOME", &home)
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ssh = || {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                fleet.known_hosts().display()
            ))
            .arg("-i")
            .arg(&*key.borrow())
            .arg("-p")
            .arg(fleet.servers[0].port.to_string())
            .arg(format!("{}@127.0.0.1", crate::support::sshd::user()))
            .arg("true")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
            .status
            .success()
    };
    for (directive, spec, connects) in [
        ("PubkeyAcceptedAlgorithms", "-ssh-ed25519", false),
        ("PubkeyAcceptedAlgorithms", "-ssh-ed*", false),
        ("PubkeyAcceptedKeyTypes", "-ssh-ed25519", false),
        (
            "PubkeyAcceptedAlgorithms",
            "rsa-sha2-512,rsa-sha2-256",
            false,
        ),
        ("PubkeyAcceptedAlgorithms", "+ssh-rsa", true),
        ("PubkeyAcceptedAlgorithms", "^ssh-ed25519", true),
        ("PubkeyAcceptedAlgorithms", "-rsa-*", true),
        ("PubkeyAcceptedAlgorithms", "rsa-sha2-512,ssh-ed25519", true),
    ] {
        std::fs::write(
            &ssh_config,
            format!("Host 127.0.0.1\n  {directive} {spec}\n"),
        )
        .expect("config");
        assert_eq!(ssh(), connects, "OpenSSH with `{directive} {spec}`");
        let (code, stderr) = rbee();
        if connects {
            assert_eq!(code, Some(6), "`{directive} {spec}`: {stderr}");
        } else {
            assert_eq!(code, Some(4), "`{directive} {spec}`: {stderr}");
            assert!(
                stderr.contains("`PubkeyAcceptedAlgorithms` does not accept `ssh-ed25519`"),
                "`{directive} {spec}`: {stderr}"
            );
        }
    }
    // An RSA key: signed with the node's best SHA-2 hash the list holds, or not offered.
    let rsa = crate::support::sshd::ClientKey::new(env.path(), "client_rsa", "rsa");
    let authorized = fleet.servers[0].dir.join("authorized_keys");
    let mut keys = std::fs::read_to_string(&authorized).expect("authorized_keys");
    keys.push_str(&format!("{}\n", rsa.public));
    std::fs::write(&authorized, keys).expect("authorized_keys");
    env.edit_config(
        &format!("identity_file = {:?}", key.borrow().display().to_string()),
        &format!("identity_file = {:?}", rsa.private.display().to_string()),
    );
    *key.borrow_mut() = rsa.private.clone();
    for (spec, connects) in [
        ("rsa-sha2-256", true),
        ("-rsa-sha2-512", true),
        ("^rsa-sha2-512", true),
        ("-rsa-sha2-*", false),
        // SHA-1, which this sshd refuses.
        ("ssh-rsa", false),
    ] {
        std::fs::write(
            &ssh_config,
            format!("Host 127.0.0.1\n  PubkeyAcceptedAlgorithms {spec}\n"),
        )
        .expect("config");
        assert_eq!(ssh(), connects, "OpenSSH with `{spec}` and an RSA key");
        let (code, stderr) = rbee();
        assert_eq!(
            code,
            Some(if connects { 6 } else { 4 }),
            "`{spec}` with an RSA key: {stderr}"
        );
    }
    // The first value obtained wins, under either name.
    std::fs::write(
        &ssh_config,
        "Host 127.0.0.1\n  PubkeyAcceptedKeyTypes -rsa-sha2-*,ssh-ed25519\n\
         Host *\n  PubkeyAcceptedAlgorithms rsa-sha2-512,ssh-ed25519\n",
    )
    .expect("config");
    assert!(!ssh());
    assert_eq!(rbee().0, Some(4));
    // A list of nothing rbee can sign with (security keys only) is refused before connecting,
    // naming its line; OpenSSH, which has no such key here either, does not log in.
    std::fs::write(
        &ssh_config,
        "Host 127.0.0.1\n  BatchMode yes\n  PubkeyAcceptedAlgorithms sk-ssh-ed25519@openssh.com\n",
    )
    .expect("config");
    assert!(!ssh());
    let (code, stderr) = rbee();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("`{}` line 3", ssh_config.display())),
        "{stderr}"
    );
}
