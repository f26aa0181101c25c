//! Where rbee keeps its files, `~` expansion for paths written in nodes.toml, and the names and
//! length limit of the Unix sockets hives and workers listen on.

use std::path::{Path, PathBuf};

use crate::config::ConfigError;

/// The hive's socket inside its node's directory.
pub(crate) const HIVE_SOCKET: &str = "hive.sock";
/// The longest path the kernel takes for a Unix socket (`sun_path` is 108 bytes with its NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;
/// No socket rbee makes in a directory has a longer file name (`hive.sock`, `w<8 hex>.sock`),
/// so one check on the directory covers the hive and all its workers.
pub(crate) const MAX_SOCKET_NAME: usize = 16;

/// The hive's socket in `dir` (a path as the node sees it), or why `dir` cannot hold sockets.
pub(crate) fn hive_socket(dir: &str) -> Result<String, ConfigError> {
    let dir = dir.trim_end_matches('/');
    let path = format!("{dir}/{HIVE_SOCKET}");
    let dir_max = MAX_SOCKET_PATH - 1 - MAX_SOCKET_NAME;
    if dir.len() > dir_max {
        return Err(ConfigError::SocketPathTooLong {
            bytes: dir.len() + 1 + MAX_SOCKET_NAME,
            path,
            max: MAX_SOCKET_PATH,
            dir_max,
        });
    }
    Ok(path)
}

/// The user's home directory, from `$HOME`.
pub(crate) fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Expands a leading `~` or `~/` against `home`. Other forms (`~user`) are left as they are.
pub(crate) fn expand_tilde_with(path: &str, home: Option<&Path>) -> PathBuf {
    match (path, home) {
        ("~", Some(home)) => home.to_path_buf(),
        (p, Some(home)) if p.starts_with("~/") => home.join(&p[2..]),
        (p, _) => PathBuf::from(p),
    }
}

/// Expands `~` against this machine's home directory.
pub(crate) fn expand_tilde(path: &str) -> PathBuf {
    expand_tilde_with(path, home_dir().as_deref())
}

/// State directory of the machine running `rbee`: `$RBEE_HOME`, else `$XDG_STATE_HOME/rbee`,
/// else `~/.local/state/rbee`.
pub(crate) fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RBEE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rbee");
    }
    home_dir()
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/state/rbee")
}

/// A directory only this user can enter, for holders' sockets (and, off Linux, the local ends
/// of SSH forwards): `<state>/run`, or
/// `$TMPDIR/rbee-<uid>` when the state directory's path leaves too little room for a socket.
pub(crate) fn private_run_dir() -> crate::error::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // `q<pid>-<n>.sock`, with room for any pid and counter.
    const NAME: usize = 28;
    let uid = nix::unistd::geteuid().as_raw();
    let under_state = state_dir().join("run");
    let dir = if under_state.as_os_str().len() + 1 + NAME <= MAX_SOCKET_PATH {
        under_state
    } else {
        std::env::temp_dir().join(format!("rbee-{uid}"))
    };
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let meta = std::fs::metadata(&dir).map_err(|e| crate::error::IoError::at("create", &dir, e))?;
    if meta.uid() != uid {
        return Err(crate::error::Error::internal(format!(
            "`{}` belongs to another user; remove it or set RBEE_HOME to a directory of yours",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| crate::error::IoError::at("make private", &dir, e))?;
    }
    Ok(dir)
}

/// `$XDG_CONFIG_HOME/rbee/nodes.toml` (or `~/.config/rbee/nodes.toml`).
pub(crate) fn user_config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".config")))?;
    Some(base.join("rbee/nodes.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_too_long_for_its_sockets_is_refused_naming_the_path_and_the_limit() {
        let fits = format!("/{}", "d".repeat(MAX_SOCKET_PATH - 2 - MAX_SOCKET_NAME));
        assert_eq!(
            hive_socket(&fits).expect("fits"),
            format!("{fits}/hive.sock")
        );
        let long = format!("{fits}x");
        let err = hive_socket(&long).expect_err("too long");
        let text = err.to_string();
        assert!(text.contains(&format!("{long}/hive.sock")), "{text}");
        assert!(text.contains("107 bytes"), "{text}");
        assert!(matches!(err, ConfigError::SocketPathTooLong { .. }));
    }

    #[test]
    fn tilde_expands_only_at_the_start() {
        let home = Path::new("/home/u");
        assert_eq!(expand_tilde_with("~", Some(home)), PathBuf::from("/home/u"));
        assert_eq!(
            expand_tilde_with("~/.rbee", Some(home)),
            PathBuf::from("/home/u/.rbee")
        );
        assert_eq!(
            expand_tilde_with("/a/~/b", Some(home)),
            PathBuf::from("/a/~/b")
        );
        assert_eq!(
            expand_tilde_with("~other/x", Some(home)),
            PathBuf::from("~other/x")
        );
        assert_eq!(expand_tilde_with("~/x", None), PathBuf::from("~/x"));
    }
}
