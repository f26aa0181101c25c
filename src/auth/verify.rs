//! The receiving side of a signature: reading the header, then checking the key, the signature,
//! the timestamp against the skew window, and that the nonce is new.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use hmac::Mac;

use crate::auth::{Key, canonical, unix_now};

/// Nonces remembered at most; the oldest go first (they are outside the window by then on
/// any hive that is not under a flood).
const NONCE_CAPACITY: usize = 200_000;

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
