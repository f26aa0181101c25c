//! `rbee infer`: make sure the node's hive runs, send the prompt, print the generated text on
//! stdout as it arrives (or `--json` events), and exit with the contract's code, all within one
//! budget.

use std::io::{IsTerminal, Read, Write};

use serde::Serialize;

use crate::cli::{InferArgs, OutputFormat};
use crate::cmd::Context;
use crate::config::{Model, Node};
use crate::deadline::Budget;
use crate::error::{DeadlineError, Error, ExitKind, Result};
use crate::protocol::{DoneEvent, InferRequest, MAX_PROMPT_BYTES, ResponseFormat, SamplingParams};
use crate::queen::generate::{self, Attempt, Shared, breakdown, stop_name};
use crate::queen::trail;

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
    let progress = Shared::default();
    let runner = ctx.runner(&config);
    let mut sink = |t: &str| print_token(ctx, t);
    let work = generate::place(&runner, &route, &request, &budget, &progress, &mut sink);
    let outcome = tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
        // Dropping the request future closes its connection, which stops the generation.
        () = crate::output::stdout_closed() => {
            progress.get().reader_gone = true;
            Ok(())
        }
        result = tokio::time::timeout_at(budget.deadline().into(), work) => match result {
            Ok(result) => result,
            Err(_) => Err(Error::Deadline(DeadlineError::Spent(breakdown(
                budget.total(),
                &budget,
                &progress.get(),
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
    let completed = crate::queen::audit_end(&budget, &outcome).record(
        "infer_completed",
        Some(request_id),
        trail::completed_fields(
            node,
            &model.name,
            &outcome,
            done,
            &budget,
            serde_json::json!({ "stdout_closed": progress.reader_gone }),
        ),
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
