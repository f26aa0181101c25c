//! The tamper-evident audit trail: append-only JSON Lines, one file per actor, each record
//! chained to the one before by `hash = sha256(prev ‖ canonical record without hash)`.
//! Prompts, outputs and keys never go in: only hashes, lengths and key ids.

mod notes;
mod verify;
mod writer;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub(crate) use notes::{NOTE_WAIT, Notes};
pub(crate) use verify::verify_contents;
pub use verify::{Break, Verified, verify};
pub use writer::append;
pub(crate) use writer::{Audit, Recorded, rotated};

pub(crate) const FILE: &str = "audit.jsonl";
/// `prev` of the first record of a chain.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) ts: String,
    pub(crate) actor: String,
    pub(crate) event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub(crate) fields: Map<String, Value>,
    pub(crate) prev: String,
    #[serde(default)]
    pub(crate) hash: String,
}

/// The last record of a chain, as a witness names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub(crate) seq: u64,
    pub(crate) hash: String,
}

/// The head of a queen's log as a node keeps it: which queen (`queen_id`), and the seq and hash
/// of that queen's record of the request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct QueenHead {
    pub(crate) queen: String,
    pub(crate) seq: u64,
    pub(crate) hash: String,
}

impl QueenHead {
    pub(crate) fn is_valid(&self) -> bool {
        let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
        (1..=64).contains(&self.queen.len())
            && hex(&self.queen)
            && self.hash.len() == 64
            && hex(&self.hash)
    }
}

impl Record {
    /// The record without its hash, keys sorted: what the hash covers.
    pub(crate) fn canonical(&self) -> String {
        let mut value = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        value.remove("hash");
        // serde_json's Map keeps keys sorted (no preserve_order), so this text is canonical.
        Value::Object(value).to_string()
    }

    pub(crate) fn compute_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.prev.as_bytes());
        hasher.update(self.canonical().as_bytes());
        hex::encode(hasher.finalize())
    }

    pub(crate) fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// Longest text a record keeps whole from what arrived unauthenticated (a header, a path).
pub(crate) const UNTRUSTED_BYTES: usize = 256;
/// Longest string any record keeps whole; longer ones become their length, hash and head.
const FIELD_BYTES: usize = 4096;
/// How much of a capped text is kept, to tell one from another when reading the log.
const HEAD_BYTES: usize = 64;

/// `text` itself when it has at most `limit` bytes, else `{"len", "sha256", "head"}`: a record
/// stays small whatever a request carried, and still identifies what it was.
pub(crate) fn bounded(text: &str, limit: usize) -> Value {
    if text.len() <= limit {
        return Value::String(text.to_string());
    }
    let mut end = HEAD_BYTES.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    serde_json::json!({
        "len": text.len(),
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "head": &text[..end],
    })
}

/// The request id and fields as a record keeps them: strings past `FIELD_BYTES` capped, and a
/// request id past `UNTRUSTED_BYTES` moved, capped, into the fields.
pub(crate) fn bounded_record(
    request_id: Option<&str>,
    fields: Map<String, Value>,
) -> (Option<String>, Map<String, Value>) {
    fn cap(value: Value) -> Value {
        match value {
            Value::String(s) if s.len() > FIELD_BYTES => bounded(&s, FIELD_BYTES),
            Value::Array(items) => Value::Array(items.into_iter().map(cap).collect()),
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, cap(v))).collect())
            }
            other => other,
        }
    }
    let mut fields: Map<String, Value> = fields.into_iter().map(|(k, v)| (k, cap(v))).collect();
    let request_id = match request_id {
        Some(id) if id.len() > UNTRUSTED_BYTES => {
            fields.insert("request_id".into(), bounded(id, UNTRUSTED_BYTES));
            None
        }
        other => other.map(str::to_string),
    };
    (request_id, fields)
}

/// SHA-256 and length of a text that must not be written itself (a prompt, an output).
pub fn digest(text: &str) -> Value {
    serde_json::json!({
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "len": text.len(),
    })
}

/// RFC 3339 with milliseconds, UTC.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
