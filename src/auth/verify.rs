//! The receiving side of a signature: reading the header, then checking the key, the signature,
//! the timestamp against the skew window, and that the nonce is new. Keys may carry their own
//! accept-until time (a retired key's grace), and nonces may be kept in a file so that a request
//! seen before a restart is still a replay after it.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::Mac;

use crate::auth::{Canonical, Covered, Key, unix_now};

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

/// A nonce: 16 to 64 hex digits.
fn parse_nonce(nonce: &str) -> Result<&str, Reject> {
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Reject::Malformed);
    }
    Ok(nonce)
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
    let nonce = parse_nonce(nonce.ok_or(Reject::Malformed)?)?;
    Ok(Signature {
        kid: kid.ok_or(Reject::Malformed)?,
        ts: ts.ok_or(Reject::Malformed)?,
        nonce,
        sig: sig.ok_or(Reject::Malformed)?,
    })
}

/// One key the verifier accepts, until `until` when it is on its way out.
#[derive(Clone)]
struct Accepted {
    key: Key,
    until: Option<Instant>,
}

/// The receiving side: the keys it accepts, its skew window, the nonces it has seen.
pub struct Verifier {
    keys: RwLock<Vec<Accepted>>,
    skew: Duration,
    nonces: Mutex<Nonces>,
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
    /// Where every accepted nonce is appended, for the next start of this process.
    log: Option<(PathBuf, std::fs::File)>,
    /// Lines appended since the file last held only the live nonces.
    appended: usize,
}

impl Nonces {
    /// Rewrites the nonce file with only what is remembered, so it stays as small as the window.
    fn compact(&mut self) -> std::io::Result<()> {
        let Some((path, _)) = &self.log else {
            return Ok(());
        };
        let path = path.clone();
        let tmp = path.with_extension("tmp");
        let mut out = String::new();
        for (ts, nonce) in &self.order {
            out.push_str(&format!("{ts} {nonce}\n"));
        }
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, &path)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        self.log = Some((path, file));
        self.appended = 0;
        Ok(())
    }
}

impl Verifier {
    pub fn new(keys: Vec<Key>, skew: Duration) -> Verifier {
        Verifier {
            keys: RwLock::new(
                keys.into_iter()
                    .map(|key| Accepted { key, until: None })
                    .collect(),
            ),
            skew,
            nonces: Mutex::new(Nonces::default()),
        }
    }

    /// Keeps the nonces it accepts in `path` and takes back those still inside the window from
    /// an earlier run, so that a request captured before a restart is refused after it. The
    /// file is rewritten with only those, then appended to (one line a request, no fsync: a
    /// process that dies leaves its writes with the kernel).
    pub(crate) fn keep_nonces_in(&self, path: &Path) -> std::io::Result<()> {
        let now = unix_now();
        let window = self.window();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let live: Vec<(i64, String)> = text
            .lines()
            .filter_map(|line| {
                let (ts, nonce) = line.split_once(' ')?;
                let ts: i64 = ts.parse().ok()?;
                (now.abs_diff(ts) <= 2 * window && parse_nonce(nonce).is_ok())
                    .then(|| (ts, nonce.to_string()))
            })
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        for (ts, nonce) in live {
            n.seen.insert(nonce.clone(), ts);
            n.order.push_back((ts, nonce));
        }
        n.log = Some((path.to_path_buf(), file));
        n.compact()
    }

    /// Accepts `keys` for good, and each of `leaving` until its time; a key in both is kept for
    /// good.
    pub(crate) fn replace_keys(&self, keys: Vec<Key>, leaving: Vec<(Key, Instant)>) {
        let mut accepted: Vec<Accepted> = keys
            .into_iter()
            .map(|key| Accepted { key, until: None })
            .collect();
        for (key, until) in leaving {
            if !accepted
                .iter()
                .any(|a| a.key.fingerprint() == key.fingerprint())
            {
                accepted.push(Accepted {
                    key,
                    until: Some(until),
                });
            }
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = accepted;
    }

    /// The keys on their way out whose time has not come yet, with their times.
    pub(crate) fn leaving(&self, now: Instant) -> Vec<(Key, Instant)> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|a| a.until.filter(|u| *u > now).map(|u| (a.key.clone(), u)))
            .collect()
    }

    /// The keys accepted now, for good or until their time.
    pub(crate) fn fingerprints(&self) -> Vec<String> {
        let now = Instant::now();
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|a| a.until.is_none_or(|u| u > now))
            .map(|a| a.key.fingerprint())
            .collect()
    }

    fn window(&self) -> u64 {
        self.skew.as_secs()
    }

    /// What can be checked before the body is read: a header that parses, names a key this side
    /// accepts, and is inside the skew window. A request that fails here costs no body bytes.
    pub(crate) fn precheck(&self, header: Option<&str>) -> Result<(), Reject> {
        let sig = parse(header.ok_or(Reject::Missing)?)?;
        self.key(sig.kid, Instant::now())?;
        if unix_now().abs_diff(sig.ts) > self.window() {
            return Err(Reject::Stale);
        }
        Ok(())
    }

    fn key(&self, kid: &str, now: Instant) -> Result<Key, Reject> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|a| a.key.fingerprint() == kid && a.until.is_none_or(|u| u > now))
            .map(|a| a.key.clone())
            .ok_or(Reject::UnknownKey)
    }

    /// Checks a request; returns the fingerprint of the key that signed it.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        covered: Covered<'_>,
        header: Option<&str>,
        body: &[u8],
    ) -> Result<String, Reject> {
        self.verify_at(method, path, covered, header, body, unix_now())
            .map(|key| key.fingerprint())
    }

    /// Checks a request; returns the key that signed it, which signs the answer.
    pub(crate) fn authenticate(
        &self,
        method: &str,
        path: &str,
        covered: Covered<'_>,
        header: Option<&str>,
        body: &[u8],
    ) -> Result<Key, Reject> {
        self.verify_at(method, path, covered, header, body, unix_now())
    }

    pub(crate) fn verify_at(
        &self,
        method: &str,
        path: &str,
        covered: Covered<'_>,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<Key, Reject> {
        let sig = parse(header.ok_or(Reject::Missing)?)?;
        let key = self.key(sig.kid, Instant::now())?;
        let mut mac = key.mac();
        let canonical = Canonical {
            method,
            path,
            covered,
            ts: sig.ts,
            nonce: sig.nonce,
            kid: sig.kid,
        };
        mac.update(canonical.text(body).as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&sig.sig)
            .map_err(|_| Reject::BadSignature)?;
        // abs_diff: a timestamp near i64::MIN must not wrap into the window.
        if now.abs_diff(sig.ts) > self.window() {
            return Err(Reject::Stale);
        }
        self.remember(sig.nonce, now)?;
        Ok(key)
    }

    fn remember(&self, nonce: &str, now: i64) -> Result<(), Reject> {
        let window = self.window();
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((seen_at, _)) = n.order.front() {
            if now.abs_diff(*seen_at) > 2 * window || n.order.len() >= NONCE_CAPACITY {
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
        if let Some((path, file)) = n.log.as_mut() {
            // A failure leaves the request good; only a replay across a restart could pass.
            // One write a line: `writeln!` on a file makes a syscall for each piece, and a
            // crash between them would leave half a line.
            if let Err(e) = file.write_all(format!("{now} {nonce}\n").as_bytes()) {
                tracing::warn!("cannot keep a nonce in `{}`: {e}", path.display());
            }
            n.appended += 1;
            if n.appended > NONCE_CAPACITY
                && let Err(e) = n.compact()
            {
                tracing::warn!("cannot compact the nonce file: {e}");
            }
        }
        Ok(())
    }
}
