//! A host certificate against the `@cert-authority` lines recorded for the host, as OpenSSH's
//! `check_host_cert` checks it.

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Certificate, HashAlg, PublicKey};

use crate::ssh::known_hosts::Recorded;

/// What the recorded authorities say of a host certificate.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Certified {
    /// Signed by a recorded authority, and valid for this host now.
    Yes,
    /// Signed by a recorded authority, but not to be trusted: why.
    Refused(String),
    /// No recorded authority signed it: it proves nothing beyond its plain key.
    NoAuthority,
}

/// `cert` for `host` (the name connected to, without the port): signed by an `@cert-authority`
/// key of `recorded` (neither that key nor the certified one `@revoked`), a host certificate,
/// valid now, whose principals name `host` (or are empty), with no critical options.
pub(super) fn check(cert: &Certificate, host: &str, recorded: &[Recorded]) -> Certified {
    let signer = cert.signature_key();
    let Some(authority) = recorded
        .iter()
        .find(|r| r.ca && !r.revoked && r.key.key_data() == signer)
    else {
        return Certified::NoAuthority;
    };
    let fingerprint = PublicKey::from(cert.public_key().clone()).fingerprint(HashAlg::Sha256);
    let refuse = |why: String| {
        Certified::Refused(format!(
            "its host certificate (key {fingerprint}, signed by the authority of `{}` line {}) \
             {why}",
            authority.file.display(),
            authority.line
        ))
    };
    let revoked = |data: &KeyData| {
        recorded
            .iter()
            .find(|r| r.revoked && r.key.key_data() == data)
    };
    if let Some(r) = revoked(signer).or_else(|| revoked(cert.public_key())) {
        return refuse(format!(
            "is marked @revoked in `{}` line {}",
            r.file.display(),
            r.line
        ));
    }
    if cert.cert_type() != CertType::Host {
        return refuse("is not a host certificate".to_string());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let authority_print = authority.key.fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&authority_print]).is_err() {
        return refuse("does not verify, or is not valid now".to_string());
    }
    let principals = cert.valid_principals();
    if !principals.is_empty() && !principals.iter().any(|p| p == host) {
        return refuse(format!("names {}, not `{host}`", principals.join(", ")));
    }
    if !cert.critical_options().is_empty() {
        return refuse("has critical options, which host certificates do not take".to_string());
    }
    Certified::Yes
}
