//! Putting rbee on a node over SSH: the binary chosen for its platform and GPUs
//! (content-addressed under `bin/<sha256>/`, made current atomically) and model files
//! (resumable, verified on the node). Every path travels shell-quoted.

use std::pin::Pin;
use std::task::{Context, Poll};

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use crate::config::{BinaryLocation, Model, Node};
use crate::error::{Error, IoContext, Result};
use crate::hive::verify::sha256_file;
use crate::platform::{self, TARGET};
use crate::progress::Progress;
use crate::queen::probe::{self, NodeFacts, runs_on};
use crate::ssh::Session;
use crate::ssh::remote;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Installed {
    /// Whether the binary was sent or downloaded (false: the node already had this version).
    pub(crate) uploaded: bool,
    pub(crate) bytes: u64,
    pub(crate) os: String,
    pub(crate) target: String,
    pub(crate) variant: String,
    pub(crate) sha256: String,
    /// Where it runs from on the node: `<remote_dir>/bin/<sha256>/rbee`.
    pub(crate) path: String,
    /// Why this entry: the node's `binary`, or what `auto` saw.
    pub(crate) reason: String,
    /// The node user's home, as the node printed it.
    #[serde(skip)]
    pub(crate) home: String,
}

/// Where the chosen binary comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Origin {
    /// This very rbee.
    Running,
    Path(std::path::PathBuf),
    Url(String),
}

/// The `[[binaries]]` entry chosen for a node, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Choice {
    pub(crate) target: String,
    pub(crate) variant: String,
    /// `None` for the running binary until it is hashed.
    pub(crate) sha256: Option<String>,
    pub(crate) origin: Origin,
    pub(crate) reason: String,
}

/// The GPU variants `auto` tries for each vendor, in order of preference.
fn gpu_variants(facts: &NodeFacts) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(g) = facts.gpus.iter().find(|g| g.vendor == "nvidia") {
        out.push(("cuda", g.name.clone()));
        out.push(("vulkan", g.name.clone()));
    }
    if facts.has("amd") {
        out.push(("rocm", "an AMD GPU".to_string()));
        out.push(("vulkan", "an AMD GPU".to_string()));
    }
    if facts.target.ends_with("-apple-darwin") {
        out.push(("metal", "Apple Metal".to_string()));
    }
    out
}

/// Picks the node's binary among `[[binaries]]` and the running one (an entry for its own
/// target and variant, unless the file lists that pair itself). Pure: what the node is comes
/// from its probe.
pub(crate) fn choose(node: &Node, facts: &NodeFacts) -> Result<Choice> {
    let choice = choose_entry(node, facts)?;
    if choice.origin == Origin::Running {
        cpu_fits(node, facts)?;
    }
    Ok(choice)
}

/// `choose` without the CPU check, for `nodes check` to report what it found.
pub(crate) fn choose_entry(node: &Node, facts: &NodeFacts) -> Result<Choice> {
    let mut entries: Vec<Choice> = node
        .binaries
        .iter()
        .map(|b| Choice {
            target: b.target.clone(),
            variant: b.variant.clone(),
            sha256: Some(b.sha256.clone()),
            origin: match &b.location {
                BinaryLocation::Path(p) => Origin::Path(p.clone()),
                BinaryLocation::Url(u) => Origin::Url(u.clone()),
            },
            reason: String::new(),
        })
        .collect();
    if !entries
        .iter()
        .any(|e| e.target == TARGET && e.variant == platform::variant())
    {
        entries.push(Choice {
            target: TARGET.to_string(),
            variant: platform::variant().to_string(),
            sha256: None,
            origin: Origin::Running,
            reason: String::new(),
        });
    }
    let find = |variant: &str| {
        entries
            .iter()
            .find(|e| e.variant == variant && runs_on(&e.target, &facts.target))
            .cloned()
    };
    let (found, wanted, reason) = if node.binary == "auto" {
        let gpu = gpu_variants(facts)
            .into_iter()
            .find_map(|(v, seen)| find(v).map(|c| (c, v, seen)));
        match gpu {
            Some((c, v, seen)) => (
                Some(c),
                v.to_string(),
                format!("auto: the node has {seen} and a `{v}` binary is listed"),
            ),
            None => {
                let why = match gpu_variants(facts).first() {
                    Some((v, seen)) => format!(
                        "auto: the node has {seen} but no `{v}` binary for {} is listed; using `cpu`",
                        facts.target
                    ),
                    None => "auto: no GPU on the node; using `cpu`".to_string(),
                };
                (find("cpu"), "cpu".to_string(), why)
            }
        }
    } else {
        (
            find(&node.binary),
            node.binary.clone(),
            format!("the node's `binary = \"{}\"`", node.binary),
        )
    };
    match found {
        Some(c) => Ok(Choice { reason, ..c }),
        None => Err(Error::config(format!(
            "node `{}` runs {} and no binary for it is known ({reason}); build or download rbee \
             for that platform and add to nodes.toml:\n\n[[binaries]]\ntarget = \"{}\"\n\
             variant = \"{wanted}\"\npath = \"PATH/TO/rbee\"   # or url = \"https://...\"\n\
             sha256 = \"...\"             # sha256sum of the file",
            node.name,
            facts.describe(),
            facts.target,
        ))),
    }
}

/// The CPU flags the running build uses that the node's CPU does not list; `None` where the
/// node does not list its flags (no `/proc/cpuinfo`).
pub(crate) fn cpu_missing(facts: &NodeFacts) -> Option<Vec<&'static str>> {
    let flags = facts.cpu_flags.as_ref()?;
    Some(platform::missing_flags(&platform::cpu_flags(), flags))
}

/// Whether the node's CPU has what this build uses (`platform::cpu_flags`), where the node lists
/// its CPU's flags: a build for another CPU would die there with SIGILL at its first such
/// instruction, so it is refused before anything is sent (exit 3). The message says where each
/// missing flag comes from: the compiler's flags or llama.cpp's own build.
fn cpu_fits(node: &Node, facts: &NodeFacts) -> Result<()> {
    let missing = cpu_missing(facts).unwrap_or_default();
    if missing.is_empty() {
        return Ok(());
    }
    let why = if platform::native() {
        "it was built for its build machine's CPU (`-C target-cpu=native`, `RBEE_NATIVE=1`). \
         Build rbee without `RBEE_NATIVE` (or on a machine with that node's CPU)"
            .to_string()
    } else {
        let ggml = platform::ggml_cpu_flags();
        let (from_ggml, from_rust): (Vec<&str>, Vec<&str>) =
            missing.iter().partition(|f| ggml.contains(f));
        let mut parts = Vec::new();
        if !from_rust.is_empty() {
            parts.push(format!(
                "Rust code compiled for {} (`-C target-cpu` or `-C target-feature` in RUSTFLAGS: \
                 build without them)",
                from_rust.join(", ")
            ));
        }
        if !from_ggml.is_empty() {
            parts.push(format!(
                "llama.cpp built with {} (its default x86-64 set, or a GGML_* variable: build \
                 in a fresh CARGO_TARGET_DIR with those turned off, for example `GGML_SSE42=OFF \
                 GGML_AVX=OFF GGML_AVX2=OFF GGML_FMA=OFF GGML_F16C=OFF GGML_BMI2=OFF cargo build \
                 --release`, as llama.cpp's CMake cache keeps the old ones)",
                from_ggml.join(", ")
            ));
        }
        format!("it has {}. Build it that way", parts.join(", and "))
    };
    Err(Error::config(format!(
        "node `{}`'s CPU lacks {}, which this rbee uses: {why}, and list that build for the \
         node's platform:\n\n[[binaries]]\ntarget = \"{}\"\nvariant = \"{}\"\n\
         path = \"PATH/TO/rbee\"\nsha256 = \"...\"             # sha256sum of the file",
        node.name,
        missing.join(", "),
        facts.target,
        platform::variant(),
    )))
}

/// The SHA-256 of a file here, hashed off the runtime's thread.
async fn hash_file(path: std::path::PathBuf) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        sha256_file(&path, &tokio_util::sync::CancellationToken::new())
    })
    .await
    .map_err(|e| Error::internal(format!("hashing task failed: {e}")))?
}

/// Makes sure the node runs the binary chosen for it (`choose`): content-addressed at
/// `<remote_dir>/bin/<sha256>/rbee`, sent (or downloaded by the node) only when absent, checked
/// on the node, then made current by renaming the `bin/rbee` link. A running hive keeps the
/// file it runs from until it restarts; old versions are pruned to the three most recent and
/// those a live process runs. Nothing is sent when no entry fits the node (exit 3).
pub(crate) async fn install_binary(
    session: &Session,
    node: &Node,
    progress: &Progress,
) -> Result<Installed> {
    let facts = probe::facts(session, node, false).await?;
    let choice = choose(node, &facts)?;
    let sha256 = match (&choice.sha256, &choice.origin) {
        (Some(s), _) => s.clone(),
        (None, _) => hash_file(std::env::current_exe().doing("find this rbee binary")?).await?,
    };
    let mut installed = Installed {
        uploaded: false,
        bytes: 0,
        os: facts.platform.clone(),
        target: choice.target.clone(),
        variant: choice.variant.clone(),
        sha256: sha256.clone(),
        path: format!(
            "{}/bin/{sha256}/rbee",
            node.remote_dir.trim_end_matches('/')
        ),
        reason: choice.reason.clone(),
        home: facts.home.clone(),
    };
    tracing::info!(node = %node.name, variant = %choice.variant, target = %choice.target, "{}", choice.reason);
    if facts.current_sha256.as_deref() == Some(sha256.as_str())
        && facts.current.as_deref() == Some(&format!("{sha256}/rbee"))
    {
        return Ok(installed);
    }
    let activate = remote::activate_binary(&node.remote_dir, &sha256);
    // A version the node already holds is checked there and switched to: nothing is sent.
    let present = facts.installed.contains(&sha256)
        && session
            .run("switching rbee", &activate)
            .await?
            .stdout_text()
            == "active";
    if !present {
        match &choice.origin {
            Origin::Url(url) => {
                let spinner = progress.spinner(format!("`{}` downloads rbee", node.name));
                session
                    .run(
                        "downloading rbee on the node",
                        &remote::download_binary(&node.remote_dir, &sha256, url),
                    )
                    .await?;
                drop(spinner);
            }
            Origin::Running | Origin::Path(_) => {
                let file_path = match &choice.origin {
                    Origin::Path(p) => p.clone(),
                    _ => std::env::current_exe().doing("find this rbee binary")?,
                };
                if matches!(choice.origin, Origin::Path(_)) {
                    let actual = hash_file(file_path.clone()).await.map_err(|e| {
                        Error::config(format!("[[binaries]] `path` {}: {e}", file_path.display()))
                    })?;
                    if actual != sha256 {
                        return Err(Error::config(format!(
                            "[[binaries]] entry for {} {}: `{}` has sha256 {actual}, but the \
                             entry says {sha256}; fix `sha256` (sha256sum prints it) or the file",
                            choice.target,
                            choice.variant,
                            file_path.display()
                        )));
                    }
                }
                let file = tokio::fs::File::open(&file_path)
                    .await
                    .at("open", &file_path)?;
                let bytes = file
                    .metadata()
                    .await
                    .at("read the size of", &file_path)?
                    .len();
                let bar = progress.bytes(&format!("rbee to {}", node.name), bytes);
                session
                    .run_reader(
                        "uploading rbee",
                        &remote::upload_binary(&node.remote_dir, &sha256),
                        Counting {
                            inner: file,
                            bar,
                            sent: Default::default(),
                        },
                    )
                    .await?;
                installed.bytes = bytes;
            }
        }
        installed.uploaded = true;
        if session
            .run("switching rbee", &activate)
            .await?
            .stdout_text()
            != "active"
        {
            return Err(Error::hive(format!(
                "rbee {sha256} was installed on `{}` but does not verify there",
                node.name
            )));
        }
    }
    probe::made_current(node, &sha256);
    Ok(installed)
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Pushed {
    pub(crate) model: String,
    /// `present` (already there and verified), `uploaded`, `resumed`, or `downloaded` (by the
    /// node itself, from a URL `source`).
    pub(crate) action: &'static str,
    pub(crate) bytes_sent: u64,
    pub(crate) resumed_from: u64,
    /// Whether it waited for another transfer of the same file to finish first.
    pub(crate) waited: bool,
}

impl From<crate::protocol::pull::Pulled> for Pushed {
    /// A model the node downloaded itself, as `hive install` lists it beside pushed ones.
    fn from(pulled: crate::protocol::pull::Pulled) -> Pushed {
        Pushed {
            model: pulled.model,
            action: match pulled.action.as_str() {
                "present" => "present",
                "resumed" => "resumed",
                _ => "downloaded",
            },
            bytes_sent: pulled.fetched,
            resumed_from: pulled.resumed_from,
            waited: false,
        }
    }
}

/// Copies a model's `source` to its `path` on the node: skips a verified file, resumes a partial
/// upload (`<path>.part`), checks the SHA-256 on the node before moving it into place.
pub(crate) async fn push_model(
    session: &Session,
    node: &Node,
    model: &Model,
    progress: &Progress,
) -> Result<Pushed> {
    let source = model.source.as_deref().ok_or_else(|| {
        Error::config(format!(
            "model `{}` has no `source` to push from; set `source = \"PATH\"` in its table",
            model.name
        ))
    })?;
    if model.download_url().is_some() {
        return Err(Error::config(format!(
            "model `{0}` has a URL `source`: the node downloads it itself, with `rbee models pull \
             --node {1} {0}`",
            model.name, node.name
        )));
    }
    let source = crate::paths::expand_tilde(source);
    let size = std::fs::metadata(&source)
        .map_err(|e| Error::config(format!("model source `{}`: {e}", source.display())))?
        .len();
    let mut waited = false;
    loop {
        let out = session
            .run(
                "checking the model on the node",
                &remote::model_probe(&model.path),
            )
            .await?;
        let text = out.stdout_text();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let present = lines.first().copied().unwrap_or("missing");
        if present.eq_ignore_ascii_case(&model.sha256) {
            return Ok(Pushed {
                model: model.name.clone(),
                action: "present",
                bytes_sent: 0,
                resumed_from: 0,
                waited,
            });
        }
        // Another push, or the hive's download, writes this file: wait for it to finish, then
        // look again (it may well have put the file in place).
        if lines.get(3) == Some(&"busy") {
            if !waited {
                tracing::info!(node = %node.name, model = %model.name, "another transfer is under way; waiting");
            }
            waited = true;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
        let mut offset: u64 = lines.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        if offset > size {
            offset = 0;
        }
        if let Some(free) = lines.get(2).and_then(|l| l.parse::<u64>().ok()) {
            let free = free.saturating_mul(1024);
            let needed = size - offset;
            if needed > free {
                return Err(Error::worker(format!(
                    "`{}` needs {:.1} MB more on `{}`, but the filesystem of `{}` there has \
                     {:.1} MB free; nothing was sent (free some space, or point the model's \
                     `path` elsewhere)",
                    model.name,
                    needed as f64 / 1e6,
                    node.name,
                    model.path,
                    free as f64 / 1e6
                )));
            }
        }
        let mut file = tokio::fs::File::open(&source).await.at("open", &source)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .at("seek in", &source)?;
        let command = remote::model_upload(&model.path, offset > 0, &model.sha256, size);
        let bar = progress.bytes(&format!("{} to {}", model.name, node.name), size);
        bar.set_position(offset);
        bar.reset_eta();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = Counting {
            inner: file,
            bar,
            sent: sent.clone(),
        };
        // A connection that dies under the copy may leave the send waiting for window space
        // that never comes: its end is watched beside it.
        let out = tokio::select! {
            out = session.exec_reader(&command, reader) => out,
            () = closed(session) => Err(session.lost()),
        };
        // The connection died under the copy (no exit status came, or sending broke): what
        // reached the node stays in its partial file, and the next push resumes from there.
        let cut = match &out {
            Ok(out) => out.code.is_none(),
            Err(_) => true,
        };
        if cut && session.is_closed() {
            return Err(cut_short(
                session,
                node,
                model,
                offset + sent.load(std::sync::atomic::Ordering::Relaxed),
                size,
            ));
        }
        let out = out?;
        match out.code {
            Some(0) => {
                return Ok(Pushed {
                    model: model.name.clone(),
                    action: if offset > 0 { "resumed" } else { "uploaded" },
                    bytes_sent: size - offset,
                    resumed_from: offset,
                    waited,
                });
            }
            // Taken between the probe and the upload: wait for that one.
            Some(remote::MODEL_BUSY) => {
                waited = true;
                continue;
            }
            Some(remote::MODEL_MISMATCH) => {
                return Err(Error::worker(format!(
                    "the copy of `{}` on `{}` does not match its sha256 {}; the partial file \
                     was removed, push again",
                    model.name, node.name, model.sha256
                )));
            }
            Some(remote::MODEL_INCOMPLETE) => {
                return Err(Error::hive(format!(
                    "the push of `{}` to `{}` ended before the whole file was there; the \
                     partial file is kept: push again to resume it",
                    model.name, node.name
                )));
            }
            code => {
                return Err(Error::worker(format!(
                    "pushing `{}` to `{}` failed (exit {}): {}",
                    model.name,
                    node.name,
                    code.map_or("?".to_string(), |c| c.to_string()),
                    out.stderr_text()
                )));
            }
        }
    }
}

/// Returns once `session` has ended (looked at every 100 ms).
async fn closed(session: &Session) {
    while !session.is_closed() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The error of a push whose SSH connection ended under it, `at` bytes of `size` read out.
fn cut_short(session: &Session, node: &Node, model: &Model, at: u64, size: u64) -> Error {
    Error::from(crate::ssh::SshError::Protocol {
        target: session.target.describe(),
        detail: format!(
            "the connection was lost during the push of `{}` to `{}` ({:.1} of {:.1} MB sent); \
             the partial file `{}.part` is kept on the node: push again to resume it",
            model.name,
            node.name,
            at as f64 / 1e6,
            size as f64 / 1e6,
            model.path
        ),
    })
}

/// Advances `bar` and `sent` by the bytes read through it; the bar clears its line when the
/// upload ends.
struct Counting<R> {
    inner: R,
    bar: ProgressBar,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.bar.inc(read as u64);
        self.sent
            .fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
        poll
    }
}

/// Puts this machine's copy of the node's signing key in `<remote_dir>/hive.key` (mode 0600)
/// when the node's differs; `name` may be `hive.key.next` during a rotation.
pub(crate) async fn install_key(
    session: &Session,
    node: &Node,
    key: &crate::auth::Key,
    name: &str,
) -> Result<bool> {
    let content = format!("{}\n", key.to_hex());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
    let probe = remote::file_sha256(&node.remote_dir, name);
    if session.exec(&probe, None).await?.stdout_text() == sha {
        return Ok(false);
    }
    session
        .run_reader(
            "writing the signing key",
            &remote::write_private_file(&node.remote_dir, name),
            content.as_bytes(),
        )
        .await?;
    tracing::info!(node = %node.name, key = %key.fingerprint(), "installed the signing key");
    Ok(true)
}

/// What the node did with this machine's key (see `remote::enroll_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enrollment {
    /// The node already accepts it.
    Enrolled,
    /// The node had no key: this one is its first.
    First,
    /// The node accepts other machines' keys: this one waits for one of them to approve it.
    Pending,
}

/// Enrolls this machine's key on the node over SSH: first come on a node with no key, else it
/// is left waiting for approval; a key the node has is never replaced.
pub(crate) async fn enroll_key(
    session: &Session,
    node: &Node,
    key: &crate::auth::Key,
) -> Result<Enrollment> {
    let content = format!("{}\n", key.to_hex());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
    let kid = key.fingerprint();
    let out = session
        .run_reader(
            "enrolling this machine's key",
            &remote::enroll_key(&node.remote_dir, &kid, &sha),
            content.as_bytes(),
        )
        .await?;
    let state = match out.stdout_text().trim() {
        "enrolled" => Enrollment::Enrolled,
        "first" => Enrollment::First,
        "pending" => Enrollment::Pending,
        other => {
            return Err(Error::hive(format!(
                "enrolling the key on `{}` printed `{}`, not its outcome",
                node.name,
                other.chars().take(200).collect::<String>()
            )));
        }
    };
    tracing::info!(node = %node.name, key = %kid, ?state, "enrollment of this machine's key");
    Ok(state)
}

/// The refusal a machine whose key the node does not accept gets: what to run, and where.
pub(crate) fn not_enrolled(node: &Node, key: &crate::auth::Key) -> Error {
    let kid = key.fingerprint();
    Error::Unauthenticated(format!(
        "this machine's key {kid} is not enrolled on `{0}`, which accepts other machines' keys; \
         it now waits there for approval: on a machine that has access, run \
         `rbee nodes enroll {0} --approve {kid}`, then run this again",
        node.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};

    fn ssh_node() -> Node {
        let config = Config::parse(
            "[nodes.gpu1]\nhost = \"10.0.0.9\"\n",
            Source::File(std::path::PathBuf::from("nodes.toml")),
        )
        .expect("parse");
        config.nodes["gpu1"].clone()
    }

    /// A probe of a node of this build's own platform whose CPU lists `flags`.
    fn facts(flags: Option<&str>) -> NodeFacts {
        let mut text = format!("uname=Linux {}\nglibc=2.36\n", std::env::consts::ARCH);
        if let Some(f) = flags {
            text.push_str(&format!("cpu_flags= {f}\n"));
        }
        let mut facts = NodeFacts::parse(&text);
        facts.target = TARGET.to_string();
        facts
    }

    #[test]
    fn the_running_binary_is_refused_for_a_cpu_without_what_it_uses() {
        let needed = platform::cpu_flags();
        let Some((dropped, kept)) = needed.split_last() else {
            // A build with nothing checked (another architecture): nothing to refuse.
            return;
        };
        // "fpu" keeps the line a list where the build needs a single flag.
        let listed = format!("fpu {}", kept.join(" "));
        let err = choose(&ssh_node(), &facts(Some(&listed))).expect_err("refused");
        assert_eq!(err.code(), 3, "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("lacks {dropped},")), "{text}");
        assert!(text.contains(&format!("target = \"{TARGET}\"")), "{text}");
        // Every flag there, or a node that does not list its flags: chosen.
        let all = needed.join(" ");
        assert_eq!(
            choose(&ssh_node(), &facts(Some(&all)))
                .expect("fits")
                .origin,
            Origin::Running
        );
        assert_eq!(
            choose(&ssh_node(), &facts(None)).expect("unknown").origin,
            Origin::Running
        );
    }

    #[test]
    fn a_listed_binary_is_not_checked_against_this_builds_flags() {
        let mut node = ssh_node();
        node.binaries.push(crate::config::Binary {
            target: TARGET.to_string(),
            variant: platform::variant().to_string(),
            sha256: "0".repeat(64),
            location: BinaryLocation::Url("https://example.com/rbee".to_string()),
        });
        let choice = choose(&node, &facts(Some("fpu"))).expect("listed");
        assert_eq!(
            choice.origin,
            Origin::Url("https://example.com/rbee".to_string())
        );
    }
}
