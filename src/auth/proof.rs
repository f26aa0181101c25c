//! The other direction: a hive proves that an answer is its own. A response carries, in
//! `x-rbee-response`, an HMAC with the key that signed the request over the request's nonce, the
//! status and the body's SHA-256 (or `event-stream` for a stream, whose events prove
//! themselves); each event of a stream carries, in its SSE `id` field, an HMAC over the event
//! chained to the one before it, the first seeded with the request's nonce. Someone who does not
//! hold the key cannot answer a request, replay an answer to another request, or alter, drop,
//! reorder or add an event without the queen noticing before it shows anything.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::auth::Key;

pub(crate) const RESPONSE_HEADER: &str = "x-rbee-response";

/// What stands for the body in a streamed response's signature.
const STREAM_BODY: &str = "event-stream";

/// The body a response signature covers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body<'a> {
    /// A body read whole: its SHA-256 is signed.
    Whole(&'a [u8]),
    /// An event stream: each event is signed on its own.
    Stream,
}

/// Why an answer is not taken as the node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unproven {
    /// The answer carries no signature.
    Missing,
    /// The signature cannot be read.
    Malformed,
    /// Signed with another key than the one the request was signed with.
    OtherKey,
    /// The signature does not match the answer.
    BadSignature,
    /// An event of a stream does not follow from the one before it (altered, dropped, reordered
    /// or added).
    BrokenChain,
}

impl Unproven {
    pub(crate) fn explain(self) -> &'static str {
        match self {
            Unproven::Missing => "the answer carries no signature of the node",
            Unproven::Malformed => "the answer's signature cannot be read",
            Unproven::OtherKey => "the answer is signed with another key than the node's",
            Unproven::BadSignature => "the answer's signature does not match it",
            Unproven::BrokenChain => {
                "an event of the stream does not follow from the one before it (altered, dropped, \
                 reordered or added on the way)"
            }
        }
    }
}

fn response_canonical(nonce: &str, status: u16, body: Body<'_>) -> String {
    let body = match body {
        Body::Whole(bytes) => hex::encode(Sha256::digest(bytes)),
        Body::Stream => STREAM_BODY.to_string(),
    };
    format!("RBEE-HMAC-SHA256-RESPONSE\n{nonce}\n{status}\n{body}")
}

/// The `x-rbee-response` header of an answer to the request whose nonce is `nonce`.
pub(crate) fn sign_response(key: &Key, nonce: &str, status: u16, body: Body<'_>) -> String {
    let mut mac = key.mac();
    mac.update(response_canonical(nonce, status, body).as_bytes());
    format!(
        "v1 kid={},sig={}",
        key.fingerprint(),
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Checks an answer's `x-rbee-response` header against the request it answers.
pub(crate) fn verify_response(
    key: &Key,
    nonce: &str,
    status: u16,
    body: Body<'_>,
    header: Option<&str>,
) -> Result<(), Unproven> {
    let rest = header
        .ok_or(Unproven::Missing)?
        .strip_prefix("v1 ")
        .ok_or(Unproven::Malformed)?;
    let (kid, sig) = rest
        .split_once(',')
        .and_then(|(kid, sig)| Some((kid.strip_prefix("kid=")?, sig.strip_prefix("sig=")?)))
        .ok_or(Unproven::Malformed)?;
    let sig = hex::decode(sig).map_err(|_| Unproven::Malformed)?;
    if kid != key.fingerprint() {
        return Err(Unproven::OtherKey);
    }
    let mut mac = key.mac();
    mac.update(response_canonical(nonce, status, body).as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).map_err(|_| Unproven::BadSignature)
}

/// The chain of one stream's events, on either end: each event's MAC covers the MAC before it
/// (the request's nonce for the first), its name and its data.
#[derive(Clone)]
pub struct EventChain {
    /// The key's HMAC state, cloned for each event (the key schedule is done once).
    mac: Hmac<Sha256>,
    prev: String,
}

impl EventChain {
    /// The chain of the answer to the request whose nonce is `nonce`.
    pub fn new(key: &Key, nonce: &str) -> EventChain {
        EventChain {
            mac: key.mac(),
            prev: nonce.to_string(),
        }
    }

    fn mac_of(&self, event: &str, data: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(b"RBEE-HMAC-SHA256-EVENT\n");
        mac.update(self.prev.as_bytes());
        mac.update(b"\n");
        mac.update(event.as_bytes());
        mac.update(b"\n");
        mac.update(data.as_bytes());
        mac
    }

    /// The signature of the next event (what goes in its `id` field); the chain moves on.
    pub fn sign(&mut self, event: &str, data: &str) -> String {
        let sig = hex::encode(self.mac_of(event, data).finalize().into_bytes());
        self.prev.clone_from(&sig);
        sig
    }

    /// Checks the next event against its signature; the chain moves on only when it verifies,
    /// so an event that does not leaves every later one unverifiable too.
    pub fn verify(&mut self, event: &str, data: &str, sig: Option<&str>) -> Result<(), Unproven> {
        let sig = sig.ok_or(Unproven::Missing)?;
        let bytes = hex::decode(sig).map_err(|_| Unproven::Malformed)?;
        self.mac_of(event, data)
            .verify_slice(&bytes)
            .map_err(|_| Unproven::BrokenChain)?;
        sig.clone_into(&mut self.prev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    fn stream(key: &Key) -> Vec<(String, String, String)> {
        let mut chain = EventChain::new(key, NONCE);
        ["The", " sky", " is", " blue"]
            .iter()
            .map(|t| ("token", format!("{{\"text\":\"{t}\"}}")))
            .chain([("done", "{\"tokens_out\":4}".to_string())])
            .map(|(e, d)| {
                let sig = chain.sign(e, &d);
                (e.to_string(), d, sig)
            })
            .collect()
    }

    fn check(key: &Key, nonce: &str, events: &[(String, String, String)]) -> Result<(), usize> {
        let mut chain = EventChain::new(key, nonce);
        for (i, (e, d, s)) in events.iter().enumerate() {
            chain.verify(e, d, Some(s)).map_err(|_| i)?;
        }
        Ok(())
    }

    #[test]
    fn a_stream_verifies_in_order_with_its_key_and_nonce() {
        let key = Key::random();
        let events = stream(&key);
        assert_eq!(check(&key, NONCE, &events), Ok(()));
        // Another key, or the same answer to another request.
        assert_eq!(check(&Key::random(), NONCE, &events), Err(0));
        assert_eq!(
            check(&key, "ffeeddccbbaa99887766554433221100", &events),
            Err(0)
        );
    }

    #[test]
    fn an_altered_dropped_reordered_or_added_event_breaks_the_chain_there() {
        let key = Key::random();
        let events = stream(&key);
        let mut altered = events.clone();
        altered[2].1 = "{\"text\":\" was\"}".to_string();
        assert_eq!(check(&key, NONCE, &altered), Err(2));
        let mut renamed = events.clone();
        renamed[2].0 = "error".to_string();
        assert_eq!(check(&key, NONCE, &renamed), Err(2));
        let mut dropped = events.clone();
        dropped.remove(2);
        assert_eq!(check(&key, NONCE, &dropped), Err(2));
        let mut reordered = events.clone();
        reordered.swap(1, 2);
        assert_eq!(check(&key, NONCE, &reordered), Err(1));
        let mut added = events.clone();
        added.insert(3, added[1].clone());
        assert_eq!(check(&key, NONCE, &added), Err(3));
        // A signature lifted from another event does not fit here either.
        let mut lifted = events.clone();
        lifted[3].2 = events[1].2.clone();
        assert_eq!(check(&key, NONCE, &lifted), Err(3));
    }

    #[test]
    fn an_unsigned_event_is_missing_and_stops_the_chain() {
        let key = Key::random();
        let events = stream(&key);
        let mut chain = EventChain::new(&key, NONCE);
        assert_eq!(
            chain.verify(&events[0].0, &events[0].1, None),
            Err(Unproven::Missing)
        );
        assert_eq!(
            chain.verify(&events[0].0, &events[0].1, Some("zz")),
            Err(Unproven::Malformed)
        );
        // The chain did not move: the first event still verifies as the first.
        assert_eq!(
            chain.verify(&events[0].0, &events[0].1, Some(&events[0].2)),
            Ok(())
        );
    }

    #[test]
    fn a_response_signature_covers_the_nonce_the_status_and_the_body() {
        let key = Key::random();
        let h = sign_response(&key, NONCE, 200, Body::Whole(b"[]"));
        let ok = |n: &str, s: u16, b: Body<'_>, h: &str| verify_response(&key, n, s, b, Some(h));
        assert_eq!(ok(NONCE, 200, Body::Whole(b"[]"), &h), Ok(()));
        assert_eq!(
            ok(NONCE, 200, Body::Whole(b"[1]"), &h),
            Err(Unproven::BadSignature)
        );
        assert_eq!(
            ok(NONCE, 503, Body::Whole(b"[]"), &h),
            Err(Unproven::BadSignature)
        );
        assert_eq!(
            ok(
                "ffeeddccbbaa99887766554433221100",
                200,
                Body::Whole(b"[]"),
                &h
            ),
            Err(Unproven::BadSignature)
        );
        assert_eq!(
            ok(NONCE, 200, Body::Stream, &h),
            Err(Unproven::BadSignature)
        );
        let other = sign_response(&Key::random(), NONCE, 200, Body::Whole(b"[]"));
        assert_eq!(
            ok(NONCE, 200, Body::Whole(b"[]"), &other),
            Err(Unproven::OtherKey)
        );
        assert_eq!(
            verify_response(&key, NONCE, 200, Body::Whole(b"[]"), None),
            Err(Unproven::Missing)
        );
        assert_eq!(
            ok(NONCE, 200, Body::Whole(b"[]"), "v1 nonsense"),
            Err(Unproven::Malformed)
        );
        let s = sign_response(&key, NONCE, 200, Body::Stream);
        assert_eq!(ok(NONCE, 200, Body::Stream, &s), Ok(()));
    }
}
