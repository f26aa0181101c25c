//! Model files are checked against their configured SHA-256 before their first load; the result
//! is remembered by size and modification time so a warm start does not hash again.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

#[derive(Default)]
pub(crate) struct Verifier {
    known: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl Verifier {
    pub(crate) async fn verify(&self, path: &Path, expected: &str) -> Result<()> {
        let meta = tokio::fs::metadata(path).await.map_err(|e| {
            Error::worker(format!(
                "model file `{}` is not readable: {e}",
                path.display()
            ))
        })?;
        let stamp = (meta.len(), meta.modified().at("read the time of", path)?);
        let cached = self
            .known
            .lock()
            .map_err(|_| Error::internal("verifier lock poisoned"))?
            .get(path)
            .filter(|(len, mtime, _)| (*len, *mtime) == stamp)
            .map(|(_, _, sha)| sha.clone());
        let actual = match cached {
            Some(sha) => sha,
            None => {
                let owned = path.to_path_buf();
                let sha = tokio::task::spawn_blocking(move || sha256_file(&owned))
                    .await
                    .map_err(|e| Error::internal(format!("hashing task failed: {e}")))??;
                self.known
                    .lock()
                    .map_err(|_| Error::internal("verifier lock poisoned"))?
                    .insert(path.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
                sha
            }
        };
        if actual.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(Error::worker(format!(
                "model file `{}` has sha256 {actual}, but the configuration expects {expected}; \
                 refusing to load it (replace the file, or fix `sha256` in nodes.toml)",
                path.display()
            )))
        }
    }
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::worker(format!("cannot open `{}`: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at("read", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mismatch_is_refused_and_a_changed_file_is_hashed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"abc").expect("write");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let verifier = Verifier::default();
        verifier.verify(&path, abc).await.expect("matches");
        std::fs::write(&path, b"abcd").expect("rewrite");
        let err = verifier.verify(&path, abc).await.expect_err("changed file");
        assert_eq!(err.code(), 7);
        assert!(
            err.to_string().contains("refusing to load"),
            "{}",
            err.to_string()
        );
    }
}
