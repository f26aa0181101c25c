//! Loading a model and the llama.cpp context the batcher drives: how many tokens of context each
//! slot gets, how many threads decode, and one KV sequence per slot.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use crate::config::{GpuLayers, MAX_GPU_LAYERS};
use crate::error::Error;
use crate::protocol::Offload;
use crate::worker::engine::{Batcher, Engine, ms};

#[derive(Debug, Clone)]
pub(crate) struct EngineOptions {
    pub(crate) model_path: PathBuf,
    /// Tokens of context per request; the KV cache holds `slots` times this.
    pub(crate) context: Option<u32>,
    pub(crate) threads: Option<u32>,
    pub(crate) gpu_layers: GpuLayers,
    /// Generations decoded together, each in its own KV sequence.
    pub(crate) slots: u32,
    /// One KV cache for all slots (see `batcher`).
    pub(crate) kv_unified: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    /// Tokens of context per request.
    pub(crate) n_ctx: u32,
    pub(crate) slots: u32,
    pub(crate) load_ms: f64,
    pub(crate) offload: Offload,
}

/// The model and the llama.cpp backend it was loaded with.
pub(crate) struct Weights {
    // Declared before the backend: the model is freed first.
    model: LlamaModel,
    backend: LlamaBackend,
    started: Instant,
    offload: Offload,
}

impl Weights {
    pub(crate) fn load(options: &EngineOptions) -> Result<Weights, Error> {
        let started = Instant::now();
        let backend = LlamaBackend::init()
            .map_err(|e| Error::worker(format!("cannot start llama.cpp: {e}")))?;
        // The registry lists the GPU devices of the backends compiled in (none on a CPU build).
        let gpus: Vec<String> = crate::platform::devices()
            .into_iter()
            .filter(|d| d.offloads())
            .map(|d| d.name)
            .collect();
        let requested = match options.gpu_layers {
            GpuLayers::Layers(n) => n,
            GpuLayers::All => MAX_GPU_LAYERS,
            GpuLayers::Auto if gpus.is_empty() => 0,
            GpuLayers::Auto => MAX_GPU_LAYERS,
        };
        let params = LlamaModelParams::default().with_n_gpu_layers(requested);
        let model =
            LlamaModel::load_from_file(&backend, &options.model_path, &params).map_err(|e| {
                Error::worker(format!(
                    "llama.cpp cannot load `{}`: {e}",
                    options.model_path.display()
                ))
            })?;
        let gpu_layers = options
            .gpu_layers
            .offloaded(!gpus.is_empty(), model.n_layer());
        let offload = Offload {
            gpu_layers,
            devices: if gpu_layers > 0 {
                gpus
            } else {
                vec!["CPU".to_string()]
            },
        };
        tracing::info!(gpu_layers, devices = ?offload.devices, "model loaded");
        Ok(Weights {
            model,
            backend,
            started,
            offload,
        })
    }

    /// A context with one KV sequence per slot, the batcher that drives it, and the handle
    /// requests come in by.
    pub(crate) fn batcher(
        &self,
        options: &EngineOptions,
    ) -> Result<(Batcher<'_>, Engine, Loaded), Error> {
        let model = &self.model;
        let per_seq = options.context.unwrap_or_else(|| {
            model
                .n_ctx_train()
                .clamp(1, crate::config::DEFAULT_MAX_CONTEXT)
        });
        let slots = options.slots.max(1);
        let threads = options.threads.map_or_else(default_threads, |t| t.max(1));
        let threads = i32::try_from(threads).unwrap_or(i32::MAX);
        // By default one KV stream per sequence (not a unified cache): a sequence's cells and
        // attention do not depend on what the others hold, so a generation comes out the same
        // batched or alone. A unified cache (the model's `kv_unified`) lays every sequence's
        // cells in one buffer, as llama-server does; each pass then attends over the cells of
        // all of them, masked, so a batched generation is no longer bound to match a solo one.
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(per_seq.saturating_mul(slots)))
            .with_n_seq_max(slots)
            .with_kv_unified(options.kv_unified)
            .with_n_batch(per_seq.max(slots))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model.new_context(&self.backend, ctx_params).map_err(|e| {
            Error::worker(format!(
                "llama.cpp cannot create a context of {per_seq} tokens for {slots} slots: {e}"
            ))
        })?;
        // llama.cpp rounds each sequence's share up to its padding.
        let n_ctx = ctx.n_ctx() / slots;
        let (batcher, engine) = Batcher::new(model, ctx, n_ctx, slots);
        let loaded = Loaded {
            n_ctx,
            slots,
            load_ms: ms(self.started),
            offload: self.offload.clone(),
        };
        Ok((batcher, engine, loaded))
    }
}

fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}
