//! `rbee infer`: make sure the node's hive runs, send the prompt, print the generated text on
//! stdout as it arrives (or `--json` events), and exit with the contract's code, all within one
//! budget.

use std::cell::RefCell;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::cli::{InferArgs, OutputFormat};
use crate::cmd::Context;
use crate::config::{Model, Node, Route};
use crate::deadline::Budget;
use crate::error::{DeadlineError, Error, ExitKind, Result};
use crate::output::reader_gone;
use crate::protocol::sse::{StreamError, events};
use crate::protocol::{
    DoneEvent, ErrorBody, InferRequest, MAX_PROMPT_BYTES, PrefillEvent, ResponseFormat,
    SamplingParams, StopReason, Timings, TokenEvent,
};
use crate::queen::node::NodeConn;
use crate::queen::{lifecycle, route, trail};

pub(crate) async fn run(ctx: &Context, args: InferArgs) -> Result<()> {
    let request_id = format!("{:032x}", rand::random::<u128>());
    let result = infer(ctx, args, &request_id).await;
    if let Err(err) = &result
        && ctx.out.json
    {
        ctx.out.json_line(&serde_json::json!({
            "event": "error",
            "request_id": request_id,
            "code": err.kind().wire_code(),
            "message": err.to_string(),
            "exit_code": err.code(),
        }));
    }
    result
}

/// What has happened so far, kept outside the request future so that a deadline or Ctrl-C that
/// cuts it short can still say how the budget was spent.
#[derive(Default)]
struct Progress {
    timings: Timings,
    /// The stage under way, and since when.
    stage: Option<(&'static str, Instant)>,
    /// Milliseconds from sending the request to its first token, as seen here: what the budget
    /// report can still say when the deadline comes before the worker's own timings.
    first_token_ms: Option<f64>,
    printed_any: bool,
    ends_with_newline: bool,
    /// Stdout's reader went away: the invocation ended there, successfully.
    reader_gone: bool,
    done: Option<DoneEvent>,
    /// The node the request is on now (after a failover, the one that took it).
    node: Option<Node>,
    /// Every node tried, in order, with how it went.
    attempts: Vec<Attempt>,
}

impl Progress {
    /// Whether anything of the answer has reached the user: after that nothing is retried.
    fn answered(&self) -> bool {
        self.printed_any || self.first_token_ms.is_some() || self.done.is_some()
    }
}

/// One node tried for a request, as the `done` event and the audit trail list it.
#[derive(Debug, Clone, Serialize)]
struct Attempt {
    node: String,
    /// `ok`, or why the node did not serve (`unreachable`, `breaker_open`, or an error class).
    outcome: String,
    ms: f64,
}

#[derive(Serialize)]
struct DoneLine<'a> {
    event: &'static str,
    request_id: &'a str,
    node: &'a str,
    model: &'a str,
    #[serde(flatten)]
    done: &'a DoneEvent,
    /// Every node tried, the one that served last; present when the request was routed.
    #[serde(skip_serializing_if = "<[Attempt]>::is_empty")]
    attempts: &'a [Attempt],
}

async fn infer(ctx: &Context, args: InferArgs, request_id: &str) -> Result<()> {
    let prompt = read_prompt(&args.prompt, args.raw)?;
    let config = ctx.config()?;
    let route = config.route(args.node.as_deref(), args.model.as_deref())?;
    let model = route.model;
    // The first candidate's settings (budget, audit policy) stand for the request until a node
    // takes it.
    let first = route.nodes[0];
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop,
        format: response_format(args.json_schema.as_deref(), args.format)?,
    };
    params.validate()?;
    let budget = Budget::new(args.timeout.unwrap_or(first.timeout));
    let mut request = InferRequest {
        request_id: request_id.to_string(),
        model: model.name.clone(),
        model_digest: crate::protocol::model_digest(model),
        system: args.system,
        prompt,
        messages: Vec::new(),
        raw: args.raw,
        params,
        queen_audit: None,
    };

    trail::record_request(
        &ctx.audit(),
        &mut request,
        first,
        &budget,
        serde_json::json!({
            "candidates": (!route.pinned)
                .then(|| route.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>()),
        }),
    )?;
    let progress = RefCell::new(Progress::default());
    let work = place(ctx, &route, &request, &budget, &progress);
    let outcome = tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
        // Dropping the request future closes its connection, which stops the generation.
        () = crate::output::stdout_closed() => {
            progress.borrow_mut().reader_gone = true;
            Ok(())
        }
        result = tokio::time::timeout_at(budget.deadline().into(), work) => match result {
            Ok(result) => result,
            Err(_) => Err(Error::Deadline(DeadlineError::Spent(breakdown(
                budget.total(),
                &budget,
                &progress.borrow(),
            )))),
        },
    };
    let progress = progress.into_inner();
    let node = progress.node.as_ref().unwrap_or(first);
    if !ctx.out.json && progress.printed_any && !progress.ends_with_newline && !progress.reader_gone
    {
        let _ = writeln!(std::io::stdout());
    }
    let done = progress.done.as_ref();
    let completed = ctx.audit().record(
        "infer_completed",
        Some(request_id),
        serde_json::json!({
            "node": node.name,
            "model": model.name,
            "exit_code": outcome.as_ref().err().map_or(0, Error::code),
            "stop_reason": done.map(|d| d.stop_reason),
            "tokens_in": done.map(|d| d.tokens_in),
            "tokens_out": done.map(|d| d.tokens_out),
            "duration_ms": u64::try_from(budget.elapsed().as_millis()).unwrap_or(u64::MAX),
            "node_audit": done.and_then(|d| d.node_audit.clone()),
            "stdout_closed": progress.reader_gone,
        }),
    );
    let outcome = trail::audited(node, outcome, done, completed.err());
    // Success (or how the generation ended) is reported only once both ends have it on record.
    if let Some(done) = done
        && !matches!(outcome, Err(Error::Audit(_)))
    {
        report_done(ctx, node, model, &request, done, &progress.attempts);
    }
    // A hop that ran out of budget says what it was doing; the user also needs the breakdown.
    match outcome {
        Err(Error::Deadline(DeadlineError::During(what))) => {
            Err(Error::Deadline(DeadlineError::Spent(format!(
                "{} ({what})",
                breakdown(budget.total(), &budget, &progress),
            ))))
        }
        other => other,
    }
}

/// Runs the request on its node, or (when routed) on the best candidate, moving to the next one
/// while no part of the answer has come back.
async fn place(
    ctx: &Context,
    route: &Route<'_>,
    request: &InferRequest,
    budget: &Budget,
    progress: &RefCell<Progress>,
) -> Result<()> {
    if route.pinned || route.nodes.len() == 1 {
        let node = route.nodes[0];
        progress.borrow_mut().node = Some(node.clone());
        return generate(ctx, node, None, request, budget, progress, &mut |t| {
            print_token(ctx, t)
        })
        .await;
    }
    progress.borrow_mut().stage = Some(("connect", Instant::now()));
    let (ranked, skipped) = route::rank(&route.nodes, route.model, budget, ctx.connect).await;
    let mut failures: Vec<(String, Error)> = Vec::new();
    for s in skipped {
        attempted(ctx, request, progress, &s.node.name, s.outcome, s.ms);
        failures.push((s.node.name, s.error));
    }
    for candidate in ranked {
        let started = Instant::now();
        {
            // A fresh account of this attempt; the attempts so far carry on.
            let mut p = progress.borrow_mut();
            let attempts = std::mem::take(&mut p.attempts);
            *p = Progress {
                node: Some(candidate.node.clone()),
                attempts,
                ..Progress::default()
            };
        }
        let result = generate(
            ctx,
            &candidate.node,
            candidate.conn,
            request,
            budget,
            progress,
            &mut |t| print_token(ctx, t),
        )
        .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let outcome = result.as_ref().err().map_or("ok", |e| e.kind().wire_code());
        attempted(ctx, request, progress, &candidate.node.name, outcome, ms);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if fails_over(&e) && !progress.borrow().answered() && !budget.is_spent() => {
                tracing::info!(node = %candidate.node.name, "failing over: {e}");
                failures.push((candidate.node.name.clone(), e));
            }
            Err(e) => return Err(e),
        }
    }
    Err(every_candidate_failed(&route.model.name, failures))
}

/// What a node's failure before the first token says about the next node: none of these is
/// about the request itself, so another node may well serve it.
pub(crate) fn fails_over(err: &Error) -> bool {
    matches!(
        err,
        Error::Ssh(_) | Error::Hive(_) | Error::Worker(_) | Error::Internal(_) | Error::Io(_)
    )
}

/// One node tried: in the `done` event, on stderr under `-v`, and in this machine's audit log.
fn attempted(
    ctx: &Context,
    request: &InferRequest,
    progress: &RefCell<Progress>,
    node: &str,
    outcome: &str,
    ms: f64,
) {
    ctx.audit_note(
        "infer_attempt",
        Some(&request.request_id),
        serde_json::json!({ "node": node, "outcome": outcome, "ms": ms.round() }),
    );
    progress.borrow_mut().attempts.push(Attempt {
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

/// Where the generated tokens go: infer prints them as they come, batch keeps them for its line.
/// `Err` with a reader gone ends the request quietly (and cancels it on the node).
type TokenSink<'a> = &'a mut dyn FnMut(&str) -> std::io::Result<()>;

/// Prints one token on stdout (or as a `--json` event) as soon as it arrives.
fn print_token(ctx: &Context, text: &str) -> std::io::Result<()> {
    if ctx.out.json {
        ctx.out
            .try_json_line(&serde_json::json!({ "event": "token", "text": text }))
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush())
    }
}

/// Runs one request on `node`, on a connection of its own, and returns the generated
/// text with its `done` event, printing nothing: what `rbee batch` needs of a node.
pub(crate) async fn generate_text(
    ctx: &Context,
    node: &Node,
    request: &InferRequest,
    budget: &Budget,
) -> Result<(String, DoneEvent)> {
    let progress = RefCell::new(Progress::default());
    let mut text = String::new();
    let mut keep = |t: &str| {
        text.push_str(t);
        Ok(())
    };
    generate(ctx, node, None, request, budget, &progress, &mut keep).await?;
    let done = progress.into_inner().done.ok_or_else(|| {
        Error::hive(format!(
            "the hive on `{}` ended the stream before the generation finished",
            node.name
        ))
    })?;
    Ok((text, done))
}

async fn generate(
    ctx: &Context,
    node: &Node,
    conn: Option<NodeConn>,
    request: &InferRequest,
    budget: &Budget,
    progress: &RefCell<Progress>,
    sink: TokenSink<'_>,
) -> Result<()> {
    progress.borrow_mut().stage = Some(("connect", Instant::now()));
    let mut conn = match conn {
        Some(conn) => conn,
        None => ctx.open(node, budget).await?,
    };
    {
        let mut p = progress.borrow_mut();
        p.timings.connect = Some(conn.connect_time.as_secs_f64() * 1000.0);
        p.stage = Some(("hive start", Instant::now()));
    }
    let models = crate::queen::node_models(&ctx.config()?, node);
    let running = lifecycle::ensure_running(&mut conn, &models, budget, &ctx.progress).await?;
    {
        let mut p = progress.borrow_mut();
        let ms = running.elapsed.as_secs_f64() * 1000.0;
        if running.started {
            p.timings.hive_start = Some(ms);
        } else if let Some(connect) = p.timings.connect.as_mut() {
            *connect += ms;
        }
    }
    if running.started && std::io::stderr().is_terminal() {
        ctx.out.note(format!("started the hive on `{}`", node.name));
    }

    progress.borrow_mut().stage = Some(("queue, load and prefill", Instant::now()));
    // On stderr, and gone before anything else is written: the first token, the summary, an
    // error (dropping it clears it too).
    let mut waiting = Some(ctx.progress.spinner(format!(
        "waiting for `{}` on `{}`: queue, load and prefill",
        request.model, node.name
    )));
    let client = &conn.client;
    let response = client
        .with_models(&models, budget, || client.infer(request, budget))
        .await?;
    let mut stream = std::pin::pin!(events(response));
    while let Some(event) = stream.next().await {
        let event = event.map_err(|e| match e {
            StreamError::Broke(cause) => Error::hive(format!(
                "the connection to the hive on `{0}` broke in the middle of the generation \
                 ({cause}); `rbee hive status {0}` tells whether the hive still runs",
                node.name
            )),
            StreamError::Malformed(e) => e,
        })?;
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
                    Err(e) if reader_gone(&e) => {
                        progress.borrow_mut().reader_gone = true;
                        return Ok(());
                    }
                    Err(e) => return Err(Error::internal(format!("cannot write to stdout: {e}"))),
                }
                let mut p = progress.borrow_mut();
                if p.first_token_ms.is_none() {
                    p.first_token_ms = p.stage.map(|(_, since)| ms(since));
                    p.stage = Some(("decode", Instant::now()));
                }
                p.printed_any = true;
                p.ends_with_newline = token.text.ends_with('\n');
            }
            "done" => {
                let mut done: DoneEvent = parse(&event.data)?;
                let mut p = progress.borrow_mut();
                done.timings_ms.connect = p.timings.connect;
                done.timings_ms.hive_start = p.timings.hive_start;
                done.timings_ms.total = Some(budget.elapsed().as_secs_f64() * 1000.0);
                p.timings = done.timings_ms.clone();
                p.done = Some(done.clone());
                drop(p);
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
            let p = Progress {
                timings: done.timings_ms.clone(),
                ..Progress::default()
            };
            Err(Error::deadline(breakdown(budget.total(), budget, &p)))
        }
        StopReason::Cancelled => Err(Error::worker(format!(
            "the generation was cancelled on `{}`",
            node.name
        ))),
        _ => Ok(()),
    }
}

/// The `done` line (`--json`), or the summary on a terminal.
fn report_done(
    ctx: &Context,
    node: &Node,
    model: &Model,
    request: &InferRequest,
    done: &DoneEvent,
    attempts: &[Attempt],
) {
    if ctx.out.json {
        ctx.out.json_line(&DoneLine {
            event: "done",
            request_id: &request.request_id,
            node: &node.name,
            model: &model.name,
            done,
            attempts,
        });
    } else if std::io::stderr().is_terminal() && !ctx.out.quiet {
        let speed = done
            .decode_tokens_per_s
            .map_or_else(String::new, |s| format!(", {s:.1} tokens/s"));
        eprintln!(
            "[{} on {}: {} tokens in, {} out, {}{speed}]",
            model.name,
            node.name,
            done.tokens_in,
            done.tokens_out,
            stop_name(done.stop_reason)
        );
    }
}

pub(crate) fn stop_name(reason: StopReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// How the budget was spent, stage by stage, for the message of exit 124.
fn breakdown(total: Duration, budget: &Budget, p: &Progress) -> String {
    let t = &p.timings;
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
        push("queue, load and prefill", p.first_token_ms);
        if let Some((stage, since)) = p.stage {
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

/// The format `--json-schema FILE` or `--format json` asks for. A schema file that cannot be
/// read or is not JSON is a usage error naming the file; whether llama.cpp can turn the schema
/// into a grammar the worker decides (exit 8).
pub(crate) fn response_format(
    schema: Option<&std::path::Path>,
    format: Option<OutputFormat>,
) -> Result<ResponseFormat> {
    let Some(path) = schema else {
        return Ok(match format {
            Some(OutputFormat::Json) => ResponseFormat::JsonObject,
            None => ResponseFormat::Text,
        });
    };
    let usage = |why: String| {
        Error::of_kind(
            ExitKind::Usage,
            format!("--json-schema `{}`: {why}", path.display()),
        )
    };
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read it: {e}")))?;
    let schema: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| usage(format!("not JSON: {e}")))?;
    Ok(ResponseFormat::JsonSchema { schema })
}

/// The prompt of `--prompt` (`-`: stdin). A raw prompt is taken byte for byte; otherwise the
/// newline that ends piped text is dropped.
fn read_prompt(arg: &str, raw: bool) -> Result<String> {
    let prompt = if arg == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(MAX_PROMPT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::invalid(format!("cannot read the prompt from stdin: {e}")))?;
        let mut text = String::from_utf8(bytes)
            .map_err(|_| Error::invalid("the prompt read from stdin is not valid UTF-8"))?;
        // `echo hi | rbee infer --prompt -` should not ask about "hi\n"; a raw prompt ends where
        // its author ended it (a chat template's last line ends with a newline).
        while !raw && (text.ends_with('\n') || text.ends_with('\r')) {
            text.pop();
        }
        text
    } else {
        arg.to_string()
    };
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(Error::invalid(format!(
            "the prompt is over {MAX_PROMPT_BYTES} bytes"
        )));
    }
    if prompt.trim().is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    Ok(prompt)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit-124 message of a 1 s budget whose first token came after 41 ms and which ran out
    /// during decode, with `timings` as far as the worker's done event brought them.
    fn message_with(timings: Timings) -> String {
        let budget = Budget::new(Duration::from_secs(1));
        let progress = Progress {
            timings,
            stage: Some(("decode", Instant::now())),
            first_token_ms: Some(41.0),
            ..Progress::default()
        };
        breakdown(budget.total(), &budget, &progress)
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
