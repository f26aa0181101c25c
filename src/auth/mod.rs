//! Request signing: HMAC-SHA256 over the canonical request, with a key id, a timestamp checked
//! against a clock-skew window and a nonce that may be used once. Keys are 32 random bytes in
//! files of mode 0600; only their fingerprint ever appears in logs and errors.
//!
//! Header: `x-rbee-signature: v1 kid=<fingerprint>,ts=<unix seconds>,nonce=<hex>,sig=<hex>`
//! where `sig = hex(HMAC-SHA256(key, canonical))` and `canonical` is, joined by `\n`:
//! `RBEE-HMAC-SHA256`, the method, the path with its query, `ts`, `nonce`,
//! `hex(SHA-256(body))`, `kid`.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, IoError, Result};

pub(crate) mod layer;

pub(crate) const SIGNATURE_HEADER: &str = "x-rbee-signature";
pub(crate) const DEFAULT_SKEW: Duration = Duration::from_secs(300);
/// Nonces remembered at most; the oldest go first (they are outside the window by then on
/// any hive that is not under a flood).
const NONCE_CAPACITY: usize = 200_000;

#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    pub fn random() -> Key {
        Key {
            bytes: rand::random(),
        }
    }

    pub fn from_hex(text: &str) -> Option<Key> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(Key {
            bytes: bytes.try_into().ok()?,
        })
    }

    pub(crate) fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The first 8 bytes of the key's SHA-256, in hex: how a key is named anywhere visible.
    pub(crate) fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(self.bytes)[..8])
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        match <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes) {
            Ok(mac) => mac,
            Err(_) => unreachable_mac(),
        }
    }

    /// Reads a key file, refusing one that group or others can read.
    pub(crate) fn load(path: &Path) -> Result<Key> {
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::config(format!("cannot read key file `{}`: {e}", path.display()))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::config(format!(
                "key file `{}` is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read key file `{}`: {e}", path.display()))
        })?;
        Key::from_hex(&text).ok_or_else(|| {
            Error::config(format!(
                "key file `{}` does not hold a key (64 hex digits)",
                path.display()
            ))
        })
    }

    /// Writes the key to a new file of mode 0600 (atomically: a temp file, then a rename).
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at("create the directory", dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .at("create the key file", &tmp)?;
        writeln!(file, "{}", self.to_hex())
            .and_then(|()| file.sync_all())
            .at("write the key file", &tmp)?;
        std::fs::rename(&tmp, path).at("put the key file in place at", path)?;
        Ok(())
    }

    /// The key at `path`, created there first if there is none.
    pub(crate) fn load_or_create(path: &Path) -> Result<Key> {
        if !path.exists() {
            let key = Key::random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).at("create the key file", path)?;
            }
            // create_new: of two processes creating the key at once, one wins; both read it.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match created {
                Ok(mut file) => {
                    writeln!(file, "{}", key.to_hex())
                        .and_then(|()| file.sync_all())
                        .at("write the key file", path)?;
                    return Ok(key);
                }
                // Another process made it first: read theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(IoError::at("create the key file", path, e).into()),
            }
        }
        Key::load(path)
    }
}

#[cold]
fn unreachable_mac() -> ! {
    // Hmac<Sha256>::new_from_slice accepts every key length; this cannot run.
    std::process::abort()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub(crate) fn canonical(
    method: &str,
    path: &str,
    ts: i64,
    nonce: &str,
    body: &[u8],
    kid: &str,
) -> String {
    let body_sha = hex::encode(Sha256::digest(body));
    format!("RBEE-HMAC-SHA256\n{method}\n{path}\n{ts}\n{nonce}\n{body_sha}\n{kid}")
}

/// The signature header for one request.
pub fn sign(key: &Key, method: &str, path: &str, body: &[u8]) -> String {
    sign_at(
        key,
        method,
        path,
        body,
        unix_now(),
        &hex::encode(rand::random::<[u8; 16]>()),
    )
}

pub(crate) fn sign_at(
    key: &Key,
    method: &str,
    path: &str,
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> String {
    let kid = key.fingerprint();
    let mut mac = key.mac();
    mac.update(canonical(method, path, ts, nonce, body, &kid).as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("v1 kid={kid},ts={ts},nonce={nonce},sig={sig}")
}

/// Why a request was refused; the class is all a client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Missing,
    Malformed,
    UnknownKey,
    BadSignature,
    Stale,
    Replayed,
}

impl Reject {
    pub(crate) fn class(self) -> &'static str {
        match self {
            Reject::Missing => "missing",
            Reject::Malformed => "malformed",
            Reject::UnknownKey => "unknown_key",
            Reject::BadSignature => "bad_signature",
            Reject::Stale => "stale",
            Reject::Replayed => "replayed",
        }
    }

    pub(crate) fn explain(self) -> &'static str {
        match self {
            Reject::Missing => "the request carries no signature",
            Reject::Malformed => "the signature header cannot be read",
            Reject::UnknownKey => "the request is signed with a key this node does not have",
            Reject::BadSignature => "the signature does not match the request",
            Reject::Stale => "the request's timestamp is outside the clock-skew window",
            Reject::Replayed => "the request's nonce was already used",
        }
    }
}

pub struct Signature<'a> {
    pub(crate) kid: &'a str,
    pub(crate) ts: i64,
    pub(crate) nonce: &'a str,
    pub(crate) sig: Vec<u8>,
}

/// Parses a signature header; anything unexpected is `Malformed`.
pub fn parse(header: &str) -> Result<Signature<'_>, Reject> {
    let rest = header.strip_prefix("v1 ").ok_or(Reject::Malformed)?;
    let (mut kid, mut ts, mut nonce, mut sig) = (None, None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or(Reject::Malformed)?;
        match k {
            "kid" => kid = Some(v),
            "ts" => ts = Some(v.parse::<i64>().map_err(|_| Reject::Malformed)?),
            "nonce" => nonce = Some(v),
            "sig" => sig = Some(hex::decode(v).map_err(|_| Reject::Malformed)?),
            _ => return Err(Reject::Malformed),
        }
    }
    let nonce = nonce.ok_or(Reject::Malformed)?;
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Reject::Malformed);
    }
    Ok(Signature {
        kid: kid.ok_or(Reject::Malformed)?,
        ts: ts.ok_or(Reject::Malformed)?,
        nonce,
        sig: sig.ok_or(Reject::Malformed)?,
    })
}

/// The receiving side: the keys it accepts, its skew window, the nonces it has seen.
pub struct Verifier {
    keys: RwLock<Vec<Key>>,
    skew: Duration,
    nonces: Mutex<Nonces>,
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Verifier {
    pub fn new(keys: Vec<Key>, skew: Duration) -> Verifier {
        Verifier {
            keys: RwLock::new(keys),
            skew,
            nonces: Mutex::new(Nonces::default()),
        }
    }

    pub(crate) fn set_keys(&self, keys: Vec<Key>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    pub(crate) fn fingerprints(&self) -> Vec<String> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Key::fingerprint)
            .collect()
    }

    /// Checks a request; returns the fingerprint of the key that signed it.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        header: Option<&str>,
        body: &[u8],
    ) -> Result<String, Reject> {
        self.verify_at(method, path, header, body, unix_now())
    }

    pub(crate) fn verify_at(
        &self,
        method: &str,
        path: &str,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<String, Reject> {
        let sig = parse(header.ok_or(Reject::Missing)?)?;
        let key = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| k.fingerprint() == sig.kid)
            .cloned()
            .ok_or(Reject::UnknownKey)?;
        let mut mac = key.mac();
        mac.update(canonical(method, path, sig.ts, sig.nonce, body, sig.kid).as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&sig.sig)
            .map_err(|_| Reject::BadSignature)?;
        let skew = i64::try_from(self.skew.as_secs()).unwrap_or(i64::MAX);
        if (now - sig.ts).abs() > skew {
            return Err(Reject::Stale);
        }
        self.remember(sig.nonce, now, skew)?;
        Ok(key.fingerprint())
    }

    fn remember(&self, nonce: &str, now: i64, skew: i64) -> Result<(), Reject> {
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((seen_at, _)) = n.order.front() {
            if now - seen_at > 2 * skew || n.order.len() >= NONCE_CAPACITY {
                if let Some((_, old)) = n.order.pop_front() {
                    n.seen.remove(&old);
                }
            } else {
                break;
            }
        }
        if n.seen.contains_key(nonce) {
            return Err(Reject::Replayed);
        }
        n.seen.insert(nonce.to_string(), now);
        n.order.push_back((now, nonce.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(key: &Key) -> Verifier {
        Verifier::new(vec![key.clone()], DEFAULT_SKEW)
    }

    #[test]
    fn a_signed_request_passes_once() {
        let key = Key::random();
        let v = verifier(&key);
        let header = sign(&key, "POST", "/v1/infer", b"{}");
        assert_eq!(
            v.verify("POST", "/v1/infer", Some(&header), b"{}"),
            Ok(key.fingerprint())
        );
        assert_eq!(
            v.verify("POST", "/v1/infer", Some(&header), b"{}"),
            Err(Reject::Replayed)
        );
    }

    #[test]
    fn every_kind_of_tampering_is_refused_with_its_class() {
        let key = Key::random();
        let v = verifier(&key);
        let now = unix_now();
        let nonce = |i: u8| format!("{:032x}", u128::from(i));
        let ok = |i| sign_at(&key, "POST", "/p", b"body", now, &nonce(i));
        assert_eq!(v.verify("POST", "/p", None, b"body"), Err(Reject::Missing));
        assert_eq!(
            v.verify("POST", "/p", Some("garbage"), b"body"),
            Err(Reject::Malformed)
        );
        assert_eq!(
            v.verify("POST", "/p", Some(&ok(1)), b"b0dy"),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            v.verify("POST", "/q", Some(&ok(2)), b"body"),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            v.verify("GET", "/p", Some(&ok(3)), b"body"),
            Err(Reject::BadSignature)
        );
        let other = Key::random();
        let foreign = sign_at(&other, "POST", "/p", b"body", now, &nonce(4));
        assert_eq!(
            v.verify("POST", "/p", Some(&foreign), b"body"),
            Err(Reject::UnknownKey)
        );
        let forged = foreign.replace(&other.fingerprint(), &key.fingerprint());
        assert_eq!(
            v.verify("POST", "/p", Some(&forged), b"body"),
            Err(Reject::BadSignature)
        );
        for ts in [now - 600, now + 600] {
            let h = sign_at(&key, "POST", "/p", b"body", ts, &nonce(5));
            assert_eq!(
                v.verify("POST", "/p", Some(&h), b"body"),
                Err(Reject::Stale)
            );
        }
        assert!(v.verify("POST", "/p", Some(&ok(6)), b"body").is_ok());
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let key = Key::load_or_create(&path).expect("created");
        assert_eq!(Key::load(&path).expect("loaded"), key);
        assert_eq!(Key::load_or_create(&path).expect("again"), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Key::load(&path).expect_err("0644 refused");
        assert!(err.to_string().contains("k.key"), "{}", err.to_string());
        assert!(err.to_string().contains("0644"), "{}", err.to_string());
        assert!(!err.to_string().contains(&key.to_hex()));
    }
}
