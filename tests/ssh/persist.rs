//! One SSH connection for many invocations (`persist`): a holder process keeps it, later
//! invocations ride it (sshd sees one login), `persist = "0"` leaves none, `nodes disconnect`
//! ends it, a dead or stopped holder is bypassed, and another user cannot use it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Fleet, node, state_of};
use crate::support::eventually;

/// Logins sshd accepted so far.
fn logins(fleet: &Fleet) -> usize {
    fleet.servers[0].log().matches("Accepted publickey").count()
}

/// The sockets of holders in this environment's private run directory.
fn holder_sockets(fleet: &Fleet) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(fleet.env.path().join("state/run")) else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("m-") && n.ends_with(".sock"))
        })
        .collect()
}

/// Holder processes of this environment (`nodes hold` with its RBEE_HOME).
pub(super) fn holders(fleet: &Fleet) -> Vec<i32> {
    holders_in(&fleet.env)
}

/// Holder processes of `env` (`nodes hold` with its RBEE_HOME).
pub(super) fn holders_in(env: &crate::support::Env) -> Vec<i32> {
    let home = format!("RBEE_HOME={}", env.path().join("state").display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("nodes\0hold") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|var| var == home.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn later_invocations_ride_one_login_until_nodes_disconnect_ends_it() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "60s") else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "start", "a"]).expect(0);
    env.run(&["hive", "status", "a"]).expect(0);
    let done = env
        .infer(&["--node", "a", "--prompt", "Say hi", "--max-tokens", "2"])
        .expect(0)
        .done();
    assert_eq!(done["node"], "a");
    env.run(&["hive", "status", "a"]).expect(0);
    assert_eq!(logins(&fleet), 1, "{}", fleet.servers[0].log());
    assert_eq!(holders(&fleet).len(), 1);
    assert_eq!(holder_sockets(&fleet).len(), 1);

    let out = fleet.json(&["nodes", "disconnect"]);
    assert_eq!(state_of(&out, "a"), "disconnected", "{out:?}");
    assert!(
        eventually(Duration::from_secs(5), || holders(&fleet).is_empty()),
        "the holder survived `nodes disconnect`"
    );
    assert!(holder_sockets(&fleet).is_empty());
    let out = fleet.json(&["nodes", "disconnect", "a"]);
    assert_eq!(state_of(&out, "a"), "not_connected", "{out:?}");

    // The next invocation logs in again, and leaves a holder again.
    env.run(&["hive", "status", "a"]).expect(0);
    assert_eq!(logins(&fleet), 2);
    assert_eq!(holders(&fleet).len(), 1);
}

#[test]
fn persist_0_leaves_no_holder_and_every_invocation_logs_in() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "0") else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "status", "a"]).expect(6);
    env.run(&["hive", "status", "a"]).expect(6);
    assert_eq!(logins(&fleet), 2);
    assert!(holders(&fleet).is_empty());
    assert!(holder_sockets(&fleet).is_empty());
}

#[test]
fn a_holder_ends_once_unused_for_persist() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "1s") else {
        return;
    };
    fleet.env.run(&["hive", "status", "a"]).expect(6);
    assert_eq!(holders(&fleet).len(), 1);
    assert!(
        eventually(Duration::from_secs(10), || holders(&fleet).is_empty()),
        "the holder outlived `persist`"
    );
    assert!(holder_sockets(&fleet).is_empty());
}

#[test]
fn a_stopped_holder_and_a_killed_one_are_bypassed() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "60s") else {
        return;
    };
    let env = &fleet.env;
    env.run(&["hive", "start", "a"]).expect(0);
    let first = holders(&fleet);
    assert_eq!(first.len(), 1);
    let pid = Pid::from_raw(first[0]);

    // A hung holder: the command connects by itself and works.
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let status = env.run(&["hive", "status", "a"]);
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    status.expect(0);
    assert_eq!(logins(&fleet), 2, "the stopped holder was not bypassed");
    env.run(&["hive", "status", "a"]).expect(0);
    assert_eq!(logins(&fleet), 2, "the resumed holder is not used again");

    // A dead holder leaves its socket: the next command replaces it.
    kill(pid, Signal::SIGKILL).expect("SIGKILL");
    assert!(eventually(Duration::from_secs(5), || !holders(&fleet)
        .contains(&first[0])));
    assert_eq!(
        holder_sockets(&fleet).len(),
        1,
        "the dead holder's socket is gone"
    );
    env.infer(&["--node", "a", "--prompt", "Say hi", "--max-tokens", "2"])
        .expect(0);
    let now = holders(&fleet);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], first[0]);
    assert_eq!(logins(&fleet), 3);
    env.run(&["hive", "status", "a"]).expect(0);
    assert_eq!(logins(&fleet), 3);
}

#[test]
fn a_changed_host_key_is_refused_by_the_holder_with_exit_4() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "60s") else {
        return;
    };
    let env = &fleet.env;
    let other = crate::support::sshd::ClientKey::new(env.path(), "impostor", "ed25519");
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
    env.run(&["--accept-new-host-key", "hive", "status", "a"])
        .expect(4);
    assert!(holders(&fleet).is_empty());
    let audit = std::fs::read_to_string(env.path().join("state/audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("host_key_refused"), "{audit}");
}

#[test]
fn another_user_cannot_use_the_holder() {
    let Some(fleet) = Fleet::persistent(&[node("a")], "60s") else {
        return;
    };
    let Some(user) = crate::support::user::unprivileged() else {
        return;
    };
    if user.uid == nix::unistd::geteuid().as_raw() {
        // Not root: there is no second user to try with.
        return;
    }
    let env = &fleet.env;
    env.run(&["hive", "status", "a"]).expect(6);
    let sockets = holder_sockets(&fleet);
    assert_eq!(sockets.len(), 1);
    // Even with every directory on the way open to them, the holder refuses them by their
    // peer credentials.
    let mut dir = sockets[0].parent().map(PathBuf::from);
    while let Some(d) = dir {
        if d == std::path::Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode | 0o711)).expect("chmod");
        if d == env.path() {
            break;
        }
        dir = d.parent().map(PathBuf::from);
    }
    std::fs::set_permissions(&sockets[0], std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // A well-formed request of this version: the holder closes the connection unanswered
    // (a reset, as it drops what was sent unread).
    let script = format!(
        "import json, socket, struct, sys\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect({:?})\n\
         body = json.dumps({{'protocol': 2, 'version': {:?}, 'op': 'ping'}}).encode()\n\
         s.settimeout(5)\n\
         try:\n\
         \x20   s.sendall(struct.pack('>I', len(body)) + body)\n\
         \x20   data = s.recv(4096)\n\
         except (ConnectionResetError, BrokenPipeError):\n\
         \x20   data = b''\n\
         print('answered' if data else 'refused')\n",
        sockets[0].display().to_string(),
        env!("CARGO_PKG_VERSION"),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "refused",
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The owner still rides it.
    env.run(&["hive", "status", "a"]).expect(6);
    assert_eq!(logins(&fleet), 1);
}
