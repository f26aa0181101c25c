//! llama.cpp on its own OS thread: loads the model once, then runs one generation at a time
//! from a channel, sending tokens back as they are decoded. Async code never blocks on decode.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::Error;
use crate::wire::{DoneEvent, GenerateRequest, Generation, StopReason, Timings};
use crate::worker::utf8::Utf8Buffer;

/// Longest context used when the user sets none: the training context can be far larger than
/// what a small machine wants to allocate for the KV cache.
const DEFAULT_MAX_CONTEXT: u32 = 4096;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_path: PathBuf,
    pub context: Option<u32>,
    pub threads: Option<u32>,
    pub gpu_layers: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub n_ctx: u32,
    pub load_ms: f64,
}

/// What the engine reports about one job, in order: `Started` or `Failed` first, then tokens,
/// then `Done` (or `Failed` if decoding broke).
#[derive(Debug)]
pub enum EngineEvent {
    Started { tokens_in: u32 },
    Token(String),
    Done(DoneEvent),
    Failed(Error),
}

pub struct Job {
    pub request: GenerateRequest,
    pub deadline: Option<Instant>,
    pub events: UnboundedSender<EngineEvent>,
}

/// What the engine is doing, for `GET /health`: the generation under way and the last one.
#[derive(Debug, Default, Clone)]
pub struct Activity {
    pub active: Option<Generation>,
    pub last: Option<Generation>,
}

type SharedActivity = Arc<Mutex<Activity>>;

fn update(activity: &SharedActivity, f: impl FnOnce(&mut Activity)) {
    // Plain data: a poisoned lock still holds a usable value.
    f(&mut activity.lock().unwrap_or_else(|p| p.into_inner()));
}

/// The sending side of the engine thread's queue.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    activity: SharedActivity,
}

impl Engine {
    /// Starts the thread and waits until the model is loaded (or failed to load).
    pub fn start(options: EngineOptions) -> Result<(Engine, Loaded), Error> {
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let activity = SharedActivity::default();
        let shared = activity.clone();
        std::thread::Builder::new()
            .name("llama".to_string())
            .spawn(move || run(options, jobs_rx, ready_tx, shared))
            .map_err(|e| Error::worker(format!("cannot start the llama.cpp thread: {e}")))?;
        let loaded = ready_rx
            .recv()
            .map_err(|_| Error::worker("the llama.cpp thread stopped while loading"))??;
        Ok((
            Engine {
                jobs: jobs_tx,
                activity,
            },
            loaded,
        ))
    }

    pub fn activity(&self) -> Activity {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn submit(&self, job: Job) -> Result<(), Error> {
        self.jobs
            .send(job)
            .map_err(|_| Error::worker("the llama.cpp thread has stopped"))
    }
}

fn run(
    options: EngineOptions,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::SyncSender<Result<Loaded, Error>>,
    activity: SharedActivity,
) {
    let started = Instant::now();
    let backend = match LlamaBackend::init() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(Error::worker(format!("cannot start llama.cpp: {e}"))));
            return;
        }
    };
    let params = LlamaModelParams::default().with_n_gpu_layers(options.gpu_layers);
    let model = match LlamaModel::load_from_file(&backend, &options.model_path, &params) {
        Ok(m) => m,
        Err(e) => {
            let message = format!(
                "llama.cpp cannot load `{}`: {e}",
                options.model_path.display()
            );
            let _ = ready.send(Err(Error::worker(message)));
            return;
        }
    };
    let n_ctx = options
        .context
        .unwrap_or_else(|| model.n_ctx_train().clamp(1, DEFAULT_MAX_CONTEXT));
    let threads = options.threads.map_or_else(default_threads, |t| t.max(1));
    let threads = i32::try_from(threads).unwrap_or(i32::MAX);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.new_context(&backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("llama.cpp cannot create a context of {n_ctx} tokens: {e}");
            let _ = ready.send(Err(Error::worker(message)));
            return;
        }
    };
    let loaded = Loaded {
        n_ctx: ctx.n_ctx(),
        load_ms: ms(started),
    };
    if ready.send(Ok(loaded)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let events = job.events.clone();
        let result = generate(&model, &mut ctx, &job, &activity);
        update(&activity, |a| {
            if let Some(mut active) = a.active.take() {
                active.stop_reason = result.as_ref().ok().copied();
                a.last = Some(active);
            }
        });
        if let Err(err) = result {
            let _ = events.send(EngineEvent::Failed(err));
        }
    }
}

fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The prompt as the model expects it: its own chat template when it has one.
fn render_prompt(model: &LlamaModel, request: &GenerateRequest) -> Result<String, Error> {
    let template = match model.chat_template(None) {
        Ok(t) => t,
        // A base model without a template gets the text as it is.
        Err(_) => return Ok(request.prompt.clone()),
    };
    let message = |role: &str, content: &str| {
        LlamaChatMessage::new(role.to_string(), content.to_string())
            .map_err(|_| Error::invalid("the prompt contains a NUL byte"))
    };
    let mut chat = Vec::new();
    if let Some(system) = &request.system {
        chat.push(message("system", system)?);
    }
    chat.push(message("user", &request.prompt)?);
    model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| Error::worker(format!("cannot apply the model's chat template: {e}")))
}

fn sampler(request: &GenerateRequest) -> LlamaSampler {
    let p = &request.params;
    if p.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let seed = p.seed.unwrap_or_else(rand::random);
    LlamaSampler::chain_simple([
        LlamaSampler::top_p(p.top_p, 1),
        LlamaSampler::temp(p.temperature),
        LlamaSampler::dist(seed),
    ])
}

/// Runs one job to its end; returns why it stopped.
fn generate(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    job: &Job,
    activity: &SharedActivity,
) -> Result<StopReason, Error> {
    let request = &job.request;
    let text = render_prompt(model, request)?;
    let vocab = model.vocab();
    let tokens = vocab.tokenize(text.as_bytes(), true, true);
    let n_ctx = ctx.n_ctx() as usize;
    if tokens.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    if tokens.len() >= n_ctx {
        return Err(Error::invalid(format!(
            "the prompt is {} tokens; the model's context holds {n_ctx}",
            tokens.len()
        )));
    }
    let tokens_in = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    update(activity, |a| {
        a.active = Some(Generation {
            request_id: request.request_id.clone(),
            tokens_out: 0,
            stop_reason: None,
        });
    });
    if job.events.send(EngineEvent::Started { tokens_in }).is_err() {
        return Ok(StopReason::Cancelled);
    }

    let expired = || job.deadline.is_some_and(|d| Instant::now() >= d);
    let decode_err = |e| Error::worker(format!("llama.cpp decode failed: {e}"));
    ctx.clear_kv_cache();
    let n_batch = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(n_batch.max(1), 1);

    let prefill_started = Instant::now();
    let mut pos: i32 = 0;
    let chunks: Vec<&[_]> = tokens.chunks(n_batch.max(1)).collect();
    for (ci, chunk) in chunks.iter().enumerate() {
        batch.clear();
        for (i, token) in chunk.iter().enumerate() {
            let last = ci + 1 == chunks.len() && i + 1 == chunk.len();
            batch
                .add(*token, pos, &[0], last)
                .map_err(|e| Error::internal(format!("batch: {e}")))?;
            pos += 1;
        }
        ctx.decode(&mut batch).map_err(decode_err)?;
    }
    let prefill_ms = ms(prefill_started);

    let mut sampler = sampler(request);
    let mut utf8 = Utf8Buffer::default();
    let mut piece = Vec::new();
    let mut tokens_out: u32 = 0;
    let decode_started = Instant::now();
    let mut first_token_at = None;
    let stop_reason = loop {
        if expired() {
            break StopReason::Deadline;
        }
        if job.events.is_closed() {
            break StopReason::Cancelled;
        }
        let token = sampler.sample(ctx, batch.n_tokens() - 1);
        if vocab.is_eog(token) {
            break StopReason::Eos;
        }
        tokens_out += 1;
        update(activity, |a| {
            if let Some(active) = a.active.as_mut() {
                active.tokens_out = tokens_out;
            }
        });
        first_token_at.get_or_insert_with(Instant::now);
        piece.clear();
        vocab.token_to_piece_into(token, &mut piece, false, None);
        let text = utf8.push(&piece);
        if !text.is_empty() && job.events.send(EngineEvent::Token(text)).is_err() {
            break StopReason::Cancelled;
        }
        if tokens_out >= request.params.max_tokens {
            break StopReason::MaxTokens;
        }
        if pos as usize >= n_ctx {
            break StopReason::ContextFull;
        }
        batch.clear();
        batch
            .add(token, pos, &[0], true)
            .map_err(|e| Error::internal(format!("batch: {e}")))?;
        pos += 1;
        ctx.decode(&mut batch).map_err(decode_err)?;
    };
    let rest = utf8.finish();
    if !rest.is_empty() {
        let _ = job.events.send(EngineEvent::Token(rest));
    }
    let decode_ms = ms(decode_started);
    // The first token comes out of prefill's logits; speed counts the decode steps after it.
    let decode_tokens_per_s = first_token_at.and_then(|first| {
        let secs = first.elapsed().as_secs_f64();
        (tokens_out > 1 && secs > 0.0).then(|| f64::from(tokens_out - 1) / secs)
    });
    let done = DoneEvent {
        tokens_in,
        tokens_out,
        stop_reason,
        timings_ms: Timings {
            prefill: Some(prefill_ms),
            decode: Some(decode_ms),
            ..Timings::default()
        },
        decode_tokens_per_s,
        worker_pid: Some(std::process::id()),
        node_audit: None,
    };
    let _ = job.events.send(EngineEvent::Done(done));
    Ok(stop_reason)
}
