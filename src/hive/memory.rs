//! Before a model loads: is there memory for it? A refused load is a clear error instead of the
//! kernel's OOM killer taking the worker (or something else) down.

use std::path::Path;

use crate::error::{Error, Result};

/// Room kept for the KV cache, compute buffers and the process itself.
const OVERHEAD_BYTES: u64 = 256 << 20;

pub fn check(model: &Path) -> Result<()> {
    let size = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let Some(available) = mem_available() else {
        // No /proc/meminfo (not Linux): nothing to check against.
        return Ok(());
    };
    enough(model, size, available)
}

/// The pure part: the file (mapped in full) plus overhead must fit in what is available.
pub fn enough(model: &Path, size: u64, available: u64) -> Result<()> {
    let needed = size + size / 4 + OVERHEAD_BYTES;
    if needed <= available {
        return Ok(());
    }
    Err(Error::worker(format!(
        "not enough memory to load `{}`: it needs about {} MB, and {} MB are available; \
         stop other workers (`rbee worker stop`) or use a smaller model",
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
        assert!(enough(path, gb, 4 * gb).is_ok());
        let err = enough(path, 8 * gb, 4 * gb).expect_err("refused");
        assert_eq!(err.code(), 7);
        assert!(err.message.contains("not enough memory"), "{}", err.message);
        assert!(err.message.contains("big.gguf"), "{}", err.message);
        assert!(mem_available().is_some_and(|m| m > 0));
    }
}
