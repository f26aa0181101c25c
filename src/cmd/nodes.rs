//! `rbee nodes list|check|trust|disconnect`: the configured nodes, their health as seen over
//! SSH, recording their host keys, and closing the connections kept for later invocations.

use serde::Serialize;

use futures::StreamExt;

use crate::cli::{NodeSelection, NodesCommand};
use crate::cmd::Context;
use crate::cmd::fleet::{NodeResult, each_node, finish};
use crate::config::{Model, Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::output::table;
use crate::queen::node::ConnectOptions;
use crate::queen::node::connect_ssh;
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

#[derive(Serialize, Default)]
struct Check {
    node: String,
    reachable: bool,
    host_key: Option<String>,
    authenticated: bool,
    platform: Option<String>,
    platform_matches: Option<bool>,
    free_bytes: Option<u64>,
    installed_version: Option<String>,
    local_version: &'static str,
    ok: bool,
    error: Option<String>,
    #[serde(skip)]
    exit_code: Option<u8>,
}

async fn check(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let nodes = ctx.selected_nodes(&sel)?;
    let checks: Vec<Check> = futures::stream::iter(nodes)
        .map(|node| check_one(ctx, node))
        .buffered(crate::cmd::parallel_nodes())
        .collect()
        .await;
    for c in &checks {
        ctx.out.result(c, || {
            if let Some(err) = &c.error {
                return format!("{}: FAILED: {err}", c.node);
            }
            format!(
                "{}: ok; host key {}, {}{}, {} free, rbee {} installed (this is {})",
                c.node,
                c.host_key.as_deref().unwrap_or("-"),
                c.platform.as_deref().unwrap_or("?"),
                if c.platform_matches == Some(false) {
                    " (does not match this rbee)"
                } else {
                    ""
                },
                c.free_bytes
                    .map_or("?".to_string(), |b| format!("{:.1} GB", b as f64 / 1e9)),
                c.installed_version.as_deref().unwrap_or("not"),
                c.local_version
            )
        });
    }
    match checks.iter().filter_map(|c| c.exit_code).max() {
        Some(code) => Err(Error::of_kind(
            crate::error::ExitKind::from_code(code),
            String::new(),
        )),
        None => Ok(()),
    }
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
        check.platform = Some(format!(
            "{} {}",
            std::env::consts::OS,
            std::env::consts::ARCH
        ));
        check.platform_matches = Some(true);
        check.free_bytes = free_bytes(&dir);
        check.installed_version = Some(env!("CARGO_PKG_VERSION").to_string());
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
    match session
        .exec(&crate::ssh::remote::node_probe(&node.remote_dir), None)
        .await
    {
        Ok(out) => {
            let text = out.stdout_text();
            let mut lines = text.lines();
            let platform = lines.next().unwrap_or_default().to_string();
            let lower = platform.to_ascii_lowercase();
            check.platform_matches = Some(
                lower.contains(std::env::consts::OS) && lower.contains(std::env::consts::ARCH),
            );
            check.platform = Some(platform);
            check.free_bytes = lines
                .next()
                .and_then(|l| l.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024);
            check.installed_version = lines
                .next()
                .filter(|v| *v != "none")
                .map(|v| v.trim_start_matches("rbee ").to_string());
            check.ok = check.platform_matches == Some(true);
            if !check.ok {
                check.error = Some(format!(
                    "the node runs {}, this rbee is built for {} {}",
                    check.platform.as_deref().unwrap_or("?"),
                    std::env::consts::OS,
                    std::env::consts::ARCH
                ));
                check.exit_code = Some(crate::error::ExitKind::HiveUnavailable.code());
            }
        }
        Err(e) => {
            check.error = Some(e.to_string());
            check.exit_code = Some(e.code());
        }
    }
    check
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
