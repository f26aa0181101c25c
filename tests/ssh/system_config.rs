//! What OpenSSH reads whatever the environment says: the system-wide ssh_config
//! (`/etc/ssh/ssh_config`) after the user's, the first value obtained in either file winning
//! and the system file's relative `Include`s starting in its own directory (OpenSSH's own
//! client on the two files concatenated, the user's first, is the oracle;
//! `RBEE_SSH_SYSTEM_CONFIG` points rbee at a test's file); and `~` and `%d` in them, the
//! passwd entry's home, not `$HOME`.

use std::path::{Path, PathBuf};

use super::{Fleet, node};

/// `ssh -F FILE -G 127.0.0.1`: the value OpenSSH resolves for `key`.
fn oracle(file: &Path, key: &str) -> String {
    let out = std::process::Command::new("ssh")
        .arg("-F")
        .arg(file)
        .args(["-G", "127.0.0.1"])
        .output()
        .expect("ssh -G");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_string))
        .unwrap_or_default()
}

/// Whether `ssh-keygen -F` finds `host` in `file` (it finds hashed names too).
fn keygen_finds(host: &str, file: &Path) -> bool {
    std::process::Command::new("ssh-keygen")
        .args(["-F", host, "-f"])
        .arg(file)
        .output()
        .expect("ssh-keygen")
        .status
        .success()
}

#[test]
fn the_system_file_applies_after_the_users_and_the_first_value_wins_across_both() {
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let server = &fleet.servers[0];
    let port = server.port;
    // ssh_config decides the port.
    env.edit_config(&format!("port = {port}\n"), "");
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let user_file = home.join(".ssh/config");
    let etc = env.path().join("etc-ssh");
    std::fs::create_dir_all(etc.join("ssh_config.d")).expect("mkdir");
    let system = etc.join("ssh_config");
    std::fs::write(
        &system,
        "Include ssh_config.d/*.conf\n\nHost *\n  SendEnv LANG LC_*\n  HashKnownHosts yes\n  \
         GSSAPIAuthentication yes\n",
    )
    .expect("system file");
    std::fs::write(
        etc.join("ssh_config.d/lab.conf"),
        format!("Host 127.0.0.1\n  Port {port}\n"),
    )
    .expect("included file");
    // The oracle's file: the user's, then the system's, which starts outside any block (its
    // Include written whole, as OpenSSH would resolve it from /etc/ssh).
    let both = env.path().join("both");
    let write_user = |text: &str| {
        std::fs::write(&user_file, text).expect("user file");
        let system_text = std::fs::read_to_string(&system)
            .expect("system file")
            .replace(
                "Include ssh_config.d/",
                &format!("Include {}/ssh_config.d/", etc.display()),
            );
        std::fs::write(&both, format!("{text}\nMatch all\n{system_text}")).expect("both");
    };
    let run = |extra: &[&str], system_file: &Path| {
        let mut args = extra.to_vec();
        args.extend(["hive", "status", "a"]);
        let out = env
            .command(&args)
            .env("HOME", &home)
            .env("RBEE_SSH_SYSTEM_CONFIG", system_file)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let known_hosts = fleet.known_hosts();
    let host = format!("[127.0.0.1]:{port}");

    // The user's file sets neither: the system file's port and hashing apply.
    write_user("Host other\n  Port 1\n");
    assert_eq!(oracle(&both, "port"), port.to_string());
    assert_eq!(oracle(&both, "hashknownhosts"), "yes");
    let (code, stderr) = run(&["--accept-new-host-key"], &system);
    assert_eq!(code, Some(6), "{stderr}");
    let recorded = std::fs::read_to_string(&known_hosts).expect("known_hosts");
    assert!(recorded.starts_with("|1|"), "not hashed: {recorded:?}");
    assert!(!recorded.contains("127.0.0.1"), "{recorded:?}");
    assert!(keygen_finds(&host, &known_hosts), "{recorded:?}");
    // The hashed line is read back as the host's key.
    let (code, stderr) = run(&[], &system);
    assert_eq!(code, Some(6), "{stderr}");

    // `none`: no system file, so port 22, where no sshd of the test listens.
    let (code, stderr) = run(&[], Path::new("none"));
    assert_eq!(code, Some(4), "{stderr}");

    // A value the user's file obtains first wins over the system file's.
    write_user("Host 127.0.0.1\n  Port 1\n");
    assert_eq!(oracle(&both, "port"), "1");
    let (code, stderr) = run(&[], &system);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1)"), "{stderr}");
    write_user("Host *\n  HashKnownHosts no\n");
    assert_eq!(oracle(&both, "port"), port.to_string());
    assert_eq!(oracle(&both, "hashknownhosts"), "no");
    std::fs::write(&known_hosts, "").expect("empty known_hosts");
    let (code, stderr) = run(&["--accept-new-host-key"], &system);
    assert_eq!(code, Some(6), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&known_hosts).expect("known_hosts"),
        server.known_hosts_line()
    );

    // A refused directive in the system file names the system file's line.
    std::fs::write(
        etc.join("ssh_config.d/lab.conf"),
        format!("Host 127.0.0.1\n  Port {port}\n  LocalForward 8080 127.0.0.1:80\n"),
    )
    .expect("included file");
    let (code, stderr) = run(&[], &system);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "`{}` line 3",
            etc.join("ssh_config.d/lab.conf").display()
        )),
        "{stderr}"
    );
}

#[test]
fn this_machines_own_system_file_passes_rbees_verdicts() {
    let system = Path::new("/etc/ssh/ssh_config");
    if !system.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing (package openssh-client)",
            system.display()
        );
        eprintln!("skipped: {} is missing", system.display());
        return;
    }
    let Some(fleet) = Fleet::build(&[node("a")], false, "") else {
        return;
    };
    let env = &fleet.env;
    let port = fleet.servers[0].port;
    let home = env.path().join("home");
    std::fs::create_dir_all(&home).expect("mkdir");
    // The machine's file as it is (Debian's: an `Include` of ssh_config.d, `SendEnv`,
    // `HashKnownHosts yes`, `GSSAPIAuthentication yes`): nothing in it is refused, and its
    // hashing is what OpenSSH resolves from it.
    let out = env
        .command(&["--accept-new-host-key", "hive", "status", "a"])
        .env("HOME", &home)
        .env_remove("RBEE_SSH_SYSTEM_CONFIG")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let known_hosts = fleet.known_hosts();
    let recorded = std::fs::read_to_string(&known_hosts).expect("known_hosts");
    assert!(
        keygen_finds(&format!("[127.0.0.1]:{port}"), &known_hosts),
        "{recorded:?}"
    );
    let hashed = oracle(system, "hashknownhosts") == "yes";
    assert_eq!(recorded.starts_with("|1|"), hashed, "{recorded:?}");
}

/// This uid's home in its passwd entry.
fn passwd_home() -> PathBuf {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .expect("passwd entry")
}

/// `path` (absolute) written from the passwd home: what follows `~/` or `%d/` to name it.
pub(super) fn from_passwd_home(path: &Path) -> String {
    let up = "../".repeat(passwd_home().components().count().saturating_sub(1));
    format!("{up}{}", path.display().to_string().trim_start_matches('/'))
}

/// `path` with its `..` taken out, as the kernel resolves it (no links on the way).
pub(super) fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[test]
fn tilde_and_percent_d_are_the_passwd_home_whatever_home_says() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let port = fleet.servers[0].port;
    let key = &fleet.key.private;
    let known_hosts = fleet.known_hosts();
    // Only ssh_config names the key and the known_hosts file, from the home.
    env.edit_config(
        &format!("identity_file = {:?}\n", key.display().to_string()),
        "",
    );
    env.edit_config(
        &format!("known_hosts = {:?}\n", known_hosts.display().to_string()),
        "",
    );
    let file = env.path().join("ssh_config");
    std::fs::write(
        &file,
        format!(
            "Host 127.0.0.1\n  IdentityFile ~/{}\n  UserKnownHostsFile %d/{}\n  \
             IdentitiesOnly yes\n",
            from_passwd_home(key),
            from_passwd_home(&known_hosts)
        ),
    )
    .expect("ssh config");
    let elsewhere = env.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    // OpenSSH, with `$HOME` elsewhere: the passwd home, and it logs in.
    let said = oracle_with_home(&file, &elsewhere, "userknownhostsfile");
    assert_eq!(lexical(Path::new(&said)), known_hosts, "{said}");
    let out = std::process::Command::new("ssh")
        .arg("-F")
        .arg(&file)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-p",
        ])
        .arg(port.to_string())
        .arg(format!("{}@127.0.0.1", crate::support::sshd::user()))
        .arg("true")
        .env("HOME", &elsewhere)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ssh");
    assert!(out.status.success(), "{out:?}");
    // rbee, with `$HOME` elsewhere and with none: the same key and file, so reached and logged
    // in (the hive is simply not running).
    for home in [Some(&elsewhere), None] {
        let mut command = env.command(&["hive", "status", "a"]);
        command
            .env("RBEE_SSH_SYSTEM_CONFIG", &file)
            .env_remove("SSH_AUTH_SOCK");
        match home {
            Some(home) => command.env("HOME", home),
            None => command.env_remove("HOME"),
        };
        let out = command.output().expect("run");
        assert_eq!(
            out.status.code(),
            Some(6),
            "HOME {home:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `oracle` with `$HOME` set to `home`.
fn oracle_with_home(file: &Path, home: &Path, key: &str) -> String {
    let out = std::process::Command::new("ssh")
        .arg("-F")
        .arg(file)
        .args(["-G", "127.0.0.1"])
        .env("HOME", home)
        .output()
        .expect("ssh -G");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_string))
        .unwrap_or_default()
}
