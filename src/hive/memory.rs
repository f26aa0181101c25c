//! Before a model loads: is there memory for it? A refused load is a clear error instead of the
//! kernel's OOM killer taking the worker (or something else) down.

use std::path::Path;

use crate::config::DEFAULT_MAX_CONTEXT;
use crate::error::{Error, Result};
use crate::hive::gguf::{self, Shape};

/// Room kept for compute buffers and the process itself, beside the weights and the KV cache.
const OVERHEAD_BYTES: u64 = 128 << 20;
/// Room kept for everything beside the weights when the model's header cannot be read.
const FALLBACK_BYTES: u64 = 256 << 20;

/// `context` and `slots` as the model's worker will get them: its KV cache holds
/// `slots` x `context` tokens.
pub(crate) fn check(model: &Path, context: Option<u32>, slots: u32) -> Result<()> {
    let size = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let Some(available) = mem_available() else {
        // No /proc/meminfo (not Linux): nothing to check against.
        return Ok(());
    };
    let kv = gguf::shape(model).map(|shape| kv_bytes(&shape, context, slots));
    enough(model, size, kv, available)
}

/// The KV cache llama.cpp allocates for `slots` sequences of `context` tokens (the worker's
/// default context when none is set).
pub fn kv_bytes(shape: &Shape, context: Option<u32>, slots: u32) -> u64 {
    let per_seq = context.map_or_else(
        || shape.context_train.clamp(1, u64::from(DEFAULT_MAX_CONTEXT)),
        u64::from,
    );
    shape
        .kv_bytes_per_token()
        .saturating_mul(per_seq)
        .saturating_mul(u64::from(slots.max(1)))
}

/// The pure part: the file (mapped in full), the KV cache and overhead must fit in what is
/// available.
pub(crate) fn enough(model: &Path, size: u64, kv: Option<u64>, available: u64) -> Result<()> {
    let rest = kv.map_or(FALLBACK_BYTES, |kv| kv.saturating_add(OVERHEAD_BYTES));
    let needed = size.saturating_add(size / 4).saturating_add(rest);
    if needed <= available {
        return Ok(());
    }
    let (kv_part, advice) = match kv {
        Some(kv) if kv > size => (
            format!(" ({} MB of it for the KV cache)", kv >> 20),
            "lower the model's `context` or `slots` in nodes.toml, stop other workers \
             (`rbee worker stop`), or use a smaller model",
        ),
        _ => (
            String::new(),
            "stop other workers (`rbee worker stop`) or use a smaller model",
        ),
    };
    Err(Error::worker(format!(
        "not enough memory to load `{}`: it needs about {} MB{kv_part}, and {} MB are \
         available; {advice}",
        model.display(),
        needed >> 20,
        available >> 20
    )))
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_larger_than_memory_is_refused() {
        let path = Path::new("/m/big.gguf");
        let gb = 1u64 << 30;
        assert!(enough(path, gb, None, 4 * gb).is_ok());
        let err = enough(path, 8 * gb, None, 4 * gb).expect_err("refused");
        assert_eq!(err.code(), 7);
        assert!(
            err.to_string().contains("not enough memory"),
            "{}",
            err.to_string()
        );
        assert!(err.to_string().contains("big.gguf"), "{}", err.to_string());
        assert!(!err.to_string().contains("KV cache"), "{}", err.to_string());
        assert!(mem_available().is_some_and(|m| m > 0));
    }

    #[test]
    fn the_kv_cache_of_every_slot_counts() {
        let path = Path::new("/m/small.gguf");
        let mb = 1u64 << 20;
        // SmolLM2-135M: 23,040 bytes of KV per token.
        let shape = Shape {
            layers: 30,
            context_train: 8192,
            heads_kv: 3,
            key_length: 64,
            value_length: 64,
        };
        // No context set: the worker's default 4096 per sequence, 4 slots.
        assert_eq!(kv_bytes(&shape, None, 4), 23_040 * 4096 * 4);
        assert_eq!(kv_bytes(&shape, Some(1000), 2), 23_040 * 2000);
        let kv = kv_bytes(&shape, Some(32_768), 64);
        let err = enough(path, 98 * mb, Some(kv), 8 << 30).expect_err("refused");
        assert!(err.to_string().contains("KV cache"), "{}", err.to_string());
        assert!(err.to_string().contains("`slots`"), "{}", err.to_string());
        assert!(enough(path, 98 * mb, Some(kv_bytes(&shape, None, 4)), 1 << 30).is_ok());
    }
}
