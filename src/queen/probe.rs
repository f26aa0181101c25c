//! What a node is, seen in one remote command (`remote::node_facts`) and kept for the rest of
//! the invocation: its platform and the target triple that runs on it, glibc, GPUs, and the
//! rbee versions installed under `<remote_dir>/bin/`.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::config::Node;
use crate::error::Result;
use crate::ssh::Session;
use crate::ssh::remote;

/// A GPU as `nvidia-smi` lists it (memory in MiB), or an AMD GPU seen through `/dev/kfd`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Gpu {
    pub(crate) vendor: &'static str,
    pub(crate) name: String,
    pub(crate) memory_total_mib: Option<u64>,
    pub(crate) memory_free_mib: Option<u64>,
    pub(crate) driver: Option<String>,
    pub(crate) compute_cap: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct NodeFacts {
    /// The node user's home, as the node printed it.
    #[serde(skip)]
    pub(crate) home: String,
    /// `uname -sm`, as the node printed it.
    pub(crate) platform: String,
    /// The Rust target triple of a binary for this node.
    pub(crate) target: String,
    pub(crate) glibc: Option<String>,
    pub(crate) gpus: Vec<Gpu>,
    /// The CPU's flags as `/proc/cpuinfo` lists them (`flags`, or `Features` on aarch64);
    /// `None` where the node has no such file.
    #[serde(skip)]
    pub(crate) cpu_flags: Option<Vec<String>>,
    /// Where `bin/rbee` points (`<sha256>/rbee`), if it is a link.
    pub(crate) current: Option<String>,
    /// The SHA-256 of the binary `bin/rbee` runs.
    pub(crate) current_sha256: Option<String>,
    /// The versions under `bin/`, by SHA-256, most recently made current first.
    pub(crate) installed: Vec<String>,
    #[serde(skip)]
    pub(crate) free_bytes: Option<u64>,
    /// What the installed rbee says of itself (`version --json`, else `--version`).
    #[serde(skip)]
    pub(crate) version: Option<String>,
}

impl NodeFacts {
    /// Reads `remote::node_facts`'s `key=value` lines; unknown keys are skipped.
    pub(crate) fn parse(text: &str) -> NodeFacts {
        let mut facts = NodeFacts::default();
        let mut amd = false;
        let some = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_string());
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "home" => facts.home = value.to_string(),
                "uname" => facts.platform = value.trim().to_string(),
                "glibc" => facts.glibc = some(value),
                "nvidia" => facts.gpus.push(nvidia(value)),
                "amd" => amd = true,
                "cpu_flags" => {
                    let flags: Vec<String> = value.split_whitespace().map(String::from).collect();
                    facts.cpu_flags = (!flags.is_empty()).then_some(flags);
                }
                "current" => facts.current = some(value),
                "current_sha" => facts.current_sha256 = some(value),
                "installed" => facts.installed.push(value.trim().to_string()),
                "free_kb" => facts.free_bytes = value.trim().parse::<u64>().ok().map(|k| k * 1024),
                "version" => facts.version = some(value),
                _ => {}
            }
        }
        if amd {
            facts.gpus.push(Gpu {
                vendor: "amd",
                name: "AMD GPU (/dev/kfd)".to_string(),
                memory_total_mib: None,
                memory_free_mib: None,
                driver: None,
                compute_cap: None,
            });
        }
        facts.target = target_of(&facts.platform, facts.glibc.is_some());
        facts
    }

    pub(crate) fn has(&self, vendor: &str) -> bool {
        self.gpus.iter().any(|g| g.vendor == vendor)
    }

    /// `Linux x86_64, glibc 2.36` for messages.
    pub(crate) fn describe(&self) -> String {
        match &self.glibc {
            Some(g) => format!("{} ({}, glibc {g})", self.platform, self.target),
            None => format!("{} ({})", self.platform, self.target),
        }
    }
}

/// The flags of a `/proc/cpuinfo` text: its first `flags` (x86) or `Features` (aarch64) line,
/// as the probe's `awk` picks it.
#[cfg(test)]
pub(crate) fn cpu_flags_line(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key.trim_end(), "flags" | "Features").then_some(value)
        })
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// One line of `nvidia-smi --format=csv,noheader,nounits`.
fn nvidia(line: &str) -> Gpu {
    let mut fields = line.split(',').map(str::trim);
    let mut next = || fields.next().filter(|f| !f.is_empty() && *f != "[N/A]");
    Gpu {
        vendor: "nvidia",
        name: next().unwrap_or("NVIDIA GPU").to_string(),
        memory_total_mib: next().and_then(|v| v.parse().ok()),
        memory_free_mib: next().and_then(|v| v.parse().ok()),
        driver: next().map(str::to_string),
        compute_cap: next().map(str::to_string),
    }
}

/// The Rust target triple for `uname -sm` output: GNU libc on Linux when glibc answered,
/// else musl.
pub(crate) fn target_of(uname: &str, glibc: bool) -> String {
    let mut parts = uname.split_whitespace();
    let os = parts.next().unwrap_or_default().to_ascii_lowercase();
    let arch = match parts.next().unwrap_or_default() {
        "arm64" => "aarch64",
        "amd64" => "x86_64",
        other => other,
    };
    match os.as_str() {
        "linux" if glibc => format!("{arch}-unknown-linux-gnu"),
        "linux" => format!("{arch}-unknown-linux-musl"),
        "darwin" => format!("{arch}-apple-darwin"),
        "freebsd" => format!("{arch}-unknown-freebsd"),
        other => format!("{arch}-unknown-{other}"),
    }
}

/// Whether a binary built for `target` runs on a node of `node_target`: the same triple, or
/// a static musl build on a GNU Linux of the same architecture.
pub(crate) fn runs_on(target: &str, node_target: &str) -> bool {
    target == node_target
        || node_target
            .strip_suffix("-unknown-linux-gnu")
            .is_some_and(|arch| target == format!("{arch}-unknown-linux-musl"))
}

/// Probes seen in this invocation, by node name and `remote_dir`.
static SEEN: Mutex<Option<HashMap<(String, String), NodeFacts>>> = Mutex::new(None);

/// The node's facts: probed once per invocation (`with_version` probes again unless the cached
/// probe has the installed version).
pub(crate) async fn facts(session: &Session, node: &Node, with_version: bool) -> Result<NodeFacts> {
    let key = (node.name.clone(), node.remote_dir.clone());
    if let Some(f) = cached(&key).filter(|f| !with_version || f.version.is_some()) {
        return Ok(f);
    }
    let out = session
        .run(
            "probing the node",
            &remote::node_facts(&node.remote_dir, with_version),
        )
        .await?;
    let facts = NodeFacts::parse(&String::from_utf8_lossy(&out.stdout));
    remember(&key, facts.clone());
    Ok(facts)
}

fn cached(key: &(String, String)) -> Option<NodeFacts> {
    let seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.as_ref().and_then(|m| m.get(key).cloned())
}

fn remember(key: &(String, String), facts: NodeFacts) {
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.get_or_insert_with(HashMap::new)
        .insert(key.clone(), facts);
}

/// Records that `sha256` is now the node's current version, so a later look in this
/// invocation does not probe again for it.
pub(crate) fn made_current(node: &Node, sha256: &str) {
    let key = (node.name.clone(), node.remote_dir.clone());
    if let Some(mut f) = cached(&key) {
        f.current = Some(format!("{sha256}/rbee"));
        f.current_sha256 = Some(sha256.to_string());
        f.installed.retain(|s| s != sha256);
        f.installed.insert(0, sha256.to_string());
        remember(&key, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_of_a_node_with_a_fake_nvidia_smi_reads_its_gpus_and_libc() {
        let dir = tempfile::tempdir().expect("tempdir");
        // nvidia-smi's own output for this query, as an H200 node prints it.
        let fake = dir.path().join("nvidia-smi");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'NVIDIA H200, 143771, 143208, 570.124.06, 9.0'\n",
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let remote_dir = dir.path().join("r d").display().to_string();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(remote::node_facts(&remote_dir, false))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    dir.path().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("sh");
        assert!(out.status.success(), "{out:?}");
        let facts = NodeFacts::parse(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(
            facts.gpus.first(),
            Some(&Gpu {
                vendor: "nvidia",
                name: "NVIDIA H200".to_string(),
                memory_total_mib: Some(143771),
                memory_free_mib: Some(143208),
                driver: Some("570.124.06".to_string()),
                compute_cap: Some("9.0".to_string()),
            })
        );
        // This machine runs the build that tests it: its probe names this build's target.
        assert_eq!(facts.target, crate::platform::TARGET);
        assert!(facts.glibc.is_some(), "{facts:?}");
        assert!(facts.current.is_none() && facts.installed.is_empty());
        assert!(facts.free_bytes.is_some_and(|b| b > 0));
        // The CPU's flags, as this machine's own /proc/cpuinfo lists them.
        if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
            let flags = cpu_flags_line(&cpuinfo);
            assert_eq!(facts.cpu_flags, (!flags.is_empty()).then_some(flags));
        }
    }

    #[test]
    fn targets_follow_uname_and_libc() {
        assert_eq!(target_of("Linux x86_64", true), "x86_64-unknown-linux-gnu");
        assert_eq!(
            target_of("Linux aarch64", false),
            "aarch64-unknown-linux-musl"
        );
        assert_eq!(target_of("Darwin arm64", false), "aarch64-apple-darwin");
        assert!(runs_on(
            "x86_64-unknown-linux-musl",
            "x86_64-unknown-linux-gnu"
        ));
        assert!(!runs_on(
            "aarch64-unknown-linux-gnu",
            "x86_64-unknown-linux-gnu"
        ));
    }
}
