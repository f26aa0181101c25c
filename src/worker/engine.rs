//! llama.cpp with continuous batching: one context holds one KV sequence per slot; every decode
//! step feeds the next token of every active generation in one batch, so concurrent requests
//! share each pass over the weights. A request joins between steps (its prompt is prefilled in
//! chunks, in one pass with the other prompts waiting, with a decode step for the generations
//! under way after each pass; then it rides along) and leaves between steps; each keeps its own
//! sampler and seed.
//! The batcher is a future on the worker's single-threaded runtime: a pass blocks the thread,
//! and the HTTP side runs between passes (see `Batcher::serve`).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::error::Error;
use crate::protocol::WORKER_ALIVE_EVERY as ALIVE_EVERY;
use crate::protocol::{DoneEvent, GenerateRequest, Generation, StopReason, Timings};
use crate::worker::prompt::{Sampling, render_prompt, sampler};
use crate::worker::stop::StopMatcher;
use crate::worker::utf8::Utf8Buffer;

/// What the engine reports about one job, in order: `Started` or `Failed` first, then tokens,
/// then `Done` (or `Failed` if decoding broke).
#[derive(Debug)]
pub(crate) enum EngineEvent {
    Started {
        tokens_in: u32,
    },
    /// `done` of the prompt's `total` tokens are prefilled; sent between chunks.
    Prefill {
        done: u32,
        total: u32,
    },
    /// Tokens were decoded but none of their text went out (a stop string may still be under
    /// way): sent at most every `ALIVE_EVERY`, so the hive does not take the worker for stuck.
    Progress {
        tokens_out: u32,
    },
    Token(String),
    Done(DoneEvent),
    Failed(Error),
}

pub(crate) struct Job {
    pub(crate) request: GenerateRequest,
    pub(crate) deadline: Option<Instant>,
    pub(crate) events: UnboundedSender<EngineEvent>,
}

/// What the engine is doing, for `GET /health`: the generations under way and the last one.
#[derive(Debug, Default, Clone)]
pub(crate) struct Activity {
    pub(crate) active: Vec<Generation>,
    pub(crate) last: Option<Generation>,
    pub(crate) prefill_passes: u64,
    pub(crate) prefill_chunks: u64,
    pub(crate) peak_active: usize,
}

type SharedActivity = Arc<Mutex<Activity>>;

fn update(activity: &SharedActivity, f: impl FnOnce(&mut Activity)) {
    // Plain data: a poisoned lock still holds a usable value.
    f(&mut activity.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Where requests enter the batcher: what the HTTP side holds.
#[derive(Clone)]
pub(crate) struct Engine {
    jobs: UnboundedSender<Job>,
    activity: SharedActivity,
}

impl Engine {
    pub(crate) fn activity(&self) -> Activity {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn submit(&self, job: Job) -> Result<(), Error> {
        self.jobs
            .send(job)
            .map_err(|_| Error::worker("the batcher has stopped"))
    }
}

pub(super) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// One generation in its KV sequence.
struct Slot {
    seq: i32,
    job: Job,
    sampler: Sampling,
    utf8: Utf8Buffer,
    /// The request's stop strings, and the text held back while it may still become one.
    stop: StopMatcher,
    /// The last token's bytes, reused from token to token.
    piece: Vec<u8>,
    /// The token to feed at the next step.
    next: LlamaToken,
    /// The tokens whose keys and values the sequence holds.
    tokens: Vec<LlamaToken>,
    tokens_in: u32,
    tokens_out: u32,
    prefill_ms: f64,
    decode_started: Instant,
    first_token_at: Option<Instant>,
    /// When the generation last sent an event.
    last_sent: Instant,
}

/// A prompt on its way into its KV sequence, one chunk per turn.
struct Prefill {
    seq: i32,
    job: Job,
    /// Built when the job is admitted, so that a format it cannot have fails it at once.
    sampler: Sampling,
    tokens: Vec<LlamaToken>,
    /// How many of `tokens` the sequence holds so far.
    held: usize,
    tokens_in: u32,
    started: Instant,
}

pub(crate) struct Batcher<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Tokens of context per sequence.
    n_ctx: u32,
    jobs: UnboundedReceiver<Job>,
    /// Sequence ids not in use; the lowest is taken first, see `step`.
    free: BTreeSet<i32>,
    /// By sequence id: the tokens a free sequence still holds from its last request, so that a
    /// prompt starting the same way (a shared system prompt, a repeated request) skips them.
    cached: Vec<Vec<LlamaToken>>,
    /// Prompts being prefilled, taking turns chunk by chunk.
    prefills: VecDeque<Prefill>,
    /// Prompt tokens in the next prefill chunk (see `CHUNK_TARGET`).
    chunk: usize,
    /// Ordered by sequence id.
    active: Vec<Slot>,
    activity: SharedActivity,
}

impl<'m> Batcher<'m> {
    /// The batcher over a context with `slots` KV sequences of `n_ctx` tokens each, and the
    /// handle requests come in by.
    pub(super) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        n_ctx: u32,
        slots: u32,
    ) -> (Batcher<'m>, Engine) {
        let (jobs_tx, jobs) = tokio::sync::mpsc::unbounded_channel();
        let activity = SharedActivity::default();
        let batcher = Batcher {
            model,
            batch: LlamaBatch::new(ctx.n_batch().max(slots) as usize, 1),
            ctx,
            n_ctx,
            jobs,
            free: (0..i32::try_from(slots).unwrap_or(i32::MAX)).collect(),
            cached: vec![Vec::new(); slots as usize],
            prefills: VecDeque::new(),
            chunk: PREFILL_CHUNK,
            active: Vec::new(),
            activity: activity.clone(),
        };
        let engine = Engine {
            jobs: jobs_tx,
            activity,
        };
        (batcher, engine)
    }
}

impl Batcher<'_> {
    /// Runs until every `Engine` handle is gone and the generations under way have ended:
    /// admits jobs while there are free sequences, runs one pass of the prompts being
    /// prefilled (a chunk of each, within a pass's budget), then one decode step, so that a long
    /// prompt neither holds back the generations already decoding nor the short prompts that
    /// come after it.
    ///
    /// It runs on the thread that serves HTTP, and yields to it between passes over the model:
    /// the tokens of a step go out, and new requests come in, without waking another thread,
    /// which on a machine with as many cores as llama.cpp threads would take a core from
    /// llama.cpp in the middle of a pass.
    pub(crate) async fn serve(mut self) {
        loop {
            // Idle: sleep until a job comes. Busy: take what is waiting, without blocking.
            let idle = self.active.is_empty() && self.prefills.is_empty();
            let mut admitted = false;
            if idle {
                match self.jobs.recv().await {
                    Some(job) => self.admit(job),
                    None => return,
                }
                admitted = true;
            }
            match self.admit_waiting() {
                None => return,
                Some(more) => admitted |= more,
            }
            if admitted {
                // The `started` events go out (and the hive has its response) before the pass,
                // and requests already on their way in (a script's parallel calls, queued on
                // the socket while the last pass ran) get in too, to share the next prefill
                // pass: taking one in needs a turn or more of the HTTP side (see
                // `between_chunks`), and a turn with nothing to do costs one poll. Those taken
                // in by the second look hear `started` after the pass.
                for _ in 0..HTTP_TURNS_PER_CHUNK {
                    tokio::task::yield_now().await;
                }
                if self.admit_waiting().is_none() {
                    return;
                }
            }
            if !self.prefills.is_empty() {
                self.prefill_pass();
                between_chunks().await;
            }
            if !self.active.is_empty() {
                self.step();
                between_passes().await;
            }
        }
    }

    /// Admits the jobs waiting while there are free sequences: whether any came in, or `None`
    /// once every `Engine` handle is gone and nothing is under way.
    fn admit_waiting(&mut self) -> Option<bool> {
        let mut admitted = false;
        while !self.free.is_empty() {
            match self.jobs.try_recv() {
                Ok(job) => {
                    self.admit(job);
                    admitted = true;
                }
                Err(TryRecvError::Empty) => break,
                // Finish what is under way; the loop ends when nothing is left.
                Err(TryRecvError::Disconnected)
                    if self.active.is_empty() && self.prefills.is_empty() =>
                {
                    return None;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        }
        Some(admitted)
    }

    /// Takes a job into a free sequence: what the sequence still holds of the prompt is kept,
    /// and the rest waits for its chunks in `prefills`.
    fn admit(&mut self, job: Job) {
        let prepared = self
            .tokenize(&job.request)
            .and_then(|tokens| Ok((tokens, sampler(self.model, &job.request)?)));
        let (tokens, sampler) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                let _ = job.events.send(EngineEvent::Failed(err));
                return;
            }
        };
        let Some(seq) = self.pick(&tokens) else {
            // The caller admits only while a sequence is free.
            let _ = job.events.send(EngineEvent::Failed(Error::internal(
                "no free sequence for the request",
            )));
            return;
        };
        self.free.remove(&seq);
        let tokens_in = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if job.events.send(EngineEvent::Started { tokens_in }).is_err() {
            self.free.insert(seq);
            return;
        }
        // At least the last token is decoded again, for its logits.
        let mut keep = common_prefix(&self.cached[seq as usize], &tokens).min(tokens.len() - 1);
        let from = u32::try_from(keep).ok();
        if !matches!(
            self.ctx
                .clear_kv_cache_seq(u32::try_from(seq).ok(), from, None),
            Ok(true)
        ) {
            self.forget(seq);
            keep = 0;
        }
        self.cached[seq as usize].clear();
        self.prefills.push_back(Prefill {
            seq,
            job,
            sampler,
            tokens,
            held: keep,
            tokens_in,
            started: Instant::now(),
        });
    }

    /// The free sequence for a prompt: the lowest id, unless another holds a much longer start
    /// of this prompt from an earlier request (a gap in the ids costs a pass per step, see
    /// `step`; a reused prefix saves its prefill once).
    fn pick(&self, tokens: &[LlamaToken]) -> Option<i32> {
        let lowest = *self.free.first()?;
        let reuse = |seq: i32| common_prefix(&self.cached[seq as usize], tokens);
        let best = self
            .free
            .iter()
            .copied()
            .max_by_key(|&seq| (reuse(seq), -seq))?;
        Some(if reuse(best) >= reuse(lowest) + PREFIX_WORTH_A_GAP {
            best
        } else {
            lowest
        })
    }

    /// Runs the next chunks of the prompts waiting, as many as fit one pass's token budget, in
    /// one batch. After a prompt's last chunk its generation takes its first token and joins
    /// the decode steps; before it, the prompt goes back in line behind the others and the
    /// client hears how far it got (which also tells the hive that the worker is not stuck). A
    /// prompt whose client has gone or whose deadline has passed ends before its next chunk.
    ///
    /// Requests that arrive together (a script's parallel calls, a batch) are prefilled in
    /// one pass and then decode in step, instead of each taking a pass of its own with a
    /// decode step of the others between: llama.cpp runs the prompts of consecutive sequences
    /// together, as many tokens of each as the shortest has, in one pass over the weights, and
    /// the rest of the longer ones after it (a gap in the ids starts another pass; see `step`
    /// on the order), and generations that start together end together, without a tail of
    /// steps with few sequences in them.
    fn prefill_pass(&mut self) {
        let budget = (self.ctx.n_batch() as usize).clamp(1, self.chunk);
        let mut taken: Vec<(Prefill, usize)> = Vec::new();
        let mut used = 0;
        while used < budget {
            let Some(mut p) = self.prefills.pop_front() else {
                break;
            };
            let stop = if p.job.events.is_closed() {
                Some(StopReason::Cancelled)
            } else if p.job.deadline.is_some_and(|d| Instant::now() >= d) {
                Some(StopReason::Deadline)
            } else {
                None
            };
            if let Some(reason) = stop {
                // The sequence holds only what was decoded.
                p.tokens.truncate(p.held);
                let slot = self.slot(p);
                self.finish(slot, reason);
                continue;
            }
            let end = (p.held + budget - used).min(p.tokens.len());
            used += end - p.held;
            taken.push((p, end));
        }
        if taken.is_empty() {
            return;
        }
        taken.sort_by_key(|(p, _)| p.seq);
        let pass_started = Instant::now();
        self.batch.clear();
        let mut added = Ok(());
        // By prompt: the batch row of its last token's logits, after its last chunk.
        let mut rows = Vec::with_capacity(taken.len());
        for (p, end) in &taken {
            let last = *end == p.tokens.len();
            for (i, token) in p.tokens[p.held..*end].iter().enumerate() {
                let pos = i32::try_from(p.held + i).unwrap_or(i32::MAX);
                let logits = last && p.held + i + 1 == *end;
                added = added.and_then(|()| self.batch.add(*token, pos, &[p.seq], logits));
            }
            rows.push(last.then(|| self.batch.n_tokens() - 1));
        }
        let result = match added {
            Err(e) => Err(Error::internal(format!("batch: {e}"))),
            Ok(()) => self.ctx.decode(&mut self.batch).map_err(decode_error),
        };
        if let Err(err) = result {
            // A failed pass leaves every sequence in it unusable.
            for (p, _) in taken {
                self.forget(p.seq);
                self.free.insert(p.seq);
                let _ = p.job.events.send(EngineEvent::Failed(Error::of_kind(
                    err.kind(),
                    err.to_string(),
                )));
            }
            return;
        }
        update(&self.activity, |a| {
            a.prefill_passes += 1;
            a.prefill_chunks += taken.len() as u64;
        });
        // The next pass is sized from this one's speed, so that it takes about CHUNK_TARGET.
        let took = pass_started.elapsed().as_secs_f64().max(1e-3);
        let per_target = (used as f64 * CHUNK_TARGET.as_secs_f64() / took) as usize;
        self.chunk = per_target.clamp(MIN_PREFILL_CHUNK, PREFILL_CHUNK);
        // Every prompt still waiting its turn hears of this pass too: with several long prompts
        // taking turns, each one's own chunk comes only every few passes, and on a loaded
        // machine that gap alone would outlast the hive's stall timeout.
        for waiting in &self.prefills {
            let _ = waiting.job.events.send(EngineEvent::Prefill {
                done: u32::try_from(waiting.held).unwrap_or(u32::MAX),
                total: waiting.tokens_in,
            });
        }
        for ((mut p, end), row) in taken.into_iter().zip(rows) {
            p.held = end;
            let Some(row) = row else {
                let done = u32::try_from(end).unwrap_or(u32::MAX);
                let _ = p.job.events.send(EngineEvent::Prefill {
                    done,
                    total: p.tokens_in,
                });
                self.prefills.push_back(p);
                continue;
            };
            update(&self.activity, |a| {
                a.active.push(Generation {
                    request_id: p.job.request.request_id.clone(),
                    tokens_out: 0,
                    stop_reason: None,
                });
                a.peak_active = a.peak_active.max(a.active.len());
            });
            let slot = self.slot(p);
            self.after_logits(slot, row);
        }
    }

    /// The generation of a prompt whose prefill has ended.
    fn slot(&self, p: Prefill) -> Slot {
        Slot {
            seq: p.seq,
            sampler: p.sampler,
            stop: StopMatcher::new(p.job.request.params.stop.clone()),
            job: p.job,
            utf8: Utf8Buffer::default(),
            piece: Vec::new(),
            tokens: p.tokens,
            next: LlamaToken(0),
            tokens_in: p.tokens_in,
            tokens_out: 0,
            prefill_ms: ms(p.started),
            decode_started: Instant::now(),
            first_token_at: None,
            last_sent: Instant::now(),
        }
    }

    fn tokenize(&self, request: &GenerateRequest) -> Result<Vec<LlamaToken>, Error> {
        let text = render_prompt(self.model, request)?;
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if tokens.len() >= self.n_ctx as usize {
            return Err(Error::invalid(format!(
                "the prompt is {} tokens; the model's context holds {}",
                tokens.len(),
                self.n_ctx
            )));
        }
        Ok(tokens)
    }

    /// One decode pass: the next token of every active generation, each in its sequence.
    ///
    /// With a KV stream per sequence, llama.cpp computes one batch in a single pass only when
    /// its sequence ids run consecutively upwards (0, 1, 2...); any other order or a gap splits
    /// it into several passes, each reading all the weights. Hence the batch in sequence order,
    /// and new requests take the lowest free id, closing gaps that finished requests leave.
    fn step(&mut self) {
        self.active.sort_by_key(|slot| slot.seq);
        self.batch.clear();
        let mut added = Ok(());
        for slot in &self.active {
            // The position of the next token is the number the sequence holds.
            let pos = i32::try_from(slot.tokens.len()).unwrap_or(i32::MAX);
            added = added.and_then(|()| self.batch.add(slot.next, pos, &[slot.seq], true));
        }
        let result = match added {
            Err(e) => Err(Error::internal(format!("batch: {e}"))),
            Ok(()) => self.ctx.decode(&mut self.batch).map_err(decode_error),
        };
        let slots = std::mem::take(&mut self.active);
        if let Err(err) = result {
            // A failed pass leaves every sequence in it unusable: fail them all, clear their
            // cells, and carry on with the next requests.
            for slot in slots {
                self.forget(slot.seq);
                self.finish_failed(slot, Error::of_kind(err.kind(), err.to_string()));
            }
            return;
        }
        for (i, mut slot) in slots.into_iter().enumerate() {
            slot.tokens.push(slot.next);
            self.after_logits(slot, i32::try_from(i).unwrap_or(i32::MAX));
        }
    }

    /// Samples a generation's next token from logits row `idx` of the last pass, sends its
    /// text, and keeps the generation for the next step or ends it.
    fn after_logits(&mut self, mut slot: Slot, idx: i32) {
        match self.next_token(&mut slot, idx) {
            Ok(None) => self.active.push(slot),
            Ok(Some(reason)) => self.finish(slot, reason),
            Err(err) => {
                // The sequence holds the tokens fed so far, as after any other ending.
                self.cached[slot.seq as usize] = std::mem::take(&mut slot.tokens);
                self.finish_failed(slot, err);
            }
        }
    }

    fn next_token(&self, slot: &mut Slot, idx: i32) -> Result<Option<StopReason>, Error> {
        if slot.job.deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Some(StopReason::Deadline));
        }
        if slot.job.events.is_closed() {
            return Ok(Some(StopReason::Cancelled));
        }
        let vocab = self.model.vocab();
        let token = slot.sampler.sample(&self.ctx, idx)?;
        if vocab.is_eog(token) {
            return Ok(Some(StopReason::Eos));
        }
        slot.tokens_out += 1;
        let (request_id, tokens_out) = (&slot.job.request.request_id, slot.tokens_out);
        update(&self.activity, |a| {
            if let Some(g) = a.active.iter_mut().find(|g| &g.request_id == request_id) {
                g.tokens_out = tokens_out;
            }
        });
        slot.first_token_at.get_or_insert_with(Instant::now);
        slot.piece.clear();
        vocab.token_to_piece_into(token, &mut slot.piece, false, None);
        let released = slot.stop.push(&slot.utf8.push(&slot.piece));
        let event = if !released.text.is_empty() {
            Some(EngineEvent::Token(released.text))
        } else if slot.last_sent.elapsed() >= ALIVE_EVERY {
            Some(EngineEvent::Progress { tokens_out })
        } else {
            None
        };
        if let Some(event) = event {
            if slot.job.events.send(event).is_err() {
                return Ok(Some(StopReason::Cancelled));
            }
            slot.last_sent = Instant::now();
        }
        if released.stopped {
            return Ok(Some(StopReason::Stop));
        }
        if slot.tokens_out >= slot.job.request.params.max_tokens {
            return Ok(Some(StopReason::MaxTokens));
        }
        if slot.tokens.len() >= self.n_ctx as usize {
            return Ok(Some(StopReason::ContextFull));
        }
        slot.next = token;
        Ok(None)
    }

    fn finish(&mut self, mut slot: Slot, mut stop_reason: StopReason) {
        self.cached[slot.seq as usize] = std::mem::take(&mut slot.tokens);
        // After a stop string nothing more goes out; otherwise what was held back does (the last
        // bytes of a cut character may yet complete a stop string).
        if stop_reason != StopReason::Stop {
            let released = slot.stop.push(&slot.utf8.finish());
            let mut rest = released.text;
            if released.stopped {
                stop_reason = StopReason::Stop;
            } else {
                rest.push_str(&slot.stop.finish());
            }
            if !rest.is_empty() {
                let _ = slot.job.events.send(EngineEvent::Token(rest));
            }
        }
        // The first token comes out of prefill's logits; speed counts the decode steps after it.
        let decode_tokens_per_s = slot.first_token_at.and_then(|first| {
            let secs = first.elapsed().as_secs_f64();
            (slot.tokens_out > 1 && secs > 0.0).then(|| f64::from(slot.tokens_out - 1) / secs)
        });
        let done = DoneEvent {
            tokens_in: slot.tokens_in,
            tokens_out: slot.tokens_out,
            stop_reason,
            timings_ms: Timings {
                prefill: Some(slot.prefill_ms),
                decode: Some(ms(slot.decode_started)),
                ..Timings::default()
            },
            decode_tokens_per_s,
            worker_pid: Some(std::process::id()),
            slots: u32::try_from(self.cached.len()).ok(),
            node_audit: None,
            audit_warning: None,
        };
        let _ = slot.job.events.send(EngineEvent::Done(done));
        self.retire(&slot, Some(stop_reason));
    }

    fn finish_failed(&mut self, slot: Slot, err: Error) {
        let _ = slot.job.events.send(EngineEvent::Failed(err));
        self.retire(&slot, None);
    }

    /// Moves a generation from active to last and gives its sequence back.
    fn retire(&mut self, slot: &Slot, stop_reason: Option<StopReason>) {
        let request_id = &slot.job.request.request_id;
        update(&self.activity, |a| {
            if let Some(i) = a.active.iter().position(|g| &g.request_id == request_id) {
                let mut generation = a.active.remove(i);
                generation.stop_reason = stop_reason;
                a.last = Some(generation);
            }
        });
        self.free.insert(slot.seq);
    }

    /// Clears a sequence's cells.
    fn forget(&mut self, seq: i32) {
        // Removing a whole sequence (all positions) cannot fail; the result is only a bool for
        // partial removals in recurrent models.
        let _ = self
            .ctx
            .clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
        self.cached[seq as usize].clear();
    }
}

/// After a pass that sampled tokens: they go out and new requests come in (the HTTP side runs),
/// then the processes they woke get this core.
async fn between_passes() {
    tokio::task::yield_now().await;
    make_way();
}

/// After a prefill chunk, a pass far longer than a decode step: the HTTP side gets several turns,
/// since taking a request in (accept, read, verify, hand over) and answering it need one turn
/// each, and with one turn per chunk a request arriving during a long prompt would wait many
/// chunks for its `started` event. A turn with nothing to do costs one poll of the sockets.
async fn between_chunks() {
    for _ in 0..HTTP_TURNS_PER_CHUNK {
        tokio::task::yield_now().await;
    }
    make_way();
}

const HTTP_TURNS_PER_CHUNK: usize = 8;

/// Lets the processes the last tokens woke (the hive, and on a local node the CLI) run now, on
/// this core, between passes. Left to the scheduler, they preempt a llama.cpp thread in the
/// middle of the next pass, and the other llama.cpp threads spin at their barrier until it is
/// back, so a machine with no core to spare loses several times the relays' own CPU time. On 2
/// cores this took decode through rbee from ~93% of the raw engine to 97-100% (bench.sh). A
/// yield with nothing else runnable returns at once.
fn make_way() {
    for _ in 0..3 {
        std::thread::yield_now();
    }
}

/// Prompt tokens per prefill pass at most, between which the worker answers HTTP: small enough
/// for a slow CPU to finish one in well under the hive's 2 s health check.
const PREFILL_CHUNK: usize = 256;
/// The fewest prompt tokens a chunk is cut to on a starved CPU.
const MIN_PREFILL_CHUNK: usize = 16;
/// How long one chunk should take: the chunk shrinks when the last one took longer (a loaded
/// machine, a large model), so the worker still answers and reports progress well inside the
/// hive's 10 s stall timeout.
const CHUNK_TARGET: std::time::Duration = std::time::Duration::from_secs(2);

/// How many more prompt tokens a free sequence must already hold than the lowest free one to be
/// picked over it.
const PREFIX_WORTH_A_GAP: usize = 64;

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn decode_error(e: impl std::fmt::Display) -> Error {
    Error::worker(format!("llama.cpp decode failed: {e}"))
}
