//! A model's download on the node (`POST /v1/models/{model}/pull`): what the queen asks, and
//! the events the hive streams back while it downloads (`waiting`, `progress`), then `done`
//! with a `Pulled` or `error`.

use serde::{Deserialize, Serialize};

/// URLs are bounded like any field that arrives from the network.
pub(crate) const MAX_URL_BYTES: usize = 8192;

/// Queen -> hive. The file's path and SHA-256 are the hive's own, from its model table, for
/// the spec the digest names; the URL comes from the queen's nodes.toml (`source`), resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PullRequest {
    pub(crate) model_digest: String,
    pub(crate) url: String,
    /// Send the node's Hugging Face token (`<remote_dir>/hf-token`) with the first request.
    #[serde(default)]
    pub(crate) hf_token: bool,
}

/// How far the download has got: `bytes` of `total` (when the server said).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PullProgress {
    pub(crate) bytes: u64,
    pub(crate) total: Option<u64>,
}

/// The last event of a download that succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pulled {
    pub(crate) model: String,
    /// `present` (already there and verified), `downloaded`, or `resumed`.
    pub(crate) action: String,
    /// The file's size.
    pub(crate) bytes: u64,
    /// Bytes received in this pull.
    pub(crate) fetched: u64,
    /// Where this pull resumed a partial file (0: from the start).
    pub(crate) resumed_from: u64,
    pub(crate) sha256: String,
}
