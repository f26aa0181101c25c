//! `rbee nodes list|check|trust|disconnect`: the configured nodes, their health as seen over
//! SSH, recording their host keys, and closing the connections kept for later invocations
//! (`enroll|revoke|keys` are in `node_keys`).

use serde::Serialize;

use futures::StreamExt;

use crate::cli::{NodeSelection, NodesCommand};
use crate::cmd::Context;
use crate::cmd::fleet::{NodeResult, each_node, finish};
use crate::config::{Model, Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::output::table;
use crate::platform::VersionInfo;
use crate::queen::install::{self, Origin};
use crate::queen::node::ConnectOptions;
use crate::queen::node::connect_ssh;
use crate::queen::probe::NodeFacts;
use crate::ssh::HostKey;

#[derive(Serialize)]
struct Listing<'a> {
    source: String,
    nodes: Vec<&'a Node>,
    models: Vec<&'a Model>,
}

pub(crate) async fn run(ctx: &Context, command: NodesCommand) -> Result<()> {
    match command {
        NodesCommand::List => list(ctx),
        NodesCommand::Check(sel) => check(ctx, sel).await,
        NodesCommand::Trust(sel) => trust(ctx, sel).await,
        NodesCommand::Enroll { node, approve } => {
            crate::cmd::node_keys::enroll(ctx, &node, approve.as_deref()).await
        }
        NodesCommand::Revoke { node, kid } => crate::cmd::node_keys::revoke(ctx, &node, &kid).await,
        NodesCommand::Keys { node } => crate::cmd::node_keys::list(ctx, &node).await,
        NodesCommand::Disconnect { nodes } => {
            let all = nodes.is_empty();
            disconnect(ctx, NodeSelection { nodes, all }).await
        }
        NodesCommand::Hold => Err(Error::internal("`nodes hold` runs on its own")),
    }
}

/// Ends the holders of the nodes' persistent SSH connections.
async fn disconnect(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        if node.transport == Transport::Local {
            return NodeResult::new(&node, "local");
        }
        let ended = match crate::ssh::Target::for_node(&node) {
            Ok(target) => crate::ssh::mux::client::disconnect(&target).await,
            Err(e) => Err(e),
        };
        match ended {
            Ok(true) => NodeResult::new(&node, "disconnected"),
            Ok(false) => NodeResult::new(&node, "not_connected"),
            Err(e) => NodeResult::failed(&node, "failed", &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "disconnected" => format!("{}: connection closed", r.node),
        "not_connected" => format!("{}: no connection kept", r.node),
        "local" => format!("{}: local node, no SSH", r.node),
        state => format!("{}: {state}", r.node),
    })
}

async fn trust(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let options = ConnectOptions {
        accept_new_host_key: true,
    };
    let results = each_node(ctx, &sel, |node| async move {
        if node.transport == Transport::Local {
            return NodeResult::new(&node, "local");
        }
        let budget = Budget::new(node.timeout);
        match connect_ssh(&node, &budget, options.accept_new_host_key).await {
            Ok(session) => match &session.host_key {
                HostKey::Accepted { fingerprint } => NodeResult {
                    detail: Some(fingerprint.clone()),
                    ..NodeResult::new(&node, "trusted")
                },
                _ => NodeResult::new(&node, "already_trusted"),
            },
            Err(e) => NodeResult::failed(&node, "failed", &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "trusted" => format!(
            "{}: host key {} recorded",
            r.node,
            r.detail.as_deref().unwrap_or("")
        ),
        "already_trusted" => format!("{}: host key already known", r.node),
        "local" => format!("{}: local node, no SSH", r.node),
        state => format!("{}: {state}", r.node),
    })
}

/// The binary chosen for a node, as `nodes check` reports it.
#[derive(Serialize, Default)]
struct BinaryCheck {
    target: String,
    variant: String,
    sha256: Option<String>,
    /// `running` (this rbee), `path` or `url`.
    origin: &'static str,
    reason: String,
    /// Whether `bin/<sha256>/rbee` is on the node.
    installed: bool,
    /// Whether `bin/rbee` points to it.
    current: bool,
}

#[derive(Serialize, Default)]
struct Check {
    node: String,
    reachable: bool,
    host_key: Option<String>,
    authenticated: bool,
    platform: Option<String>,
    target: Option<String>,
    glibc: Option<String>,
    gpus: Vec<crate::queen::probe::Gpu>,
    platform_matches: Option<bool>,
    /// Where this very rbee is the binary chosen for the node and the node lists its CPU's
    /// flags: those it uses that the node's `/proc/cpuinfo` does not list (empty: it fits; not
    /// empty: it is not installed there).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_missing: Option<Vec<&'static str>>,
    free_bytes: Option<u64>,
    installed_version: Option<String>,
    /// The llama.cpp backends of the binary the node runs (or would run).
    backends: Option<Vec<String>>,
    binary: Option<BinaryCheck>,
    local_version: &'static str,
    ok: bool,
    error: Option<String>,
    /// What works now but will not for long (a nearly full audit disk).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(skip)]
    exit_code: Option<u8>,
}

/// Free space on the disk of a node's `remote_dir` (where its audit trail is written) below
/// which `nodes check` warns: the hive fails closed (exit 10) once a record cannot be written,
/// and a disk this low is a model download or a log rotation away from it.
const AUDIT_DISK_WARN_BYTES: u64 = 256 << 20;

/// The warning for a node whose audit disk is nearly full, if it is.
fn audit_disk_warning(node: &Node, free: Option<u64>) -> Option<String> {
    let free = free.filter(|f| *f < AUDIT_DISK_WARN_BYTES)?;
    Some(format!(
        "only {} MiB free on the disk of `{}`, where the node's audit trail is written (warned \
         under {} MiB); once a record cannot be written the hive refuses work (exit 10) unless \
         the node is `audit = \"best-effort\"`: free space there",
        free >> 20,
        node.remote_dir,
        AUDIT_DISK_WARN_BYTES >> 20
    ))
}

async fn check(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let nodes = ctx.selected_nodes(&sel)?;
    let checks: Vec<Check> = futures::stream::iter(nodes)
        .map(|node| check_one(ctx, node))
        .buffered(crate::cmd::parallel_nodes())
        .collect()
        .await;
    for c in &checks {
        for warning in &c.warnings {
            ctx.out
                .note(format!("rbee: warning: {}: {warning}", c.node));
        }
        ctx.out.result(c, || describe(c));
    }
    match checks.iter().filter_map(|c| c.exit_code).max() {
        Some(code) => Err(Error::of_kind(
            crate::error::ExitKind::from_code(code),
            String::new(),
        )),
        None => Ok(()),
    }
}

fn describe(c: &Check) -> String {
    if let Some(err) = &c.error {
        return format!("{}: FAILED: {err}", c.node);
    }
    let gpus = if c.gpus.is_empty() {
        "no GPU".to_string()
    } else {
        c.gpus
            .iter()
            .map(|g| {
                let mem = g
                    .memory_total_mib
                    .map_or(String::new(), |m| format!(" {:.0} GiB", m as f64 / 1024.0));
                let driver = g
                    .driver
                    .as_deref()
                    .map_or(String::new(), |d| format!(", driver {d}"));
                format!("{}{mem}{driver}", g.name)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let binary = c.binary.as_ref().map_or("-".to_string(), |b| {
        format!(
            "binary {} {} ({}){}",
            b.target,
            b.variant,
            b.reason,
            if b.current {
                ", installed and current"
            } else if b.installed {
                ", installed, not current"
            } else {
                ", not installed"
            }
        )
    });
    format!(
        "{}: ok; host key {}, {}{}, {gpus}, {} free, rbee {} installed (this is {}); {binary}; backends {}",
        c.node,
        c.host_key.as_deref().unwrap_or("-"),
        c.platform.as_deref().unwrap_or("?"),
        c.glibc
            .as_deref()
            .map_or(String::new(), |g| format!(", glibc {g}")),
        c.free_bytes
            .map_or("?".to_string(), |b| format!("{:.1} GB", b as f64 / 1e9)),
        c.installed_version.as_deref().unwrap_or("not"),
        c.local_version,
        c.backends
            .as_ref()
            .map_or("?".to_string(), |b| b.join(", ")),
    )
}

async fn check_one(ctx: &Context, node: Node) -> Check {
    let mut check = Check {
        node: node.name.clone(),
        local_version: env!("CARGO_PKG_VERSION"),
        ..Check::default()
    };
    if node.transport == Transport::Local {
        let dir = crate::queen::lifecycle::local_dir(&node);
        check.reachable = true;
        check.authenticated = true;
        check.host_key = Some("local".to_string());
        // The same probe as on an SSH node, run here.
        let facts = std::process::Command::new("sh")
            .arg("-c")
            .arg(crate::ssh::remote::node_facts(&node.remote_dir, false))
            .output()
            .map(|o| NodeFacts::parse(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default();
        check.platform = Some(facts.platform.clone());
        check.target = Some(crate::platform::TARGET.to_string());
        check.glibc = facts.glibc.clone();
        check.gpus = facts.gpus.clone();
        check.platform_matches = Some(true);
        check.free_bytes = free_bytes(&dir);
        check
            .warnings
            .extend(audit_disk_warning(&node, check.free_bytes));
        check.installed_version = Some(env!("CARGO_PKG_VERSION").to_string());
        check.backends = Some(local_backends());
        check.ok = true;
        return check;
    }
    let budget = Budget::new(node.timeout);
    let session = match connect_ssh(&node, &budget, ctx.connect.accept_new_host_key).await {
        Ok(s) => s,
        Err(e) => {
            check.reachable = matches!(&e, Error::Ssh(ssh) if ssh.reached());
            check.error = Some(e.to_string());
            check.exit_code = Some(e.code());
            return check;
        }
    };
    check.reachable = true;
    check.authenticated = true;
    check.host_key = Some(match &session.host_key {
        HostKey::Accepted { fingerprint } => format!("{fingerprint} (recorded now)"),
        _ => "known".to_string(),
    });
    let facts = match crate::queen::probe::facts(&session, &node, true).await {
        Ok(f) => f,
        Err(e) => {
            check.error = Some(e.to_string());
            check.exit_code = Some(e.code());
            return check;
        }
    };
    check.platform = Some(facts.platform.clone());
    check.target = Some(facts.target.clone());
    check.glibc = facts.glibc.clone();
    check.gpus = facts.gpus.clone();
    check.free_bytes = facts.free_bytes;
    check
        .warnings
        .extend(audit_disk_warning(&node, check.free_bytes));
    // `version --json` from an rbee that has it, else `rbee X.Y.Z`.
    let installed: Option<VersionInfo> = facts
        .version
        .as_deref()
        .and_then(|v| serde_json::from_str(v).ok());
    check.installed_version = match &installed {
        Some(v) => Some(v.version.clone()),
        None => facts
            .version
            .as_deref()
            .map(|v| v.trim_start_matches("rbee ").to_string()),
    };
    if let Ok(choice) = install::choose_entry(&node, &facts)
        && choice.origin == Origin::Running
    {
        check.cpu_missing = install::cpu_missing(&facts);
    }
    match install::choose(&node, &facts) {
        Ok(choice) => {
            let sha256 = match &choice.origin {
                Origin::Running => std::env::current_exe().ok().and_then(|exe| {
                    crate::hive::verify::sha256_file(
                        &exe,
                        &tokio_util::sync::CancellationToken::new(),
                    )
                    .ok()
                }),
                _ => choice.sha256.clone(),
            };
            let current = sha256.is_some() && facts.current_sha256 == sha256;
            check.backends = match (&installed, current, &choice.origin) {
                (Some(v), true, _) => Some(v.backends.clone()),
                (_, _, Origin::Running) => Some(local_backends()),
                _ => None,
            };
            check.binary = Some(BinaryCheck {
                installed: sha256.as_ref().is_some_and(|s| facts.installed.contains(s)),
                current,
                target: choice.target,
                variant: choice.variant,
                origin: match choice.origin {
                    Origin::Running => "running",
                    Origin::Path(_) => "path",
                    Origin::Url(_) => "url",
                },
                reason: choice.reason,
                sha256,
            });
            check.platform_matches = Some(true);
            check.ok = true;
        }
        Err(e) => {
            check.platform_matches = Some(false);
            check.error = Some(e.to_string());
            check.exit_code = Some(e.code());
        }
    }
    check
}

/// The llama.cpp backends of this binary, with llama.cpp's own log lines kept quiet.
fn local_backends() -> Vec<String> {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    crate::platform::backends(&crate::platform::devices())
}

fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let mut d = dir.to_path_buf();
    while !d.exists() {
        d = d.parent()?.to_path_buf();
    }
    let stat = nix::sys::statvfs::statvfs(&d).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

fn list(ctx: &Context) -> Result<()> {
    let config = ctx.config()?;
    let listing = Listing {
        source: config.source.to_string(),
        nodes: config.nodes.values().collect(),
        models: config.models.values().collect(),
    };
    ctx.out.result(&listing, || {
        let nodes: Vec<Vec<String>> = listing
            .nodes
            .iter()
            .map(|n| {
                let transport = serde_json::to_value(n.transport)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                vec![
                    n.name.clone(),
                    transport,
                    n.host.clone().unwrap_or_else(|| "-".into()),
                    n.hive_port.to_string(),
                    n.remote_dir.clone(),
                    n.models.join(", "),
                ]
            })
            .collect();
        let models: Vec<Vec<String>> = listing
            .models
            .iter()
            .map(|m| vec![m.name.clone(), m.path.clone(), m.sha256[..12].to_string()])
            .collect();
        format!(
            "config: {}\n\n{}\n{}",
            listing.source,
            table(
                &[
                    "NODE",
                    "TRANSPORT",
                    "HOST",
                    "HIVE PORT",
                    "REMOTE DIR",
                    "MODELS"
                ],
                &nodes
            ),
            table(&["MODEL", "PATH", "SHA256"], &models)
        )
    });
    Ok(())
}
