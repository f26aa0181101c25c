//! The hive's pidfile, held under an exclusive lock for the hive's whole life, so that two hives
//! never serve the same directory and a stale file (no lock holder) is told from a live one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};

pub(crate) struct PidFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl PidFile {
    /// Takes the lock and writes our pid; fails when another live process holds it.
    pub(crate) fn acquire(path: &Path) -> Result<PidFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::internal(format!("cannot open `{}`: {e}", path.display())))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) => {
                let holder = read_pid(path).map_or_else(String::new, |p| format!(" (pid {p})"));
                return Err(Error::hive(format!(
                    "another hive already runs from `{}`{holder}: {errno}",
                    path.parent().unwrap_or(path).display()
                )));
            }
        };
        lock.set_len(0)
            .and_then(|()| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(lock, "{}", std::process::id()))
            .and_then(|()| lock.sync_data())
            .at("write the pidfile", path)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so a starting hive never sees our pid as its own.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid written in a pidfile, if any.
pub(crate) fn read_pid(path: &Path) -> Option<i32> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether some process holds the pidfile's lock (a live hive).
pub(crate) fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_release_removes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hive.pid");
        let first = PidFile::acquire(&path).expect("first lock");
        assert_eq!(read_pid(&path), Some(std::process::id() as i32));
        assert!(is_locked(&path));
        let err = PidFile::acquire(&path).err().expect("second lock refused");
        assert_eq!(err.code(), 6);
        assert!(
            err.to_string().contains("another hive"),
            "{}",
            err.to_string()
        );
        drop(first);
        assert!(!path.exists());
        assert!(!is_locked(&path));
    }
}
