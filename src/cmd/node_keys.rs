//! `rbee nodes enroll|revoke|keys`: the keys of the controlling machines a node accepts. A
//! machine asks to be enrolled over SSH (its key waits in `<remote_dir>/keys/pending/`, first
//! come on a node with no key), a machine that already has access approves it by a signed
//! request, and any enrolled machine may revoke a key; the node records who did.

use serde::Serialize;

use crate::cmd::Context;
use crate::config::{Node, Transport};
use crate::deadline::Budget;
use crate::error::Result;
use crate::output::table;
use crate::queen::install::{self, Enrollment};
use crate::queen::lifecycle;
use crate::queen::node::NodeConn;

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Serialize)]
struct Changed<'a> {
    node: &'a str,
    kid: String,
    /// `enrolled` (already), `first` (the node's first key), `pending` (waits for approval),
    /// `approved`, `revoked`, or `local` (a local node's key is this machine's file).
    state: &'static str,
    accepted: Vec<String>,
}

/// The node's hive, started when it is down (which also enrolls this machine's key on a fresh
/// node, and refuses a machine the node does not know, saying what to run).
async fn hive(ctx: &Context, node: &Node, budget: &Budget) -> Result<NodeConn> {
    let mut conn = ctx.open(node, budget).await?;
    let models = crate::queen::node_models(&ctx.config()?.models, node);
    lifecycle::ensure_running(&mut conn, &models, budget, &ctx.progress).await?;
    Ok(conn)
}

pub(crate) async fn enroll(ctx: &Context, name: &str, approve: Option<&str>) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(name))?;
    let budget = Budget::new(node.timeout);
    let changed = if let Some(kid) = approve {
        let conn = hive(ctx, node, &budget).await?;
        let accepted = conn.client.key_change("enroll", kid, TIMEOUT).await?;
        ctx.audit_note(
            "key_enrolled",
            None,
            serde_json::json!({ "node": node.name, "kid": kid }),
        );
        Changed {
            node: &node.name,
            kid: kid.to_string(),
            state: "approved",
            accepted,
        }
    } else {
        let key = crate::auth::Key::load_or_create(&node.key_file)?;
        let state = if node.transport == Transport::Local {
            "local"
        } else {
            let mut conn = ctx.open(node, &budget).await?;
            let session = conn.ssh(&budget).await?;
            match install::enroll_key(session, node, &key).await? {
                Enrollment::Enrolled => "enrolled",
                Enrollment::First => "first",
                Enrollment::Pending => "pending",
            }
        };
        Changed {
            node: &node.name,
            kid: key.fingerprint(),
            state,
            accepted: Vec::new(),
        }
    };
    ctx.out.result(&changed, || match changed.state {
        "approved" => format!("{}: key {} enrolled", changed.node, changed.kid),
        "enrolled" | "local" => format!(
            "{}: this machine's key {} is enrolled",
            changed.node, changed.kid
        ),
        "first" => format!(
            "{}: this machine's key {} is the node's first key",
            changed.node, changed.kid
        ),
        _ => format!(
            "{0}: this machine's key {1} waits for approval; on a machine that has access, run \
             `rbee nodes enroll {0} --approve {1}`",
            changed.node, changed.kid
        ),
    });
    Ok(())
}

pub(crate) async fn revoke(ctx: &Context, name: &str, kid: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(name))?;
    let budget = Budget::new(node.timeout);
    let conn = hive(ctx, node, &budget).await?;
    let accepted = conn.client.key_change("revoke", kid, TIMEOUT).await?;
    ctx.audit_note(
        "key_revoked",
        None,
        serde_json::json!({ "node": node.name, "kid": kid }),
    );
    let changed = Changed {
        node: &node.name,
        kid: kid.to_string(),
        state: "revoked",
        accepted,
    };
    ctx.out.result(&changed, || {
        format!("{}: key {} revoked", changed.node, changed.kid)
    });
    Ok(())
}

#[derive(Serialize)]
struct Listed<'a> {
    node: &'a str,
    /// This machine's key id.
    this: String,
    enrolled: Vec<String>,
    pending: Vec<String>,
}

pub(crate) async fn list(ctx: &Context, name: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(Some(name))?;
    let budget = Budget::new(node.timeout);
    let conn = hive(ctx, node, &budget).await?;
    let keys = conn.client.key_list(TIMEOUT).await?;
    let listed = Listed {
        node: &node.name,
        this: crate::auth::Key::load(&node.key_file)?.fingerprint(),
        enrolled: keys.enrolled,
        pending: keys.pending,
    };
    ctx.out.result(&listed, || {
        let mut rows = Vec::new();
        for (kids, state) in [(&listed.enrolled, "enrolled"), (&listed.pending, "pending")] {
            for kid in kids {
                let this = if *kid == listed.this { "yes" } else { "" };
                rows.push(vec![kid.clone(), state.to_string(), this.to_string()]);
            }
        }
        table(&["KEY ID", "STATE", "THIS MACHINE"], &rows)
    });
    Ok(())
}
