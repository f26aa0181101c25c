//! `~/.ssh/config`, then `/etc/ssh/ssh_config`, for a `host` alias as OpenSSH reads them:
//! HostName, User, Port, IdentityFile and CertificateFile (with `%` tokens), IdentitiesOnly,
//! ProxyJump, ProxyCommand,
//! ServerAliveInterval, ServerAliveCountMax, UserKnownHostsFile and the rest of `directives`'
//! honoured list, in `Host` and `Match` blocks and `Include`d files, first obtained value wins;
//! a directive rbee cannot honour is kept in `refused`, with its file and line.

use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct HostEntry {
    pub(crate) host_name: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) identity_files: Vec<String>,
    /// `CertificateFile`s, as written: user certificates tried with the identity whose key
    /// they certify.
    pub(crate) certificate_files: Vec<String>,
    /// `ServerAliveInterval` in seconds (0: no keep-alives).
    pub(crate) alive_interval: Option<u64>,
    /// `ServerAliveCountMax`: unanswered keep-alives before the connection is given up.
    pub(crate) alive_count: Option<u32>,
    /// `ProxyJump`, as written: `[user@]host[:port]`, comma-separated, or `none`.
    pub(crate) proxy_jump: Option<String>,
    /// `IdentitiesOnly`: only the identity files, not whatever else ssh-agent holds.
    pub(crate) identities_only: Option<bool>,
    /// `ConnectTimeout` in seconds (0 or `none`: the default).
    pub(crate) connect_timeout: Option<u64>,
    /// The first line rbee cannot honour (`file` line N: why): connecting without it would not
    /// be what OpenSSH does with the same file.
    pub(crate) refused: Option<String>,
    /// The first `ProxyCommand` that applies, as written (`none` included: it still counts as
    /// the first value).
    pub(crate) proxy_command: Option<String>,
    /// `UserKnownHostsFile`: its words as written (`%` tokens and `~` not yet expanded);
    /// `none` is the word `none`.
    pub(crate) user_known_hosts: Option<Vec<String>>,
    /// `GlobalKnownHostsFile`, the same way.
    pub(crate) global_known_hosts: Option<Vec<String>>,
    /// `StrictHostKeyChecking accept-new`: an unknown host key is recorded, as with
    /// `--accept-new-host-key` (a changed one is still refused).
    pub(crate) accept_new: Option<bool>,
    /// `HashKnownHosts`: a key recorded for the host goes under its hashed name.
    pub(crate) hash_known_hosts: Option<bool>,
    /// `IgnoreUnknown`: patterns of directives that are not to be an error when unknown.
    ignore_unknown: Option<String>,
    /// The directives that have obtained their first value (only that one counts).
    seen: std::collections::BTreeSet<String>,
    /// `KexAlgorithms`, `Ciphers`, `MACs`, `HostKeyAlgorithms`: the first of each.
    pub(crate) algorithms: super::algorithms::Algorithms,
}

/// How deep `Include`s may nest, as in OpenSSH.
const INCLUDE_DEPTH: usize = 16;

/// Reads the user's `~/.ssh/config`, then the system's `/etc/ssh/ssh_config`, as OpenSSH does:
/// the first value obtained in either wins. A missing or unreadable file means no entries.
pub(crate) fn lookup(alias: &str) -> HostEntry {
    let mut entry = HostEntry::default();
    if let Some(home) = user_config_home() {
        read_into(&home.join(".ssh/config"), alias, &mut entry);
    }
    if let Some(system) = system_file() {
        read_into(&system, alias, &mut entry);
    }
    entry
}

/// Where `~/.ssh/config` is looked for: `$HOME`, else the passwd entry's home. OpenSSH takes
/// the passwd home only; `$HOME` first lets a caller (the tests) point rbee at another file.
fn user_config_home() -> Option<PathBuf> {
    crate::paths::home_dir().or_else(passwd_home)
}

/// The system-wide file: `$RBEE_SSH_SYSTEM_CONFIG` where set (a test and packaging knob;
/// empty or `none`: no system file), else OpenSSH's `/etc/ssh/ssh_config`.
fn system_file() -> Option<PathBuf> {
    match std::env::var_os("RBEE_SSH_SYSTEM_CONFIG") {
        Some(path) if path.is_empty() || path.eq_ignore_ascii_case("none") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => Some(PathBuf::from("/etc/ssh/ssh_config")),
    }
}

#[cfg(test)]
fn lookup_in(path: &Path, alias: &str) -> HostEntry {
    let mut entry = HostEntry::default();
    read_into(path, alias, &mut entry);
    entry
}

/// Applies the file at `path` to `entry`: it starts outside any block, and its relative
/// `Include`s start in its own directory (`~/.ssh` for the user's file, `/etc/ssh` for the
/// system's, as in OpenSSH).
fn read_into(path: &Path, alias: &str, entry: &mut HostEntry) {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Ok(text) = std::fs::read_to_string(path) {
        let mut active = true;
        apply(&text, path, &base, alias, entry, &mut active, 0);
    }
}

#[cfg(test)]
pub(crate) fn parse(text: &str, alias: &str) -> HostEntry {
    let mut entry = HostEntry::default();
    let mut active = true;
    let base = crate::paths::home_dir()
        .map(|h| h.join(".ssh"))
        .unwrap_or_default();
    apply(
        text,
        Path::new("config"),
        &base,
        alias,
        &mut entry,
        &mut active,
        0,
    );
    entry
}

/// Applies one file's lines to `entry`; `base` is where a relative `Include` path starts
/// (`~/.ssh` for the user's file). An included file starts in the block that includes it, and
/// the block is back as it was after it, as in OpenSSH.
fn apply(
    text: &str,
    file: &Path,
    base: &Path,
    alias: &str,
    entry: &mut HostEntry,
    active: &mut bool,
    depth: usize,
) {
    for (number, line) in text.lines().enumerate() {
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
        let lower = key.to_ascii_lowercase();
        if *active && lower != "host" && lower != "match" && entry.seen.insert(lower.clone()) {
            judge(&lower, key, value, file, number + 1, entry);
        }
        match lower.as_str() {
            "host" => *active = host_matches(value, alias),
            "match" => {
                let raw =
                    line[key.len()..].trim_start_matches(|c: char| c.is_whitespace() || c == '=');
                *active = match match_matches(raw, alias, entry) {
                    Ok(holds) => holds,
                    Err(why) => {
                        if entry.refused.is_none() {
                            entry.refused =
                                Some(format!("`{}` line {}: {why}", file.display(), number + 1));
                        }
                        false
                    }
                };
            }
            "include" if *active && depth < INCLUDE_DEPTH => {
                for path in included(value, base) {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        let mut inner = *active;
                        apply(&text, &path, base, alias, entry, &mut inner, depth + 1);
                    }
                }
            }
            "hostname" if *active && entry.host_name.is_none() => {
                entry.host_name = Some(value.replace("%h", alias));
            }
            "user" if *active && entry.user.is_none() => entry.user = Some(value.to_string()),
            "port" if *active && entry.port.is_none() => entry.port = value.parse().ok(),
            "identityfile" if *active => entry.identity_files.push(value.to_string()),
            "certificatefile" if *active => entry.certificate_files.push(value.to_string()),
            "identitiesonly" if *active && entry.identities_only.is_none() => {
                entry.identities_only = Some(value.eq_ignore_ascii_case("yes"));
            }
            "connecttimeout" if *active && entry.connect_timeout.is_none() => {
                entry.connect_timeout = Some(value.parse().unwrap_or(0));
            }
            "serveraliveinterval" if *active && entry.alive_interval.is_none() => {
                entry.alive_interval = value.parse().ok();
            }
            // As OpenSSH's readconf.c: whichever of ProxyCommand and ProxyJump comes first
            // (`none` included) keeps the other from applying.
            "proxycommand"
                if *active && entry.proxy_command.is_none() && entry.proxy_jump.is_none() =>
            {
                // The command is the rest of the line, quotes and all.
                let raw = line[key.len()..]
                    .trim_start_matches(|c: char| c.is_whitespace() || c == '=')
                    .trim();
                entry.proxy_command = Some(raw.to_string());
            }
            "proxyjump"
                if *active && entry.proxy_jump.is_none() && entry.proxy_command.is_none() =>
            {
                entry.proxy_jump = Some(value.to_string());
            }
            "userknownhostsfile" if *active && entry.user_known_hosts.is_none() => {
                entry.user_known_hosts = Some(split_quoted(rest(line, key)));
            }
            "globalknownhostsfile" if *active && entry.global_known_hosts.is_none() => {
                entry.global_known_hosts = Some(split_quoted(rest(line, key)));
            }
            "stricthostkeychecking" if *active && entry.accept_new.is_none() => {
                entry.accept_new = Some(value.eq_ignore_ascii_case("accept-new"));
            }
            "hashknownhosts" if *active && entry.hash_known_hosts.is_none() => {
                entry.hash_known_hosts = Some(value.eq_ignore_ascii_case("yes"));
            }
            "ignoreunknown" if *active && entry.ignore_unknown.is_none() => {
                entry.ignore_unknown = Some(value.to_ascii_lowercase());
            }
            "kexalgorithms"
            | "ciphers"
            | "macs"
            | "hostkeyalgorithms"
            | "pubkeyacceptedalgorithms"
            | "pubkeyacceptedkeytypes"
                if *active =>
            {
                let algorithms = &mut entry.algorithms;
                // The old name and the new are one option: the first of either wins.
                let slot = match lower.as_str() {
                    "kexalgorithms" => &mut algorithms.kex,
                    "ciphers" => &mut algorithms.ciphers,
                    "macs" => &mut algorithms.macs,
                    "hostkeyalgorithms" => &mut algorithms.host_keys,
                    _ => &mut algorithms.pubkey,
                };
                if slot.is_none() {
                    *slot = Some(value.to_string());
                    if let Err(why) = super::algorithms::check(&lower, value)
                        && entry.refused.is_none()
                    {
                        entry.refused = Some(format!(
                            "`{}` line {}: `{key} {value}`: {why}",
                            file.display(),
                            number + 1
                        ));
                    }
                }
            }
            "serveralivecountmax" if *active && entry.alive_count.is_none() => {
                entry.alive_count = value.parse().ok();
            }
            _ => {}
        }
    }
}

/// Keeps the first directive of the blocks that apply which rbee cannot honour, as `file` line
/// N: why.
fn judge(lower: &str, key: &str, value: &str, file: &Path, line: usize, entry: &mut HostEntry) {
    use super::directives::{Verdict, judge};
    let why = match judge(lower, value) {
        Verdict::Honoured | Verdict::Ignored => return,
        Verdict::Refused(why) => format!("`{key} {value}`: {why}"),
        Verdict::Unknown
            if entry
                .ignore_unknown
                .as_deref()
                .is_some_and(|patterns| patterns.split(',').any(|p| glob(p.trim(), lower))) =>
        {
            return;
        }
        Verdict::Unknown => format!(
            "`{key}` is not an ssh_config directive rbee knows (OpenSSH's `ssh` refuses it \
             too, unless `IgnoreUnknown` names it)"
        ),
    };
    if entry.refused.is_none() {
        entry.refused = Some(format!(
            "`{}` line {line}: {why}; rbee cannot honour it, and connecting without it would not \
             be what OpenSSH does (see the README's list of directives)",
            file.display()
        ));
    }
}

/// What follows the keyword on a line, quotes and all.
fn rest<'a>(line: &'a str, key: &str) -> &'a str {
    line[key.len()..]
        .trim_start_matches(|c: char| c.is_whitespace() || c == '=')
        .trim()
}

/// The files an `Include` names: each word, `~` expanded, relative to `base`, with `*` and `?`
/// in its last component matched against that directory, in lexical order as OpenSSH's glob.
fn included(value: &str, base: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for word in value.split_whitespace() {
        let path = expand_tilde(word);
        let path = if path.is_absolute() {
            path
        } else {
            base.join(path)
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains(['*', '?']) {
            files.push(path);
            continue;
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| glob(&name, &e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        found.sort();
        files.extend(found);
    }
    files
}

/// A `Match` line: every criterion must hold. `all`, `host` (the HostName so far, else the
/// alias), `originalhost`, `user` (the User so far), `localuser` and `exec` are evaluated as
/// OpenSSH's readconf.c does (`exec` runs through `sh -c` with its `%` tokens expanded, stdin
/// and stdout on /dev/null, and only while the criteria before it hold; exit 0 matches).
/// Criteria rbee cannot evaluate (`canonical`, `final`, `tagged`, `localnetwork`, ...) are an
/// error: skipping or taking the block would both differ from OpenSSH.
fn match_matches(value: &str, alias: &str, entry: &HostEntry) -> Result<bool, String> {
    let words = split_quoted(value);
    let mut words = words.iter();
    let mut result = true;
    while let Some(criterion) = words.next() {
        let lower = criterion.to_ascii_lowercase();
        let (negate, name) = match lower.strip_prefix('!') {
            Some(name) => (true, name),
            None => (false, lower.as_str()),
        };
        let holds = match name {
            "all" => true,
            "host" | "originalhost" | "user" | "localuser" | "exec" => {
                let Some(argument) = words.next() else {
                    return Err(format!("`Match {name}` needs an argument"));
                };
                let host = entry.host_name.clone().unwrap_or_else(|| alias.to_string());
                let user = entry.user.clone().unwrap_or_else(local_user);
                match name {
                    "exec" if !result => false,
                    "exec" => {
                        let home = home_token();
                        let local = local_user();
                        let tokens = Tokens {
                            alias,
                            host: &host,
                            port: entry.port.unwrap_or(22),
                            user: &user,
                            local_user: &local,
                            home: &home,
                        };
                        run_exec(&expand_tokens(argument, &tokens))?
                    }
                    _ => {
                        let subject = match name {
                            "host" => host,
                            "originalhost" => alias.to_string(),
                            "user" => user,
                            _ => local_user(),
                        };
                        host_matches(&argument.replace(',', " "), &subject)
                    }
                }
            }
            other => {
                return Err(format!(
                    "`Match {other}` is not something rbee can evaluate as OpenSSH does \
                     (it evaluates all, host, originalhost, user, localuser and exec)"
                ));
            }
        };
        if holds == negate {
            result = false;
        }
    }
    Ok(result)
}

/// The passwd entry of this process's uid: its name and home, as OpenSSH's `%u`, `localuser`,
/// `%d` and `~` use them (never `$USER` or `$HOME`); read once (a command over many nodes asks
/// for every node).
fn passwd_entry() -> Option<&'static (String, PathBuf)> {
    static ENTRY: std::sync::OnceLock<Option<(String, PathBuf)>> = std::sync::OnceLock::new();
    ENTRY
        .get_or_init(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| (u.name, u.dir))
        })
        .as_ref()
}

/// The passwd name of this process's uid.
pub(super) fn passwd_name() -> Option<String> {
    passwd_entry().map(|(name, _)| name.clone())
}

/// The passwd home of this process's uid.
pub(super) fn passwd_home() -> Option<PathBuf> {
    passwd_entry()
        .map(|(_, dir)| dir.clone())
        .filter(|dir| !dir.as_os_str().is_empty())
}

fn local_user() -> String {
    passwd_name().unwrap_or_default()
}

/// `Match exec`: whether `command` exits 0.
fn run_exec(command: &str) -> Result<bool, String> {
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map(|status| status.success())
        .map_err(|e| format!("cannot run `Match exec {command:?}`: {e}"))
}

/// The words of a line, `"..."` keeping spaces inside one word, as OpenSSH's argv_split.
fn split_quoted(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// What the `%` tokens of an `IdentityFile` stand for.
pub(crate) struct Tokens<'a> {
    pub(crate) alias: &'a str,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) user: &'a str,
    pub(crate) local_user: &'a str,
    pub(crate) home: &'a str,
}

/// `%h` (host name), `%n` (the alias as given), `%p`, `%r` (remote user), `%u` (local user),
/// `%d` (local home) and `%%`; other tokens are left as written.
pub(crate) fn expand_tokens(text: &str, t: &Tokens<'_>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(t.host),
            Some('n') => out.push_str(t.alias),
            Some('p') => out.push_str(&t.port.to_string()),
            Some('r') => out.push_str(t.user),
            Some('u') => out.push_str(t.local_user),
            Some('d') => out.push_str(t.home),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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
    files.iter().map(|f| expand_tilde(f)).collect()
}

/// The home that `~` and `%d` stand for in ssh_config, as in OpenSSH: the passwd entry's,
/// whatever `$HOME` says (`$HOME` only where the uid has no passwd entry).
fn ssh_home() -> Option<PathBuf> {
    passwd_home().or_else(crate::paths::home_dir)
}

/// `%d`.
pub(crate) fn home_token() -> String {
    ssh_home()
        .map(|h| h.display().to_string())
        .unwrap_or_default()
}

/// A leading `~` or `~/` expanded as OpenSSH expands it in ssh_config's file names.
pub(crate) fn expand_tilde(path: &str) -> PathBuf {
    crate::paths::expand_tilde_with(path, ssh_home().as_deref())
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
    fn includes_match_blocks_and_tokens_as_openssh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("conf.d");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(conf.join("10-lab.conf"), "Host lab\n  Port 2201\n").expect("write");
        std::fs::write(
            conf.join("20-lab.conf"),
            "Host lab\n  Port 2202\n  User second\n",
        )
        .expect("write");
        std::fs::write(conf.join("skip.txt"), "Host lab\n  Port 9\n").expect("write");
        let main = dir.path().join("config");
        std::fs::write(
            &main,
            "Host lab\n  HostName 10.1.1.1\n  Include conf.d/*.conf\n  IdentityFile ~/.ssh/%h-%r\n\
             Match host 10.1.1.* user second\n  IdentitiesOnly yes\n  ProxyJump bastion\n\
             Match exec \"test %n = lab\"\n  ServerAliveInterval 1\n\
             Match exec false\n  ServerAliveCountMax 9\n\
             Match originalhost other exec \"exit 1\"\n  ServerAliveCountMax 8\n",
        )
        .expect("write");
        let e = lookup_in(&main, "lab");
        assert_eq!(e.host_name.as_deref(), Some("10.1.1.1"));
        assert_eq!(e.port, Some(2201), "the first included file's value wins");
        assert_eq!(e.user.as_deref(), Some("second"));
        assert_eq!(e.identities_only, Some(true));
        assert_eq!(e.proxy_jump.as_deref(), Some("bastion"));
        assert_eq!(
            e.alive_interval,
            Some(1),
            "`Match exec` ran `test lab = lab`"
        );
        assert_eq!(e.alive_count, None);
        assert_eq!(e.refused, None);
        let odd = dir.path().join("odd");
        std::fs::write(
            &odd,
            "Host *\n  Port 2\n\nMatch canonical host lab\n  Port 3\n",
        )
        .expect("write");
        let e = lookup_in(&odd, "lab");
        assert_eq!(e.port, Some(2));
        assert_eq!(
            e.refused
                .as_deref()
                .map(|r| r.starts_with(&format!("`{}` line 4: ", odd.display()))),
            Some(true),
            "{:?}",
            e.refused
        );
        assert_eq!(e.proxy_command, None);
        let with_command = dir.path().join("with-command");
        std::fs::write(
            &with_command,
            "Host *\n\n  ProxyCommand nc \"%h\" %p\n  ProxyJump bastion\n",
        )
        .expect("write");
        let e = lookup_in(&with_command, "lab");
        assert_eq!(e.proxy_command.as_deref(), Some("nc \"%h\" %p"));
        assert_eq!(e.proxy_jump, None, "the first of the two wins");
        std::fs::write(
            &with_command,
            "Host *\n  ProxyJump none\n  ProxyCommand nc %h %p\n",
        )
        .expect("write");
        let e = lookup_in(&with_command, "lab");
        assert_eq!(e.proxy_command, None);
        assert_eq!(e.proxy_jump.as_deref(), Some("none"));
        let t = Tokens {
            alias: "lab",
            host: "10.1.1.1",
            port: 2201,
            user: "second",
            local_user: "me",
            home: "/home/me",
        };
        assert_eq!(
            expand_tokens("%d/.ssh/%h-%r-%u-%p-%n-%%-%x", &t),
            "/home/me/.ssh/10.1.1.1-second-me-2201-lab-%-%x"
        );
    }

    #[test]
    fn globs_and_negation() {
        assert!(host_matches("*.lab !bad.lab", "a.lab"));
        assert!(!host_matches("*.lab !bad.lab", "bad.lab"));
        assert!(host_matches("node?", "node1"));
        assert!(!host_matches("node?", "node12"));
    }
}
