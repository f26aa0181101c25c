//! Where rbee keeps its files, and `~` expansion for paths written in nodes.toml.

use std::path::{Path, PathBuf};

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
