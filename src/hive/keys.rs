//! The node's request-signing keys: one per controlling machine, each in its own file of mode
//! 0600: `keys/<key id>.key` (enrolled over SSH, first come, or approved by a machine that
//! already has access from `keys/pending/`), and `hive.key` (a local node's key, and the one
//! key of a node set up before enrollment). During a rotation `hive.key.next` is accepted too,
//! and a retired key stays accepted for a short grace, so a request signed just before the
//! switch still passes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Key, Verifier};
use crate::error::{Error, IoContext, Result};
use crate::protocol::KeyList;

pub(crate) const KEY_FILE: &str = "hive.key";
pub(crate) const NEXT_KEY_FILE: &str = "hive.key.next";
/// The enrolled keys, one file per key, named by key id.
pub(crate) const KEYS_DIR: &str = "keys";

/// What `revoke` would remove: a waiting key's file or an enrolled key's.
pub(crate) enum Revocation {
    Waiting(PathBuf),
    Enrolled(PathBuf),
}

/// How long a key waits in `keys/pending/` for approval. An operator approves a request they
/// just heard of; one left for a week is stale, and whoever holds that key can ask again
/// (`rbee nodes enroll NODE` writes it anew).
const PENDING_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether the waiting key at `path` asked longer than `PENDING_FOR` ago, by its file's
/// modification time. A time ahead of the clock (a clock stepped back) counts as now; a file
/// whose time cannot be read, as stale.
fn stale(path: &Path) -> bool {
    match std::fs::metadata(path).and_then(|m| m.modified()) {
        Ok(written) => written.elapsed().is_ok_and(|age| age > PENDING_FOR),
        Err(_) => true,
    }
}

/// The key the hive signs its requests to workers with, made anew at each start.
pub(crate) const WORKER_KEY_FILE: &str = "worker.key";
const RETIRE_GRACE: Duration = Duration::from_secs(60);
/// The nonces of the requests accepted within the skew window, kept across restarts.
pub(crate) const NONCE_FILE: &str = "nonces";

pub(crate) struct NodeKeys {
    key: PathBuf,
    next: PathBuf,
    dir: PathBuf,
    verifier: Arc<Verifier>,
    /// Held from a change's check through its audit record to the change itself, so that two
    /// changes at once cannot both pass one check (two revokes of the last two keys).
    changes: tokio::sync::Mutex<()>,
}

/// A key id: 16 lower-case hex digits (what `Key::fingerprint` makes), so it is safe in a path.
pub(crate) fn valid_kid(kid: &str) -> bool {
    kid.len() == 16 && kid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl NodeKeys {
    pub(crate) fn open(dir: &Path, skew: Duration) -> Result<NodeKeys> {
        let keys = NodeKeys {
            key: dir.join(KEY_FILE),
            next: dir.join(NEXT_KEY_FILE),
            dir: dir.join(KEYS_DIR),
            verifier: Arc::new(Verifier::new(Vec::new(), skew)),
            changes: tokio::sync::Mutex::new(()),
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

    /// Taken by a change to the keys (approve, revoke, retire) for its check, its audit record
    /// and the change.
    pub(crate) async fn changing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// The enrolled keys in `keys/`, each checked to be the key its file name says.
    fn enrolled(&self) -> Result<Vec<Key>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(crate::error::IoError::at("read", &self.dir, e).into()),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let path = entry.at("read", &self.dir)?.path();
            let Some(kid) = kid_of(&path) else { continue };
            let key = Key::load(&path)?;
            if key.fingerprint() != kid {
                return Err(Error::config(format!(
                    "key file `{}` holds key {}, not the key its name says",
                    path.display(),
                    key.fingerprint()
                )));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// Accepts every enrolled key, `hive.key` (made when the node has no key at all), and
    /// `hive.key.next` when there is one, and keeps accepting a key retired less than the
    /// grace ago; returns the fingerprints accepted now.
    pub(crate) fn reload(&self) -> Result<Vec<String>> {
        let mut keys = self.enrolled()?;
        if keys.is_empty() || self.key.exists() {
            keys.push(Key::load_or_create(&self.key)?);
        }
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
        let accepted = self.reload_leaving(leaving)?;
        tracing::info!(old = %old.fingerprint(), new = %new.fingerprint(), "old signing key accepted for {}s more", RETIRE_GRACE.as_secs());
        Ok(accepted)
    }

    /// The file that holds the enrolled key `kid`: `keys/<kid>.key`, or `hive.key` when that is
    /// the key.
    fn file_of(&self, kid: &str) -> Option<PathBuf> {
        let own = self.dir.join(format!("{kid}.key"));
        if valid_kid(kid) && own.exists() {
            return Some(own);
        }
        Key::load(&self.key)
            .ok()
            .filter(|k| k.fingerprint() == kid)
            .map(|_| self.key.clone())
    }

    /// Ends the key `kid` the way a rotation does: its file goes now, and the key stays
    /// accepted for the grace, for the requests its machine signed before it switched.
    #[cfg(test)]
    pub(crate) fn retire_kid(&self, kid: &str) -> Result<Vec<String>> {
        let checked = self.retire_kid_check(kid)?;
        self.retire_checked(checked)
    }

    /// `retire_kid` of what `retire_kid_check` found.
    pub(crate) fn retire_checked(&self, (path, old): (PathBuf, Key)) -> Result<Vec<String>> {
        std::fs::remove_file(&path).at("remove the retired key", &path)?;
        let now = Instant::now();
        let mut leaving = self.verifier.leaving(now);
        leaving.push((old, now + RETIRE_GRACE));
        self.reload_leaving(leaving)
    }

    /// Whether `retire_kid` would retire `kid`: the file that holds it, or why not. The hive
    /// checks before it records the change, so its audit never records one that is refused.
    pub(crate) fn retire_kid_check(&self, kid: &str) -> Result<(PathBuf, Key)> {
        let path = self.file_of(kid).ok_or_else(|| unknown(kid))?;
        let key = Key::load(&path)?;
        self.not_the_last(kid)?;
        Ok((path, key))
    }

    /// Refuses to end `kid` when it is the node's last enrolled key: nobody could reach the
    /// node's hive any more.
    fn not_the_last(&self, kid: &str) -> Result<()> {
        if self.list()?.enrolled.len() <= 1 {
            return Err(Error::invalid(format!(
                "key `{kid}` is the node's last enrolled key; enroll another one first, or \
                 rotate it with `rbee hive rotate-key NODE`"
            )));
        }
        Ok(())
    }

    fn reload_leaving(&self, leaving: Vec<(Key, Instant)>) -> Result<Vec<String>> {
        let mut keys = self.enrolled()?;
        if self.key.exists() {
            keys.push(Key::load(&self.key)?);
        }
        if self.next.exists() {
            keys.push(Key::load(&self.next)?);
        }
        self.verifier.replace_keys(keys, leaving);
        Ok(self.verifier.fingerprints())
    }

    /// The enrolled keys and those waiting, by id.
    pub(crate) fn list(&self) -> Result<KeyList> {
        let mut enrolled: Vec<String> = self.enrolled()?.iter().map(Key::fingerprint).collect();
        if let Ok(key) = Key::load(&self.key) {
            enrolled.push(key.fingerprint());
        }
        let mut pending = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("pending")) {
            for entry in entries.flatten() {
                let path = entry.path();
                // A request asked long ago is not offered for approval. Its file stays until
                // the machine asks again (which rewrites it) or it is revoked: removing it here
                // could remove a request rewritten a moment ago.
                if let Some(kid) = kid_of(&path).filter(|_| !stale(&path)) {
                    pending.push(kid);
                }
            }
        }
        enrolled.sort();
        enrolled.dedup();
        pending.sort();
        Ok(KeyList { enrolled, pending })
    }

    /// Approves the key `kid` that asked to be enrolled (`keys/pending/<kid>.key`, put there
    /// over SSH by its machine): it moves among the enrolled keys and is accepted from now on.
    #[cfg(test)]
    pub(crate) fn approve(&self, kid: &str) -> Result<Vec<String>> {
        match self.approve_check(kid)? {
            Some(pending) => self.approve_checked(kid, &pending),
            None => Ok(self.verifier.fingerprints()),
        }
    }

    /// `approve` of the waiting file `approve_check` found, without checking it again: the
    /// change its record says was made.
    pub(crate) fn approve_checked(&self, kid: &str, pending: &Path) -> Result<Vec<String>> {
        let enrolled = self.dir.join(format!("{kid}.key"));
        std::fs::rename(pending, &enrolled).at("enroll the key at", &enrolled)?;
        let leaving = self.verifier.leaving(Instant::now());
        self.reload_leaving(leaving)
    }

    /// Whether `approve` would enroll `kid`: the waiting key's file, `None` when the key is
    /// enrolled already, or why it is refused. A request that waited too long is dropped here.
    pub(crate) fn approve_check(&self, kid: &str) -> Result<Option<PathBuf>> {
        if !valid_kid(kid) {
            return Err(unknown(kid));
        }
        if self.file_of(kid).is_some() {
            return Ok(None);
        }
        let pending = self.dir.join("pending").join(format!("{kid}.key"));
        if !pending.exists() {
            return Err(Error::invalid(format!(
                "no key `{kid}` is waiting to be enrolled on this node; on the machine that \
                 holds it, run `rbee nodes enroll NODE` first"
            )));
        }
        if stale(&pending) {
            return Err(Error::invalid(format!(
                "key `{kid}` asked to be enrolled more than {} days ago, too long to approve; on \
                 the machine that holds it, run `rbee nodes enroll NODE` again",
                PENDING_FOR.as_secs() / 86_400
            )));
        }
        let key = Key::load(&pending)?;
        if key.fingerprint() != kid {
            return Err(Error::invalid(format!(
                "the key waiting as `{kid}` is another key ({}); it was not enrolled",
                key.fingerprint()
            )));
        }
        Ok(Some(pending))
    }

    /// Revokes the key `kid` (enrolled or waiting) at once; the last enrolled key is kept, or
    /// nobody could reach the node's hive any more.
    #[cfg(test)]
    pub(crate) fn revoke(&self, kid: &str) -> Result<Vec<String>> {
        let checked = self.revoke_check(kid)?;
        self.revoke_checked(kid, checked)
    }

    /// `revoke` of what `revoke_check` found.
    pub(crate) fn revoke_checked(&self, kid: &str, checked: Revocation) -> Result<Vec<String>> {
        let path = match checked {
            Revocation::Waiting(pending) => {
                std::fs::remove_file(&pending).at("remove the waiting key", &pending)?;
                return Ok(self.verifier.fingerprints());
            }
            Revocation::Enrolled(path) => path,
        };
        std::fs::remove_file(&path).at("remove the revoked key", &path)?;
        // No grace: a revoked key is refused from the next request on.
        let leaving = self
            .verifier
            .leaving(Instant::now())
            .into_iter()
            .filter(|(k, _)| k.fingerprint() != kid)
            .collect();
        self.reload_leaving(leaving)
    }

    /// Whether `revoke` would revoke `kid`, and which file it removes; the last enrolled key is
    /// refused.
    pub(crate) fn revoke_check(&self, kid: &str) -> Result<Revocation> {
        let pending = self.dir.join("pending").join(format!("{kid}.key"));
        if valid_kid(kid) && pending.exists() {
            return Ok(Revocation::Waiting(pending));
        }
        let path = self.file_of(kid).ok_or_else(|| unknown(kid))?;
        self.not_the_last(kid)?;
        Ok(Revocation::Enrolled(path))
    }
}

/// The key id a key file's name gives: `<16 hex digits>.key`.
fn kid_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let kid = name.strip_suffix(".key")?;
    valid_kid(kid).then(|| kid.to_string())
}

fn unknown(kid: &str) -> Error {
    if !valid_kid(kid) {
        return Error::invalid("a key id is 16 hex digits; `rbee nodes keys NODE` lists them");
    }
    Error::invalid(format!(
        "no key `{kid}` is enrolled on this node; `rbee nodes keys NODE` lists them"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node directory with one enrolled key, and its keys opened.
    fn one_enrolled() -> (tempfile::TempDir, Key, NodeKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Key::random();
        first
            .save(&dir.path().join(format!("keys/{}.key", first.fingerprint())))
            .expect("first");
        let keys = NodeKeys::open(dir.path(), Duration::from_secs(300)).expect("open");
        (dir, first, keys)
    }

    #[test]
    fn a_waiting_key_is_accepted_once_approved_and_refused_once_revoked() {
        let (dir, first, keys) = one_enrolled();
        // No `hive.key` is made beside an enrolled key.
        assert_eq!(keys.reload().expect("reload"), vec![first.fingerprint()]);
        assert!(!dir.path().join(KEY_FILE).exists());

        let second = Key::random();
        let kid = second.fingerprint();
        second
            .save(&dir.path().join(format!("keys/pending/{kid}.key")))
            .expect("pending");
        assert!(!keys.verifier().fingerprints().contains(&kid));
        assert_eq!(keys.list().expect("list").pending, vec![kid.clone()]);
        // Another key's id does not enroll it.
        assert!(keys.approve(&first.fingerprint()).is_ok());
        assert!(keys.approve("0123456789abcdef").is_err());
        assert!(keys.approve(&kid).expect("approve").contains(&kid));
        assert!(keys.list().expect("list").pending.is_empty());

        assert!(!keys.revoke(&kid).expect("revoke").contains(&kid));
        // The last key stays.
        let last = keys.revoke(&first.fingerprint()).expect_err("last key");
        assert_eq!(last.kind(), crate::error::ExitKind::InvalidRequest);
        assert!(keys.revoke("../hive").is_err());
        // Nor is it retired.
        let last = keys.retire_kid(&first.fingerprint()).expect_err("last key");
        assert_eq!(last.kind(), crate::error::ExitKind::InvalidRequest);
        assert!(
            keys.verifier()
                .fingerprints()
                .contains(&first.fingerprint())
        );
    }

    #[test]
    fn a_key_that_waited_longer_than_a_week_is_neither_listed_nor_approved() {
        let (dir, _first, keys) = one_enrolled();
        let ask = |key: &Key, age: Duration| {
            let path = dir
                .path()
                .join(format!("keys/pending/{}.key", key.fingerprint()));
            key.save(&path).expect("pending");
            let file = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            file.set_modified(std::time::SystemTime::now() - age)
                .expect("set mtime");
            path
        };
        let old = Key::random();
        let old_path = ask(&old, PENDING_FOR + Duration::from_secs(3600));
        let err = keys.approve(&old.fingerprint()).expect_err("stale");
        assert_eq!(err.kind(), crate::error::ExitKind::InvalidRequest);
        assert!(err.to_string().contains("nodes enroll"), "{err}");
        assert!(!keys.verifier().fingerprints().contains(&old.fingerprint()));
        assert!(keys.list().expect("list").pending.is_empty());
        assert!(old_path.exists(), "left for the machine to ask again");

        // Asked again, now: approved. One a day short of the limit is still listed.
        ask(&old, Duration::ZERO);
        let recent = Key::random();
        ask(&recent, PENDING_FOR - Duration::from_secs(86_400));
        let stale_one = Key::random();
        ask(&stale_one, PENDING_FOR * 2);
        // A time ahead of the clock (the clock stepped back) is a request asked now.
        let ahead = Key::random();
        let ahead_path = ask(&ahead, Duration::ZERO);
        std::fs::File::options()
            .write(true)
            .open(&ahead_path)
            .expect("open")
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
            .expect("set mtime");
        let mut waiting = vec![old.fingerprint(), recent.fingerprint(), ahead.fingerprint()];
        waiting.sort();
        assert_eq!(keys.list().expect("list").pending, waiting);
        assert!(
            keys.approve(&old.fingerprint())
                .expect("approve")
                .contains(&old.fingerprint())
        );
    }
}
