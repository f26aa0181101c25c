//! `rbee batch`: a JSON-lines file of prompts run over every candidate node, as many at once on
//! each as its model has slots, one result line per prompt, appended as each finishes so that a
//! rerun with the same output file resumes where the last one stopped.

mod input;

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::BatchArgs;
use crate::cmd::Context;
use crate::config::Node;
use crate::deadline::Budget;
use crate::error::{Error, ExitKind, IoContext, Result};
use crate::progress::Progress;
use crate::protocol::{DoneEvent, InferRequest};
use crate::queen::generate::{Runner, fails_over, generate_text, stop_name};
use crate::queen::pool::Pool;
use crate::queen::trail;
use input::Item;

pub(crate) async fn run(ctx: &Context, args: BatchArgs) -> Result<()> {
    let items = input::read(&args.input)?;
    let config = ctx.config()?;
    let route = config.route(args.node.as_deref(), args.model.as_deref())?;
    let done = match &args.output {
        Some(path) => input::done_ids(path)?,
        None => Default::default(),
    };
    let total = items.len();
    let queue: VecDeque<(Item, u32)> = items
        .into_iter()
        .filter(|item| !done.contains(&input::key(&item.id)))
        .map(|item| (item, 0))
        .collect();
    let mut out = Sink::open(args.output.as_deref())?;
    ctx.audit_note(
        "batch_started",
        None,
        json!({
            "items": total,
            "skipped": total - queue.len(),
            "model": route.model.name,
            "nodes": route.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        }),
    );
    let batch = Batch {
        // Each item's own spinners would fight the batch's bar.
        runner: Runner {
            progress: Progress::hidden(),
            ..ctx.runner(&config)
        },
        pool: Pool::default(),
        nodes: &route.nodes,
        model: route.model,
        retries: args.retries,
        timeout: args.timeout,
    };
    let outcome = batch.run(ctx, queue, &mut out).await;
    ctx.audit_note(
        "batch_finished",
        None,
        json!({
            "ok": outcome.ok,
            "failed": outcome.failed,
            "interrupted": outcome.interrupted,
            "unwritten": outcome.unwritten.as_ref().map(ToString::to_string),
        }),
    );
    match outcome.unwritten {
        // The reader of stdout has gone (`rbee batch in.jsonl | head -1`): it had what it
        // wanted, and the batch ends quietly, as `infer` does.
        Some(Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        // A full disk, a file gone read-only: the results written so far stay, and a rerun
        // with the same `--output` resumes after them.
        Some(e) => return Err(e),
        None => {}
    }
    if outcome.interrupted {
        return Err(Error::Interrupted);
    }
    if outcome.failed > 0 {
        return Err(Error::Classified {
            kind: ExitKind::BatchFailed,
            message: format!(
                "some items failed: {} of {} (each has an error line in the output)",
                outcome.failed,
                outcome.ok + outcome.failed
            ),
        });
    }
    Ok(())
}

struct Batch<'a> {
    runner: Runner,
    /// One connection per node for the whole batch, opened again when one fails.
    pool: Pool,
    nodes: &'a [&'a Node],
    model: &'a crate::config::Model,
    retries: u32,
    timeout: Option<std::time::Duration>,
}

#[derive(Default)]
struct Outcome {
    ok: usize,
    failed: usize,
    interrupted: bool,
    /// The output could not take a result: the batch stopped there.
    unwritten: Option<Error>,
}

/// What one try of an item came back with.
struct Tried {
    node: usize,
    item: Item,
    tries: u32,
    ms: f64,
    result: Result<(String, DoneEvent)>,
}

impl Batch<'_> {
    async fn run(
        &self,
        ctx: &Context,
        mut queue: VecDeque<(Item, u32)>,
        out: &mut Sink,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        // One item at a time on each node until one succeeds there: that one starts the hive
        // (installing it when needed) and loads the model, which concurrent first items would
        // each try at once.
        let mut free: Vec<u32> = vec![1; self.nodes.len()];
        let mut warm = vec![false; self.nodes.len()];
        // A node that failed an item takes no more: its other items would fail the same way,
        // and each would spend a retry.
        let mut down = vec![false; self.nodes.len()];
        let mut last_failure: Option<Error> = None;
        let mut running = FuturesUnordered::new();
        let mut in_flight = vec![0u32; self.nodes.len()];
        let bar = ctx.progress.items(queue.len() as u64);
        let started = Instant::now();
        let mut tokens_out: u64 = 0;
        let mut sigint = signal(SignalKind::interrupt()).ok();
        let mut stopping = false;
        loop {
            while !stopping
                && let Some(n) = (0..self.nodes.len()).find(|&n| free[n] > 0 && !down[n])
                && let Some((item, tries)) = queue.pop_front()
            {
                free[n] -= 1;
                in_flight[n] += 1;
                running.push(self.try_item(n, item, tries));
            }
            if running.is_empty() {
                break;
            }
            let per_node: Vec<String> = self
                .nodes
                .iter()
                .zip(&in_flight)
                .filter(|(_, n)| **n > 0)
                .map(|(node, n)| format!("{} {n}", node.name))
                .collect();
            bar.set_message(format!(
                "failed {}, in flight {}, {:.1} tokens/s",
                outcome.failed,
                per_node.join(" "),
                tokens_out as f64 / started.elapsed().as_secs_f64().max(0.001)
            ));
            let tried = tokio::select! {
                biased;
                _ = interrupted(&mut sigint) => {
                    if stopping {
                        // The second Ctrl-C: dropping the requests cancels them on their nodes;
                        // their items are not in the output, so a rerun runs them.
                        outcome.interrupted = true;
                        return outcome;
                    }
                    stopping = true;
                    outcome.interrupted = true;
                    ctx.progress.suspend(|| {
                        if !ctx.out.quiet {
                            eprintln!(
                                "rbee: interrupted; letting {} item(s) in flight finish \
                                 (Ctrl-C again cancels them)",
                                running.len()
                            );
                        }
                    });
                    continue;
                }
                Some(tried) = running.next() => tried,
            };
            let Tried {
                node,
                item,
                tries,
                ms,
                result,
            } = tried;
            free[node] += 1;
            in_flight[node] -= 1;
            let line = match result {
                Ok((text, done)) => {
                    if !warm[node] {
                        warm[node] = true;
                        // The worker's own count where it tells one (auto slots).
                        let slots = self.model.slots.or(done.slots);
                        free[node] += slots
                            .unwrap_or(crate::config::AUTO_SLOTS_BEFORE_REPORT)
                            .saturating_sub(1);
                    }
                    tokens_out += u64::from(done.tokens_out);
                    outcome.ok += 1;
                    json!({
                        "id": item.id,
                        "text": text,
                        "node": self.nodes[node].name,
                        "tokens_in": done.tokens_in,
                        "tokens_out": done.tokens_out,
                        "stop_reason": stop_name(done.stop_reason),
                        "ms": ms.round(),
                    })
                }
                Err(e) if fails_over(&e) && tries < self.retries => {
                    tracing::info!(node = %self.nodes[node].name, "retrying {} elsewhere: {e}", item.id);
                    down[node] = true;
                    last_failure = Some(e);
                    // At the front: it has waited longest.
                    queue.push_front((item, tries + 1));
                    continue;
                }
                Err(e) => {
                    if fails_over(&e) {
                        down[node] = true;
                    }
                    outcome.failed += 1;
                    error_line(&item.id, &e)
                }
            };
            bar.inc(1);
            if let Err(e) = ctx.progress.suspend(|| out.write(&line)) {
                // Nowhere to put results: stop here (the items in flight are cancelled on
                // their nodes); what is written stays written.
                outcome.unwritten = Some(e);
                return outcome;
            }
        }
        bar.finish_and_clear();
        // Every node went down with items left: each gets the last node's reason.
        if !stopping && !queue.is_empty() {
            let why = last_failure.map_or_else(
                || "no node could take it".to_string(),
                |e| format!("every node failed; the last one: {e}"),
            );
            for (item, _) in queue.drain(..) {
                outcome.failed += 1;
                let e = Error::Classified {
                    kind: ExitKind::HiveUnavailable,
                    message: why.clone(),
                };
                if let Err(e) = out.write(&error_line(&item.id, &e)) {
                    outcome.unwritten = Some(e);
                    break;
                }
            }
        }
        outcome
    }

    /// One try of `item` on node `n`, on a budget of its own.
    async fn try_item(&self, n: usize, item: Item, tries: u32) -> Tried {
        let node = self.nodes[n];
        let started = Instant::now();
        let budget = Budget::new(self.timeout.unwrap_or(node.timeout));
        let mut request = InferRequest {
            request_id: format!("{:032x}", rand::random::<u128>()),
            model: self.model.name.clone(),
            model_digest: crate::protocol::model_digest(self.model),
            system: item.system.clone(),
            prompt: item.prompt.clone(),
            messages: Vec::new(),
            raw: item.raw,
            params: item.params.clone(),
            queen_audit: None,
        };
        let result = match self.requested(node, &mut request, &budget) {
            Ok(()) => {
                let work = generate_text(&self.runner, &self.pool, node, &request, &budget);
                let result = match tokio::time::timeout_at(budget.deadline().into(), work).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::deadline(format!(
                        "the item's deadline of {} passed on `{}`",
                        humantime::format_duration(budget.total()),
                        node.name
                    ))),
                };
                self.completed(node, &request, &budget, result)
            }
            Err(e) => Err(e),
        };
        Tried {
            node: n,
            item,
            tries,
            ms: started.elapsed().as_secs_f64() * 1000.0,
            result,
        }
    }
}

impl Batch<'_> {
    /// Each try is on this machine's record as an `infer` is, and its head goes with the
    /// request for the node's log to witness; under `audit = "required"` an unrecorded try is
    /// not sent (the item fails with exit 10, not retried: every node would refuse it alike).
    fn requested(&self, node: &Node, request: &mut InferRequest, budget: &Budget) -> Result<()> {
        trail::record_request(
            &crate::queen::audit(),
            request,
            node,
            budget,
            json!({ "batch": true }),
        )
    }

    /// Records how the try ended and weighs what either end could not record, as `infer` does.
    fn completed(
        &self,
        node: &Node,
        request: &InferRequest,
        budget: &Budget,
        result: Result<(String, DoneEvent)>,
    ) -> Result<(String, DoneEvent)> {
        let (outcome, answer) = match result {
            Ok(answer) => (Ok(()), Some(answer)),
            Err(e) => (Err(e), None),
        };
        let done = answer.as_ref().map(|(_, d)| d);
        let completed = crate::queen::audit_end(budget, &outcome).record(
            "infer_completed",
            Some(&request.request_id),
            trail::completed_fields(node, &self.model.name, &outcome, done, budget, json!({})),
        );
        trail::audited(node, outcome, done, completed.err())?;
        answer.ok_or_else(|| Error::internal("a try succeeded without an answer"))
    }
}

fn error_line(id: &Value, e: &Error) -> Value {
    json!({
        "id": id,
        "error": {
            "code": e.kind().wire_code(),
            "message": e.to_string(),
            "exit_code": e.code(),
        },
    })
}

/// Resolves on SIGINT; never when no handler could be set up (the default action then applies).
async fn interrupted(sigint: &mut Option<tokio::signal::unix::Signal>) {
    match sigint {
        Some(s) => {
            s.recv().await;
        }
        None => futures::future::pending::<()>().await,
    }
}

/// Where result lines go: the output file (appended) or stdout. Each line is written whole with
/// one write and flushed, so a crash leaves at most one cut line, which a rerun drops.
enum Sink {
    Stdout,
    File(std::fs::File, std::path::PathBuf),
}

impl Sink {
    fn open(path: Option<&Path>) -> Result<Sink> {
        match path {
            None => Ok(Sink::Stdout),
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        Error::usage(format!("cannot open `--output {}`: {e}", path.display()))
                    })?;
                Ok(Sink::File(file, path.to_path_buf()))
            }
        }
    }

    fn write(&mut self, line: &Value) -> Result<()> {
        let mut bytes = serde_json::to_vec(line)
            .map_err(|e| Error::internal(format!("cannot encode a result: {e}")))?;
        bytes.push(b'\n');
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)
                    .and_then(|()| out.flush())
                    .doing("write a result to stdout")?;
            }
            Sink::File(file, path) => {
                file.write_all(&bytes)
                    .and_then(|()| file.flush())
                    .at("append to", path)?;
            }
        }
        Ok(())
    }
}
