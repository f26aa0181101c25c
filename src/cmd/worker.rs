//! `rbee worker list|stop|restart|cancel`: the llama.cpp workers of a node's hive.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cli::WorkerOp;
use crate::cmd::Context;
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::output::table;
use crate::protocol::{RequestInfo, RequestStage, WorkerInfo, WorkerState};

const TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(ctx: &Context, command: WorkerOp) -> Result<()> {
    match command {
        WorkerOp::List { node } => list(ctx, node.as_deref()).await,
        WorkerOp::Stop { node, model } => stop(ctx, node.as_deref(), &model).await,
        WorkerOp::Restart { node, model } => restart(ctx, node.as_deref(), &model).await,
        WorkerOp::Cancel { node, request_id } => cancel(ctx, node.as_deref(), &request_id).await,
    }
}

pub(crate) fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Loading => "loading",
        WorkerState::Ready => "ready",
        WorkerState::Busy => "busy",
        WorkerState::Restarting => "restarting",
        WorkerState::Failed => "failed",
    }
}

async fn list(ctx: &Context, node: Option<&str>) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    let conn = ctx.open(node, &Budget::new(node.timeout)).await?;
    let client = &conn.client;
    let workers = client.workers(TIMEOUT).await?;
    let requests = client.requests(TIMEOUT).await?;
    if ctx.out.json {
        ctx.out.json_line(&serde_json::json!({
            "node": node.name,
            "workers": workers,
            "requests": requests,
        }));
        return Ok(());
    }
    if workers.is_empty() {
        ctx.out.note(format!("{}: no workers running", node.name));
    } else {
        let headers = [
            "MODEL",
            "STATE",
            "BUSY",
            "PID",
            "SOCKET",
            "UP",
            "LOAD",
            "OFFLOAD",
            "SERVED",
            "QUEUED",
            "RESTARTS",
            "LAST EXIT",
            "HELD BACK",
        ];
        let rows: Vec<Vec<String>> = workers.iter().map(row).collect();
        ctx.out.result(&(), || table(&headers, &rows));
    }
    if !requests.is_empty() {
        let rows: Vec<Vec<String>> = requests.iter().map(request_row).collect();
        let headers = ["REQUEST", "MODEL", "STAGE", "AGE", "BUDGET LEFT"];
        ctx.out
            .result(&(), || format!("\n{}", table(&headers, &rows)));
    }
    Ok(())
}

fn request_row(r: &RequestInfo) -> Vec<String> {
    let stage = match r.stage {
        RequestStage::Queued => "queued",
        RequestStage::Loading => "loading",
        RequestStage::Generating => "generating",
    };
    vec![
        r.request_id.clone(),
        r.model.clone(),
        stage.to_string(),
        format!("{}ms", r.age_ms),
        format!("{}ms", r.remaining_ms),
    ]
}

fn row(w: &WorkerInfo) -> Vec<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dash = || "-".to_string();
    vec![
        w.model.clone(),
        state_name(w.state).to_string(),
        // In flight of the slots the hive counts (auto: the count it chose at load).
        if w.slots > 0 {
            format!("{}/{}", w.in_flight, w.slots)
        } else {
            w.in_flight.to_string()
        },
        w.pid.map_or_else(dash, |p| p.to_string()),
        w.socket.as_deref().map_or_else(dash, |s| {
            std::path::Path::new(s)
                .file_name()
                .map_or_else(|| s.to_string(), |n| n.to_string_lossy().into_owned())
        }),
        w.started_at
            .map_or_else(dash, |t| format!("{}s", now.saturating_sub(t))),
        w.load_ms.map_or_else(dash, |ms| format!("{ms:.0}ms")),
        w.offload.as_ref().map_or_else(dash, |o| {
            format!("{} layers on {}", o.gpu_layers, o.devices.join(", "))
        }),
        w.requests_served.to_string(),
        w.queued.to_string(),
        w.restart_count.to_string(),
        w.last_exit.clone().unwrap_or_else(dash),
        w.failed_reason.clone().map_or_else(dash, |r| {
            let closes = w.breaker_closes_at.map_or(String::new(), |t| {
                format!(" (closes in {}s)", t.saturating_sub(now))
            });
            format!("{r}{closes}")
        }),
    ]
}

async fn stop(ctx: &Context, node: Option<&str>, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    config.model(node, Some(model))?;
    let conn = ctx.open(node, &Budget::new(node.timeout)).await?;
    let stopped = conn.client.stop_worker(model, TIMEOUT).await?;
    let value = serde_json::json!({ "node": node.name, "model": model, "stopped": stopped });
    // The same exit code with `--json`: a script must see that nothing was stopped.
    if !stopped {
        return Err(Error::worker(format!(
            "no worker for `{model}` runs on `{}`",
            node.name
        )));
    }
    ctx.out.result(&value, || {
        format!("{}: stopped the worker for `{model}`", node.name)
    });
    Ok(())
}

async fn restart(ctx: &Context, node: Option<&str>, model: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    let spec = config.model(node, Some(model))?;
    // The hive waits for the load up to the model's `load_timeout`; the start of the hive and
    // the connection come first.
    let budget = Budget::new(spec.load_timeout + Duration::from_secs(30));
    let conn = ctx.open(node, &budget).await?;
    let models = crate::queen::node_models(&config.models, node);
    let client = &conn.client;
    let info = client
        .with_models(&models, &budget, || {
            client.restart_worker(model, budget.remaining())
        })
        .await?;
    ctx.out.result(&info, || {
        format!(
            "{}: restarted the worker for `{model}` (pid {})",
            node.name,
            info.pid.map_or("-".to_string(), |p| p.to_string())
        )
    });
    Ok(())
}

async fn cancel(ctx: &Context, node: Option<&str>, request_id: &str) -> Result<()> {
    let config = ctx.config()?;
    let node = config.node(node)?;
    let conn = ctx.open(node, &Budget::new(node.timeout)).await?;
    let info = conn.client.cancel_request(request_id, TIMEOUT).await?;
    let value = serde_json::json!({ "node": node.name, "cancelled": info });
    ctx.out.result(&value, || {
        format!(
            "{}: cancelled request {} ({}, {}ms old)",
            node.name, info.request_id, info.model, info.age_ms
        )
    });
    Ok(())
}
