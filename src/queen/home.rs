//! The home directory of an SSH node's user, which turns a `remote_dir` such as `~/.rbee` into
//! the absolute socket path sshd needs. It is learnt by a command on the node once and kept in
//! `<state>/homes/`, so a warm request opens only a forwarding channel and runs no command.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::ssh::{Session, Target, remote};

fn file(target: &Target) -> PathBuf {
    crate::paths::state_dir()
        .join("homes")
        .join(format!("{}.home", target.node))
}

/// Whom the remembered home belongs to: a node pointed at another host or user learns anew.
fn owner(target: &Target) -> String {
    format!("{}@{}:{}", target.user, target.host, target.port)
}

/// The home remembered for this node's user and host, if any.
pub(crate) fn cached(target: &Target) -> Option<String> {
    let text = std::fs::read_to_string(file(target)).ok()?;
    let (who, home) = text.split_once('\n')?;
    (who == owner(target) && home.starts_with('/')).then(|| home.to_string())
}

/// Remembers `home`; a failure to write only costs a command on the next connection.
pub(crate) fn remember(target: &Target, home: &str) {
    let path = file(target);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, format!("{}\n{home}", owner(target))));
    if let Err(e) = written {
        tracing::debug!(
            "cannot remember the home of `{}` in `{}`: {e}",
            target.node,
            path.display()
        );
    }
}

/// Asks the node for its user's home, and remembers it.
pub(crate) async fn learn(session: &Session) -> Result<String> {
    let out = session
        .run("reading the home directory", &remote::home())
        .await?;
    let home = String::from_utf8_lossy(&out.stdout).into_owned();
    checked(&session.target, home)
}

/// A home as the node printed it, if it is an absolute path; remembered when it is.
pub(crate) fn checked(target: &Target, home: String) -> Result<String> {
    if !home.starts_with('/') {
        return Err(Error::hive(format!(
            "node {}: the user's home `{home}` is not an absolute path; set an absolute \
             `remote_dir` for the node",
            target.describe()
        )));
    }
    remember(target, &home);
    Ok(home)
}

/// `remote_dir` as an absolute path on the node, given its user's home (SSH runs commands in
/// the home, so a relative `remote_dir` is under it too).
pub(crate) fn absolute(remote_dir: &str, home: &str) -> String {
    let home = home.trim_end_matches('/');
    if remote_dir.starts_with('/') {
        remote_dir.to_string()
    } else if remote_dir == "~" {
        home.to_string()
    } else if let Some(rest) = remote_dir.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else {
        format!("{home}/{remote_dir}")
    }
}

#[cfg(test)]
mod tests {
    use super::absolute;

    #[test]
    fn remote_dirs_resolve_against_the_nodes_home() {
        assert_eq!(absolute("/opt/rbee", "/home/u"), "/opt/rbee");
        assert_eq!(absolute("~/.rbee", "/home/u/"), "/home/u/.rbee");
        assert_eq!(absolute("~", "/home/u"), "/home/u");
        assert_eq!(absolute("rbee", "/home/u"), "/home/u/rbee");
    }
}
