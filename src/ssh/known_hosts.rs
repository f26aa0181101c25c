//! The node's host key against known_hosts: what the check decided during the handshake, and
//! the error that names the key when it refused.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

use crate::error::Error;
use crate::ssh::SshError;
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
        line: usize,
    },
    Unsupported(String),
}

/// Checks the host key during the handshake and leaves its verdict in `verdict`, where the
/// caller reads it once the handshake is over, failed or not.
pub(super) struct Checker {
    host: String,
    port: u16,
    known_hosts: PathBuf,
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
            known_hosts: target.known_hosts.clone(),
            accept_new,
            verdict,
        }
    }

    fn decide(&self, key: &PublicKey) -> HostKey {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => HostKey::Known,
            Ok(false) if self.accept_new => {
                match russh::keys::known_hosts::learn_known_hosts_path(
                    &self.host,
                    self.port,
                    key,
                    &self.known_hosts,
                ) {
                    Ok(()) => HostKey::Accepted { fingerprint },
                    Err(e) => HostKey::Unsupported(format!(
                        "cannot record the host key in `{}`: {e}",
                        self.known_hosts.display()
                    )),
                }
            }
            Ok(false) => HostKey::Unknown { fingerprint },
            Err(russh::keys::Error::KeyChanged { line }) => HostKey::Changed { fingerprint, line },
            Err(e) => {
                HostKey::Unsupported(format!("cannot read `{}`: {e}", self.known_hosts.display()))
            }
        }
    }
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let verdict = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.decide(key),
            PublicKeyOrCertificate::Certificate(_) => {
                HostKey::Unsupported("the server presented a host certificate; rbee checks plain host keys against known_hosts".to_string())
            }
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
            known_hosts: target.known_hosts.clone(),
        },
        HostKey::Changed { fingerprint, line } => SshError::HostKeyChanged {
            target: target.describe(),
            node: target.node.clone(),
            fingerprint,
            known: known_fingerprint(target, line),
            known_hosts: target.known_hosts.clone(),
            line,
        },
        HostKey::Unsupported(why) => SshError::HostKeyUnchecked {
            target: target.describe(),
            why,
        },
        HostKey::Known | HostKey::Accepted { .. } => return None,
    };
    Some(Error::from(err))
}

/// The fingerprint of the key that known_hosts holds for the target at `line`.
fn known_fingerprint(target: &Target, line: usize) -> Option<String> {
    let known = russh::keys::known_hosts::known_host_keys_path(
        &target.host,
        target.port,
        &target.known_hosts,
    )
    .ok()?;
    known
        .into_iter()
        .find(|(l, _)| *l == line)
        .map(|(_, key)| key.fingerprint(HashAlg::Sha256).to_string())
}
