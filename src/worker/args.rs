//! The worker's start arguments: what `worker serve` takes from the hive.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Model name, for logs and reports
    #[arg(long)]
    pub(crate) model: String,
    /// The GGUF file
    #[arg(long)]
    pub(crate) model_path: PathBuf,
    /// Context length per request in tokens (default: the model's training context, at most
    /// 4096)
    #[arg(long)]
    pub(crate) context: Option<u32>,
    /// Requests decoded together, each in its own KV sequence
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=crate::config::MAX_SLOTS as i64))]
    pub(crate) slots: u32,
    /// One KV cache shared by the slots instead of one per slot (batched outputs may then
    /// differ from solo ones)
    #[arg(long)]
    pub(crate) kv_unified: bool,
    /// CPU threads (default: all cores)
    #[arg(long)]
    pub(crate) threads: Option<u32>,
    /// Layers to offload to the GPU: a number, `all`, or `auto` (all when a GPU device is there)
    #[arg(long, default_value = "auto", value_parser = crate::config::GpuLayers::parse)]
    pub(crate) gpu_layers: crate::config::GpuLayers,
    /// The hive directory this worker belongs to (ties it to its hive in `ps`)
    #[arg(long)]
    pub(crate) hive_dir: Option<PathBuf>,
    /// The Unix socket to listen on, inside the hive's private directory
    #[arg(long)]
    pub(crate) socket: PathBuf,
}
