//! `nodes check` warns when the disk of a node's `remote_dir`, where its audit trail is
//! written, is nearly full: before the hive's fail-closed audit refuses work.

use std::process::Command;

use crate::support::Env;

/// A small tmpfs mounted over a directory, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn over(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "mounting a tmpfs needs root"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(path).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount a tmpfs over {}", path.display());
        Some(Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn nodes_check_warns_when_the_audit_disk_is_nearly_full_and_not_otherwise() {
    let Some(env) = Env::new("") else { return };
    // On the machine's own disk, with room: no warning.
    let roomy = env.run(&["--json", "nodes", "check", "n1"]);
    roomy.expect(0);
    let value: serde_json::Value = serde_json::from_str(roomy.stdout.trim()).expect("JSON");
    assert!(value.get("warnings").is_none(), "{value}");

    let Some(_tmpfs) = Tmpfs::over(&env.node_dir(), "32m") else {
        return;
    };
    let run = env.run(&["--json", "nodes", "check", "n1"]);
    run.expect(0);
    let value: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
    let warning = value["warnings"][0].as_str().expect("a warning");
    assert!(warning.contains("audit"), "{warning}");
    assert!(
        warning.contains("256 MiB"),
        "the threshold is named: {warning}"
    );
    let plain = env.run(&["nodes", "check", "n1"]);
    plain.expect(0);
    assert!(
        plain.stderr.contains("warning: n1:"),
        "no warning on stderr: {}",
        plain.stderr
    );
    // The hive still serves meanwhile: the warning comes before the refusal.
    env.infer(&["--prompt", "Hi", "--max-tokens", "2"])
        .expect(0);
    env.run(&["hive", "stop", "n1"]).expect(0);
}
