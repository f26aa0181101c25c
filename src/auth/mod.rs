//! Request signing: HMAC-SHA256 over the canonical request, with a key id, a timestamp checked
//! against a clock-skew window and a nonce that may be used once. Keys are 32 random bytes in
//! files of mode 0600; only their fingerprint ever appears in logs and errors.
//!
//! Header: `x-rbee-signature: v1 kid=<fingerprint>,ts=<unix seconds>,nonce=<hex>,sig=<hex>`
//! where `sig = hex(HMAC-SHA256(key, canonical))` and `canonical` is, joined by `\n`:
//! `RBEE-HMAC-SHA256`, the method, the path with its query, `ts`, `nonce`,
//! `hex(SHA-256(body))`, `kid`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::Mac;
use sha2::{Digest, Sha256};

mod key;
pub(crate) mod layer;
mod verify;

pub use key::Key;
pub use verify::{Reject, Signature, Verifier, parse};

pub(crate) const SIGNATURE_HEADER: &str = "x-rbee-signature";
pub(crate) const DEFAULT_SKEW: Duration = Duration::from_secs(300);

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
}
