//! The parts of `~/.ssh/config` that users expect rbee to honour for a `host` alias: HostName,
//! User, Port, IdentityFile, ProxyJump, ServerAliveInterval and ServerAliveCountMax, first
//! match wins as in OpenSSH.

use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct HostEntry {
    pub(crate) host_name: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) identity_files: Vec<String>,
    /// `ServerAliveInterval` in seconds (0: no keep-alives).
    pub(crate) alive_interval: Option<u64>,
    /// `ServerAliveCountMax`: unanswered keep-alives before the connection is given up.
    pub(crate) alive_count: Option<u32>,
    /// `ProxyJump`, as written: `[user@]host[:port]`, comma-separated, or `none`.
    pub(crate) proxy_jump: Option<String>,
}

/// Reads the user's `~/.ssh/config`; a missing or unreadable file means no entries.
pub(crate) fn lookup(alias: &str) -> HostEntry {
    let Some(home) = crate::paths::home_dir() else {
        return HostEntry::default();
    };
    lookup_in(&home.join(".ssh/config"), alias)
}

pub(crate) fn lookup_in(path: &Path, alias: &str) -> HostEntry {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, alias),
        Err(_) => HostEntry::default(),
    }
}

pub(crate) fn parse(text: &str, alias: &str) -> HostEntry {
    let mut entry = HostEntry::default();
    let mut active = true;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, v)) => (
                k,
                v.trim_start_matches(|c: char| c.is_whitespace() || c == '='),
            ),
            None => continue,
        };
        let value = value.trim().trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "host" => active = host_matches(value, alias),
            // Match blocks need evaluation rbee does not do; their settings are not applied.
            "match" => active = false,
            "hostname" if active && entry.host_name.is_none() => {
                entry.host_name = Some(value.replace("%h", alias));
            }
            "user" if active && entry.user.is_none() => entry.user = Some(value.to_string()),
            "port" if active && entry.port.is_none() => entry.port = value.parse().ok(),
            "identityfile" if active => entry.identity_files.push(value.to_string()),
            "serveraliveinterval" if active && entry.alive_interval.is_none() => {
                entry.alive_interval = value.parse().ok();
            }
            "proxyjump" if active && entry.proxy_jump.is_none() => {
                entry.proxy_jump = Some(value.to_string());
            }
            "serveralivecountmax" if active && entry.alive_count.is_none() => {
                entry.alive_count = value.parse().ok();
            }
            _ => {}
        }
    }
    entry
}

/// `Host` patterns: `*` and `?` wildcards, `!` negation, several per line.
fn host_matches(patterns: &str, alias: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split_whitespace() {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated, alias) {
                return false;
            }
        } else if glob(pattern, alias) {
            matched = true;
        }
    }
    matched
}

pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Identity files as written, `~` expanded.
pub(crate) fn expand(files: &[String]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| crate::paths::expand_tilde(f))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "
Host gpu1 gpu-*
    HostName 10.0.0.%h
    User ops
    Port 2222
    IdentityFile ~/.ssh/lab

Host *
    User fallback
    IdentityFile ~/.ssh/id_ed25519
";

    #[test]
    fn first_value_wins_and_identity_files_accumulate() {
        let e = parse(CONFIG, "gpu1");
        assert_eq!(e.host_name.as_deref(), Some("10.0.0.gpu1"));
        assert_eq!(e.user.as_deref(), Some("ops"));
        assert_eq!(e.port, Some(2222));
        assert_eq!(e.identity_files, vec!["~/.ssh/lab", "~/.ssh/id_ed25519"]);
        let other = parse(CONFIG, "db");
        assert_eq!(other.host_name, None);
        assert_eq!(other.user.as_deref(), Some("fallback"));
        assert_eq!(parse(CONFIG, "gpu-7").port, Some(2222));
    }

    #[test]
    fn globs_and_negation() {
        assert!(host_matches("*.lab !bad.lab", "a.lab"));
        assert!(!host_matches("*.lab !bad.lab", "bad.lab"));
        assert!(host_matches("node?", "node1"));
        assert!(!host_matches("node?", "node12"));
    }
}
