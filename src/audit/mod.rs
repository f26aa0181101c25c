//! The tamper-evident audit trail: append-only JSON Lines, one file per actor, each record
//! chained to the one before by `hash = sha256(prev ‖ canonical record without hash)`.
//! Prompts, outputs and keys never go in: only hashes, lengths and key ids.

mod verify;
mod writer;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub(crate) use verify::verify_contents;
pub use verify::{Break, Verified, verify};
pub use writer::append;
pub(crate) use writer::{Audit, rotated};

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
