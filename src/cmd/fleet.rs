//! Commands over several nodes: each node's result, run `parallel_nodes()` at a time, a
//! progress line per node on a terminal, and the worst exit code at the end.

use std::future::Future;
use std::io::IsTerminal;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use crate::cli::NodeSelection;
use crate::cmd::Context;
use crate::config::Node;
use crate::error::{Error, ExitKind, Result};
use crate::protocol::WorkerInfo;
use crate::queen::install::{Installed, Pushed};

#[derive(Debug, Default, Serialize)]
pub(crate) struct NodeResult {
    pub(crate) node: String,
    pub(crate) state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) uptime_s: Option<f64>,
    pub(crate) elapsed_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) workers: Option<Vec<WorkerInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) installed: Option<Installed>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) models: Vec<Pushed>,
    /// What else the command has to say about this node (a host key fingerprint...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exit_code: Option<u8>,
}

impl NodeResult {
    pub(crate) fn new(node: &Node, state: &'static str) -> NodeResult {
        NodeResult {
            node: node.name.clone(),
            state,
            ..NodeResult::default()
        }
    }

    pub(crate) fn failed(node: &Node, state: &'static str, err: &Error) -> NodeResult {
        NodeResult {
            error: Some(err.to_string()),
            exit_code: Some(err.code()),
            ..NodeResult::new(node, state)
        }
    }
}

/// Runs `action` on every selected node, `parallel_nodes()` at a time, results in order.
pub(crate) async fn each_node<F, Fut>(
    ctx: &Context,
    sel: &NodeSelection,
    action: F,
) -> Result<Vec<NodeResult>>
where
    F: Fn(Node) -> Fut,
    Fut: Future<Output = NodeResult>,
{
    let nodes = ctx.selected_nodes(sel)?;
    let show_progress = nodes.len() > 1 && std::io::stderr().is_terminal() && !ctx.out.quiet;
    let results = futures::stream::iter(nodes)
        .map(|node| {
            let started = Instant::now();
            let fut = action(node);
            async move {
                let mut result = fut.await;
                result.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                if show_progress {
                    ctx.progress
                        .suspend(|| eprintln!("  {}: {}", result.node, result.state));
                }
                result
            }
        })
        .buffered(crate::cmd::parallel_nodes())
        .collect()
        .await;
    Ok(results)
}

/// Prints each node's result, then turns failures into the worst exit code.
pub(crate) fn finish(
    ctx: &Context,
    results: &[NodeResult],
    text: impl Fn(&NodeResult) -> String,
) -> Result<()> {
    for r in results {
        let event = match r.state {
            "started" => Some("hive_started"),
            "stopped" => Some("hive_stopped"),
            "installed" => Some("hive_installed"),
            "rotated" => Some("key_rotated"),
            _ => None,
        };
        if let Some(event) = event {
            ctx.audit_note(
                event,
                None,
                serde_json::json!({
                    "node": r.node,
                    "pid": r.pid,
                    "uploaded": r.installed.as_ref().map(|i| i.uploaded),
                    "key": r.detail,
                }),
            );
        }
        ctx.out.result(r, || text(r));
    }
    worst(ctx, results)
}

pub(crate) fn worst(ctx: &Context, results: &[NodeResult]) -> Result<()> {
    let failed: Vec<&NodeResult> = results.iter().filter(|r| r.exit_code.is_some()).collect();
    let Some(code) = failed.iter().filter_map(|r| r.exit_code).max() else {
        if results.len() > 1 && std::io::stderr().is_terminal() {
            ctx.out.note(format!("all {} nodes ok", results.len()));
        }
        return Ok(());
    };
    if results.len() > 1 {
        ctx.out.note(format!(
            "{} of {} nodes failed",
            failed.len(),
            results.len()
        ));
    }
    let detail: Vec<String> = failed
        .iter()
        .map(|r| format!("{}: {}", r.node, r.error.as_deref().unwrap_or(r.state)))
        .collect();
    Err(Error::Classified {
        kind: ExitKind::from_code(code),
        message: detail.join("\n"),
    })
}
