//! Real file-system faults under a path: a read-only bind mount over it, or a small tmpfs in
//! its place. Each is undone when its guard drops, whether the test passed or not.

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) struct Mount {
    path: PathBuf,
}

fn mount(args: &[&str]) -> bool {
    Command::new("mount")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Mount {
    /// `path` seen read-only from now on: a bind mount of it over itself, remounted read-only.
    /// Files already open for writing stay writable (they belong to the mount underneath);
    /// whatever opens a file there from now on gets EROFS. Root only; `None` (with a note)
    /// elsewhere.
    pub(crate) fn read_only(path: &Path) -> Option<Mount> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a read-only bind mount needs root");
            return None;
        }
        let p = path.to_str().expect("UTF-8 path");
        assert!(mount(&["--bind", p, p]), "mount --bind {p}");
        let guard = Mount {
            path: path.to_path_buf(),
        };
        assert!(
            mount(&["-o", "remount,bind,ro", p]),
            "remount {p} read-only"
        );
        Some(guard)
    }

    /// A tmpfs of `megabytes` mounted at `path` (made if missing): a small filesystem for
    /// full-disk tests. Root only; `None` (with a note) elsewhere, a failure under `CI`.
    pub(crate) fn tmpfs(path: &Path, megabytes: u32) -> Option<Mount> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "a tmpfs mount needs root, and CI is set"
            );
            eprintln!("skipped: a tmpfs mount needs root");
            return None;
        }
        std::fs::create_dir_all(path).expect("mount point");
        let p = path.to_str().expect("UTF-8 path");
        let size = format!("size={megabytes}m,mode=0700");
        assert!(
            mount(&["-t", "tmpfs", "-o", &size, "tmpfs", p]),
            "mount tmpfs on {p}"
        );
        Some(Mount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.path).status();
        if !status.is_ok_and(|s| s.success()) {
            // Busy (a process still has a file open there): detach it now, gone when it closes.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
