//! Host keys as OpenSSH checks them, with OpenSSH's own client on the same known_hosts as the
//! oracle: a key of another type recorded for the host is a changed key, a host is known by
//! any key it offers, and recording a key keeps `~/.ssh` private and the file free of blank
//! lines.

use std::os::unix::fs::PermissionsExt;

use super::{Fleet, node};
use crate::support::sshd::{self, ClientKey, Options};

#[test]
fn a_known_key_of_another_type_is_a_changed_key_refused_even_when_accepting_new_ones() {
    // The node now offers only an ECDSA key; known_hosts holds an ed25519 key for it.
    let options = Options {
        host_keys: &["ecdsa"],
        ..Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], false, "", &options) else {
        return;
    };
    let env = &fleet.env;
    let old = ClientKey::new(env.path(), "old_host_key", "ed25519");
    let old_key: Vec<&str> = old.public.split_whitespace().take(2).collect();
    let line = format!(
        "[127.0.0.1]:{} {}\n",
        fleet.servers[0].port,
        old_key.join(" ")
    );
    std::fs::write(fleet.known_hosts(), &line).expect("known_hosts");
    // OpenSSH, even with accept-new, will not log in: the host's identity changed.
    let (connects, said) = sshd::openssh_connects(
        fleet.servers[0].port,
        &sshd::user(),
        &fleet.key.private,
        &fleet.known_hosts(),
        "accept-new",
    );
    assert!(!connects, "OpenSSH connected: {said}");
    let commands: [&[&str]; 3] = [
        &["hive", "status", "a"],
        &["--accept-new-host-key", "hive", "status", "a"],
        &["nodes", "trust", "a"],
    ];
    for args in commands {
        let run = env.run(args);
        run.expect(4);
        assert!(run.stderr.contains("HOST KEY CHANGED"), "{}", run.stderr);
        assert!(
            run.stderr
                .contains(&fleet.servers[0].fingerprint_of("ecdsa")),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains(&old.fingerprint()), "{}", run.stderr);
        assert!(run.stderr.contains("line 1"), "{}", run.stderr);
    }
    assert_eq!(
        std::fs::read_to_string(fleet.known_hosts()).expect("known_hosts"),
        line,
        "known_hosts changed"
    );
}

#[test]
fn a_host_is_known_by_any_key_it_offers() {
    let options = Options {
        host_keys: &["ed25519", "ecdsa"],
        ..Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], false, "", &options) else {
        return;
    };
    let env = &fleet.env;
    let server = &fleet.servers[0];
    // Only the ECDSA key is recorded, as after `ssh-keyscan -t ecdsa`.
    let ecdsa = &server.host_keys[1].1;
    std::fs::write(
        fleet.known_hosts(),
        format!("[127.0.0.1]:{} {ecdsa}\n", server.port),
    )
    .expect("known_hosts");
    let (connects, said) = sshd::openssh_connects(
        server.port,
        &sshd::user(),
        &fleet.key.private,
        &fleet.known_hosts(),
        "yes",
    );
    assert!(connects, "OpenSSH did not connect: {said}");
    // Reached and logged in: the hive is simply not running.
    let run = env.run(&["hive", "status", "a"]);
    run.expect(6);
    let run = env.run(&["--json", "nodes", "trust", "a"]);
    run.expect(0);
    assert_eq!(
        run.json_lines()[0]["state"],
        "already_trusted",
        "{}",
        run.stdout
    );
}

#[test]
fn recording_a_key_makes_a_private_directory_and_no_blank_first_line() {
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let dot_ssh = env.path().join("home/.ssh");
    let known_hosts = dot_ssh.join("known_hosts");
    env.edit_config(
        &format!(
            "known_hosts = {:?}",
            fleet.known_hosts().display().to_string()
        ),
        &format!("known_hosts = {:?}", known_hosts.display().to_string()),
    );
    env.run(&["--accept-new-host-key", "hive", "status", "a"])
        .expect(6);
    let mode = std::fs::metadata(&dot_ssh)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    let text = std::fs::read_to_string(&known_hosts).expect("known_hosts");
    assert_eq!(text, fleet.servers[0].known_hosts_line(), "{text:?}");
    // OpenSSH takes the recorded line as the host's key.
    let (connects, said) = sshd::openssh_connects(
        fleet.servers[0].port,
        &sshd::user(),
        &fleet.key.private,
        &known_hosts,
        "yes",
    );
    assert!(connects, "OpenSSH did not connect: {said}");
}

#[test]
fn user_known_hosts_file_from_ssh_config_is_read_whole_and_new_keys_go_to_its_first_file() {
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let server = &fleet.servers[0];
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let third = env.path().join("third");
    let ssh_config = home.join(".ssh/config");
    // `~` and `%d` are the passwd entry's home (OpenSSH's, whatever `$HOME` says): the test's
    // home is named from there.
    let home_rel = super::system_config::from_passwd_home(&home);
    std::fs::write(
        &ssh_config,
        format!(
            "Host 127.0.0.1\n  UserKnownHostsFile ~/{home_rel}/.ssh/first-%u \
             %d/{home_rel}/second-%h {}\n",
            third.display()
        ),
    )
    .expect("ssh config");
    // nodes.toml names no file: ssh_config's list decides.
    env.edit_config(
        &format!(
            "known_hosts = {:?}\n",
            fleet.known_hosts().display().to_string()
        ),
        "",
    );
    let user = sshd::user();
    let first = home.join(format!(".ssh/first-{user}"));
    let second = home.join("second-127.0.0.1");
    // OpenSSH's list.
    let oracle = std::process::Command::new("ssh")
        .arg("-F")
        .arg(&ssh_config)
        .args(["-G", "127.0.0.1"])
        .output()
        .expect("ssh -G");
    let listed: Vec<std::path::PathBuf> = String::from_utf8_lossy(&oracle.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("userknownhostsfile "))
        .expect("userknownhostsfile")
        .split_whitespace()
        .map(|f| super::system_config::lexical(std::path::Path::new(f)))
        .collect();
    assert_eq!(listed, vec![first.clone(), second.clone(), third.clone()]);
    let status = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(["hive", "status", "a"]);
        env.command(&args).env("HOME", &home).output().expect("run")
    };
    let code = |out: &std::process::Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Known from the second file: reached, the hive is simply not running.
    std::fs::write(&second, server.known_hosts_line()).expect("second");
    assert_eq!(code(&status(&[])).0, Some(6), "{}", code(&status(&[])).1);
    // Unknown in all three: refused, then recorded in the first file only.
    std::fs::remove_file(&second).expect("rm");
    let (exit, stderr) = code(&status(&[]));
    assert_eq!(exit, Some(4), "{stderr}");
    let (exit, stderr) = code(&status(&["--accept-new-host-key"]));
    assert_eq!(exit, Some(6), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&first).expect("first"),
        server.known_hosts_line()
    );
    assert!(!second.exists() && !third.exists());
    // OpenSSH takes the recorded line as the host's key.
    let (connects, said) =
        sshd::openssh_connects(server.port, &user, &fleet.key.private, &first, "yes");
    assert!(connects, "OpenSSH did not connect: {said}");
    // `StrictHostKeyChecking accept-new` records an unknown key as the flag does.
    std::fs::remove_file(&first).expect("rm");
    std::fs::write(
        &ssh_config,
        format!(
            "Host 127.0.0.1\n  StrictHostKeyChecking accept-new\n  \
             UserKnownHostsFile ~/{home_rel}/.ssh/first-%u\n"
        ),
    )
    .expect("ssh config");
    let (exit, stderr) = code(&status(&[]));
    assert_eq!(exit, Some(6), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&first).expect("first"),
        server.known_hosts_line()
    );
    // nodes.toml's `known_hosts` wins over ssh_config's list (which holds the key).
    std::fs::write(
        &ssh_config,
        format!("Host 127.0.0.1\n  UserKnownHostsFile ~/{home_rel}/.ssh/first-%u\n"),
    )
    .expect("ssh config");
    let empty = env.path().join("empty_known_hosts");
    std::fs::write(&empty, "").expect("empty");
    env.edit_config(
        "[nodes.a]\n",
        &format!(
            "[nodes.a]\nknown_hosts = {:?}\n",
            empty.display().to_string()
        ),
    );
    let (exit, stderr) = code(&status(&[]));
    assert_eq!(exit, Some(4), "{stderr}");
    assert!(stderr.contains(&empty.display().to_string()), "{stderr}");
    env.edit_config(
        &format!("known_hosts = {:?}\n", empty.display().to_string()),
        "",
    );
    // `none`: no file is read and none is written, even when accepting new keys.
    std::fs::write(&ssh_config, "Host *\n  UserKnownHostsFile none\n").expect("ssh config");
    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let (exit, stderr) = code(&status(extra));
        assert_eq!(exit, Some(4), "{stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(&first).expect("first"),
        server.known_hosts_line()
    );
}
