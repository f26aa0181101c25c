//! `rbee logs [NODE] [--model MODEL] [-n N] [-f]`: a node's hive log, or a model's worker log,
//! read from the node over the same connection as every request (a signed hive endpoint whose
//! every line is proven as the node's); when the hive does not answer, the file itself is read
//! (over SSH for a remote node), so a stopped or failed hive's log can still be seen.

use std::io::Write;

use futures::StreamExt;

use crate::cmd::Context;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::{Error, ExitKind, Result};
use crate::protocol::sse::{StreamError, events};
use crate::queen::node::NodeConn;
use crate::ssh::remote;

pub(crate) async fn run(
    ctx: &Context,
    node: Option<&str>,
    model: Option<&str>,
    lines: usize,
    follow: bool,
) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    if let Some(model) = model {
        config.model(node, Some(model))?;
    }
    let budget = Budget::new(node.timeout);
    let mut conn = ctx.open(node, &budget).await?;
    let response = match conn.client.logs(lines, follow, model).await {
        Ok(response) => response,
        Err(e) if e.kind() == ExitKind::HiveUnavailable => {
            return from_the_file(ctx, &mut conn, &budget, model, lines, follow, e).await;
        }
        Err(e) => return Err(e),
    };
    let mut stream = std::pin::pin!(events(response));
    // One watch for the whole stream: each is a blocking thread.
    let mut closed = std::pin::pin!(crate::output::stdout_closed());
    loop {
        let event = tokio::select! {
            // The reader went away while the log is quiet (`rbee logs -f | head`, the first
            // lines read): done, quietly, without waiting for the hive's next line.
            () = &mut closed => return Ok(()),
            event = stream.next() => event,
        };
        let Some(event) = event else { break };
        let event = match event {
            Ok(event) => event,
            Err(StreamError::Broke(cause)) => {
                return Err(Error::hive(format!(
                    "the connection to the hive on `{}` broke while reading its log: {cause}",
                    node.name
                )));
            }
            Err(StreamError::Malformed(e)) => return Err(e),
        };
        match event.event.as_str() {
            "line" => {
                let value: serde_json::Value = serde_json::from_str(&event.data)
                    .map_err(|e| Error::hive(format!("an unreadable log line: {e}")))?;
                let text = value["text"].as_str().unwrap_or_default();
                // The reader went away (`rbee logs -f | head`): done, quietly; a full disk is
                // an error.
                if let Err(e) = print(ctx, node, model, text) {
                    return crate::output::ended_by(e);
                }
            }
            "end" => return Ok(()),
            "error" => {
                let body: crate::protocol::ErrorBody = serde_json::from_str(&event.data)
                    .map_err(|e| Error::hive(format!("an unreadable error event: {e}")))?;
                return Err(Error::of_kind(
                    crate::error::ExitKind::from_wire_code(&body.code),
                    body.message,
                ));
            }
            _ => {}
        }
    }
    Err(Error::hive(format!(
        "the hive on `{}` ended its log stream early",
        node.name
    )))
}

/// One log line on stdout, as text or as `{"node", "model", "line"}`.
fn print(ctx: &Context, node: &Node, model: Option<&str>, text: &str) -> std::io::Result<()> {
    if ctx.out.json {
        ctx.out.try_json_line(&serde_json::json!({
            "node": node.name, "model": model, "line": text,
        }))
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush())
    }
}

/// The last `lines` lines of the log file itself (and of its newest rotated file before it),
/// for a hive that does not answer (`down` says why): read over SSH on a remote node, from the
/// disk on a local one. These lines are
/// the file's, not proven by the hive's key. Following needs a running hive: after the lines,
/// `-f` ends with `down`, saying how to start it.
async fn from_the_file(
    ctx: &Context,
    conn: &mut NodeConn,
    budget: &Budget,
    model: Option<&str>,
    lines: usize,
    follow: bool,
    down: Error,
) -> Result<()> {
    let node = conn.node.clone();
    let name = match model {
        Some(model) => crate::hive::logs::worker_log_name(model),
        None => crate::hive::LOG_FILE.to_string(),
    };
    let text = match node.transport {
        Transport::Local => {
            let path = crate::queen::lifecycle::local_dir(&node).join(&name);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    // The newest rotated file first, for a log rotated since (as on a node).
                    let mut older =
                        std::fs::read(path.with_file_name(format!("{name}.1"))).unwrap_or_default();
                    if !older.is_empty() && !older.ends_with(b"\n") {
                        older.push(b'\n');
                    }
                    older.extend_from_slice(&bytes);
                    Some(String::from_utf8_lossy(&older).into_owned())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::from(crate::error::IoError::at("read", &path, e)));
                }
            }
        }
        Transport::Ssh | Transport::Http => {
            let session = conn.ssh(budget).await?;
            let out = session
                .exec(&remote::log_tail(&node.remote_dir, &name, lines), None)
                .await?;
            match out.code {
                Some(0) => Some(out.stdout_text()),
                Some(remote::LOG_MISSING) => None,
                code => {
                    return Err(Error::from(crate::ssh::SshError::Command {
                        target: session.target.describe(),
                        what: format!("reading `{name}`"),
                        code: code.map_or("?".to_string(), |c| c.to_string()),
                        stderr: out.stderr_text(),
                    }));
                }
            }
        }
    };
    let Some(text) = text else {
        return Err(Error::hive(format!(
            "node `{}` has no `{name}` in `{}` ({down}); the hive has not run there yet: start it \
             with `rbee hive start {}`",
            node.name, node.remote_dir, node.name
        )));
    };
    tracing::info!(node = %node.name, "the hive does not answer ({down}); reading `{name}` itself");
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        if let Err(e) = print(ctx, &node, model, line) {
            return crate::output::ended_by(e);
        }
    }
    if follow {
        return Err(Error::hive(format!(
            "{down}; the lines above are the last of `{name}` as the file holds them, and none \
             is written while the hive is down: start it with `rbee hive start {}` to follow",
            node.name
        )));
    }
    Ok(())
}
