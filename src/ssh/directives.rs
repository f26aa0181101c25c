//! What rbee does with each ssh_config directive that applies to a node: honours it, ignores
//! it because it has no effect on what rbee does, or refuses it because connecting without it
//! would not be what OpenSSH does with the same file (another address, route, key or check).

/// The verdict on the first value a directive obtains.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// `config` reads it (HostName, Port, IdentityFile, ...).
    Honoured,
    /// It changes nothing rbee does: rbee never asks, forwards, or multiplexes as ssh does.
    Ignored,
    /// rbee cannot do what it asks; the reason says what would differ.
    Refused(&'static str),
    /// Not an ssh_config directive at all (OpenSSH refuses the file too).
    Unknown,
}

/// Directives `config` reads.
const HONOURED: &[&str] = &[
    "host",
    "match",
    "include",
    "hostname",
    "user",
    "port",
    "identityfile",
    "identitiesonly",
    "connecttimeout",
    "serveraliveinterval",
    "serveralivecountmax",
    "proxyjump",
    "proxycommand",
    "userknownhostsfile",
    "globalknownhostsfile",
    "hashknownhosts",
    "ignoreunknown",
    "certificatefile",
    "kexalgorithms",
    "ciphers",
    "macs",
    "hostkeyalgorithms",
    "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes",
];

/// Directives that have no effect on what rbee does, whatever their value: the interactive
/// client's (terminal, escapes, X11, agent and port forwarding that rbee never asks for),
/// OpenSSH's own multiplexing (rbee has its `persist`), logging, and authentication methods
/// rbee never uses (it logs in with keys only, so where they would be needed its login fails
/// as a refusal, never elsewhere). Also the keywords OpenSSH itself accepts and ignores.
const IGNORED: &[&str] = &[
    "addkeystoagent",
    "batchmode",
    "canonicaldomains",
    "canonicalizefallbacklocal",
    "canonicalizemaxdots",
    "canonicalizepermittedcnames",
    "challengeresponseauthentication",
    "channeltimeout",
    "checkhostip",
    "clearallforwardings",
    "compression",
    "controlmaster",
    "controlpath",
    "controlpersist",
    "enableescapecommandline",
    "enablesshkeysign",
    "escapechar",
    "exitonforwardfailure",
    "forkafterauthentication",
    "forwardagent",
    "forwardx11",
    "forwardx11timeout",
    "forwardx11trusted",
    "gatewayports",
    "gssapiauthentication",
    "gssapiclientidentity",
    "gssapidelegatecredentials",
    "gssapikeyexchange",
    "gssapikexalgorithms",
    "gssapirenewalforcesrekey",
    "gssapiserveridentity",
    "gssapitrustdns",
    "hostbasedacceptedalgorithms",
    "hostbasedauthentication",
    "hostbasedkeytypes",
    "ipqos",
    "kbdinteractiveauthentication",
    "kbdinteractivedevices",
    "localcommand",
    "loglevel",
    "logverbose",
    "numberofpasswordprompts",
    "obscurekeystroketiming",
    "passwordauthentication",
    "permitremoteopen",
    "preferredauthentications",
    "rekeylimit",
    "requesttty",
    "securitykeyprovider",
    "sendenv",
    "sessiontype",
    "stdinnull",
    "streamlocalbindmask",
    "streamlocalbindunlink",
    "syslogfacility",
    "tag",
    "tcpkeepalive",
    "tunneldevice",
    "updatehostkeys",
    "visualhostkey",
    "xauthlocation",
    // Deprecated or unsupported keywords that OpenSSH accepts and ignores.
    "cipher",
    "compressionlevel",
    "dsaauthentication",
    "fallbacktorsh",
    "protocol",
    "rhostsauthentication",
    "rhostsrsaauthentication",
    "rsaauthentication",
    "smartcarddevice",
    "useprivilegedport",
    "useroaming",
    "usersh",
];

/// Directives rbee cannot honour whatever their value, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "localforward",
        "rbee opens no port forwards; OpenSSH would set this one up",
    ),
    (
        "remoteforward",
        "rbee opens no port forwards; OpenSSH would set this one up",
    ),
    (
        "dynamicforward",
        "rbee opens no port forwards; OpenSSH would set this one up",
    ),
    (
        "bindaddress",
        "rbee does not choose the local address it connects from",
    ),
    (
        "bindinterface",
        "rbee does not choose the local interface it connects from",
    ),
    (
        "hostkeyalias",
        "rbee looks the host key up under the host's own name, not an alias",
    ),
    (
        "casignaturealgorithms",
        "rbee accepts its own list of certificate signature algorithms",
    ),
    (
        "requiredrsasize",
        "rbee does not enforce a minimum RSA key size",
    ),
    ("setenv", "rbee sends no environment variables to the node"),
    (
        "refuseconnection",
        "OpenSSH would refuse to connect to this host",
    ),
];

/// The verdict on directive `key` (lower case) whose value begins with `value`.
pub(super) fn judge(key: &str, value: &str) -> Verdict {
    let value = value
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let value = value.as_str();
    if let Some(verdict) = by_value(key, value) {
        return verdict;
    }
    if HONOURED.contains(&key) {
        Verdict::Honoured
    } else if IGNORED.contains(&key) {
        Verdict::Ignored
    } else if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
        Verdict::Refused(why)
    } else {
        Verdict::Unknown
    }
}

/// Directives that are harmless with some values only: `Ignored` where the value is what
/// rbee does anyway, `Refused` otherwise.
fn by_value(key: &str, value: &str) -> Option<Verdict> {
    let (fine, why): (&[&str], &'static str) = match key {
        "stricthostkeychecking" if value == "accept-new" => return Some(Verdict::Honoured),
        "stricthostkeychecking" => (
            &["yes", "ask", "true"],
            "rbee refuses an unknown host key unless asked (`--accept-new-host-key`, `rbee \
             nodes trust`, `StrictHostKeyChecking accept-new`), and a changed one always",
        ),
        "canonicalizehostname" => (&["no", "false"], "rbee does not canonicalize host names"),
        "pubkeyauthentication" => (
            &["yes", "true", "unbound", "host-bound"],
            "rbee logs in with public keys only",
        ),
        "connectionattempts" => (&["1"], "rbee makes one connection attempt"),
        "addressfamily" => (
            &["any"],
            "rbee connects to any address the name resolves to",
        ),
        "tunnel" => (&["no", "false"], "rbee opens no tun devices"),
        "proxyusefdpass" => (
            &["no", "false"],
            "rbee's ProxyCommand carries the session on its stdio",
        ),
        "permitlocalcommand" => (&["no", "false"], "rbee runs no `LocalCommand`"),
        "verifyhostkeydns" => (
            &["no", "false", "ask"],
            "rbee checks host keys against known_hosts only, not SSHFP records",
        ),
        "nohostauthenticationforlocalhost" => (
            &["no", "false"],
            "rbee checks the host key of localhost too",
        ),
        "remotecommand" => (
            &["none"],
            "rbee runs its own commands on the node (OpenSSH refuses a command line with it too)",
        ),
        "knownhostscommand" => (&["none"], "rbee reads known_hosts files only"),
        "revokedhostkeys" => (
            &["none"],
            "rbee reads no revocation list (`@revoked` lines in known_hosts are read)",
        ),
        "pkcs11provider" => (&["none"], "rbee cannot use keys of a PKCS#11 token"),
        "identityagent" => (
            &["ssh_auth_sock", "$ssh_auth_sock"],
            "rbee asks the ssh-agent of `$SSH_AUTH_SOCK` only",
        ),
        _ => return None,
    };
    Some(if fine.contains(&value) {
        Verdict::Ignored
    } else {
        Verdict::Refused(why)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_do_not_overlap_and_values_decide_where_they_matter() {
        for key in HONOURED {
            assert!(!IGNORED.contains(key), "{key}");
            assert!(!REFUSED.iter().any(|(k, _)| k == key), "{key}");
        }
        for key in IGNORED {
            assert!(!REFUSED.iter().any(|(k, _)| k == key), "{key}");
        }
        assert_eq!(judge("compression", "yes"), Verdict::Ignored);
        assert_eq!(judge("stricthostkeychecking", "Yes"), Verdict::Ignored);
        assert!(matches!(
            judge("stricthostkeychecking", "no"),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            judge("localforward", "8080 x:80"),
            Verdict::Refused(_)
        ));
        assert_eq!(judge("usekeychain", "yes"), Verdict::Unknown);
    }
}
