//! One test binary driving the real `rbee` with the real model; modules by feature.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod architecture;
mod audit;
mod batching;
mod completions;
mod config_errors;
mod daemon;
mod deadline;
mod infer;
pub(crate) mod isolation;
mod signing;
mod ssh;
mod supervision;
