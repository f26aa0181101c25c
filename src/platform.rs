//! What this binary is: its version, the target triple it was built for, its variant (the GPU
//! backend compiled into llama.cpp, from the crate's features) and the llama.cpp backends and
//! devices its ggml registry holds at run time.

use serde::Serialize;

/// The target triple of this build, as cargo named it.
pub(crate) const TARGET: &str = env!("RBEE_TARGET");

/// The variants a `[[binaries]]` entry may name.
pub(crate) const VARIANTS: &[&str] = &["cpu", "cuda", "rocm", "vulkan", "metal"];

/// The variant of this build: the GPU backend its llama.cpp was compiled with, else `cpu`.
pub(crate) const fn variant() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "rocm") {
        "rocm"
    } else if cfg!(feature = "vulkan") {
        "vulkan"
    } else if cfg!(feature = "metal") {
        "metal"
    } else {
        "cpu"
    }
}

/// A device in llama.cpp's backend registry.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Device {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) backend: String,
    /// `cpu`, `gpu`, `igpu`, `accel` or `unknown`.
    pub(crate) kind: String,
    pub(crate) memory_total: u64,
    pub(crate) memory_free: u64,
}

impl Device {
    /// Whether llama.cpp can offload layers to it (a GPU of its own or integrated).
    pub(crate) fn offloads(&self) -> bool {
        matches!(self.kind.as_str(), "gpu" | "igpu")
    }
}

/// The devices of llama.cpp's registry, CPU included. Reading it initialises the backends
/// compiled in (a CUDA build looks for its GPUs here).
pub(crate) fn devices() -> Vec<Device> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| Device {
            kind: match d.device_type {
                T::Cpu => "cpu",
                T::Gpu => "gpu",
                T::IntegratedGpu => "igpu",
                T::Accelerator => "accel",
                T::Unknown => "unknown",
            }
            .to_string(),
            name: d.name,
            description: d.description,
            backend: d.backend,
            memory_total: d.memory_total as u64,
            memory_free: d.memory_free as u64,
        })
        .collect()
}

/// The backends compiled in, each once, in the registry's order.
pub(crate) fn backends(devices: &[Device]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for d in devices {
        if !names.contains(&d.backend) {
            names.push(d.backend.clone());
        }
    }
    names
}

/// `rbee version --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct VersionInfo {
    pub(crate) version: String,
    pub(crate) target: String,
    pub(crate) variant: String,
    pub(crate) backends: Vec<String>,
    pub(crate) devices: Vec<Device>,
}

impl VersionInfo {
    pub(crate) fn this() -> VersionInfo {
        let devices = devices();
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            target: TARGET.to_string(),
            variant: variant().to_string(),
            backends: backends(&devices),
            devices,
        }
    }
}
