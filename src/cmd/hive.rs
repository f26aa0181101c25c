//! `rbee hive start|stop|status`: the hive daemon on each selected node, all nodes at once; one
//! failing node does not stop the others, and the exit code is the worst one.

use std::time::Duration;

use serde::Serialize;

use crate::cli::{HiveCommand, NodeSelection};
use crate::client::HiveClient;
use crate::cmd::Context;
use crate::config::Node;
use crate::deadline::Budget;
use crate::error::{Error, ExitKind, Result};
use crate::lifecycle::{self, Probe, Stopped};
use crate::output::table;
use crate::wire::WorkerInfo;

pub async fn run(ctx: &Context, command: HiveCommand) -> Result<()> {
    match command {
        HiveCommand::Start(sel) => start(ctx, sel).await,
        HiveCommand::Stop(sel) => stop(ctx, sel).await,
        HiveCommand::Status(sel) => status(ctx, sel).await,
        HiveCommand::Serve(args) => crate::hive::serve(args),
    }
}

#[derive(Debug, Serialize)]
struct NodeResult {
    node: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    elapsed_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<Vec<WorkerInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u8>,
}

impl NodeResult {
    fn new(node: &Node, state: &'static str) -> NodeResult {
        NodeResult {
            node: node.name.clone(),
            state,
            pid: None,
            version: None,
            uptime_s: None,
            elapsed_ms: None,
            workers: None,
            error: None,
            exit_code: None,
        }
    }

    fn failed(node: &Node, err: &Error) -> NodeResult {
        NodeResult {
            error: Some(err.message.clone()),
            exit_code: Some(err.code()),
            ..NodeResult::new(node, "error")
        }
    }
}

/// Runs `action` on every selected node concurrently and reports each result.
async fn each_node<F, Fut>(ctx: &Context, sel: &NodeSelection, action: F) -> Result<Vec<NodeResult>>
where
    F: Fn(Node) -> Fut,
    Fut: std::future::Future<Output = NodeResult>,
{
    let config = ctx.config()?;
    let nodes = config.select_nodes(&sel.nodes, sel.all)?;
    let results = futures::future::join_all(nodes.into_iter().cloned().map(action)).await;
    Ok(results)
}

fn finish(
    ctx: &Context,
    results: &[NodeResult],
    text: impl Fn(&NodeResult) -> String,
) -> Result<()> {
    for r in results {
        ctx.out.result(r, || text(r));
    }
    let failed: Vec<&NodeResult> = results.iter().filter(|r| r.exit_code.is_some()).collect();
    let worst = failed.iter().filter_map(|r| r.exit_code).max();
    match worst {
        None => Ok(()),
        Some(code) => {
            let kind = [
                ExitKind::Config,
                ExitKind::Ssh,
                ExitKind::Unauthenticated,
                ExitKind::HiveUnavailable,
                ExitKind::WorkerUnavailable,
                ExitKind::Deadline,
            ]
            .into_iter()
            .find(|k| k.code() == code)
            .unwrap_or(ExitKind::Internal);
            let detail: Vec<String> = failed
                .iter()
                .map(|r| format!("{}: {}", r.node, r.error.as_deref().unwrap_or(r.state)))
                .collect();
            Err(Error::new(kind, detail.join("\n")))
        }
    }
}

async fn start(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        let budget = Budget::new(node.timeout);
        let client = match HiveClient::for_node(&node) {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, &e),
        };
        match lifecycle::ensure_running(&node, &client, &budget).await {
            Ok(running) => NodeResult {
                pid: Some(running.health.pid),
                version: Some(running.health.version),
                uptime_s: Some(running.health.uptime_s),
                elapsed_ms: Some(running.elapsed.as_secs_f64() * 1000.0),
                ..NodeResult::new(
                    &node,
                    if running.started {
                        "started"
                    } else {
                        "running"
                    },
                )
            },
            Err(e) => NodeResult::failed(&node, &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "started" => format!(
            "{}: started (pid {}, ready in {:.2}s)",
            r.node,
            r.pid.unwrap_or(0),
            r.elapsed_ms.unwrap_or(0.0) / 1000.0
        ),
        "running" => format!("{}: already running (pid {})", r.node, r.pid.unwrap_or(0)),
        _ => format!("{}: failed", r.node),
    })
}

async fn stop(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let results = each_node(ctx, &sel, |node| async move {
        let client = match HiveClient::for_node(&node) {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, &e),
        };
        match lifecycle::stop(&node, &client).await {
            Ok(Stopped::Stopped { pid }) => NodeResult {
                pid: u32::try_from(pid).ok(),
                ..NodeResult::new(&node, "stopped")
            },
            Ok(Stopped::NotRunning) => NodeResult::new(&node, "not_running"),
            Err(e) => NodeResult::failed(&node, &e),
        }
    })
    .await?;
    finish(ctx, &results, |r| match r.state {
        "stopped" => format!("{}: stopped (pid {})", r.node, r.pid.unwrap_or(0)),
        "not_running" => format!("{}: not running", r.node),
        _ => format!("{}: failed", r.node),
    })
}

async fn status(ctx: &Context, sel: NodeSelection) -> Result<()> {
    let timeout = Duration::from_secs(5);
    let results = each_node(ctx, &sel, |node| async move {
        let client = match HiveClient::for_node(&node) {
            Ok(c) => c,
            Err(e) => return NodeResult::failed(&node, &e),
        };
        match lifecycle::probe(&client, timeout).await {
            Probe::Ready(h) | Probe::NeedsRestart(h) => NodeResult {
                pid: Some(h.pid),
                version: Some(h.version),
                uptime_s: Some(h.uptime_s),
                workers: client.workers(timeout).await.ok(),
                ..NodeResult::new(&node, "running")
            },
            Probe::Unreachable(_) => NodeResult::new(&node, "stopped"),
        }
    })
    .await?;
    if ctx.out.json {
        for r in &results {
            ctx.out.json_line(r);
        }
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    r.state.to_string(),
                    r.pid.map_or("-".into(), |p| p.to_string()),
                    r.version.clone().unwrap_or_else(|| "-".into()),
                    r.uptime_s.map_or("-".into(), |u| format!("{u:.0}s")),
                    r.workers.as_ref().map_or("-".into(), |w| {
                        if w.is_empty() {
                            "none".to_string()
                        } else {
                            w.iter()
                                .map(|w| {
                                    format!(
                                        "{} ({})",
                                        w.model,
                                        crate::cmd::worker::state_name(w.state)
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    }),
                ]
            })
            .collect();
        ctx.out.result(&(), || {
            table(
                &["NODE", "STATE", "PID", "VERSION", "UPTIME", "WORKERS"],
                &rows,
            )
        });
    }
    let errors: Vec<&NodeResult> = results.iter().filter(|r| r.exit_code.is_some()).collect();
    if let Some(first) = errors.first() {
        return Err(Error::new(
            ExitKind::from_wire_code("internal"),
            first.error.clone().unwrap_or_default(),
        ));
    }
    if results.iter().any(|r| r.state != "running") {
        // Scripts can write `rbee hive status NODE && ...`.
        return Err(Error::new(ExitKind::HiveUnavailable, String::new()));
    }
    Ok(())
}
