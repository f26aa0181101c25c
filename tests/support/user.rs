//! Running rbee as a user that file modes apply to. The tests usually run as root, and root
//! reads and writes any file whatever its mode, so a permission error never happens to it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Env, Run};

/// The account created for this when the tests run as root.
pub(crate) const NAME: &str = "rbee-test";

pub(crate) struct Unprivileged {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

fn lookup(user: Option<nix::unistd::User>) -> Option<Unprivileged> {
    user.map(|u| Unprivileged {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    })
}

/// The test runner itself when it is not root; else `rbee-test`, created when missing. When
/// there is none, CI fails and elsewhere the test is skipped with a note.
pub(crate) fn unprivileged() -> Option<Unprivileged> {
    let me = nix::unistd::geteuid();
    if !me.is_root() {
        return lookup(nix::unistd::User::from_uid(me).ok().flatten());
    }
    let find = || lookup(nix::unistd::User::from_name(NAME).ok().flatten());
    if let Some(user) = find() {
        return Some(user);
    }
    let created = Command::new("useradd")
        .args(["-m", "-p", "*", NAME])
        .stdin(Stdio::null())
        .output();
    // A test run beside this one may have created it in the meantime: look again either way.
    if let Some(user) = find() {
        return Some(user);
    }
    let why = match created {
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        Err(e) => format!("useradd: {e} (package passwd)"),
    };
    if std::env::var_os("CI").is_some() {
        panic!("cannot create the unprivileged test user `{NAME}`: {why}");
    }
    eprintln!("skipped: no unprivileged user to run rbee as (`useradd {NAME}`: {why})");
    None
}

impl Unprivileged {
    /// Hands `path` (not what it holds) to this user.
    pub(crate) fn own(&self, path: &Path) {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    /// A copy of the test binary this user can run: the build directory is often under a
    /// home that only its owner enters.
    pub(crate) fn binary(&self, dir: &Path) -> PathBuf {
        let copy = dir.join("rbee-unprivileged");
        std::fs::copy(super::bin(), &copy).expect("copy rbee");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        copy
    }
}

impl Env {
    /// Runs the binary at `program` (see `Unprivileged::binary`) as `user`, with this
    /// environment. The environment's directory must let the user in.
    pub(crate) fn run_as(&self, user: &Unprivileged, program: &Path, args: &[&str]) -> Run {
        let output = self
            .command_of(program, args)
            // As root, std also drops the supplementary groups before switching.
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .output()
            .expect("run rbee as another user");
        Run::from(output)
    }
}

/// An account `name` with login shell `shell`, created when missing (root only; CI fails
/// without it, elsewhere the test is skipped with a note). Its shell is set to `shell` each
/// time, so a test finds it as it needs it.
pub(crate) fn login_user(name: &str, shell: &str) -> Option<Unprivileged> {
    let skip = |why: String| {
        if std::env::var_os("CI").is_some() {
            panic!("cannot have the test user `{name}` with shell {shell}: {why}");
        }
        eprintln!("skipped: no test user `{name}` with shell {shell}: {why}");
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("creating users needs root".to_string());
    }
    if !Path::new(shell).exists() {
        return skip(format!(
            "{shell} is not installed (scripts/setup.sh installs it)"
        ));
    }
    let find = || lookup(nix::unistd::User::from_name(name).ok().flatten());
    if find().is_none() {
        let out = Command::new("useradd")
            .args(["-m", "-p", "*", "-s", shell, name])
            .stdin(Stdio::null())
            .output();
        // A test run beside this one may have created it in the meantime: look again.
        if find().is_none() {
            return skip(match out {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => format!("useradd: {e} (package passwd)"),
            });
        }
    }
    let _ = Command::new("usermod")
        .args(["-s", shell, name])
        .stdin(Stdio::null())
        .output();
    find()
}
