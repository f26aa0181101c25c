//! Model files are checked against their configured SHA-256 before their first load; the result
//! is remembered by size and modification time so a warm start does not hash again. Only a
//! regular file is read at all (a directory, a device such as `/dev/zero` or a FIFO would fail
//! late, never end, or block), and hashing stops as soon as nobody waits for it any more.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};

#[derive(Default)]
pub(crate) struct Verifier {
    known: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl Verifier {
    /// Checks the file at `path` against `expected`. Hashing runs on a blocking thread and ends
    /// when `stop` is cancelled or this future is dropped (its request ran out of budget).
    pub(crate) async fn verify(
        &self,
        path: &Path,
        expected: &str,
        stop: &CancellationToken,
    ) -> Result<()> {
        let meta = tokio::fs::metadata(path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::ModelMissing(format!(
                    "model file `{}` is not on the node",
                    path.display()
                ))
            } else {
                Error::worker(format!(
                    "model file `{}` is not readable: {e}",
                    path.display()
                ))
            }
        })?;
        regular(path, &meta)?;
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
                let cancel = stop.child_token();
                let _cancel_when_dropped = cancel.clone().drop_guard();
                let sha = tokio::task::spawn_blocking(move || sha256_file(&owned, &cancel))
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

/// Refuses what is not a regular file, naming it and what it is.
fn regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(());
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(Error::worker(format!(
        "model file `{}` is not a regular file (it is {what}); point the model's `path` in \
         nodes.toml at its GGUF file",
        path.display()
    )))
}

/// The SHA-256 of the regular file at `path`, in hex; gives up once `cancel` is cancelled.
pub(crate) fn sha256_file(path: &Path, cancel: &CancellationToken) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO put in the file's place after it was checked cannot hold this
    // thread until a writer comes; what was opened is checked again below.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::worker(format!("cannot open `{}`: {e}", path.display())))?;
    regular(path, &file.metadata().at("read the metadata of", path)?)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if cancel.is_cancelled() {
            return Err(Error::worker(format!(
                "hashing `{}` was abandoned: nobody waits for it any more",
                path.display()
            )));
        }
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
        let stop = CancellationToken::new();
        verifier.verify(&path, abc, &stop).await.expect("matches");
        std::fs::write(&path, b"abcd").expect("rewrite");
        let err = verifier
            .verify(&path, abc, &stop)
            .await
            .expect_err("changed file");
        assert_eq!(err.code(), 7);
        assert!(
            err.to_string().contains("refusing to load"),
            "{}",
            err.to_string()
        );
    }

    #[test]
    fn hashing_stops_once_cancelled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"abc").expect("write");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = sha256_file(&path, &cancel).expect_err("cancelled");
        assert!(err.to_string().contains("abandoned"), "{err}");
    }
}
