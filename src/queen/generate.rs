//! Running one request on the fleet, for every face that asks for text (`infer`, `batch`,
//! `serve`): bring the node's hive up, send the request, hand each token to a sink as it
//! arrives, and (when routed) fail over to the next candidate while no part of the answer has
//! gone out. What happened is kept in an `Account` beside the request future, so that a
//! deadline or an interrupt that cuts it short can still say how the budget was spent.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::config::{Node, Route};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::protocol::sse::{StreamError, events};
use crate::protocol::{
    DoneEvent, ErrorBody, InferRequest, PrefillEvent, StopReason, Timings, TokenEvent,
};
use crate::queen::node::{ConnectOptions, NodeConn};
use crate::queen::pool::Pool;
use crate::queen::{lifecycle, route};

/// How a face runs requests: how it connects, and where its spinners go.
#[derive(Clone)]
pub(crate) struct Runner {
    pub(crate) connect: ConnectOptions,
    /// The models of nodes.toml, each node's table of them sent to its hive from here.
    pub(crate) models: std::sync::Arc<indexmap::IndexMap<String, crate::config::Model>>,
    pub(crate) progress: Progress,
    /// Say on stderr that a hive was started (a person at a terminal asked).
    pub(crate) note_start: bool,
}

/// What has happened so far in one request.
#[derive(Default)]
pub(crate) struct Account {
    pub(crate) timings: Timings,
    /// The stage under way, and since when.
    pub(crate) stage: Option<(&'static str, Instant)>,
    /// Milliseconds from sending the request to its first token, as seen here: what the budget
    /// report can still say when the deadline comes before the worker's own timings.
    pub(crate) first_token_ms: Option<f64>,
    pub(crate) printed_any: bool,
    pub(crate) ends_with_newline: bool,
    /// The sink's reader went away: the request ended there, successfully.
    pub(crate) reader_gone: bool,
    pub(crate) done: Option<DoneEvent>,
    /// The node the request is on now (after a failover, the one that took it).
    pub(crate) node: Option<Node>,
    /// Every node tried, in order, with how it went.
    pub(crate) attempts: Vec<Attempt>,
}

impl Account {
    /// Whether anything of the answer has reached the user: after that nothing is retried.
    pub(crate) fn answered(&self) -> bool {
        self.printed_any || self.first_token_ms.is_some() || self.done.is_some()
    }
}

/// The account of a request, shared between the request future and whoever watches it (a
/// deadline, an interrupt, a server's stream). Never locked across an await.
#[derive(Default)]
pub(crate) struct Shared(Mutex<Account>);

impl Shared {
    pub(crate) fn get(&self) -> MutexGuard<'_, Account> {
        // A panic while the lock was held leaves an account that is still worth reading.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn into_inner(self) -> Account {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One node tried for a request, as the `done` event and the audit trail list it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Attempt {
    pub(crate) node: String,
    /// `ok`, or why the node did not serve (`unreachable`, `breaker_open`, or an error class).
    pub(crate) outcome: String,
    pub(crate) ms: f64,
}

/// Where the generated tokens go: infer prints them as they come, batch keeps them for its line,
/// serve sends them to its client. `Err` with a reader gone (`BrokenPipe`) ends the request
/// quietly (and cancels it on the node).
pub(crate) type TokenSink<'a> = &'a mut (dyn FnMut(&str) -> std::io::Result<()> + Send);

/// Runs the request on its node, or (when routed) on the best candidate, moving to the next one
/// while no part of the answer has come back.
pub(crate) async fn place(
    runner: &Runner,
    route: &Route<'_>,
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    sink: TokenSink<'_>,
) -> Result<()> {
    if route.pinned || route.nodes.len() == 1 {
        let node = route.nodes[0];
        account.get().node = Some(node.clone());
        return generate(runner, node, Via::Own(None), request, budget, account, sink).await;
    }
    account.get().stage = Some(("connect", Instant::now()));
    let (ranked, skipped) = route::rank(&route.nodes, route.model, budget, runner.connect).await;
    let candidates = ranked
        .into_iter()
        .map(|r| (r.node, Via::Own(r.conn.map(Box::new))))
        .collect();
    let order = Order {
        model: &route.model.name,
        candidates,
        skipped,
    };
    in_order(runner, order, request, budget, account, sink, &|_| {}).await
}

/// The candidates of a request, best first, each with where its connection comes from, and
/// those that cannot take it (each an attempt of its own).
pub(crate) struct Order<'a> {
    pub(crate) model: &'a str,
    pub(crate) candidates: Vec<(Node, Via<'a>)>,
    pub(crate) skipped: Vec<route::Skipped>,
}

/// Tries the candidates in order while no part of the answer has come back; `failed` hears of
/// each node that failed.
pub(crate) async fn in_order(
    runner: &Runner,
    order: Order<'_>,
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    sink: TokenSink<'_>,
    failed: &(dyn Fn(&Node) + Sync),
) -> Result<()> {
    let mut failures: Vec<(String, Error)> = Vec::new();
    for s in order.skipped {
        attempted(request, budget, account, &s.node.name, s.outcome, s.ms);
        failures.push((s.node.name, s.error));
    }
    for (node, via) in order.candidates {
        let started = Instant::now();
        {
            // A fresh account of this attempt; the attempts so far carry on.
            let mut a = account.get();
            let attempts = std::mem::take(&mut a.attempts);
            *a = Account {
                node: Some(node.clone()),
                attempts,
                ..Account::default()
            };
        }
        let result = generate(runner, &node, via, request, budget, account, sink).await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let outcome = result.as_ref().err().map_or("ok", |e| e.kind().wire_code());
        attempted(request, budget, account, &node.name, outcome, ms);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if fails_over(&e) && !account.get().answered() && !budget.is_spent() => {
                tracing::info!(node = %node.name, "failing over: {e}");
                failed(&node);
                failures.push((node.name.clone(), e));
            }
            Err(e) => {
                failed(&node);
                return Err(e);
            }
        }
    }
    Err(every_candidate_failed(order.model, failures))
}

/// What a node's failure before the first token says about the next node: none of these is
/// about the request itself, so another node may well serve it.
pub(crate) fn fails_over(err: &Error) -> bool {
    matches!(
        err,
        Error::Ssh(_)
            | Error::Hive(_)
            | Error::Worker(_)
            | Error::ModelMissing(_)
            | Error::Internal(_)
            | Error::Io(_)
    )
}

/// One node tried: in the `done` event, on stderr under `-v`, and in this machine's audit log.
fn attempted(
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    node: &str,
    outcome: &str,
    ms: f64,
) {
    crate::queen::audit_note_within(
        budget,
        "infer_attempt",
        Some(&request.request_id),
        serde_json::json!({ "node": node, "outcome": outcome, "ms": ms.round() }),
    );
    account.get().attempts.push(Attempt {
        node: node.to_string(),
        outcome: outcome.to_string(),
        ms,
    });
}

/// Every candidate failed: the exit code of the last failure, and each node with its reason.
fn every_candidate_failed(model: &str, failures: Vec<(String, Error)>) -> Error {
    let kind = failures
        .last()
        .map_or(crate::error::ExitKind::Config, |(_, e)| e.kind());
    let reasons: Vec<String> = failures
        .iter()
        .map(|(node, e)| format!("  {node}: {e}"))
        .collect();
    Error::Classified {
        kind,
        message: format!(
            "no node could serve `{model}`; each one tried:\n{}",
            reasons.join("\n")
        ),
    }
}

/// Runs one request on `node`, over the connection `pool` keeps for it, and returns the
/// generated text with its `done` event, printing nothing: what `rbee batch` needs of a node.
pub(crate) async fn generate_text(
    runner: &Runner,
    pool: &Pool,
    node: &Node,
    request: &InferRequest,
    budget: &Budget,
) -> Result<(String, DoneEvent)> {
    let account = Shared::default();
    let mut text = String::new();
    let mut keep = |t: &str| {
        text.push_str(t);
        Ok(())
    };
    generate(
        runner,
        node,
        Via::Kept(pool),
        request,
        budget,
        &account,
        &mut keep,
    )
    .await?;
    let done = account.into_inner().done.ok_or_else(|| {
        Error::hive(format!(
            "the hive on `{}` ended the stream before the generation finished",
            node.name
        ))
    })?;
    Ok((text, done))
}

/// Where a request's connection to its node comes from.
pub(crate) enum Via<'a> {
    /// Its own: the one its probe made, else opened for it.
    Own(Option<Box<NodeConn>>),
    /// The one `pool` keeps for the node, brought up first when its hive was not seen running.
    Kept(&'a Pool),
}

/// Runs one request on `node`, over the connection `via` gives, every token to `sink`.
pub(crate) async fn generate(
    runner: &Runner,
    node: &Node,
    via: Via<'_>,
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    sink: TokenSink<'_>,
) -> Result<()> {
    match via {
        Via::Own(conn) => {
            let conn = up(runner, node, conn.map(|c| *c), budget, account).await?;
            send(runner, node, &conn, request, budget, account, sink).await
        }
        Via::Kept(pool) => kept(runner, pool, node, request, budget, account, sink).await,
    }
}

/// Runs the request over the node's kept connection. A kept connection that fails on the way
/// to the hive (its session died, the hive went away) is given up and the node brought up
/// again, once, before the failure counts against the node.
async fn kept(
    runner: &Runner,
    pool: &Pool,
    node: &Node,
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    sink: TokenSink<'_>,
) -> Result<()> {
    let mut again = true;
    loop {
        let (conn, reused) = match pool.running(&node.name) {
            Some(conn) => {
                account.get().timings.connect = Some(0.0);
                (conn, true)
            }
            None => {
                let conn = pool
                    .bring_up(&node.name, |old| {
                        // A connection kept from before costs this request nothing to reach.
                        let old = old.map(|mut c| {
                            c.connect_time = Duration::ZERO;
                            c
                        });
                        up(runner, node, old, budget, account)
                    })
                    .await?;
                (conn, false)
            }
        };
        let result = send(runner, node, &conn, request, budget, account, sink).await;
        match result {
            Err(e) if matches!(e, Error::Ssh(_) | Error::Hive(_) | Error::Io(_)) => {
                pool.failed(&node.name, &conn).await;
                if reused && again && !account.get().answered() && !budget.is_spent() {
                    tracing::info!(node = %node.name, "the kept connection failed ({e}); bringing the node up again");
                    again = false;
                    continue;
                }
                return Err(e);
            }
            other => return other,
        }
    }
}

/// Reaches the node (on `conn` when one is at hand) and makes sure its hive runs, as the
/// account's timings say.
async fn up(
    runner: &Runner,
    node: &Node,
    conn: Option<NodeConn>,
    budget: &Budget,
    account: &Shared,
) -> Result<NodeConn> {
    account.get().stage = Some(("connect", Instant::now()));
    let mut conn = match conn {
        Some(conn) => conn,
        None => NodeConn::open(node, budget, runner.connect).await?,
    };
    {
        let mut a = account.get();
        a.timings.connect = Some(conn.connect_time.as_secs_f64() * 1000.0);
        a.stage = Some(("hive start", Instant::now()));
    }
    let models = crate::queen::node_models(&runner.models, node);
    let running = lifecycle::ensure_running(&mut conn, &models, budget, &runner.progress).await?;
    {
        let mut a = account.get();
        let ms = running.elapsed.as_secs_f64() * 1000.0;
        if running.started {
            a.timings.hive_start = Some(ms);
        } else if let Some(connect) = a.timings.connect.as_mut() {
            *connect += ms;
        }
    }
    if running.started && runner.note_start {
        eprintln!("started the hive on `{}`", node.name);
    }
    Ok(conn)
}

/// Sends the request to the hive over `conn` and hands every token to `sink`.
async fn send(
    runner: &Runner,
    node: &Node,
    conn: &NodeConn,
    request: &InferRequest,
    budget: &Budget,
    account: &Shared,
    sink: TokenSink<'_>,
) -> Result<()> {
    let models = crate::queen::node_models(&runner.models, node);
    account.get().stage = Some(("queue, load and prefill", Instant::now()));
    // On stderr, and gone before anything else is written: the first token, the summary, an
    // error (dropping it clears it too).
    let mut waiting = Some(runner.progress.spinner(format!(
        "waiting for `{}` on `{}`: queue, load and prefill",
        request.model, node.name
    )));
    let client = &conn.client;
    let first = client
        .with_models(&models, budget, || client.infer(request, budget))
        .await;
    let response = match first {
        Err(Error::ModelMissing(why)) => {
            drop(waiting.take());
            fetch_missing(runner, conn, &models, request, budget, &why).await?;
            waiting = Some(runner.progress.spinner(format!(
                "waiting for `{}` on `{}`: queue, load and prefill",
                request.model, node.name
            )));
            let client = &conn.client;
            client
                .with_models(&models, budget, || client.infer(request, budget))
                .await?
        }
        other => other?,
    };
    let mut stream = std::pin::pin!(events(response));
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            // A lost SSH connection (the link died) is the SSH failure it is, not the hive's.
            Err(StreamError::Broke(cause)) => {
                return Err(conn.lost().await.unwrap_or_else(|| {
                    Error::hive(format!(
                        "the connection to the hive on `{0}` broke in the middle of the \
                         generation ({cause}); `rbee hive status {0}` tells whether the hive \
                         still runs",
                        node.name
                    ))
                }));
            }
            Err(StreamError::Malformed(e)) => return Err(e),
        };
        if event.event == "prefill" {
            // Progress for a person at a terminal, never on stdout.
            if let (Some(spinner), Ok(p)) = (&waiting, parse::<PrefillEvent>(&event.data)) {
                spinner.set_message(format!(
                    "waiting for `{}` on `{}`: prefill {}/{} tokens",
                    request.model, node.name, p.done, p.total
                ));
            }
            continue;
        }
        if event.event != "started"
            && let Some(spinner) = waiting.take()
        {
            spinner.finish_and_clear();
        }
        match event.event.as_str() {
            "token" => {
                let token: TokenEvent = parse(&event.data)?;
                match sink(&token.text) {
                    Ok(()) => {}
                    // Returning drops the stream, and so cancels the generation on the node.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        account.get().reader_gone = true;
                        return Ok(());
                    }
                    Err(e) => return Err(Error::internal(format!("cannot write the text: {e}"))),
                }
                let mut a = account.get();
                if a.first_token_ms.is_none() {
                    a.first_token_ms = a.stage.map(|(_, since)| ms(since));
                    a.stage = Some(("decode", Instant::now()));
                }
                a.printed_any = true;
                a.ends_with_newline = token.text.ends_with('\n');
            }
            "done" => {
                let mut done: DoneEvent = parse(&event.data)?;
                {
                    let mut a = account.get();
                    done.timings_ms.connect = a.timings.connect;
                    done.timings_ms.hive_start = a.timings.hive_start;
                    done.timings_ms.total = Some(budget.elapsed().as_secs_f64() * 1000.0);
                    a.timings = done.timings_ms.clone();
                    a.done = Some(done.clone());
                }
                return finish(node, budget, &done);
            }
            "error" => {
                let body: ErrorBody = parse(&event.data)?;
                return Err(body.into());
            }
            _ => {}
        }
    }
    // The hive ends every stream with `done` or `error`, even when its worker dies: a stream
    // that just stops is the hive's own failure.
    Err(Error::hive(format!(
        "the hive on `{}` ended the stream before the generation finished",
        node.name
    )))
}

/// How the generation ended, as the exit code sees it.
fn finish(node: &Node, budget: &Budget, done: &DoneEvent) -> Result<()> {
    match done.stop_reason {
        StopReason::Deadline => {
            let a = Account {
                timings: done.timings_ms.clone(),
                ..Account::default()
            };
            // The whole breakdown already: a face adds it only to a hop's own words.
            Err(Error::Deadline(crate::error::DeadlineError::Spent(
                breakdown(budget.total(), budget, &a),
            )))
        }
        StopReason::Cancelled => Err(Error::worker(format!(
            "the generation was cancelled on `{}`",
            node.name
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn stop_name(reason: StopReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// How the budget was spent, stage by stage, for the message of exit 124.
pub(crate) fn breakdown(total: Duration, budget: &Budget, a: &Account) -> String {
    let t = &a.timings;
    let mut stages = Vec::new();
    let mut push = |name: &str, v: Option<f64>| {
        if let Some(ms) = v {
            stages.push(format!("{name} {ms:.0}ms"));
        }
    };
    push("connect", t.connect);
    push("hive start", t.hive_start);
    push("queue", t.queue);
    push("load", t.load);
    push("prefill", t.prefill);
    push("decode", t.decode);
    if t.decode.is_none() {
        push("queue, load and prefill", a.first_token_ms);
        if let Some((stage, since)) = a.stage {
            stages.push(format!("ran out during {stage} after {:.0}ms", ms(since)));
        }
    }
    let spent = if stages.is_empty() {
        String::new()
    } else {
        format!(": {}", stages.join(", "))
    };
    format!(
        "deadline of {} exceeded after {:.2}s{spent}",
        humantime::format_duration(total),
        budget.elapsed().as_secs_f64()
    )
}

fn parse<T: serde::de::DeserializeOwned>(data: &str) -> Result<T> {
    serde_json::from_str(data)
        .map_err(|e| Error::internal(format!("unreadable event from the hive: {e}")))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// A model whose file is not on the node: downloaded there on the spot, within the request's
/// budget, when its `source` is a URL; otherwise the error says how to put it there.
async fn fetch_missing(
    runner: &Runner,
    conn: &NodeConn,
    models: &crate::protocol::ModelTable,
    request: &InferRequest,
    budget: &Budget,
    why: &str,
) -> Result<()> {
    let node = conn.node.name.clone();
    let name = &request.model;
    let Some(model) = runner.models.get(name) else {
        return Err(Error::ModelMissing(why.to_string()));
    };
    if model.download_url().is_none() {
        let fix = if let (true, Some(source)) = (conn.is_local(), &model.source) {
            format!("copy its `source` `{source}` there")
        } else if model.source.is_some() {
            format!("copy it there with `rbee models push --node {node} {name}`")
        } else {
            format!(
                "copy the file there, or set the model's `source` in nodes.toml (a file on this \
                 machine for `rbee models push --node {node} {name}`, or a URL for `rbee models \
                 pull --node {node} {name}`)"
            )
        };
        return Err(Error::ModelMissing(format!("{why}; {fix}")));
    }
    if runner.note_start {
        eprintln!("`{name}` is not on `{node}`: the node downloads it from its source");
    }
    let pull = crate::queen::fetch::download(conn, models, model, budget, &runner.progress, |_| {});
    match tokio::time::timeout(budget.remaining(), pull).await {
        Ok(pulled) => pulled.map(|_| ()),
        Err(_) => Err(Error::deadline(format!(
            "the budget ran out while `{node}` downloaded `{name}`; `rbee models pull --node \
             {node} {name}` finishes it (the partial file is kept)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit-124 message of a 1 s budget whose first token came after 41 ms and which ran out
    /// during decode, with `timings` as far as the worker's done event brought them.
    fn message_with(timings: Timings) -> String {
        let budget = Budget::new(Duration::from_secs(1));
        let account = Account {
            timings,
            stage: Some(("decode", Instant::now())),
            first_token_ms: Some(41.0),
            ..Account::default()
        };
        breakdown(budget.total(), &budget, &account)
    }

    #[test]
    fn a_deadline_before_the_workers_timings_still_names_prefill_and_decode() {
        let message = message_with(Timings {
            connect: Some(2.0),
            ..Timings::default()
        });
        assert!(
            message.contains("connect 2ms, queue, load and prefill 41ms, ran out during decode"),
            "{message}"
        );
    }

    #[test]
    fn the_workers_timings_replace_what_was_seen_here() {
        let message = message_with(Timings {
            queue: Some(1.0),
            prefill: Some(30.0),
            decode: Some(900.0),
            ..Timings::default()
        });
        assert!(
            message.ends_with(": queue 1ms, prefill 30ms, decode 900ms"),
            "{message}"
        );
    }
}
