//! Request signing: HMAC-SHA256 over the canonical request, with a key id, a timestamp checked
//! against a clock-skew window and a nonce that may be used once. Keys are 32 random bytes in
//! files of mode 0600; only their fingerprint ever appears in logs and errors.
//!
//! Header: `x-rbee-signature: v1 kid=<fingerprint>,ts=<unix seconds>,nonce=<hex>,sig=<hex>`
//! where `sig = hex(HMAC-SHA256(key, canonical))` and `canonical` is, joined by `\n`:
//! `RBEE-HMAC-SHA256`, the method, the path with its query, `ts`, `nonce`,
//! `hex(SHA-256(body))`, `kid`, the budget header's value and the request id header's value
//! (each empty when absent): every header a hop acts on is signed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::Mac;
use sha2::{Digest, Sha256};

mod key;
pub(crate) mod layer;
pub(crate) mod proof;
mod verify;

pub use key::Key;
pub use proof::{EventChain, Unproven};
pub use verify::{Reject, Signature, Verifier, parse};

/// The headers a signature covers besides the method, path and body: what a hop acts on (how
/// long it may work, which request it records). An absent header is the empty string.
#[derive(Debug, Clone, Copy, Default)]
pub struct Covered<'a> {
    pub budget_ms: &'a str,
    pub request_id: &'a str,
}

pub(crate) const SIGNATURE_HEADER: &str = "x-rbee-signature";
pub(crate) const DEFAULT_SKEW: Duration = Duration::from_secs(300);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The text a request's signature is computed over.
pub(crate) struct Canonical<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) covered: Covered<'a>,
    pub(crate) ts: i64,
    pub(crate) nonce: &'a str,
    pub(crate) kid: &'a str,
}

impl Canonical<'_> {
    pub(crate) fn text(&self, body: &[u8]) -> String {
        let body_sha = hex::encode(Sha256::digest(body));
        format!(
            "RBEE-HMAC-SHA256\n{}\n{}\n{}\n{}\n{body_sha}\n{}\n{}\n{}",
            self.method,
            self.path,
            self.ts,
            self.nonce,
            self.kid,
            self.covered.budget_ms,
            self.covered.request_id
        )
    }
}

/// The signature header for one request.
pub fn sign(key: &Key, method: &str, path: &str, covered: Covered<'_>, body: &[u8]) -> String {
    sign_nonced(key, method, path, covered, body).0
}

/// The signature header for one request, and the nonce it carries: what the answer's proof is
/// made over (see `proof`).
pub(crate) fn sign_nonced(
    key: &Key,
    method: &str,
    path: &str,
    covered: Covered<'_>,
    body: &[u8],
) -> (String, String) {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let header = sign_at(key, method, path, covered, body, unix_now(), &nonce);
    (header, nonce)
}

pub(crate) fn sign_at(
    key: &Key,
    method: &str,
    path: &str,
    covered: Covered<'_>,
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> String {
    let kid = key.fingerprint();
    let mut mac = key.mac();
    let canonical = Canonical {
        method,
        path,
        covered,
        ts,
        nonce,
        kid: &kid,
    };
    mac.update(canonical.text(body).as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("v1 kid={kid},ts={ts},nonce={nonce},sig={sig}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Covered<'static> = Covered {
        budget_ms: "1500",
        request_id: "r1",
    };

    fn verifier(key: &Key) -> Verifier {
        Verifier::new(vec![key.clone()], DEFAULT_SKEW)
    }

    #[test]
    fn a_signed_request_passes_once() {
        let key = Key::random();
        let v = verifier(&key);
        let header = sign(&key, "POST", "/v1/infer", Covered::default(), b"{}");
        assert_eq!(
            v.verify(
                "POST",
                "/v1/infer",
                Covered::default(),
                Some(&header),
                b"{}"
            ),
            Ok(key.fingerprint())
        );
        assert_eq!(
            v.verify(
                "POST",
                "/v1/infer",
                Covered::default(),
                Some(&header),
                b"{}"
            ),
            Err(Reject::Replayed)
        );
    }

    #[test]
    fn every_kind_of_tampering_is_refused_with_its_class() {
        let key = Key::random();
        let v = verifier(&key);
        let now = unix_now();
        let nonce = |i: u8| format!("{:032x}", u128::from(i));
        let ok = |i| sign_at(&key, "POST", "/p", C, b"body", now, &nonce(i));
        assert_eq!(
            v.verify("POST", "/p", C, None, b"body"),
            Err(Reject::Missing)
        );
        assert_eq!(
            v.verify("POST", "/p", C, Some("garbage"), b"body"),
            Err(Reject::Malformed)
        );
        assert_eq!(
            v.verify("POST", "/p", C, Some(&ok(1)), b"b0dy"),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            v.verify("POST", "/q", C, Some(&ok(2)), b"body"),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            v.verify("GET", "/p", C, Some(&ok(3)), b"body"),
            Err(Reject::BadSignature)
        );
        let other = Key::random();
        let foreign = sign_at(&other, "POST", "/p", C, b"body", now, &nonce(4));
        assert_eq!(
            v.verify("POST", "/p", C, Some(&foreign), b"body"),
            Err(Reject::UnknownKey)
        );
        let forged = foreign.replace(&other.fingerprint(), &key.fingerprint());
        assert_eq!(
            v.verify("POST", "/p", C, Some(&forged), b"body"),
            Err(Reject::BadSignature)
        );
        for ts in [now - 600, now + 600] {
            let h = sign_at(&key, "POST", "/p", C, b"body", ts, &nonce(5));
            assert_eq!(
                v.verify("POST", "/p", C, Some(&h), b"body"),
                Err(Reject::Stale)
            );
        }
        assert!(v.verify("POST", "/p", C, Some(&ok(6)), b"body").is_ok());
    }

    #[test]
    fn the_budget_and_request_id_are_signed() {
        let key = Key::random();
        let v = verifier(&key);
        let h = sign(&key, "POST", "/p", C, b"body");
        let longer = Covered {
            budget_ms: "999999",
            ..C
        };
        assert_eq!(
            v.verify("POST", "/p", longer, Some(&h), b"body"),
            Err(Reject::BadSignature)
        );
        let other = Covered {
            request_id: "r2",
            ..C
        };
        assert_eq!(
            v.verify("POST", "/p", other, Some(&h), b"body"),
            Err(Reject::BadSignature)
        );
        assert!(v.verify("POST", "/p", C, Some(&h), b"body").is_ok());
    }

    #[test]
    fn a_timestamp_at_the_ends_of_the_range_is_stale_not_an_overflow() {
        let key = Key::random();
        let v = verifier(&key);
        for (i, ts) in [i64::MIN, i64::MIN + 1, i64::MAX].into_iter().enumerate() {
            let nonce = format!("{:032x}", 100 + i);
            let h = sign_at(&key, "POST", "/p", C, b"body", ts, &nonce);
            assert_eq!(
                v.verify("POST", "/p", C, Some(&h), b"body"),
                Err(Reject::Stale)
            );
            assert_eq!(v.precheck(Some(&h)), Err(Reject::Stale));
        }
    }

    #[test]
    fn nonces_kept_in_a_file_are_replays_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("nonces");
        let key = Key::random();
        let h = sign(&key, "POST", "/p", C, b"body");
        let before = verifier(&key);
        before.keep_nonces_in(&file).expect("nonce file");
        assert!(before.verify("POST", "/p", C, Some(&h), b"body").is_ok());
        drop(before);
        let after = verifier(&key);
        after.keep_nonces_in(&file).expect("nonce file");
        assert_eq!(
            after.verify("POST", "/p", C, Some(&h), b"body"),
            Err(Reject::Replayed)
        );
        let fresh = sign(&key, "POST", "/p", C, b"body");
        assert!(after.verify("POST", "/p", C, Some(&fresh), b"body").is_ok());
    }

    #[test]
    fn a_leaving_key_is_accepted_until_its_own_time() {
        let old = Key::random();
        let new = Key::random();
        let v = verifier(&new);
        let now = std::time::Instant::now();
        v.replace_keys(
            vec![new.clone()],
            vec![(old.clone(), now + Duration::from_secs(60))],
        );
        let h = sign(&old, "POST", "/p", C, b"body");
        assert!(v.verify("POST", "/p", C, Some(&h), b"body").is_ok());
        v.replace_keys(vec![new.clone()], vec![(old.clone(), now)]);
        let h = sign(&old, "POST", "/p", C, b"body");
        assert_eq!(
            v.verify("POST", "/p", C, Some(&h), b"body"),
            Err(Reject::UnknownKey)
        );
        assert_eq!(v.fingerprints(), vec![new.fingerprint()]);
    }
}
