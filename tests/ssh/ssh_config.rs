//! ssh_config as OpenSSH reads it, OpenSSH's own client on the same file as the oracle: an
//! `Include`d file whose `Match` block sets the port, an `IdentityFile` with `%` tokens, and
//! `IdentitiesOnly`, with an agent holding six other keys (sshd's MaxAuthTries).

use std::time::Duration;

use super::{Fleet, node};
use crate::support::eventually;
use crate::support::sshd::{self, ClientKey, Options};

#[test]
fn include_match_tokens_and_identities_only_resolve_as_openssh_does() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let root = env.path();
    let port = fleet.servers[0].port;
    // An agent with six keys the node does not take.
    let socket = root.join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    assert!(eventually(Duration::from_secs(5), || socket.exists()));
    for i in 0..6 {
        let other = ClientKey::new(root, &format!("other{i}"), "ed25519");
        let added = std::process::Command::new("ssh-add")
            .arg(&other.private)
            .env("SSH_AUTH_SOCK", &socket)
            .output()
            .expect("ssh-add");
        assert!(added.status.success(), "{added:?}");
    }
    // The node's key, under a name only the tokens give.
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let named = keys.join(format!("{}@127.0.0.1-{port}", sshd::user()));
    std::fs::copy(&fleet.key.private, &named).expect("copy key");
    let home = root.join("home");
    std::fs::create_dir_all(home.join(".ssh/conf.d")).expect("mkdir");
    std::fs::write(
        home.join(".ssh/conf.d/lab.conf"),
        format!(
            "Host lab\n  HostName 127.0.0.1\n\
             Match originalhost lab user {}\n  Port {port}\n  IdentitiesOnly yes\n  \
             IdentityFile {}/%r@%h-%p\n",
            sshd::user(),
            keys.display()
        ),
    )
    .expect("include");
    let ssh_config = home.join(".ssh/config");
    std::fs::write(
        &ssh_config,
        format!(
            "Include {}/*.conf\n\nHost *\n  User {}\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n",
            home.join(".ssh/conf.d").display(),
            sshd::user(),
            fleet.known_hosts().display()
        ),
    )
    .expect("ssh config");
    let ssh = |extra: &[&str]| {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(extra)
            .args(["lab", "true"])
            .env("SSH_AUTH_SOCK", &socket)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
    };
    // OpenSSH: logs in; without IdentitiesOnly the agent's six keys use up MaxAuthTries.
    let out = ssh(&[]);
    assert!(out.status.success(), "{out:?}");
    let out = ssh(&["-o", "IdentitiesOnly=no"]);
    assert!(!out.status.success(), "{out:?}");

    let config = std::fs::read_to_string(&env.config).expect("config");
    let config = config
        .replace("host = \"127.0.0.1\"", "host = \"lab\"")
        .replace(&format!("port = {port}\n"), "")
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
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("run");
    let _ = agent.kill();
    let _ = agent.wait();
    // Reached, logged in: the hive is simply not running.
    assert_eq!(
        run.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn match_exec_is_evaluated_as_openssh_and_an_unhonoured_match_names_its_line() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let port = fleet.servers[0].port;
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    let flag = env.path().join("on-the-lab-network");
    // `Host 127.0.0.1` gives no port, so the node's port comes from the `Match exec` block
    // (`%h` expanded in the command), only while the flag file is there.
    std::fs::write(
        &ssh_config,
        format!(
            "Match exec \"test -f {} && test %h = 127.0.0.1\"\n  Port {port}\n\
             Host *\n  Port 1\n",
            flag.display()
        ),
    )
    .expect("ssh config");
    let oracle_port = || {
        let out = std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-G", "127.0.0.1"])
            .output()
            .expect("ssh -G");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("port ").map(str::to_string))
            .unwrap_or_default()
    };
    let status = || {
        env.command(&["hive", "status", "a"])
            .env("HOME", &home)
            .output()
            .expect("run")
    };
    // The node's port in nodes.toml is not 22, so take it out: ssh_config decides.
    let toml = std::fs::read_to_string(env.path().join("nodes.toml")).expect("nodes.toml");
    std::fs::write(
        env.path().join("nodes.toml"),
        toml.replace(&format!("port = {port}\n"), ""),
    )
    .expect("nodes.toml");
    assert_eq!(oracle_port(), "1");
    let run = status();
    assert_eq!(
        run.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::write(&flag, "").expect("flag");
    assert_eq!(oracle_port(), port.to_string());
    let run = status();
    assert_eq!(
        run.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // A criterion rbee cannot evaluate is an error naming the file and line.
    std::fs::write(
        &ssh_config,
        "Host *\n  User x\n\nMatch canonical all\n  Port 2\n",
    )
    .expect("ssh config");
    let run = status();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("`{}` line 4", ssh_config.display())),
        "{stderr}"
    );
}

#[test]
fn connect_timeout_from_ssh_config_bounds_a_node_that_never_answers() {
    // Takes TCP connections (the kernel's backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let env = crate::support::Env::custom(|dir, _| {
        format!(
            "[nodes.a]\nhost = \"127.0.0.1\"\nport = {port}\nknown_hosts = {:?}\n",
            dir.join("known_hosts").display().to_string()
        )
    });
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    std::fs::write(&ssh_config, "Host 127.0.0.1\n  ConnectTimeout 1\n").expect("ssh config");
    let oracle = std::process::Command::new("ssh")
        .arg("-F")
        .arg(&ssh_config)
        .args(["-G", "127.0.0.1"])
        .output()
        .expect("ssh -G");
    assert!(
        String::from_utf8_lossy(&oracle.stdout).contains("\nconnecttimeout 1\n"),
        "{oracle:?}"
    );
    let run = env
        .command(&["hive", "status", "a"])
        .env("HOME", &home)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
    drop(silent);
}

/// `hive status a` with `home` as `$HOME` (its `.ssh/config`): the exit code and stderr.
fn status_with_home(env: &crate::support::Env, home: &std::path::Path) -> (Option<i32>, String) {
    let out = env
        .command(&["hive", "status", "a"])
        .env("HOME", home)
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn directives_rbee_cannot_honour_are_refused_with_file_and_line_and_harmless_ones_ignored() {
    let Some(fleet) = Fleet::new(&[node("a")]) else {
        return;
    };
    let env = &fleet.env;
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    let oracle = || {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh_config)
            .args(["-G", "127.0.0.1"])
            .output()
            .expect("ssh -G")
    };
    let status = || status_with_home(env, &home);
    // Harmless directives, a refused one in another host's block, and a refused value that is
    // not the first obtained: OpenSSH takes the file, and so does rbee.
    std::fs::write(
        &ssh_config,
        "Host other\n  LocalForward 8080 127.0.0.1:80\n\
         Host 127.0.0.1\n  StrictHostKeyChecking yes\n  Compression yes\n  ControlMaster auto\n  \
         ControlPath ~/.ssh/cm-%C\n  ControlPersist 10m\n  LogLevel ERROR\n  SendEnv LANG LC_*\n  \
         ForwardAgent no\n  BatchMode yes\n  IgnoreUnknown UseKeychain\n  UseKeychain yes\n\
         Host *\n  StrictHostKeyChecking no\n",
    )
    .expect("ssh config");
    let out = oracle();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("\nstricthostkeychecking true\n"), "{said}");
    assert!(!said.contains("\nlocalforward "), "{said}");
    let (code, stderr) = status();
    assert_eq!(code, Some(6), "{stderr}");

    // Each of these changes where or how OpenSSH connects: the node's own block has it on line 5.
    for (line, oracle_says) in [
        (
            "LocalForward 8080 127.0.0.1:80",
            "localforward 8080 [127.0.0.1]:80",
        ),
        ("HostKeyAlias gpu-box", "hostkeyalias gpu-box"),
        ("CanonicalizeHostname yes", "canonicalizehostname true"),
        ("StrictHostKeyChecking no", "stricthostkeychecking false"),
        ("Ciphers 3des-cbc", "ciphers 3des-cbc"),
        ("BindAddress 127.0.0.1", "bindaddress 127.0.0.1"),
    ] {
        std::fs::write(
            &ssh_config,
            format!("Host other\n  User x\n\nHost 127.0.0.1\n  {line}\n"),
        )
        .expect("ssh config");
        let out = oracle();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains(&format!("\n{oracle_says}\n")),
            "{line}: {said}"
        );
        let (code, stderr) = status();
        assert_eq!(code, Some(3), "{line}: {stderr}");
        assert!(
            stderr.contains(&format!("`{}` line 5", ssh_config.display())),
            "{line}: {stderr}"
        );
    }
    // A word that is no directive at all: OpenSSH refuses the file, and so does rbee.
    std::fs::write(&ssh_config, "Host 127.0.0.1\n  Bogus yes\n").expect("ssh config");
    assert!(!oracle().status.success());
    let (code, stderr) = status();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("`{}` line 2", ssh_config.display())),
        "{stderr}"
    );
}

#[test]
fn algorithm_lists_narrow_what_rbee_offers_as_they_narrow_openssh() {
    // The node's sshd takes one cipher only.
    let options = Options {
        extra: "Ciphers aes256-ctr\n",
        ..Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[node("a")], true, "", &options) else {
        return;
    };
    let env = &fleet.env;
    let home = env.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
    let ssh_config = home.join(".ssh/config");
    let key = fleet.key.private.clone();
    let rbee = || status_with_home(env, &home);
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
            .arg(&key)
            .arg("-p")
            .arg(fleet.servers[0].port.to_string())
            .arg(format!("{}@127.0.0.1", crate::support::sshd::user()))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh")
            .status
            .success()
    };
    // Without aes256-ctr in the list neither client finds a cipher the node takes; with it
    // first, or in the list, both connect (only a list to remove holds wildcards).
    for (spec, connects) in [
        ("-aes256-ctr", false),
        ("aes128-ctr,chacha20-poly1305@openssh.com", false),
        ("^aes256-ctr", true),
        ("aes128-ctr,aes256-ctr", true),
        ("-aes*", false),
    ] {
        std::fs::write(&ssh_config, format!("Host 127.0.0.1\n  Ciphers {spec}\n")).expect("config");
        assert_eq!(ssh(), connects, "OpenSSH with `Ciphers {spec}`");
        let (code, stderr) = rbee();
        if connects {
            assert_eq!(code, Some(6), "`Ciphers {spec}`: {stderr}");
        } else {
            assert_eq!(code, Some(4), "`Ciphers {spec}`: {stderr}");
        }
    }
    // A list that leaves rbee nothing it has is refused before connecting, naming its line.
    std::fs::write(
        &ssh_config,
        "Host 127.0.0.1\n  KexAlgorithms curve25519-sha256\n  Ciphers 3des-cbc\n",
    )
    .expect("config");
    let (code, stderr) = rbee();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("`{}` line 3", ssh_config.display())),
        "{stderr}"
    );
}
