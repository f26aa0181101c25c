//! Before a model loads: is there memory for it? A refused load is a clear error instead of the
//! kernel's OOM killer taking the worker (or something else) down.

use std::path::Path;

use crate::config::{DEFAULT_MAX_CONTEXT, GpuLayers, Model};
use crate::error::{Error, Result};
use crate::hive::gguf::{self, Shape};

/// Room kept for compute buffers and the process itself, beside the weights and the KV cache.
const OVERHEAD_BYTES: u64 = 128 << 20;
/// Room kept for everything beside the weights when the model's header cannot be read.
const FALLBACK_BYTES: u64 = 256 << 20;

/// Most slots auto gives a model on the CPU: on an idle 2-core machine 8 slots gave the most
/// tokens per second under 8 and 16 concurrent requests, and 16 slots no more (see the README's
/// performance reading), while each slot costs its KV cache, allocated and cleared at load.
pub(crate) const AUTO_SLOTS_CPU: u32 = 8;
/// Most slots auto gives a model offloaded to a device: a GPU decodes a wider batch for little
/// more than a narrow one, so the cap is higher (chosen, not measured here); memory usually
/// decides first.
pub(crate) const AUTO_SLOTS_DEVICE: u32 = 32;
/// Slots auto gives a model whose header cannot be read (its KV cache is unknown).
const AUTO_SLOTS_UNKNOWN: u32 = crate::config::AUTO_SLOTS_BEFORE_REPORT;

/// Stands in for the host's available memory (bytes), for tests only: how the tests show that
/// auto slots follow memory without filling the test machine's.
const TEST_MEM_AVAILABLE: &str = "RBEE_TEST_MEM_AVAILABLE";

/// The slots the model's worker gets, after checking there is memory for them: the model's own
/// `slots`, or with auto (`None`) as many as `auto_slots` derives from memory and the model.
/// Either way the worker's KV cache holds `slots` x `context` tokens, checked as `check` does;
/// a node whose memory holds not even one slot gets the refusal of one.
pub(crate) async fn plan(model: &Path, spec: &Model, exe: &Path) -> Result<u32> {
    let size = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let shape = gguf::shape(model);
    let device = match (&shape, spec.gpu_layers) {
        (Some(_), GpuLayers::Layers(0)) | (None, _) => None,
        _ => offload_device(exe).await,
    };
    let available = mem_available();
    let offloaded = shape.as_ref().map_or(0, |shape| {
        let layers = u32::try_from(shape.layers).unwrap_or(u32::MAX);
        spec.gpu_layers.offloaded(true, layers)
    });
    let slots = match (spec.slots, &shape) {
        (Some(slots), _) => slots,
        (None, None) => AUTO_SLOTS_UNKNOWN,
        (None, Some(shape)) => {
            let offload = device.as_ref().map(|d| (d, offloaded));
            auto_slots(shape, size, spec.context, available, offload)
        }
    };
    if let (Some(shape), Some(device)) = (&shape, &device) {
        let split = split(shape, size, offloaded, spec.context, slots);
        enough_split(model, &split, available, device)?;
        return Ok(slots);
    }
    let Some(available) = available else {
        // No /proc/meminfo (not Linux): nothing to check against.
        return Ok(slots);
    };
    let kv = shape.map(|shape| kv_bytes(&shape, spec.context, slots));
    enough(model, size, kv, available)?;
    Ok(slots)
}

/// Auto slots, the pure part: as many as fit in half the room each memory has beside the
/// weights and the margins `enough` and `enough_split` keep (the other half stays for other
/// models and the rest of the node, since llama.cpp allocates the whole KV cache at load), at
/// most `AUTO_SLOTS_CPU` (`AUTO_SLOTS_DEVICE` when layers go to a device), and never fewer than
/// one: whether one fits is the check's to say. Without offload, the host's memory counts;
/// with `offload` (the device and the layers on it), the device's share of each slot against
/// its free memory and the host's share against the host's. Memory not known: the cap.
pub(crate) fn auto_slots(
    shape: &Shape,
    size: u64,
    context: Option<u32>,
    host_available: Option<u64>,
    offload: Option<(&DeviceBudget, u32)>,
) -> u32 {
    /// Slots whose `per_slot` bytes fit in half of `room`; none to count means no limit.
    fn fitting(room: u64, per_slot: u64) -> u64 {
        (room / 2).checked_div(per_slot).unwrap_or(u64::MAX)
    }
    let one = split(shape, size, offload.map_or(0, |(_, on)| on), context, 1);
    let mut fit = u64::MAX;
    if let Some(available) = host_available {
        let kept = one
            .host_weights
            .saturating_add(one.host_weights / 4)
            .saturating_add(OVERHEAD_BYTES);
        fit = fit.min(fitting(available.saturating_sub(kept), one.host_kv));
    }
    let cap = match offload {
        Some((device, _)) => {
            let kept = one.device_weights.saturating_add(OVERHEAD_BYTES);
            fit = fit.min(fitting(device.free.saturating_sub(kept), one.device_kv));
            AUTO_SLOTS_DEVICE
        }
        None => AUTO_SLOTS_CPU,
    };
    u32::try_from(fit.min(u64::from(cap))).unwrap_or(cap).max(1)
}

/// A device llama.cpp would offload to, and its free memory.
#[derive(Debug, Clone)]
pub struct DeviceBudget {
    pub name: String,
    pub free: u64,
}

/// The first GPU device in the registry of `exe` (this hive's own binary), asked in a process
/// of its own so that the hive never holds a GPU context; none from a CPU build.
async fn offload_device(exe: &Path) -> Option<DeviceBudget> {
    if crate::platform::variant() == "cpu" {
        return None;
    }
    let out = tokio::process::Command::new(exe)
        .args(["version", "--json"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let info: crate::platform::VersionInfo = serde_json::from_slice(&out.stdout).ok()?;
    info.devices
        .into_iter()
        .find(crate::platform::Device::offloads)
        .map(|d| DeviceBudget {
            name: format!("{} ({})", d.name, d.description),
            free: d.memory_free,
        })
}

/// Where a model's memory goes when `offloaded` layers (the output layer counted as one) are
/// on a device: their share of the weights and their KV cache there, the rest on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub layers: u32,
    pub device_weights: u64,
    pub device_kv: u64,
    pub host_weights: u64,
    pub host_kv: u64,
}

/// llama.cpp keeps each repeating layer's KV cache on that layer's device, so the KV splits by
/// layers exactly; the weights split in proportion (layers are close to equal in size).
pub fn split(shape: &Shape, size: u64, offloaded: u32, context: Option<u32>, slots: u32) -> Split {
    let layers = shape.layers.max(1);
    let on = u64::from(offloaded).min(layers + 1);
    let kv = kv_bytes(shape, context, slots);
    let device_kv = kv / layers * on.min(layers);
    let device_weights = size / (layers + 1) * on;
    Split {
        layers: u32::try_from(on).unwrap_or(u32::MAX),
        device_weights,
        device_kv,
        host_weights: size - device_weights,
        host_kv: kv - device_kv,
    }
}

/// The pure part with offload: the device's share and compute buffers must fit in its free
/// memory, the host's share (mapped, with the same margin as without offload) in what the host
/// has available. A refusal says which memory is short, and by how much.
pub fn enough_split(
    model: &Path,
    split: &Split,
    host_available: Option<u64>,
    device: &DeviceBudget,
) -> Result<()> {
    let device_need = split
        .device_weights
        .saturating_add(split.device_kv)
        .saturating_add(OVERHEAD_BYTES);
    if device_need > device.free {
        return Err(Error::worker(format!(
            "not enough device memory on {} to offload {} layers of `{}`: they need about {} MB \
             ({} MB of weights, {} MB of KV cache) and {} MB are free, {} MB short; lower the \
             model's `gpu_layers`, `context` or `slots` in nodes.toml, or stop other workers",
            device.name,
            split.layers,
            model.display(),
            device_need >> 20,
            split.device_weights >> 20,
            split.device_kv >> 20,
            device.free >> 20,
            (device_need - device.free).div_ceil(1 << 20)
        )));
    }
    let Some(available) = host_available else {
        return Ok(());
    };
    let host_need = split
        .host_weights
        .saturating_add(split.host_weights / 4)
        .saturating_add(split.host_kv)
        .saturating_add(OVERHEAD_BYTES);
    if host_need > available {
        return Err(Error::worker(format!(
            "not enough host memory to load `{}` with {} layers offloaded: the rest needs about \
             {} MB ({} MB of KV cache) and {} MB are available, {} MB short; offload more \
             layers (`gpu_layers`), lower `context` or `slots`, or stop other workers",
            model.display(),
            split.layers,
            host_need >> 20,
            split.host_kv >> 20,
            available >> 20,
            (host_need - available).div_ceil(1 << 20)
        )));
    }
    Ok(())
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

/// The host's available memory: `MemAvailable` of /proc/meminfo, or `RBEE_TEST_MEM_AVAILABLE`.
fn mem_available() -> Option<u64> {
    if let Some(bytes) = std::env::var(TEST_MEM_AVAILABLE)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(bytes);
    }
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

    /// SmolLM2-135M (the default model) as its GGUF header describes it.
    fn smollm2() -> Shape {
        Shape {
            layers: 30,
            context_train: 8192,
            heads_kv: 3,
            key_length: 64,
            value_length: 64,
        }
    }

    #[test]
    fn the_kv_cache_of_every_slot_counts() {
        let path = Path::new("/m/small.gguf");
        let mb = 1u64 << 20;
        // SmolLM2-135M: 23,040 bytes of KV per token.
        let shape = smollm2();
        // No context set: the worker's default 4096 per sequence, 4 slots.
        assert_eq!(kv_bytes(&shape, None, 4), 23_040 * 4096 * 4);
        assert_eq!(kv_bytes(&shape, Some(1000), 2), 23_040 * 2000);
        let kv = kv_bytes(&shape, Some(32_768), 64);
        let err = enough(path, 98 * mb, Some(kv), 8 << 30).expect_err("refused");
        assert!(err.to_string().contains("KV cache"), "{}", err.to_string());
        assert!(err.to_string().contains("`slots`"), "{}", err.to_string());
        assert!(enough(path, 98 * mb, Some(kv_bytes(&shape, None, 4)), 1 << 30).is_ok());
    }

    #[test]
    fn offloaded_layers_count_on_the_device_and_the_rest_on_the_host() {
        let path = Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mb = 1u64 << 20;
        let shape = smollm2();
        let size = 98 * mb;
        // llama.cpp at the defaults (4096 tokens x 4 slots) reports a KV buffer of 360.00 MiB;
        // it keeps each layer's share on that layer's device: all 30 (and the output layer)
        // offloaded put 360 MiB there, 10 layers 120 MiB and leave 240 MiB on the host.
        let all = split(&shape, size, 31, None, 4);
        assert_eq!(all.device_kv, 360 * mb);
        assert_eq!(all.host_kv, 0);
        assert_eq!(all.layers, 31);
        let ten = split(&shape, size, 10, None, 4);
        assert_eq!((ten.device_kv, ten.host_kv), (120 * mb, 240 * mb));
        assert_eq!(ten.device_weights + ten.host_weights, size);
        assert_eq!(split(&shape, size, 0, None, 4).device_kv, 0);
        // A "number larger than the model has" is all of it.
        assert_eq!(split(&shape, size, 500, None, 4), all);

        // A device with 400 MiB free holds 10 layers but not all of them.
        let device = DeviceBudget {
            name: "CUDA0 (test budget)".to_string(),
            free: 400 * mb,
        };
        assert!(enough_split(path, &ten, Some(8 << 30), &device).is_ok());
        let err = enough_split(path, &all, Some(8 << 30), &device).expect_err("refused");
        assert_eq!(err.code(), 7);
        let need = all.device_weights + all.device_kv + OVERHEAD_BYTES;
        let short = (need - 400 * mb).div_ceil(mb);
        let text = err.to_string();
        assert!(text.contains("device memory on CUDA0"), "{text}");
        assert!(text.contains(&format!("{short} MB short")), "{text}");
        // The host's share is checked too: little host memory refuses the ten-layer load.
        let err = enough_split(path, &ten, Some(200 * mb), &device).expect_err("refused");
        assert!(err.to_string().contains("not enough host memory"), "{err}");
    }

    #[test]
    fn auto_slots_fill_half_the_room_beside_the_weights_between_one_and_the_cap() {
        let mb = 1u64 << 20;
        let shape = smollm2();
        let size = 98 * mb;
        let kept = size + size / 4 + OVERHEAD_BYTES;
        let slot = kv_bytes(&shape, Some(512), 1);
        let auto = |available: u64| auto_slots(&shape, size, Some(512), Some(available), None);
        // Half the room: 7 slots of room give 3, 6 give 3, 5 give 2.
        assert_eq!(auto(kept + 7 * slot), 3);
        assert_eq!(auto(kept + 6 * slot), 3);
        assert_eq!(auto(kept + 6 * slot - 1), 2);
        // Never fewer than one, even with no room at all (the check refuses that).
        assert_eq!(auto(kept + slot), 1);
        assert_eq!(auto(0), 1);
        // Ample memory: the CPU's cap; unknown memory too.
        assert_eq!(auto(1 << 40), AUTO_SLOTS_CPU);
        assert_eq!(
            auto_slots(&shape, size, Some(512), None, None),
            AUTO_SLOTS_CPU
        );
        // A longer context costs more per slot: 4096 tokens (the default) are 8 times 512.
        let room = kept + 2 * 8 * slot * 3;
        assert_eq!(auto(room), AUTO_SLOTS_CPU);
        assert_eq!(auto_slots(&shape, size, None, Some(room), None), 3);

        // Offloaded: the device's share of each slot against its free memory, the host's
        // share against the host's; the tighter decides, capped at the device cap.
        let all = |free: u64, host: u64| {
            let device = DeviceBudget {
                name: "CUDA0 (test budget)".to_string(),
                free,
            };
            auto_slots(&shape, size, None, Some(host), Some((&device, 31)))
        };
        let per_slot = kv_bytes(&shape, None, 1); // all of it on the device
        let device_kept = size / 31 * 31 + OVERHEAD_BYTES;
        assert_eq!(all(device_kept + 2 * 5 * per_slot, 1 << 40), 5);
        assert_eq!(all(1 << 40, 1 << 40), AUTO_SLOTS_DEVICE);
        assert_eq!(all(0, 1 << 40), 1);
        // Ten layers offloaded: two thirds of each slot on the host, whose room decides.
        let device = DeviceBudget {
            name: "CUDA0 (test budget)".to_string(),
            free: 1 << 40,
        };
        let ten = split(&shape, size, 10, None, 1);
        let host = ten.host_weights + ten.host_weights / 4 + OVERHEAD_BYTES + 2 * 4 * ten.host_kv;
        assert_eq!(
            auto_slots(&shape, size, None, Some(host), Some((&device, 10))),
            4
        );
        // Whatever auto chooses passes the check with the same memory.
        for available in [kept + 7 * slot, kept + 100 * slot, 1 << 40] {
            let n = auto(available);
            let kv = kv_bytes(&shape, Some(512), n);
            assert!(
                enough(Path::new("/m"), size, Some(kv), available).is_ok(),
                "{n}"
            );
        }
    }
}
