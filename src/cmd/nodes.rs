//! `rbee nodes list`: the configured nodes and the models they serve.

use serde::Serialize;

use crate::cli::NodesCommand;
use crate::cmd::Context;
use crate::config::{Model, Node};
use crate::error::Result;
use crate::output::table;

#[derive(Serialize)]
struct Listing<'a> {
    source: String,
    nodes: Vec<&'a Node>,
    models: Vec<&'a Model>,
}

pub async fn run(ctx: &Context, command: NodesCommand) -> Result<()> {
    match command {
        NodesCommand::List => list(ctx),
    }
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
