//! The node's request-signing keys: `hive.key` (mode 0600), and during a rotation
//! `hive.key.next`, both accepted until the rotation finishes. The old key stays accepted for a
//! short grace after that, so a request signed just before the switch still passes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Key, Verifier};
use crate::error::{Error, IoContext, Result};

pub(crate) const KEY_FILE: &str = "hive.key";
pub(crate) const NEXT_KEY_FILE: &str = "hive.key.next";
/// The key the hive signs its requests to workers with, made anew at each start.
pub(crate) const WORKER_KEY_FILE: &str = "worker.key";
const RETIRE_GRACE: Duration = Duration::from_secs(60);
/// The nonces of the requests accepted within the skew window, kept across restarts.
pub(crate) const NONCE_FILE: &str = "nonces";

pub(crate) struct NodeKeys {
    key: PathBuf,
    next: PathBuf,
    verifier: Arc<Verifier>,
}

impl NodeKeys {
    pub(crate) fn open(dir: &Path, skew: Duration) -> Result<NodeKeys> {
        let keys = NodeKeys {
            key: dir.join(KEY_FILE),
            next: dir.join(NEXT_KEY_FILE),
            verifier: Arc::new(Verifier::new(Vec::new(), skew)),
        };
        keys.reload()?;
        let nonces = dir.join(NONCE_FILE);
        keys.verifier
            .keep_nonces_in(&nonces)
            .at("keep the nonces of signed requests in", &nonces)?;
        Ok(keys)
    }

    pub(crate) fn verifier(&self) -> Arc<Verifier> {
        self.verifier.clone()
    }

    /// Accepts `hive.key`, and `hive.key.next` when there is one, and keeps accepting a key
    /// retired less than the grace ago; returns the fingerprints accepted now.
    pub(crate) fn reload(&self) -> Result<Vec<String>> {
        let mut keys = vec![Key::load_or_create(&self.key)?];
        if self.next.exists() {
            keys.push(Key::load(&self.next)?);
        }
        let leaving = self.verifier.leaving(Instant::now());
        self.verifier.replace_keys(keys, leaving);
        let fingerprints = self.verifier.fingerprints();
        tracing::info!(keys = ?fingerprints, "signing keys loaded");
        Ok(fingerprints)
    }

    /// Makes `hive.key.next` the key. The key it replaces stays accepted for the grace, each
    /// key until its own time: a second rotation inside the grace of the first retires the key
    /// in between and leaves the first one's time as it was, so no request fails.
    pub(crate) fn retire(&self) -> Result<Vec<String>> {
        if !self.next.exists() {
            return Err(Error::invalid(format!(
                "there is no `{}` to switch to",
                self.next.display()
            )));
        }
        let new = Key::load(&self.next)?;
        let old = Key::load(&self.key)?;
        std::fs::rename(&self.next, &self.key).at("put the next key in place at", &self.key)?;
        let now = Instant::now();
        let mut leaving = self.verifier.leaving(now);
        leaving.push((old.clone(), now + RETIRE_GRACE));
        self.verifier.replace_keys(vec![new], leaving);
        tracing::info!(old = %old.fingerprint(), "old signing key accepted for {}s more", RETIRE_GRACE.as_secs());
        Ok(self.verifier.fingerprints())
    }
}
