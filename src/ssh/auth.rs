//! Logging in to the node: each identity in ssh-agent (only those of the identity files under
//! `IdentitiesOnly`), then each key file (its user certificates first), until one is accepted;
//! only what `PubkeyAcceptedAlgorithms` accepts is offered.

use std::sync::Arc;

use russh::client;
use russh::keys::agent::AgentIdentity;
use russh::keys::{Certificate, HashAlg, PrivateKeyWithHashAlg, PublicKey};

use crate::error::{Error, Result};
use crate::ssh::SshError;
use crate::ssh::known_hosts::Checker;
use crate::ssh::session::Target;

pub(super) async fn authenticate(
    handle: &mut client::Handle<Checker>,
    target: &Target,
) -> Result<()> {
    let mut tried = Vec::new();
    let accepted = crate::ssh::algorithms::pubkey_accepted(target.algorithms.pubkey.as_deref());
    let accepted = accepted.as_deref();
    if std::env::var_os("SSH_AUTH_SOCK").is_some()
        && with_agent(handle, target, accepted, &mut tried).await?
    {
        return Ok(());
    }
    for file in &target.identity_files {
        if !file.exists() {
            if target.named_identity.as_ref() == Some(file) {
                tried.push(format!(
                    "`{}` (the `identity_file` of nodes.toml: it does not exist)",
                    file.display()
                ));
            }
            continue;
        }
        let key = match russh::keys::load_secret_key(file, None) {
            Ok(key) => key,
            Err(e) => {
                tried.push(format!("{} (unusable: {e})", file.display()));
                continue;
            }
        };
        let key = Arc::new(key);
        // As OpenSSH: the identity's certificates first, then its plain key.
        for (path, cert) in certificates_for(target, Some(file), key.public_key()) {
            let name = cert.algorithm().to_certificate_type();
            if !accepts(accepted, &name) {
                tried.push(format!(
                    "the certificate `{}` (`PubkeyAcceptedAlgorithms` does not accept `{name}`)",
                    path.display()
                ));
                continue;
            }
            let result = handle
                .authenticate_openssh_cert(&target.user, key.clone(), cert)
                .await
                .map_err(|e| target.broke(format_args!("authentication failed: {e}")))?;
            if result.success() {
                return Ok(());
            }
            let what = format!("the certificate `{}`", path.display());
            second_factor(target, &result, &what)?;
            tried.push(what);
        }
        let Some(hash) = signing(handle, key.public_key(), accepted).await else {
            tried.push(not_accepted(
                &format!("the key `{}`", file.display()),
                key.public_key(),
            ));
            continue;
        };
        let result = handle
            .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| target.broke(format_args!("authentication failed: {e}")))?;
        if result.success() {
            return Ok(());
        }
        second_factor(target, &result, &format!("the key `{}`", file.display()))?;
        tried.push(file.display().to_string());
    }
    let tried = if tried.is_empty() {
        "no key found (set `identity_file`, or load a key into ssh-agent)".to_string()
    } else {
        format!("tried {}", tried.join(", "))
    };
    Err(Error::from(SshError::AuthRefused {
        target: target.describe(),
        user: target.user.clone(),
        tried,
    }))
}

/// Each identity in ssh-agent (only the identity files' keys under `IdentitiesOnly`): the
/// `CertificateFile`s that certify its key first, then the plain key; whether one logged in.
async fn with_agent(
    handle: &mut client::Handle<Checker>,
    target: &Target,
    accepted: Option<&[String]>,
    tried: &mut Vec<String>,
) -> Result<bool> {
    let mut agent = match russh::keys::agent::client::AgentClient::connect_env().await {
        Ok(agent) => agent,
        Err(e) => {
            tracing::debug!("ssh-agent unavailable: {e}");
            return Ok(false);
        }
    };
    let identities = agent.request_identities().await.unwrap_or_default();
    let only = target.identities_only.then(|| file_public_keys(target));
    for identity in identities {
        let key = identity.public_key().into_owned();
        // sshd counts every key offered (MaxAuthTries): with IdentitiesOnly, the agent's
        // other keys are never offered, nor their certificates (as OpenSSH, which then
        // finds no key to sign a certificate file's login with).
        if only
            .as_ref()
            .is_some_and(|keys| !keys.iter().any(|k| k.key_data() == key.key_data()))
        {
            continue;
        }
        for (path, cert) in certificates_for(target, None, &key) {
            let hash = rsa_hash(handle, &key).await;
            let name = certificate_name(&cert, hash);
            if !accepts(accepted, &name) {
                tried.push(format!(
                    "the certificate `{}` (`PubkeyAcceptedAlgorithms` does not accept `{name}`)",
                    path.display()
                ));
                continue;
            }
            let what = format!(
                "the certificate `{}` with its ssh-agent key",
                path.display()
            );
            let result = handle
                .authenticate_certificate_with(&target.user, cert, hash, &mut PlainKey(&mut agent))
                .await;
            match result {
                Ok(r) if r.success() => return Ok(true),
                Ok(r) => second_factor(target, &r, &what)?,
                Err(e) => tracing::debug!("{what}: {e}"),
            }
            tried.push(what);
        }
        let Some(hash) = signing(handle, &key, accepted).await else {
            tried.push(not_accepted("an ssh-agent key", &key));
            continue;
        };
        let result = handle
            .authenticate_publickey_with(&target.user, key, hash, &mut agent)
            .await;
        match result {
            Ok(r) if r.success() => return Ok(true),
            Ok(r) => second_factor(target, &r, "an ssh-agent key")?,
            Err(_) => {}
        }
    }
    tried.push("ssh-agent".to_string());
    Ok(false)
}

/// ssh-agent asked to sign a certificate's login with the certificate's plain key, as
/// OpenSSH's client asks it: an agent given the key alone (`ssh-add KEY`) holds no
/// certificate identity, and refuses a request that names the certificate.
struct PlainKey<'a>(&'a mut russh::keys::agent::client::AgentClient<tokio::net::UnixStream>);

impl russh::Signer for PlainKey<'_> {
    type Error = russh::AgentAuthError;

    async fn auth_sign(
        &mut self,
        identity: &AgentIdentity,
        hash_alg: Option<HashAlg>,
        to_sign: Vec<u8>,
    ) -> std::result::Result<Vec<u8>, Self::Error> {
        let plain = AgentIdentity::from(identity.public_key().into_owned());
        self.0
            .sign_request(&plain, hash_alg, to_sign)
            .await
            .map_err(Into::into)
    }
}

/// The algorithm name a certificate login with `hash` goes under, as russh sends it.
fn certificate_name(cert: &Certificate, hash: Option<HashAlg>) -> String {
    match (cert.algorithm().is_rsa(), hash) {
        (true, Some(HashAlg::Sha512)) => "rsa-sha2-512-cert-v01@openssh.com".to_string(),
        (true, Some(HashAlg::Sha256)) => "rsa-sha2-256-cert-v01@openssh.com".to_string(),
        _ => cert.algorithm().to_certificate_type(),
    }
}

/// The user certificates for the key `key` (of the identity `file`, if it is one):
/// `<file>-cert.pub`, then each `CertificateFile` that certifies that key, as OpenSSH pairs
/// them.
fn certificates_for(
    target: &Target,
    file: Option<&std::path::Path>,
    key: &PublicKey,
) -> Vec<(std::path::PathBuf, Certificate)> {
    let beside = file.map(|file| {
        let mut beside = file.as_os_str().to_owned();
        beside.push("-cert.pub");
        std::path::PathBuf::from(beside)
    });
    let mut found = Vec::new();
    for path in beside
        .into_iter()
        .chain(target.certificate_files.iter().cloned())
    {
        if !path.exists() || found.iter().any(|(p, _)| p == &path) {
            continue;
        }
        match russh::keys::load_openssh_certificate(&path) {
            Ok(cert) if cert.public_key() == key.key_data() => found.push((path, cert)),
            Ok(_) => {}
            Err(e) => tracing::debug!("{}: not a certificate: {e}", path.display()),
        }
    }
    found
}

/// A refusal that is a partial success: the key was accepted, and sshd wants more (its
/// `AuthenticationMethods` lists another method after `publickey`).
fn second_factor(target: &Target, result: &client::AuthResult, accepted: &str) -> Result<()> {
    let client::AuthResult::Failure {
        remaining_methods,
        partial_success: true,
    } = result
    else {
        return Ok(());
    };
    let remaining: Vec<&str> = remaining_methods.iter().map(<&str>::from).collect();
    Err(Error::from(SshError::SecondFactor {
        target: target.describe(),
        user: target.user.clone(),
        accepted: accepted.to_string(),
        remaining: remaining.join(", "),
    }))
}

/// The public keys of the identity files (beside them as `.pub`, or read from the key when it
/// has no passphrase).
fn file_public_keys(target: &Target) -> Vec<PublicKey> {
    target
        .identity_files
        .iter()
        .filter_map(|file| {
            let mut public = file.clone().into_os_string();
            public.push(".pub");
            russh::keys::load_public_key(&public).ok().or_else(|| {
                russh::keys::load_secret_key(file, None)
                    .ok()
                    .map(|k| k.public_key().clone())
            })
        })
        .collect()
}

/// Whether `PubkeyAcceptedAlgorithms` (`None`: unset) accepts the algorithm `name`.
fn accepts(accepted: Option<&[String]>, name: &str) -> bool {
    accepted.is_none_or(|list| list.iter().any(|n| n == name))
}

/// The hash to sign a login with `key` by (`None`: the key's only algorithm, or RSA's
/// SHA-1), where `PubkeyAcceptedAlgorithms` accepts the key: for RSA the node's best of
/// `rsa-sha2-512`, `rsa-sha2-256` and `ssh-rsa` where the list has it, else the list's first
/// of them.
async fn signing(
    handle: &client::Handle<Checker>,
    key: &PublicKey,
    accepted: Option<&[String]>,
) -> Option<Option<HashAlg>> {
    if !key.algorithm().is_rsa() {
        return accepts(accepted, key.algorithm().as_str()).then_some(None);
    }
    let best = rsa_hash(handle, key).await;
    let Some(list) = accepted else {
        return Some(best);
    };
    let rsa = |name: &str| match name {
        "rsa-sha2-512" => Some(Some(HashAlg::Sha512)),
        "rsa-sha2-256" => Some(Some(HashAlg::Sha256)),
        "ssh-rsa" => Some(None),
        _ => None,
    };
    if list.iter().any(|n| rsa(n) == Some(best)) {
        return Some(best);
    }
    list.iter().find_map(|n| rsa(n))
}

/// A key left out because `PubkeyAcceptedAlgorithms` accepts none of its algorithms.
fn not_accepted(what: &str, key: &PublicKey) -> String {
    format!(
        "{what} (`PubkeyAcceptedAlgorithms` does not accept `{}`)",
        key.algorithm().as_str()
    )
}

async fn rsa_hash(handle: &client::Handle<Checker>, key: &PublicKey) -> Option<HashAlg> {
    if key.algorithm().is_rsa() {
        handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten()
    } else {
        None
    }
}
