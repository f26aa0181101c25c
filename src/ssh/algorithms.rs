//! `KexAlgorithms`, `Ciphers`, `MACs`, `HostKeyAlgorithms` and `PubkeyAcceptedAlgorithms` as
//! OpenSSH reads them: a list that is the whole choice, or that changes the default (`+`
//! appends, `-` removes, `^` puts first); names to remove may hold `*` and `?`. rbee offers
//! what the list leaves of the algorithms it has, so a hardened `Host *` block narrows rbee's
//! choice as it narrows ssh's.

use serde::{Deserialize, Serialize};

/// The lists a node's ssh_config sets, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Algorithms {
    pub(crate) kex: Option<String>,
    pub(crate) ciphers: Option<String>,
    pub(crate) macs: Option<String>,
    pub(crate) host_keys: Option<String>,
    /// `PubkeyAcceptedAlgorithms` (or its old name `PubkeyAcceptedKeyTypes`): the keys and
    /// certificates a login may offer.
    #[serde(default)]
    pub(crate) pubkey: Option<String>,
}

/// The signature algorithms rbee can log in with: its key types' certificates, then the keys
/// (RSA with SHA-2 or, where the list adds it, SHA-1).
const PUBKEY_ALL: &[&str] = &[
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
];

/// OpenSSH's default `PubkeyAcceptedAlgorithms`, less the security keys (`sk-*`) rbee has none of.
const PUBKEY_DEFAULT: &[&str] = &[
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
];

/// What a `PubkeyAcceptedAlgorithms` list leaves of the algorithms rbee can log in with, in
/// its order; `None` where ssh_config sets none (every key is offered).
pub(crate) fn pubkey_accepted(spec: Option<&str>) -> Option<Vec<String>> {
    spec.map(|spec| assemble(spec, &names(PUBKEY_DEFAULT), &names(PUBKEY_ALL)))
}

/// Markers in the key exchange list that are no algorithm (extension negotiation, strict key
/// exchange): always sent, as OpenSSH adds its own.
fn is_marker(name: &str) -> bool {
    name.starts_with("ext-info-") || name.starts_with("kex-strict-")
}

/// What `spec` leaves, in order, of `all` (what rbee has), with `default` as the list it
/// changes.
fn assemble(spec: &str, default: &[String], all: &[String]) -> Vec<String> {
    let (mode, list) = match spec.chars().next() {
        Some(c @ ('+' | '-' | '^')) => (Some(c), &spec[1..]),
        _ => (None, spec),
    };
    let patterns: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    // Only a list of names to remove may hold wildcards, as in OpenSSH (elsewhere it refuses
    // `*` as a bad name; here it matches nothing).
    let matches = |pattern: &str, name: &str| {
        if mode == Some('-') {
            super::config::glob(pattern, name)
        } else {
            pattern == name
        }
    };
    let named = |pool: &[String]| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for pattern in &patterns {
            for name in pool {
                if matches(pattern, name) && !out.contains(name) {
                    out.push(name.clone());
                }
            }
        }
        out
    };
    match mode {
        Some('+') => {
            let mut out = default.to_vec();
            out.extend(named(all).into_iter().filter(|n| !default.contains(n)));
            out
        }
        Some('-') => {
            let removed = named(default);
            default
                .iter()
                .filter(|n| !removed.contains(n))
                .cloned()
                .collect()
        }
        Some(_) => {
            let mut out = named(all);
            out.extend(
                default
                    .iter()
                    .filter(|n| !out.contains(n))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            out
        }
        None => named(all),
    }
}

fn names<T: AsRef<str>>(list: &[T]) -> Vec<String> {
    list.iter()
        .map(|n| n.as_ref().to_string())
        .filter(|n| !is_marker(n) && n != "none" && n != "clear")
        .collect()
}

fn kex_all() -> Vec<String> {
    names(russh::kex::ALL_KEX_ALGORITHMS)
}

fn cipher_all() -> Vec<String> {
    names(russh::cipher::ALL_CIPHERS)
}

fn mac_all() -> Vec<String> {
    names(russh::mac::ALL_MAC_ALGORITHMS)
}

/// The host key names rbee can ask for: each of its key algorithms and its certificate form.
fn host_key_names(keys: &[russh::keys::Algorithm]) -> Vec<String> {
    let mut out: Vec<String> = keys.iter().map(|a| a.to_certificate_type()).collect();
    out.extend(keys.iter().map(|a| a.as_str().to_string()));
    out
}

/// Why a directive's list leaves rbee nothing to offer (`key` in lower case), if it does.
pub(super) fn check(key: &str, value: &str) -> Result<(), String> {
    let preferred = russh::Preferred::default();
    let left = match key {
        "kexalgorithms" => assemble(value, &names(&preferred.kex), &kex_all()),
        "ciphers" => assemble(value, &names(&preferred.cipher), &cipher_all()),
        "macs" => assemble(value, &names(&preferred.mac), &mac_all()),
        "pubkeyacceptedalgorithms" | "pubkeyacceptedkeytypes" => {
            assemble(value, &names(PUBKEY_DEFAULT), &names(PUBKEY_ALL))
        }
        "hostkeyalgorithms" => {
            let all = host_key_names(&preferred.key);
            // A list of certificates only leaves no plain key to fall back on; rbee asks for
            // a certificate only where an `@cert-authority` line applies, so it needs one.
            assemble(value, &all, &all)
                .into_iter()
                .filter(|n| !n.contains("-cert-"))
                .collect()
        }
        _ => return Ok(()),
    };
    if left.is_empty() {
        return Err(format!(
            "none of these is an algorithm rbee has (it has {})",
            match key {
                "kexalgorithms" => kex_all().join(","),
                "ciphers" => cipher_all().join(","),
                "macs" => mac_all().join(","),
                "hostkeyalgorithms" => host_key_names(&preferred.key).join(","),
                _ => PUBKEY_ALL.join(","),
            }
        ));
    }
    Ok(())
}

/// Narrows russh's lists to what the node's ssh_config leaves; whether the host key order is
/// the user's own (and must not be changed).
pub(super) fn apply(preferred: &mut russh::Preferred, algorithms: &Algorithms) -> bool {
    fn pick<N: AsRef<str> + Copy>(
        spec: Option<&str>,
        default: &[N],
        all: &[&N],
        keep_markers: bool,
    ) -> Option<Vec<N>> {
        let spec = spec?;
        let everything: Vec<N> = all.iter().map(|n| **n).collect();
        let chosen = assemble(spec, &names(default), &names(&everything));
        let mut out: Vec<N> = chosen
            .iter()
            .filter_map(|c| everything.iter().find(|n| n.as_ref() == c).copied())
            .collect();
        if keep_markers {
            out.extend(default.iter().filter(|n| is_marker(n.as_ref())).copied());
        }
        Some(out)
    }
    if let Some(kex) = pick(
        algorithms.kex.as_deref(),
        &preferred.kex,
        russh::kex::ALL_KEX_ALGORITHMS,
        true,
    ) {
        preferred.kex = kex.into();
    }
    if let Some(cipher) = pick(
        algorithms.ciphers.as_deref(),
        &preferred.cipher,
        russh::cipher::ALL_CIPHERS,
        false,
    ) {
        preferred.cipher = cipher.into();
    }
    if let Some(mac) = pick(
        algorithms.macs.as_deref(),
        &preferred.mac,
        russh::mac::ALL_MAC_ALGORITHMS,
        false,
    ) {
        preferred.mac = mac.into();
    }
    let Some(spec) = algorithms.host_keys.as_deref() else {
        return false;
    };
    let all = host_key_names(&preferred.key);
    let chosen = assemble(spec, &all, &all);
    let by_name = |name: &str| preferred.key.iter().find(|a| a.as_str() == name).cloned();
    let by_cert = |name: &str| {
        preferred
            .key
            .iter()
            .find(|a| a.to_certificate_type() == name)
            .cloned()
    };
    let keys: Vec<_> = chosen.iter().filter_map(|n| by_name(n)).collect();
    // Certificates stay asked for only where they already were (an `@cert-authority` line
    // applies) and the list keeps them.
    let certs: Vec<_> = if preferred.host_key_certificates.is_empty() {
        Vec::new()
    } else {
        chosen.iter().filter_map(|n| by_cert(n)).collect()
    };
    preferred.key = keys.into();
    preferred.host_key_certificates = certs.into();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn lists_replace_append_remove_and_prepend_as_in_openssh() {
        let all = list(&["a-ctr", "b-ctr", "c-gcm", "d-poly"]);
        let default = list(&["c-gcm", "a-ctr"]);
        assert_eq!(
            assemble("b-ctr,a-ctr", &default, &all),
            list(&["b-ctr", "a-ctr"])
        );
        assert_eq!(assemble("*-ctr", &default, &all), Vec::<String>::new());
        assert_eq!(
            assemble("+d-poly", &default, &all),
            list(&["c-gcm", "a-ctr", "d-poly"])
        );
        assert_eq!(assemble("-c-*", &default, &all), list(&["a-ctr"]));
        assert_eq!(
            assemble("^a-ctr", &default, &all),
            list(&["a-ctr", "c-gcm"])
        );
        assert_eq!(
            assemble("nothing-we-have", &default, &all),
            Vec::<String>::new()
        );
    }

    #[test]
    fn pubkey_lists_change_openssh_default_and_refuse_what_rbee_cannot_sign_with() {
        assert_eq!(pubkey_accepted(None), None);
        let left = pubkey_accepted(Some("-ssh-ed25519")).expect("list");
        assert!(!left.contains(&"ssh-ed25519".to_string()), "{left:?}");
        assert!(left.contains(&"ssh-ed25519-cert-v01@openssh.com".to_string()));
        assert!(
            !left.contains(&"ssh-rsa".to_string()),
            "SHA-1 is not in the default"
        );
        let added = pubkey_accepted(Some("+ssh-rsa")).expect("list");
        assert_eq!(added.last().map(String::as_str), Some("ssh-rsa"));
        assert!(check("pubkeyacceptedalgorithms", "sk-ssh-ed25519@openssh.com").is_err());
        assert!(check("pubkeyacceptedkeytypes", "-*").is_err());
        assert!(check("pubkeyacceptedalgorithms", "rsa-sha2-256").is_ok());
    }

    #[test]
    fn a_list_rbee_has_nothing_of_is_refused_and_markers_stay() {
        assert!(check("ciphers", "aes256-ctr").is_ok());
        assert!(check("ciphers", "3des-cbc").is_err());
        assert!(check("macs", "-*").is_err());
        assert!(check("hostkeyalgorithms", "ssh-ed25519-cert-v01@openssh.com").is_err());
        let mut preferred = russh::Preferred::default();
        let algorithms = Algorithms {
            kex: Some("curve25519-sha256".into()),
            ciphers: Some("aes256-ctr".into()),
            ..Algorithms::default()
        };
        assert!(!apply(&mut preferred, &algorithms));
        let kex: Vec<&str> = preferred.kex.iter().map(AsRef::as_ref).collect();
        assert_eq!(kex[0], "curve25519-sha256");
        assert!(kex[1..].iter().all(|k| is_marker(k)), "{kex:?}");
        assert!(!kex[1..].is_empty(), "the extension markers went: {kex:?}");
        let ciphers: Vec<&str> = preferred.cipher.iter().map(AsRef::as_ref).collect();
        assert_eq!(ciphers, ["aes256-ctr"]);
    }
}
