//! One test binary driving the real `rbee` with the real model; modules by feature.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod architecture;
mod audit;
mod audit_closed;
mod audit_disk;
mod audit_witness;
mod batch_controls;
mod batching;
mod broken_streams;
mod cancel;
mod completions;
mod config_errors;
mod crowd;
mod daemon;
mod deadline;
mod faults;
mod generation;
mod infer;
pub(crate) mod isolation;
mod loads;
mod logs;
mod model_fetch;
mod model_files;
mod model_table;
mod models_rm;
mod outputs;
mod pipes;
mod proof;
mod serve;
mod serve_errors;
mod signing;
mod slots;
mod ssh;
mod supervision;
