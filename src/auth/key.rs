//! The key a node and its callers share: 32 random bytes in a file of mode 0600, named anywhere
//! visible by its fingerprint, never by its bytes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, IoError, Result};

#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    pub fn random() -> Key {
        Key {
            bytes: rand::random(),
        }
    }

    pub fn from_hex(text: &str) -> Option<Key> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(Key {
            bytes: bytes.try_into().ok()?,
        })
    }

    pub(crate) fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The first 8 bytes of the key's SHA-256, in hex: how a key is named anywhere visible.
    pub(crate) fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(self.bytes)[..8])
    }

    pub(super) fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        match <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes) {
            Ok(mac) => mac,
            Err(_) => unreachable_mac(),
        }
    }

    /// Reads a key file, refusing one that group or others can read.
    pub(crate) fn load(path: &Path) -> Result<Key> {
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::config(format!("cannot read key file `{}`: {e}", path.display()))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::config(format!(
                "key file `{}` is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read key file `{}`: {e}", path.display()))
        })?;
        Key::from_hex(&text).ok_or_else(|| {
            Error::config(format!(
                "key file `{}` does not hold a key (64 hex digits)",
                path.display()
            ))
        })
    }

    /// Writes the key to a new file of mode 0600 (atomically: a temp file, then a rename).
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at("create the directory", dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .at("create the key file", &tmp)?;
        writeln!(file, "{}", self.to_hex())
            .and_then(|()| file.sync_all())
            .at("write the key file", &tmp)?;
        std::fs::rename(&tmp, path).at("put the key file in place at", path)?;
        Ok(())
    }

    /// The key at `path`, created there first if there is none. The key is written whole to a
    /// private temp file and then linked into place, which fails when the name exists: of
    /// several processes creating it at once one wins, none replaces it, and none ever reads a
    /// half-written file.
    pub(crate) fn load_or_create(path: &Path) -> Result<Key> {
        if !path.exists() {
            let key = Key::random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).at("create the key file", path)?;
            }
            let tmp = path.with_extension(format!(
                "tmp{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut file| {
                    writeln!(file, "{}", key.to_hex()).and_then(|()| file.sync_all())
                })
                .at("write the key file", &tmp);
            let linked = written.and_then(|()| {
                std::fs::hard_link(&tmp, path).or_else(|e| {
                    // Another process put its key there first: that one is read below.
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(IoError::at("put the key file in place at", path, e))
                    }
                })
            });
            let _ = std::fs::remove_file(&tmp);
            linked?;
        }
        Key::load(path)
    }
}

#[cold]
fn unreachable_mac() -> ! {
    // Hmac<Sha256>::new_from_slice accepts every key length; this cannot run.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_created_at_once_are_one_key_and_never_read_half_written() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("keys").join("n1.key");
            let start = std::sync::Barrier::new(8);
            let keys: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            Key::load_or_create(&path).map(|k| k.to_hex())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread").expect("a key"))
                    .collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
            assert_eq!(Key::load(&path).expect("load").to_hex(), keys[0]);
            let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(names.len(), 1, "temp files left: {names:?}");
        }
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let key = Key::load_or_create(&path).expect("created");
        assert_eq!(Key::load(&path).expect("loaded"), key);
        assert_eq!(Key::load_or_create(&path).expect("again"), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Key::load(&path).expect_err("0644 refused");
        assert!(err.to_string().contains("k.key"), "{}", err.to_string());
        assert!(err.to_string().contains("0644"), "{}", err.to_string());
        assert!(!err.to_string().contains(&key.to_hex()));
    }
}
