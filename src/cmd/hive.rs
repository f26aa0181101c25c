//! `rbee hive start|stop|status|install`: the hive daemon on each selected node, several nodes
//! at once (bounded); one failing node does not stop the others, and the exit code is the
//! worst one.

use std::time::Duration;

use crate::cli::{HiveOp, NodeSelection};
use crate::cmd::Context;
use crate::cmd::fleet::{NodeResult, each_node, finish, worst};
use crate::config::Node;
use crate::deadline::Budget;
use crate::error::{Error, ExitKind, Result};
use crate::output::table;
use crate::queen::install;
use crate::queen::lifecycle::{self, Probe, Stopped};
use crate::queen::node::NodeConn;

pub(crate) async fn run(ctx: &Context, command: HiveOp) -> Result<()> {
    match command {
        HiveOp::Start { sel, preload } => start(ctx, sel, preload).await,
        HiveOp::Stop { sel, timeout } => stop(ctx, sel, timeout).await,
        HiveOp::Status(sel) => status(ctx, sel).await,
        HiveOp::Install(sel) => install(ctx, sel).await,
        HiveOp::RotateKey(sel) => rotate_key(ctx, sel).await,
    }
}

/// `hive start --preload`: the node's default model, loaded within its `load_timeout`.
async fn preload_default(
    ctx: &Context,
    node: &crate::config::Node,
    conn: &crate::queen::node::NodeConn,
) -> Result<Option<crate::protocol::WorkerInfo>> {
    let config = ctx.config()?;
    let spec = config.model(node, None)?;
    let budget = Budget::new(spec.load_timeout);
    let spinner = ctx
        .progress
        .spinner(format!("{}: loading `{}`", node.name, spec.name));
    let info = conn.client.load_worker(&spec.name, &budget).await;
    spinner.finish_and_clear();
    info.map(Some)
}

async fn start(ctx: &Context, sel: NodeSelection, preload: bool) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        let budget = Budget::new(node.timeout);
        let mut conn = match ctx.open(&node, &budget).await {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, "unreachable", &e),
        };
        let models = match ctx.config() {
            Ok(config) => crate::queen::node_models(&config.models, &node),
            Err(e) => return NodeResult::failed(&node, "failed", &e),
        };
        let running = lifecycle::ensure_running(&mut conn, &models, &budget, &ctx.progress).await;
        // A hive that already ran gets the node's models as nodes.toml has them now: the way an
        // operator hands it a removed or added model without a request for it.
        let running = match running {
            Ok(r) if !r.started => conn
                .client
                .update_models(&models, budget.remaining())
                .await
                .map(|()| r),
            other => other,
        };
        let preloaded = match (&running, preload) {
            (Ok(_), true) => preload_default(ctx, &node, &conn).await,
            _ => Ok(None),
        };
        let workers = match preloaded {
            Ok(w) => w.map(|w| vec![w]),
            Err(e) => return NodeResult::failed(&node, "failed", &e),
        };
        match running {
            Ok(running) => NodeResult {
                workers,
                pid: running.health.signed.as_ref().map(|d| d.pid),
                uptime_s: running.health.signed.as_ref().map(|d| d.uptime_s),
                version: Some(running.health.version),
                ..NodeResult::new(
                    &node,
                    if running.started {
                        "started"
                    } else {
                        "running"
                    },
                )
            },
            Err(e) => NodeResult::failed(&node, "failed", &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "started" => format!(
            "{}: started (pid {}, ready in {:.2}s)",
            r.node,
            r.pid.unwrap_or(0),
            r.elapsed_ms / 1000.0
        ),
        "running" => format!("{}: already running (pid {})", r.node, r.pid.unwrap_or(0)),
        state => format!("{}: {state}", r.node),
    })
}

async fn stop(ctx: &Context, sel: NodeSelection, timeout: Option<Duration>) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        let budget = Budget::new(timeout.unwrap_or(node.timeout));
        let mut conn = match ctx.open(&node, &budget).await {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, "unreachable", &e),
        };
        match lifecycle::stop(&mut conn, &budget).await {
            Ok(Stopped::Stopped { pid }) => NodeResult {
                pid: u32::try_from(pid).ok(),
                ..NodeResult::new(&node, "stopped")
            },
            Ok(Stopped::NotRunning) => NodeResult::new(&node, "not_running"),
            Err(e) => NodeResult::failed(&node, "failed", &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "stopped" => format!("{}: stopped (pid {})", r.node, r.pid.unwrap_or(0)),
        "not_running" => format!("{}: not running", r.node),
        state => format!("{}: {state}", r.node),
    })
}

async fn install(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let config = ctx.config()?;
    let config = &config;
    let results = each_node(ctx, &sel, |node| async move {
        if node.transport == crate::config::Transport::Local {
            return NodeResult::new(&node, "local");
        }
        let budget = Budget::new(node.timeout);
        let mut conn = match ctx.open(&node, &budget).await {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, "unreachable", &e),
        };
        let session = match conn.ssh(&budget).await {
            Ok(s) => s,
            Err(e) => return NodeResult::failed(&node, "unreachable", &e),
        };
        let installed = match install::install_binary(session, &node, &ctx.progress).await {
            Ok(i) => i,
            Err(e) => return NodeResult::failed(&node, "failed", &e),
        };
        let key = crate::auth::Key::load_or_create(&node.key_file);
        let keyed = match key {
            Ok(key) => match install::enroll_key(session, &node, &key).await {
                Ok(install::Enrollment::Pending) => Err(install::not_enrolled(&node, &key)),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = keyed {
            return NodeResult::failed(&node, "failed", &e);
        }
        let mut models = Vec::new();
        for name in &node.models {
            // A model with a URL `source` is downloaded by the node itself, below.
            let Some(model) = config
                .models
                .get(name)
                .filter(|m| m.source.is_some() && m.download_url().is_none())
            else {
                continue;
            };
            match install::push_model(session, &node, model, &ctx.progress).await {
                Ok(pushed) => models.push(pushed),
                Err(e) => {
                    return NodeResult {
                        installed: Some(installed),
                        models,
                        ..NodeResult::failed(&node, "failed", &e)
                    };
                }
            }
        }
        let table = crate::queen::node_models(&config.models, &node);
        for name in &node.models {
            let Some(model) = config
                .models
                .get(name)
                .filter(|m| m.download_url().is_some())
            else {
                continue;
            };
            let pulled =
                crate::queen::fetch::pull(&mut conn, &table, model, &budget, &ctx.progress, |_| {})
                    .await;
            match pulled {
                Ok(pulled) => models.push(install::Pushed::from(pulled)),
                Err(e) => {
                    return NodeResult {
                        installed: Some(installed),
                        models,
                        ..NodeResult::failed(&node, "failed", &e)
                    };
                }
            }
        }
        NodeResult {
            installed: Some(installed),
            models,
            ..NodeResult::new(&node, "installed")
        }
    })
    .await?;
    finish(ctx, &results, |r| {
        let binary = match &r.installed {
            Some(i) if i.uploaded => format!("uploaded rbee ({:.1} MB)", i.bytes as f64 / 1e6),
            Some(_) => "rbee up to date".to_string(),
            None if r.state == "local" => "local node, nothing to install".to_string(),
            None => r.state.to_string(),
        };
        let models: Vec<String> = r
            .models
            .iter()
            .map(|m| format!("{} {}", m.model, m.action))
            .collect();
        if models.is_empty() {
            format!("{}: {binary}", r.node)
        } else {
            format!("{}: {binary}; {}", r.node, models.join(", "))
        }
    })
}

/// The state of a hive that runs but does not answer its health check.
const NOT_ANSWERING: &str = "not_answering";

async fn status(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let timeout = Duration::from_secs(5);
    let results = each_node(ctx, &sel, |node| async move {
        let budget = Budget::new(node.timeout);
        let mut conn = match ctx.open(&node, &budget).await {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, "unreachable", &e),
        };
        // The pidfile check below says whether a hive runs, so a channel sshd fails is not
        // retried through the bridge until it has (a stopped hive costs no bridge command).
        if let Some(forward) = conn.forward() {
            forward.fail_fast(true);
        }
        let unanswered = match answered(&conn, &node, timeout).await {
            Ok(result) => return result,
            Err(e) => e,
        };
        // The connection has forwarded to this node before and nothing listens on the hive's
        // socket now: no hive serves there, and no command need say so (a session start costs
        // sshd more than the rest of the status together).
        if conn.forward().is_some_and(|f| f.nothing_listens()) {
            return NodeResult::new(&node, "stopped");
        }
        // No answer: a hive holding its pidfile lock still runs, it only does not answer.
        match lifecycle::lock_holder(&mut conn, &budget).await {
            Ok(None) => NodeResult::new(&node, "stopped"),
            Ok(Some(pid)) => {
                // It runs, and sshd failed the channel to its socket: sshd refuses forwarding.
                if let Some(forward) = conn.forward().filter(|f| f.open_failed()) {
                    forward.use_bridge();
                    if let Ok(result) = answered(&conn, &node, timeout).await {
                        return result;
                    }
                }
                let err = Error::hive(format!(
                    "the hive on `{name}` runs (pid {pid} holds its pidfile) but does not \
                     answer: {unanswered}; it may be suspended or overloaded, and \
                     `rbee hive stop {name}` stops it",
                    name = node.name
                ));
                NodeResult {
                    pid: Some(pid),
                    ..NodeResult::failed(&node, NOT_ANSWERING, &err)
                }
            }
            Err(e) => NodeResult::failed(&node, "unreachable", &e),
        }
    })
    .await?;
    if ctx.out.json {
        for r in &results {
            ctx.out.json_line(r);
        }
    } else {
        let rows: Vec<Vec<String>> = results.iter().map(status_row).collect();
        ctx.out.result(&(), || {
            table(
                &["NODE", "STATE", "PID", "VERSION", "UPTIME", "WORKERS"],
                &rows,
            )
        });
    }
    worst(ctx, &results)?;
    if results.iter().any(|r| r.state != "running") {
        // Scripts can write `rbee hive status NODE && ...`.
        return Err(Error::Reported(ExitKind::HiveUnavailable));
    }
    Ok(())
}

/// The status of a hive that answered its health check, or why none did.
async fn answered(
    conn: &NodeConn,
    node: &Node,
    timeout: Duration,
) -> std::result::Result<NodeResult, Error> {
    match lifecycle::probe(&conn.client, timeout).await {
        Probe::Ready(h) | Probe::NeedsRestart(h) | Probe::Incompatible(h) => {
            let (pid, uptime_s, workers) = match h.signed {
                Some(d) => (Some(d.pid), Some(d.uptime_s), d.workers),
                None => (None, None, None),
            };
            let workers = match workers {
                Some(workers) => Some(workers),
                // A hive from before its health listed them.
                None => conn.client.workers(timeout).await.ok(),
            };
            Ok(NodeResult {
                pid,
                uptime_s,
                version: Some(h.version),
                workers,
                ..NodeResult::new(node, "running")
            })
        }
        // It answered, and refused this machine's key: it runs, and says who may ask.
        Probe::Refused(e) | Probe::Unreachable(e @ Error::Unauthenticated(_)) => {
            Ok(NodeResult::failed(node, "refused", &e))
        }
        Probe::Unreachable(e) => Err(e),
    }
}

fn status_row(r: &NodeResult) -> Vec<String> {
    let dash = || "-".to_string();
    let workers = r.workers.as_ref().map_or_else(dash, |w| {
        if w.is_empty() {
            "none".to_string()
        } else {
            w.iter()
                .map(|w| {
                    format!(
                        "{} ({}, {}/{} busy, {} queued)",
                        w.model,
                        crate::cmd::worker::state_name(w.state),
                        w.in_flight,
                        w.slots,
                        w.queued
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    });
    vec![
        r.node.clone(),
        r.state.to_string(),
        r.pid.map_or_else(dash, |p| p.to_string()),
        r.version.clone().unwrap_or_else(dash),
        r.uptime_s.map_or_else(dash, |u| format!("{u:.0}s")),
        workers,
    ]
}

/// Replaces each node's signing key without a moment where requests fail: the node first
/// accepts the new key beside the old, then this machine switches, then the node retires the
/// old key (after a short grace for requests signed just before).
async fn rotate_key(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        let budget = Budget::new(node.timeout);
        match rotate_one(ctx, &node, &budget).await {
            Ok(fingerprint) => NodeResult {
                detail: Some(fingerprint),
                ..NodeResult::new(&node, "rotated")
            },
            Err(e) => NodeResult::failed(&node, "failed", &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "rotated" => format!(
            "{}: signing key is now {}",
            r.node,
            r.detail.as_deref().unwrap_or("")
        ),
        state => format!("{}: {state}", r.node),
    })
}

async fn rotate_one(ctx: &Context, node: &Node, budget: &Budget) -> Result<String> {
    use crate::hive::keys::{KEY_FILE, NEXT_KEY_FILE};
    let new = crate::auth::Key::random();
    let mut conn = ctx.open(node, budget).await?;
    let local = conn.is_local();
    if !local {
        return rotate_enrolled(ctx, &mut conn, new, budget).await;
    }
    let running = matches!(
        lifecycle::probe(&conn.client, Duration::from_secs(2)).await,
        Probe::Ready(_) | Probe::NeedsRestart(_) | Probe::Incompatible(_) | Probe::Refused(_)
    );
    let node_dir = lifecycle::local_dir(node);
    if !running {
        // Nothing to coordinate: the node's key is this machine's file.
        new.save(&node_dir.join(KEY_FILE))?;
        return Ok(new.fingerprint());
    }
    new.save(&node_dir.join(NEXT_KEY_FILE))?;
    conn.client.keys("reload", Duration::from_secs(10)).await?;
    // The node accepts both keys now, so the retire may be signed with either.
    conn.client.keys("retire", Duration::from_secs(10)).await?;
    Ok(new.fingerprint())
}

/// Rotates this machine's enrolled key on an SSH node, leaving the other machines' keys as they
/// are: the hive (started for it when it is down) proves this machine is enrolled, the new key
/// goes in beside the old one and is accepted, this machine switches, then the old key is
/// retired (accepted a little longer, for requests signed just before the switch).
async fn rotate_enrolled(
    ctx: &Context,
    conn: &mut crate::queen::node::NodeConn,
    new: crate::auth::Key,
    budget: &Budget,
) -> Result<String> {
    let node = conn.node.clone();
    let models = crate::queen::node_models(&ctx.config()?.models, &node);
    lifecycle::ensure_running(conn, &models, budget, &ctx.progress).await?;
    let old = crate::auth::Key::load(&node.key_file)?;
    // A signed call first: a machine whose key the node does not accept puts nothing there.
    conn.client.key_list(Duration::from_secs(10)).await?;
    let name = format!("{}/{}.key", crate::hive::keys::KEYS_DIR, new.fingerprint());
    let session = conn.ssh(budget).await?;
    install::install_key(session, &node, &new, &name).await?;
    conn.client.keys("reload", Duration::from_secs(10)).await?;
    new.save(&node.key_file)?;
    conn.client
        .key_change("retire", &old.fingerprint(), Duration::from_secs(10))
        .await?;
    Ok(new.fingerprint())
}
