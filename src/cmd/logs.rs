//! `rbee logs [NODE] [--model MODEL] [-n N] [-f]`: a node's hive log, or a model's worker log,
//! read from the node over the same connection as every request (a signed hive endpoint whose
//! every line is proven as the node's).

use std::io::Write;

use futures::StreamExt;

use crate::cmd::Context;
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::protocol::sse::{StreamError, events};

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
    let conn = ctx.open(node, &budget).await?;
    let response = conn.client.logs(lines, follow, model).await?;
    let mut stream = std::pin::pin!(events(response));
    while let Some(event) = stream.next().await {
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
                let written = if ctx.out.json {
                    ctx.out.try_json_line(&serde_json::json!({
                        "node": node.name, "model": model, "line": text,
                    }))
                } else {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{text}").and_then(|()| out.flush())
                };
                // The reader went away (`rbee logs -f | head`): done, quietly.
                if written.is_err() {
                    return Ok(());
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
