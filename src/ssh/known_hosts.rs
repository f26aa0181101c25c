//! The node's host key against known_hosts, as OpenSSH checks it: a host is known when the key
//! it presents is recorded for it; any other key recorded for it, of the same type or another,
//! makes the key a changed one (refused, whatever the user asked). The client asks first for
//! the key types known_hosts holds for the host, so a host that offers several keys presents
//! the one that is known. A host certificate is taken when an `@cert-authority` line for the
//! host signed it; a key marked `@revoked` is refused. Every known_hosts file is read; a new
//! key is recorded in the first (one line, hashed under `HashKnownHosts`, `~/.ssh` made 0700
//! when missing).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::{Algorithm, HashAlg, PublicKey, PublicKeyOrCertificate};

use crate::error::Error;
use crate::ssh::SshError;
use crate::ssh::host_cert::Certified;
use crate::ssh::session::Target;

/// What the host key check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostKey {
    Known,
    /// Unknown, and recorded because the user asked for it.
    Accepted {
        fingerprint: String,
    },
    Unknown {
        fingerprint: String,
    },
    Changed {
        fingerprint: String,
        /// The known_hosts file and line that hold the key recorded for the host.
        file: PathBuf,
        line: usize,
        /// The fingerprint of the key that line holds.
        known: String,
        /// Whether that key is of another type than the one presented.
        other_type: Option<(String, String)>,
    },
    Unsupported(String),
}

/// A key known_hosts records for the host.
#[derive(Debug, Clone)]
pub(super) struct Recorded {
    pub(super) file: PathBuf,
    pub(super) line: usize,
    pub(super) key: PublicKey,
    pub(super) revoked: bool,
    /// An `@cert-authority` line: the key signs host certificates, it is no host key.
    pub(super) ca: bool,
}

/// The name known_hosts files the host under: `host`, or `[host]:port` off port 22.
fn host_port(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The keys `path` records for `host:port` (a missing file records none), `@revoked` and
/// `@cert-authority` lines marked as such; lines that do not parse are skipped, as OpenSSH
/// skips them.
pub(super) fn recorded(host: &str, port: u16, path: &Path) -> std::io::Result<Vec<Recorded>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let name = host_port(host, port);
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        if first.starts_with('#') {
            continue;
        }
        let (mut revoked, mut ca) = (false, false);
        if first.starts_with('@') {
            match first {
                "@revoked" => revoked = true,
                "@cert-authority" => ca = true,
                _ => continue,
            }
            let Some(next) = fields.next() else {
                continue;
            };
            first = next;
        }
        let (Some(kind), Some(data)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !host_matches(first, &name) {
            continue;
        }
        let Ok(key) = PublicKey::from_openssh(&format!("{kind} {data}")) else {
            tracing::debug!("{}:{}: not a key; skipped", path.display(), i + 1);
            continue;
        };
        found.push(Recorded {
            file: path.to_path_buf(),
            line: i + 1,
            key,
            revoked,
            ca,
        });
    }
    Ok(found)
}

/// The keys every file of `files` records for `host:port`, in the files' order (as OpenSSH
/// reads each of `UserKnownHostsFile` and `GlobalKnownHostsFile`).
pub(super) fn recorded_in(
    host: &str,
    port: u16,
    files: &[PathBuf],
) -> std::io::Result<Vec<Recorded>> {
    let mut found = Vec::new();
    for file in files {
        found.extend(recorded(host, port, file)?);
    }
    Ok(found)
}

/// A known_hosts host field: comma-separated patterns (`*`, `?`, `!` negation) or hashed
/// names (`|1|salt|hmac`).
fn host_matches(patterns: &str, name: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            matched |= hashed_matches(hashed, name);
        } else if let Some(negated) = pattern.strip_prefix('!') {
            if crate::ssh::config::glob(&negated.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
                return false;
            }
        } else if crate::ssh::config::glob(
            &pattern.to_ascii_lowercase(),
            &name.to_ascii_lowercase(),
        ) {
            matched = true;
        }
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    use hmac_sha1::{Hmac, KeyInit, Mac};
    let decode = |text: &str| data_encoding::BASE64.decode(text.as_bytes()).ok();
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Some(salt), Some(hash)) = (decode(salt), decode(hash)) else {
        return false;
    };
    match Hmac::<sha1::Sha1>::new_from_slice(&salt) {
        Ok(mac) => mac
            .chain_update(name.as_bytes())
            .verify_slice(&hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// `name` as OpenSSH's `HashKnownHosts` writes it: `|1|salt|HMAC-SHA1(salt, name)`, base64.
fn hashed_name(name: &str) -> String {
    use hmac_sha1::{Hmac, KeyInit, Mac};
    let salt: [u8; 20] = rand::random();
    let hash = match Hmac::<sha1::Sha1>::new_from_slice(&salt) {
        Ok(mac) => mac
            .chain_update(name.as_bytes())
            .finalize()
            .into_bytes()
            .to_vec(),
        // HMAC takes a key of any length: this arm is never taken.
        Err(_) => return name.to_string(),
    };
    format!(
        "|1|{}|{}",
        data_encoding::BASE64.encode(&salt),
        data_encoding::BASE64.encode(&hash)
    )
}

/// Whether two key algorithms are one key type (RSA keys sign with several hashes).
fn same_type(a: &Algorithm, b: &Algorithm) -> bool {
    matches!((a, b), (Algorithm::Rsa { .. }, Algorithm::Rsa { .. })) || a == b
}

/// russh's preferred host key algorithms with the types known for the target first, so a
/// host that offers a known key presents it.
pub(super) fn preferred_for(target: &Target) -> russh::Preferred {
    let known: Vec<Algorithm> = recorded_in(&target.host, target.port, &read_files(target))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| !r.revoked && !r.ca)
        .map(|r| r.key.algorithm())
        .collect();
    let mut preferred = russh::Preferred::default();
    // A certificate authority for the host: ask for its host certificate first, as OpenSSH
    // does, so the node proves its name with the CA's signature.
    if has_authority(target) {
        preferred.host_key_certificates = preferred.key.clone();
    }
    // A `HostKeyAlgorithms` list is the user's order, kept as OpenSSH keeps it.
    if crate::ssh::algorithms::apply(&mut preferred, &target.algorithms) {
        return preferred;
    }
    let mut keys = preferred.key.to_vec();
    // Stable: each group keeps russh's own order.
    keys.sort_by_key(|a| !known.iter().any(|k| same_type(k, a)));
    preferred.key = keys.into();
    preferred
}

/// Whether an `@cert-authority` line (not revoked) applies to `target`.
fn has_authority(target: &Target) -> bool {
    recorded_in(&target.host, target.port, &read_files(target))
        .unwrap_or_default()
        .iter()
        .any(|r| r.ca && !r.revoked)
}

/// Every known_hosts file read for `target`: the user's, then the global ones.
fn read_files(target: &Target) -> Vec<PathBuf> {
    let mut files = target.known_hosts.clone();
    files.extend(target.global_known_hosts.iter().cloned());
    files
}

/// Checks the host key during the handshake and leaves its verdict in `verdict`, where the
/// caller reads it once the handshake is over, failed or not.
pub(super) struct Checker {
    host: String,
    port: u16,
    /// Every file read; a new key goes to `record_in`.
    files: Vec<PathBuf>,
    record_in: Option<PathBuf>,
    hashed: bool,
    accept_new: bool,
    verdict: Arc<Mutex<Option<HostKey>>>,
}

impl Checker {
    pub(super) fn new(
        target: &Target,
        accept_new: bool,
        verdict: Arc<Mutex<Option<HostKey>>>,
    ) -> Checker {
        Checker {
            host: target.host.clone(),
            port: target.port,
            files: read_files(target),
            record_in: target.known_hosts.first().cloned(),
            hashed: target.hash_known_hosts,
            accept_new: accept_new || target.accept_new,
            verdict,
        }
    }

    fn decide(&self, key: &PublicKey) -> HostKey {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let recorded = match recorded_in(&self.host, self.port, &self.files) {
            Ok(recorded) => recorded,
            Err(e) => {
                return HostKey::Unsupported(format!("cannot read its known_hosts files: {e}"));
            }
        };
        let same_key = |r: &&Recorded| r.key.key_data() == key.key_data();
        if let Some(r) = recorded.iter().filter(|r| r.revoked).find(same_key) {
            return HostKey::Unsupported(format!(
                "the key it presents, {fingerprint}, is marked @revoked in `{}` line {}",
                r.file.display(),
                r.line
            ));
        }
        let hosts_keys: Vec<&Recorded> = recorded.iter().filter(|r| !r.revoked && !r.ca).collect();
        if hosts_keys.iter().any(same_key) {
            return HostKey::Known;
        }
        // Another key of the same type first; else a key of another type, which the host was
        // asked for first and no longer offers.
        let other = hosts_keys
            .iter()
            .find(|r| same_type(&r.key.algorithm(), &key.algorithm()))
            .or_else(|| hosts_keys.first());
        if let Some(r) = other {
            let other_type = (!same_type(&r.key.algorithm(), &key.algorithm()))
                .then(|| (key.algorithm().to_string(), r.key.algorithm().to_string()));
            return HostKey::Changed {
                fingerprint,
                file: r.file.clone(),
                line: r.line,
                known: r.key.fingerprint(HashAlg::Sha256).to_string(),
                other_type,
            };
        }
        if !self.accept_new {
            return HostKey::Unknown { fingerprint };
        }
        let Some(file) = &self.record_in else {
            return HostKey::Unsupported(format!(
                "it presents {fingerprint}, which is not known, and there is no known_hosts \
                 file to record it in (`UserKnownHostsFile none`)"
            ));
        };
        match learn(&self.host, self.port, key, file, self.hashed) {
            Ok(()) => HostKey::Accepted { fingerprint },
            Err(e) => HostKey::Unsupported(format!(
                "cannot record the host key in `{}`: {e}",
                file.display()
            )),
        }
    }
}

impl Checker {
    /// A host certificate: taken when a recorded `@cert-authority` signed it and it holds for
    /// this host (`host_cert`); one that no recorded authority signed is checked as its plain
    /// key, as OpenSSH does.
    fn decide_certificate(&self, cert: &russh::keys::Certificate) -> HostKey {
        let recorded = match recorded_in(&self.host, self.port, &self.files) {
            Ok(recorded) => recorded,
            Err(e) => {
                return HostKey::Unsupported(format!("cannot read its known_hosts files: {e}"));
            }
        };
        match crate::ssh::host_cert::check(cert, &self.host, &recorded) {
            Certified::Yes => HostKey::Known,
            Certified::Refused(why) => HostKey::Unsupported(why),
            Certified::NoAuthority => self.decide(&PublicKey::from(cert.public_key().clone())),
        }
    }
}

/// Appends `host`'s key to known_hosts: its directory made 0700 when missing (as OpenSSH makes
/// `~/.ssh`), a newline first only when the file does not end in one.
fn learn(host: &str, port: u16, key: &PublicKey, path: &Path, hashed: bool) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let mut last = [0u8; 1];
    let needs_newline = file.seek(SeekFrom::End(-1)).is_ok()
        && file.read_exact(&mut last).is_ok()
        && last[0] != b'\n';
    let openssh = key
        .to_openssh()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let line = format!(
        "{}{} {openssh}\n",
        if needs_newline { "\n" } else { "" },
        if hashed {
            hashed_name(&host_port(host, port))
        } else {
            host_port(host, port)
        }
    );
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let verdict = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.decide(key),
            PublicKeyOrCertificate::Certificate(cert) => self.decide_certificate(cert),
        };
        let accepted = matches!(verdict, HostKey::Known | HostKey::Accepted { .. });
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
        Ok(accepted)
    }
}

/// The error for a refused host key, or `None` when the key was not what stopped the connection.
pub(super) fn host_key_error(target: &Target, verdict: Option<HostKey>) -> Option<Error> {
    let err = match verdict? {
        HostKey::Unknown { fingerprint } => SshError::HostKeyUnknown {
            target: target.describe(),
            node: target.node.clone(),
            fingerprint,
            known_hosts: target
                .known_hosts
                .first()
                .cloned()
                .unwrap_or_else(|| PathBuf::from("none")),
        },
        HostKey::Changed {
            fingerprint,
            file,
            line,
            known,
            other_type,
        } => SshError::HostKeyChanged {
            target: target.describe(),
            node: target.node.clone(),
            fingerprint,
            known: Some(known),
            known_hosts: file,
            line,
            holds: match other_type {
                Some((presented, recorded)) => format!(
                    "its {recorded} key, and it no longer offers one (it presents {presented})"
                ),
                None => "another key".to_string(),
            },
        },
        HostKey::Unsupported(why) => SshError::HostKeyUnchecked {
            target: target.describe(),
            why,
        },
        HostKey::Known | HostKey::Accepted { .. } => return None,
    };
    Some(Error::from(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    #[test]
    fn patterns_negation_and_hashed_names_match_as_in_openssh() {
        assert!(host_matches("a,[127.0.0.1]:2222", "[127.0.0.1]:2222"));
        assert!(host_matches("*.lab,!bad.lab", "gpu.lab"));
        assert!(!host_matches("*.lab,!bad.lab", "bad.lab"));
        assert!(!host_matches("127.0.0.1", "[127.0.0.1]:2222"));
        // From russh's own test: `|1|...` for `example.com`.
        assert!(host_matches(
            "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak=",
            "example.com"
        ));
        assert!(!host_matches(
            "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak=",
            "example.org"
        ));
    }

    #[test]
    fn recording_makes_a_private_directory_and_no_blank_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dot-ssh/known_hosts");
        let key = PublicKey::from_openssh(ED).expect("key");
        learn("h", 2222, &key, &path, false).expect("learn");
        learn("g", 22, &key, &path, false).expect("learn");
        learn("hashed", 22, &key, &path, true).expect("learn");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("[h]:2222 ssh-ed25519 "), "{text:?}");
        assert_eq!(text.lines().count(), 3, "{text:?}");
        assert!(!text.contains("hashed"), "{text:?}");
        assert_eq!(recorded("hashed", 22, &path).expect("read").len(), 1);
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with("g ")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("dot-ssh"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let found = recorded("h", 2222, &path).expect("read");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 1);
    }
}
