//! Remote commands under any login shell: rbee runs each under `sh -c` after a marker line, so
//! a tcsh login shell, a `~/.bashrc` that prints, and a nologin shell each get what they
//! should. The nodes log in as users of their own, created for this.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::{Fleet, NodeSpec};
use crate::support::sshd;
use crate::support::user::{self, Unprivileged};

/// Removes what a test left in the homes of its users.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// A fleet whose node `name` logs in as `user` each, `remote_dir` and the model's `path` in
/// that user's home (`~/...`), the model pushed there from this machine's copy.
fn fleet_of_users(users: &[(&str, &Unprivileged)]) -> Option<(Fleet, Cleanup, String)> {
    let model = crate::support::model()?;
    let extras: Vec<String> = users
        .iter()
        .map(|(_, u)| format!("user = {:?}", u.name))
        .collect();
    let specs: Vec<NodeSpec<'_>> = users
        .iter()
        .zip(&extras)
        .map(|((name, _), extra)| NodeSpec {
            name,
            remote_dir: None,
            extra,
        })
        .collect();
    let source = format!("source = {:?}\n", model.display().to_string());
    let fleet = Fleet::build(&specs, true, &source)?;
    let env = &fleet.env;
    // sshd reads authorized_keys as the user logging in.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tag = format!("rbee-t{}-{}", std::process::id(), users[0].0);
    for (name, _) in users {
        env.edit_config(
            &format!(
                "remote_dir = {:?}",
                fleet.remote_dir(name).display().to_string()
            ),
            &format!("remote_dir = \"~/{tag}-node\""),
        );
    }
    env.edit_config(
        &format!("path = {:?}", model.display().to_string()),
        &format!("path = \"~/{tag}-model/smollm2.gguf\""),
    );
    let mut left = Vec::new();
    for (_, u) in users {
        left.push(u.home.join(format!("{tag}-node")));
        left.push(u.home.join(format!("{tag}-model")));
    }
    Some((fleet, Cleanup(left), tag))
}

#[test]
fn install_start_infer_and_push_work_under_tcsh_and_a_bashrc_that_prints() {
    let Some(tcsh) = user::login_user("rbee-tcsh", "/usr/bin/tcsh") else {
        return;
    };
    let Some(chatty) = user::login_user("rbee-chatty", "/bin/bash") else {
        return;
    };
    let bashrc = chatty.home.join(".bashrc");
    std::fs::write(&bashrc, "echo hello\n").expect("bashrc");
    chatty.own(&bashrc);
    let Some((fleet, _cleanup, _)) = fleet_of_users(&[("a", &tcsh), ("b", &chatty)]) else {
        return;
    };
    let env = &fleet.env;
    // OpenSSH shows what the login shells do: tcsh runs commands, bash greets first.
    let key = &fleet.key.private;
    let out = sshd::openssh_run(
        fleet.servers[1].port,
        &chatty.name,
        key,
        &fleet.known_hosts(),
        "yes",
        "true",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{out:?}");
    let out = sshd::openssh_run(
        fleet.servers[0].port,
        &tcsh.name,
        key,
        &fleet.known_hosts(),
        "yes",
        "echo $shell",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/usr/bin/tcsh\n",
        "{out:?}"
    );

    let install = env.run(&["--json", "hive", "install", "a", "b"]);
    install.expect(0);
    for line in install.json_lines() {
        assert_eq!(line["state"], "installed", "{line}");
    }
    for name in ["a", "b"] {
        let done = env
            .infer(&["--node", name, "--prompt", "Say hi", "--max-tokens", "4"])
            .expect(0)
            .done();
        assert_eq!(done["node"], name);
    }
    // The model is on the node: a push sends nothing, greeting or not.
    let push = env.run(&["--json", "models", "push", "--node", "b", "smollm2"]);
    push.expect(0);
    assert_eq!(push.json_lines()[0]["action"], "present", "{}", push.stdout);
    env.run(&["hive", "stop", "a", "b"]).expect(0);
}

#[test]
fn a_nologin_shell_is_reported_with_what_it_said() {
    let Some(nologin) = user::login_user("rbee-nologin", "/usr/sbin/nologin") else {
        return;
    };
    let Some((fleet, _cleanup, _)) = fleet_of_users(&[("c", &nologin)]) else {
        return;
    };
    let run = fleet.env.run(&["hive", "start", "c"]);
    run.expect(4);
    assert!(
        run.stderr
            .contains("This account is currently not available"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rbee-nologin@127.0.0.1"),
        "{}",
        run.stderr
    );
}

#[test]
fn with_no_user_set_the_login_is_the_passwd_name_of_this_uid_even_under_env_i() {
    let Some(me) = user::unprivileged() else {
        return;
    };
    // Only that user may log in: a login as `root` (or anyone else) is refused.
    let allow = format!("AllowUsers {}\n", me.name);
    let options = sshd::Options {
        extra: &allow,
        ..sshd::Options::default()
    };
    let Some(fleet) = Fleet::build_with(&[super::node("a")], true, "", &options) else {
        return;
    };
    let env = &fleet.env;
    env.edit_config(&format!("user = {:?}\n", sshd::user()), "");
    let root = env.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    me.own(&fleet.key.private);
    for dir in ["state", "keys"] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        me.own(&root.join(dir));
    }
    let rbee = me.binary(root);
    let as_me_with_no_environment = |program: &std::path::Path, args: &[&str]| {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(program)
            .args(args)
            .current_dir(root)
            .env_clear()
            .env("RBEE_CONFIG", &env.config)
            .env("RBEE_HOME", root.join("state"))
            .uid(me.uid)
            .gid(me.gid)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        crate::support::Run::from(out)
    };
    // OpenSSH, as this uid with no environment at all, logs in as its passwd name.
    let ssh = as_me_with_no_environment(
        std::path::Path::new("/usr/bin/ssh"),
        &["-F", "/dev/null", "-G", "127.0.0.1"],
    );
    assert!(
        ssh.stdout.lines().any(|l| l == format!("user {}", me.name)),
        "{}",
        ssh.stdout
    );
    // Logged in: the hive is simply not running.
    let run = as_me_with_no_environment(&rbee, &["hive", "status", "a"]);
    run.expect(6);
}

#[test]
fn a_remote_dir_that_is_the_home_itself_is_refused_naming_the_key() {
    let Some(fleet) = Fleet::new(&[super::node("a")]) else {
        return;
    };
    let env = &fleet.env;
    env.edit_config(
        &format!(
            "remote_dir = {:?}",
            fleet.remote_dir("a").display().to_string()
        ),
        "remote_dir = \"~\"",
    );
    let run = env.run(&["hive", "start", "a"]);
    run.expect(3);
    assert!(
        run.stderr.contains("`remote_dir = \"~\"`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("~/.rbee"), "{}", run.stderr);
}
