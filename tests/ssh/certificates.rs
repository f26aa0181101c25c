//! Certificates as OpenSSH uses them, OpenSSH's own client on the same files as the oracle:
//! a user certificate (beside the key, or a `CertificateFile`) logs in where the plain key is
//! not authorized, signed with the key file or with ssh-agent's key; a host certificate is verified against an `@cert-authority` line; a key
//! marked `@revoked` is refused.

use super::{Fleet, node};
use crate::support::sshd::{self, ClientKey, Options};

/// A node whose sshd trusts a user CA and has no authorized_keys at all (the first value wins
/// in sshd_config too): only a certificate logs in. The CA's directory lives as long as the
/// first part.
fn user_ca_fleet() -> Option<(tempfile::TempDir, ClientKey, Fleet)> {
    let ca_dir = crate::support::tempdir();
    let ca = ClientKey::new(ca_dir.path(), "user_ca", "ed25519");
    let extra = format!(
        "TrustedUserCAKeys {}\nAuthorizedKeysFile none\n",
        ca.private.with_extension("pub").display()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let fleet = Fleet::build_with(&[node("a")], true, "", &options)?;
    Some((ca_dir, ca, fleet))
}

#[test]
fn a_user_certificate_logs_in_where_the_plain_key_is_not_authorized() {
    let Some((_ca_dir, ca, fleet)) = user_ca_fleet() else {
        return;
    };
    let env = &fleet.env;
    let port = fleet.servers[0].port;
    let user = sshd::user();
    let key = &fleet.key.private;
    let (connects, said) = sshd::openssh_connects(port, &user, key, &fleet.known_hosts(), "yes");
    assert!(!connects, "OpenSSH logged in with the plain key: {said}");
    env.run(&["hive", "status", "a"]).expect(4);

    // `ssh-keygen -s ca -I id -n USER`: the certificate lands beside the key.
    sshd::sign(
        &ca.private,
        &key.with_extension("pub"),
        &["-I", "rbee-test", "-n", &user],
    );
    let beside = key.with_file_name("client_ed25519-cert.pub");
    assert!(beside.exists());
    let (connects, said) = sshd::openssh_connects(port, &user, key, &fleet.known_hosts(), "yes");
    assert!(
        connects,
        "OpenSSH did not log in with the certificate: {said}"
    );
    // Reached and logged in: the hive is simply not running.
    env.run(&["hive", "status", "a"]).expect(6);

    // Elsewhere, named by ssh_config's `CertificateFile`.
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let moved = env.path().join("certs/lab-cert");
    std::fs::create_dir_all(moved.parent().expect("parent")).expect("mkdir");
    std::fs::rename(&beside, &moved).expect("move certificate");
    let ssh_config = home.join(".ssh/config");
    std::fs::write(
        &ssh_config,
        format!("Host 127.0.0.1\n  CertificateFile {}\n", moved.display()),
    )
    .expect("ssh config");
    let status = || {
        env.command(&["hive", "status", "a"])
            .env("HOME", &home)
            .output()
            .expect("run")
            .status
            .code()
    };
    let openssh = |config: &std::path::Path| {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(config)
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                fleet.known_hosts().display()
            ))
            .arg("-i")
            .arg(key)
            .args(["-p", &port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
    };
    assert!(openssh(&ssh_config).status.success());
    assert_eq!(status(), Some(6));
    // Without it, neither logs in.
    std::fs::write(&ssh_config, "Host other\n  User x\n").expect("ssh config");
    assert!(!openssh(&ssh_config).status.success());
    assert_eq!(status(), Some(4));
}

#[test]
fn a_certificate_file_is_signed_with_the_agents_key_where_no_key_file_is_readable() {
    let Some((_ca_dir, ca, fleet)) = user_ca_fleet() else {
        return;
    };
    let env = &fleet.env;
    let root = env.path();
    let port = fleet.servers[0].port;
    let user = sshd::user();
    let key = &fleet.key.private;
    sshd::sign(
        &ca.private,
        &key.with_extension("pub"),
        &["-I", "rbee-test", "-n", &user],
    );
    let cert = root.join("certs/lab-cert");
    std::fs::create_dir_all(cert.parent().expect("parent")).expect("mkdir");
    std::fs::rename(key.with_file_name("client_ed25519-cert.pub"), &cert).expect("move");
    // The agent gets the key alone (no certificate beside it), then the key file goes: only
    // the agent can sign.
    let socket = root.join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    assert!(crate::support::eventually(
        std::time::Duration::from_secs(5),
        || socket.exists()
    ));
    let added = std::process::Command::new("ssh-add")
        .arg(key)
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add");
    assert!(added.status.success(), "{added:?}");
    let listed = std::process::Command::new("ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add -L");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("cert"),
        "{listed:?}"
    );
    std::fs::remove_file(key).expect("rm key");
    env.edit_config(
        &format!("identity_file = {:?}\n", key.display().to_string()),
        "",
    );
    let home = root.join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    let openssh = || {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                fleet.known_hosts().display()
            ))
            .args(["-p", &port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .arg("true")
            .env("SSH_AUTH_SOCK", &socket)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
    };
    let status = || {
        env.command(&["hive", "status", "a"])
            .env("HOME", &home)
            .env("SSH_AUTH_SOCK", &socket)
            .output()
            .expect("run")
    };
    // With the certificate named, both log in (the hive is simply not running).
    std::fs::write(
        &ssh_config,
        format!("Host 127.0.0.1\n  CertificateFile {}\n", cert.display()),
    )
    .expect("ssh config");
    let ssh_out = openssh();
    let out = status();
    // `IdentitiesOnly`: the agent's key is no identity file, so OpenSSH finds no key to sign
    // the certificate's login with.
    std::fs::write(
        &ssh_config,
        format!(
            "Host 127.0.0.1\n  IdentitiesOnly yes\n  CertificateFile {}\n",
            cert.display()
        ),
    )
    .expect("ssh config");
    let ssh_only = openssh();
    let only = status();
    // Without it, neither: the agent's plain key is not authorized.
    std::fs::write(&ssh_config, "Host other\n  User x\n").expect("ssh config");
    let ssh_without = openssh();
    let without = status();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(ssh_out.status.success(), "{ssh_out:?}");
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ssh_only.status.success(), "{ssh_only:?}");
    assert_eq!(
        only.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&only.stderr)
    );
    assert!(!ssh_without.status.success(), "{ssh_without:?}");
    assert_eq!(
        without.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
}

#[test]
fn a_host_certificate_is_verified_against_a_cert_authority_line() {
    let ca_dir = crate::support::tempdir();
    let ca = ClientKey::new(ca_dir.path(), "host_ca", "ed25519");
    let other_ca = ClientKey::new(ca_dir.path(), "other_ca", "ed25519");
    let options = Options {
        host_ca: Some((&ca.private, "127.0.0.1")),
        ..Options::default()
    };
    // Nothing recorded for the host itself: only the authority.
    let Some(fleet) = Fleet::build_with(&[node("a")], false, "", &options) else {
        return;
    };
    let env = &fleet.env;
    let port = fleet.servers[0].port;
    let user = sshd::user();
    let openssh =
        || sshd::openssh_connects(port, &user, &fleet.key.private, &fleet.known_hosts(), "yes");
    let authority = |key: &ClientKey| {
        format!(
            "@cert-authority *.example,[127.0.0.1]:{port} {}\n",
            key.public
        )
    };
    std::fs::write(fleet.known_hosts(), authority(&ca)).expect("known_hosts");
    let (connects, said) = openssh();
    assert!(
        connects,
        "OpenSSH did not take the host certificate: {said}"
    );
    env.run(&["hive", "status", "a"]).expect(6);
    env.run(&["nodes", "check", "a"]).expect(0);

    // Another authority: the certificate proves nothing, and its plain key is not known.
    std::fs::write(fleet.known_hosts(), authority(&other_ca)).expect("known_hosts");
    let (connects, said) = openssh();
    assert!(!connects, "OpenSSH connected: {said}");
    env.run(&["hive", "status", "a"]).expect(4);

    // The authority revoked: refused, even when accepting new keys.
    std::fs::write(
        fleet.known_hosts(),
        format!("{}@revoked * {}\n", authority(&ca), ca.public),
    )
    .expect("known_hosts");
    let (connects, said) = openssh();
    assert!(!connects, "OpenSSH connected: {said}");
    env.run(&["hive", "status", "a"]).expect(4);
    env.run(&["--accept-new-host-key", "hive", "status", "a"])
        .expect(4);
}

#[test]
fn a_host_certificate_for_another_name_is_refused() {
    let ca_dir = crate::support::tempdir();
    let ca = ClientKey::new(ca_dir.path(), "host_ca", "ed25519");
    let options = Options {
        host_ca: Some((&ca.private, "gpu1.example")),
        ..Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], false, "", &options) else {
        return;
    };
    let port = fleet.servers[0].port;
    std::fs::write(
        fleet.known_hosts(),
        format!("@cert-authority [127.0.0.1]:{port} {}\n", ca.public),
    )
    .expect("known_hosts");
    let (connects, said) = sshd::openssh_connects(
        port,
        &sshd::user(),
        &fleet.key.private,
        &fleet.known_hosts(),
        "yes",
    );
    assert!(!connects, "OpenSSH connected: {said}");
    let run = fleet.env.run(&["hive", "status", "a"]);
    run.expect(4);
    assert!(run.stderr.contains("gpu1.example"), "{}", run.stderr);
}

#[test]
fn a_revoked_host_key_is_refused_even_when_accepting_new_ones() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let server = &fleet.servers[0];
    std::fs::write(
        fleet.known_hosts(),
        format!(
            "{}@revoked [127.0.0.1]:{} {}\n",
            server.known_hosts_line(),
            server.port,
            server.host_key
        ),
    )
    .expect("known_hosts");
    let (connects, said) = sshd::openssh_connects(
        server.port,
        &sshd::user(),
        &fleet.key.private,
        &fleet.known_hosts(),
        "accept-new",
    );
    assert!(!connects, "OpenSSH connected: {said}");
    for args in [
        &["hive", "status", "a"][..],
        &["--accept-new-host-key", "hive", "status", "a"][..],
        &["nodes", "trust", "a"][..],
    ] {
        let run = env.run(args);
        run.expect(4);
        assert!(run.stderr.contains("@revoked"), "{}", run.stderr);
    }
}
