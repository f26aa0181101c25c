//! `rbee audit verify|tail|note`: the hash-chained logs of this machine and of nodes, and the
//! cross-check that every record head a node returned to this machine is still in its log.

use std::path::PathBuf;

use serde::Serialize;

use crate::audit::{self, Head, Record, Verified};
use crate::cli::AuditCommand;
use crate::cmd::Context;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::ssh::remote;

pub(crate) async fn run(ctx: &Context, command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { node, all } => verify(ctx, node.as_deref(), all).await,
        AuditCommand::Tail { node, n } => tail(ctx, node.as_deref(), n).await,
        AuditCommand::Note { message } => {
            let head = ctx.audit().record(
                "operator_note",
                None,
                serde_json::json!({ "message": message }),
            )?;
            ctx.out
                .result(&head, || format!("recorded as seq {}", head.seq));
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct Report {
    log: String,
    ok: bool,
    records: u64,
    head: Option<Head>,
    witnessed: usize,
    error: Option<String>,
}

async fn verify(ctx: &Context, node: Option<&str>, all: bool) -> Result<()> {
    let mut reports = Vec::new();
    let queen = audit::verify(&ctx.audit().path);
    let queen_records = queen
        .as_ref()
        .map(|v| v.records_list.clone())
        .unwrap_or_default();
    if node.is_none() {
        reports.push(report("queen".to_string(), queen.map(|v| (v, 0))));
    }
    if node.is_some() || all {
        let config = ctx.config()?;
        let nodes: Vec<&Node> = match node {
            Some(name) => vec![config.node(Some(name))?],
            None => config.nodes.values().collect(),
        };
        for node in nodes {
            let result = verify_node(ctx, node, &queen_records).await;
            reports.push(match result {
                Ok(outcome) => report(node.name.clone(), outcome),
                Err(e) => Report {
                    log: node.name.clone(),
                    ok: false,
                    records: 0,
                    head: None,
                    witnessed: 0,
                    error: Some(e.to_string()),
                },
            });
        }
    }
    for r in &reports {
        ctx.out.result(r, || match &r.error {
            None => format!(
                "{}: intact, {} records, head seq {}{}",
                r.log,
                r.records,
                r.head.as_ref().map_or(0, |h| h.seq),
                if r.witnessed > 0 {
                    format!(", {} witnessed heads present", r.witnessed)
                } else {
                    String::new()
                }
            ),
            Some(e) => format!("{}: BROKEN: {e}", r.log),
        });
    }
    let broken: Vec<&Report> = reports.iter().filter(|r| !r.ok).collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "audit verification failed for {}",
            broken
                .iter()
                .map(|r| r.log.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn report(log: String, outcome: std::result::Result<(Verified, usize), audit::Break>) -> Report {
    match outcome {
        Ok((v, witnessed)) => Report {
            log,
            ok: true,
            records: v.records,
            head: v.head,
            witnessed,
            error: None,
        },
        Err(b) => Report {
            log,
            ok: false,
            records: 0,
            head: None,
            witnessed: 0,
            error: Some(b.to_string()),
        },
    }
}

/// A node's log as stored on the node: (file name, bytes), oldest first.
async fn fetch(ctx: &Context, node: &Node) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    if node.transport == Transport::Local {
        let path = crate::queen::lifecycle::local_dir(node).join(audit::FILE);
        let mut files = audit::rotated(&path);
        files.push(path);
        return Ok(files
            .into_iter()
            .filter_map(|f| std::fs::read(&f).ok().map(|b| (f, b)))
            .collect());
    }
    let budget = Budget::new(node.timeout);
    let mut conn = ctx.open(node, &budget).await?;
    let session = conn.ssh(&budget).await?;
    let mut files = Vec::new();
    for n in 1.. {
        let name = format!("{}.{n}", audit::FILE);
        let out = session
            .exec(&remote::read_file(&node.remote_dir, &name), None)
            .await?;
        if !out.ok() {
            break;
        }
        files.push((PathBuf::from(name), out.stdout));
    }
    let out = session
        .exec(&remote::read_file(&node.remote_dir, audit::FILE), None)
        .await?;
    if out.ok() {
        files.push((
            PathBuf::from(format!("{}:{}", node.name, audit::FILE)),
            out.stdout,
        ));
    }
    Ok(files)
}

async fn verify_node(
    ctx: &Context,
    node: &Node,
    queen: &[Record],
) -> Result<std::result::Result<(Verified, usize), audit::Break>> {
    let files = fetch(ctx, node).await?;
    let verified = match audit::verify_contents(&files) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    // Every head the node returned to this machine must still be in its log: a node-side
    // truncation or rewrite shows even when the chain was recomputed.
    let mut witnessed = 0;
    for record in queen.iter().filter(|r| {
        r.event == "infer_completed"
            && r.fields.get("node").and_then(|v| v.as_str()) == Some(&node.name)
    }) {
        let Some(head) = record
            .fields
            .get("node_audit")
            .and_then(|v| serde_json::from_value::<Head>(v.clone()).ok())
        else {
            continue;
        };
        if verified.hashes.get(&head.seq) != Some(&head.hash) {
            return Ok(Err(audit::Break {
                file: files.last().map(|f| f.0.clone()).unwrap_or_default(),
                line: 0,
                seq: Some(head.seq),
                why: format!(
                    "the record seq {} ({}) that the node returned for request {} is missing \
                     from its log: the log was truncated or rewritten",
                    head.seq,
                    &head.hash[..16.min(head.hash.len())],
                    record.request_id.as_deref().unwrap_or("?")
                ),
            }));
        }
        witnessed += 1;
    }
    Ok(Ok((verified, witnessed)))
}

async fn tail(ctx: &Context, node: Option<&str>, n: usize) -> Result<()> {
    let files = match node {
        None => {
            let path = ctx.audit().path;
            vec![(path.clone(), std::fs::read(&path).unwrap_or_default())]
        }
        Some(name) => {
            let config = ctx.config()?;
            fetch(ctx, config.node(Some(name))?).await?
        }
    };
    let text: String = files
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(n)..] {
        if ctx.out.json {
            println!("{line}");
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => println!(
                "{:>5}  {}  {:<18} {}{}",
                r.seq,
                r.ts,
                r.event,
                r.request_id
                    .map(|id| format!("[{id}] "))
                    .unwrap_or_default(),
                serde_json::Value::Object(r.fields)
            ),
            Err(_) => println!("?      {line}"),
        }
    }
    Ok(())
}
