//! `rbee audit verify|tail|note`: the hash-chained logs of this machine and of nodes, and the
//! cross-check that every record head a node returned to this machine is still in its log.

use std::path::PathBuf;

use serde::Serialize;

use crate::audit::{self, Head, Record, Verified};
use crate::cli::AuditCommand;
use crate::cmd::Context;
use crate::config::{Node, Transport};
use std::io::Write;

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
    let queen_path = ctx.audit().path;
    let queen = audit::verify(&queen_path);
    let queen_records = queen
        .as_ref()
        .map(|v| v.records_list.clone())
        .unwrap_or_default();
    let mut node_reports = Vec::new();
    let mut witnesses = Vec::new();
    if node.is_some() || all {
        let config = ctx.config()?;
        let nodes: Vec<&Node> = match node {
            Some(name) => vec![config.node(Some(name))?],
            None => config.nodes.values().collect(),
        };
        let me = crate::queen::trail::audit_id();
        for node in nodes {
            let result = verify_node(ctx, node, &queen_records, &me).await;
            node_reports.push(match result {
                Ok(checked) => {
                    witnesses.extend(checked.witnesses);
                    report(node.name.clone(), checked.outcome)
                }
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
    let mut reports = Vec::new();
    if node.is_none() {
        let outcome = queen.and_then(|v| {
            let held = witnessed_by_nodes(&queen_path, &v, &witnesses)?;
            Ok((v, held))
        });
        reports.push(report("queen".to_string(), outcome));
    }
    reports.extend(node_reports);
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

/// A head of this machine's log that a node kept with a request it served.
struct Witness {
    node: String,
    head: audit::QueenHead,
    request_id: Option<String>,
    /// The node's record that keeps it: file and line.
    at: (PathBuf, usize),
}

/// Checks this machine's log against the heads the nodes kept of it: a log rewritten (even
/// with its chain recomputed), cut or deleted no longer holds them. Returns how many it holds.
fn witnessed_by_nodes(
    path: &std::path::Path,
    log: &Verified,
    witnesses: &[Witness],
) -> std::result::Result<usize, audit::Break> {
    for w in witnesses {
        let head = &w.head;
        if log.hashes.get(&head.seq) == Some(&head.hash) {
            continue;
        }
        if log
            .pruned_through
            .is_some_and(|through| head.seq <= through)
        {
            eprintln!(
                "rbee: note: node `{}` witnessed seq {} of {}, in a rotated file the retention \
                 bound dropped (an `audit_pruned` record says so)",
                w.node,
                head.seq,
                path.display()
            );
            continue;
        }
        let what = if log.hashes.contains_key(&head.seq) {
            "this log holds another record there: it was rewritten".to_string()
        } else if log.records == 0 {
            "this log holds no records: it was deleted".to_string()
        } else {
            format!(
                "this log ends at seq {}: records were cut from its end",
                log.head.as_ref().map_or(0, |h| h.seq)
            )
        };
        let (file, line) = log.place_of(head.seq, path);
        return Err(audit::Break {
            file,
            line,
            seq: Some(head.seq),
            why: format!(
                "node `{}` witnessed seq {} ({}) for request {} (its record at {}:{}), but {what}",
                w.node,
                head.seq,
                short(&head.hash),
                w.request_id.as_deref().unwrap_or("?"),
                w.at.0.display(),
                w.at.1,
            ),
        });
    }
    Ok(witnesses.len())
}

fn short(hash: &str) -> &str {
    &hash[..16.min(hash.len())]
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

/// What checking a node's log found, and the heads of this machine's log that it keeps.
struct NodeChecked {
    outcome: std::result::Result<(Verified, usize), audit::Break>,
    witnesses: Vec<Witness>,
}

async fn verify_node(
    ctx: &Context,
    node: &Node,
    queen: &[Record],
    me: &str,
) -> Result<NodeChecked> {
    let files = fetch(ctx, node).await?;
    let verified = match audit::verify_contents(&files) {
        Ok(v) => v,
        Err(b) => {
            return Ok(NodeChecked {
                outcome: Err(b),
                witnesses: Vec::new(),
            });
        }
    };
    let node_path = PathBuf::from(format!("{}:{}", node.name, audit::FILE));
    let witnesses = verified
        .records_list
        .iter()
        .filter(|r| r.event == "request_started")
        .filter_map(|r| {
            let head = r.fields.get("queen_audit")?;
            let head = serde_json::from_value::<audit::QueenHead>(head.clone()).ok()?;
            // Heads of other queens sharing this node are theirs to check.
            (head.queen == me).then(|| Witness {
                node: node.name.clone(),
                head,
                request_id: r.request_id.clone(),
                at: verified.place_of(r.seq, &node_path),
            })
        })
        .collect();
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
        if verified
            .pruned_through
            .is_some_and(|through| head.seq <= through)
        {
            eprintln!(
                "rbee: note: this machine witnessed seq {} of node `{}`'s log, in a rotated file \
                 its retention bound dropped (an `audit_pruned` record says so)",
                head.seq, node.name
            );
            continue;
        }
        if verified.hashes.get(&head.seq) != Some(&head.hash) {
            let (file, line) = verified.place_of(head.seq, &node_path);
            let what = if verified.hashes.contains_key(&head.seq) {
                format!(
                    "another record holds seq {}: the log was rewritten",
                    head.seq
                )
            } else {
                format!(
                    "the log ends at seq {}: it was cut",
                    verified.head.as_ref().map_or(0, |h| h.seq)
                )
            };
            return Ok(NodeChecked {
                outcome: Err(audit::Break {
                    file,
                    line,
                    seq: Some(head.seq),
                    why: format!(
                        "the record seq {} ({}) that the node returned for request {} is missing \
                         from its log: {what}",
                        head.seq,
                        short(&head.hash),
                        record.request_id.as_deref().unwrap_or("?")
                    ),
                }),
                witnesses,
            });
        }
        witnessed += 1;
    }
    Ok(NodeChecked {
        outcome: Ok((verified, witnessed)),
        witnesses,
    })
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
    let mut out = std::io::stdout().lock();
    for line in &lines[lines.len().saturating_sub(n)..] {
        let written = if ctx.out.json {
            writeln!(out, "{line}")
        } else {
            match serde_json::from_str::<Record>(line) {
                Ok(r) => writeln!(
                    out,
                    "{:>5}  {}  {:<18} {}{}",
                    r.seq,
                    r.ts,
                    r.event,
                    r.request_id
                        .map(|id| format!("[{id}] "))
                        .unwrap_or_default(),
                    serde_json::Value::Object(r.fields)
                ),
                Err(_) => writeln!(out, "?      {line}"),
            }
        };
        if let Err(e) = written {
            return crate::output::ended_by(e);
        }
    }
    out.flush().or_else(crate::output::ended_by)
}
