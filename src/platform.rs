//! What this binary is: its version, the target triple it was built for, its variant (the GPU
//! backend compiled into llama.cpp, from the crate's features) and the llama.cpp backends and
//! devices its ggml registry holds at run time.

use serde::Serialize;

/// The target triple of this build, as cargo named it.
pub(crate) const TARGET: &str = env!("RBEE_TARGET");

/// The CPU features the compiler was told this build may use, comma-separated, as cargo names
/// them (`avx2`, `avx512vnni`, `neon`).
const TARGET_FEATURES: &str = env!("RBEE_TARGET_FEATURES");

/// The x86 features llama.cpp's CMake build compiles in on its own (its default set, and what
/// a GGML_* variable of the build turned on), in the same names; see build.rs.
const GGML_FEATURES: &str = env!("RBEE_GGML_FEATURES");

/// Whether this build is `-C target-cpu=native`: llama.cpp built with GGML_NATIVE, for the build
/// machine's CPU.
const TARGET_CPU_NATIVE: bool = !env!("RBEE_TARGET_CPU_NATIVE").is_empty();

/// Whether this build is for its build machine's CPU (`-C target-cpu=native`).
pub(crate) const fn native() -> bool {
    TARGET_CPU_NATIVE
}

/// Rust's names of the CPU features a node's CPU must have, and the names Linux's
/// `/proc/cpuinfo` gives them (`flags` on x86-64, `Features` on aarch64). Features outside this
/// list are not checked: the target's baseline, and those the kernel may hide although the CPU
/// has them (`rdrand` on some AMD parts, the `xsave` variants).
const CPU_FLAG_NAMES: &[(&str, &str, &str)] = &[
    ("x86_64", "sse3", "pni"),
    ("x86_64", "ssse3", "ssse3"),
    ("x86_64", "sse4.1", "sse4_1"),
    ("x86_64", "sse4.2", "sse4_2"),
    ("x86_64", "sse4a", "sse4a"),
    ("x86_64", "popcnt", "popcnt"),
    ("x86_64", "cmpxchg16b", "cx16"),
    ("x86_64", "aes", "aes"),
    ("x86_64", "pclmulqdq", "pclmulqdq"),
    ("x86_64", "sha", "sha_ni"),
    ("x86_64", "adx", "adx"),
    ("x86_64", "avx", "avx"),
    ("x86_64", "avx2", "avx2"),
    ("x86_64", "fma", "fma"),
    ("x86_64", "f16c", "f16c"),
    ("x86_64", "bmi1", "bmi1"),
    ("x86_64", "bmi2", "bmi2"),
    ("x86_64", "lzcnt", "abm"),
    ("x86_64", "movbe", "movbe"),
    ("x86_64", "avx512f", "avx512f"),
    ("x86_64", "avx512cd", "avx512cd"),
    ("x86_64", "avx512bw", "avx512bw"),
    ("x86_64", "avx512dq", "avx512dq"),
    ("x86_64", "avx512vl", "avx512vl"),
    ("x86_64", "avx512ifma", "avx512ifma"),
    ("x86_64", "avx512vbmi", "avx512vbmi"),
    ("x86_64", "avx512vbmi2", "avx512_vbmi2"),
    ("x86_64", "avx512vnni", "avx512_vnni"),
    ("x86_64", "avx512bitalg", "avx512_bitalg"),
    ("x86_64", "avx512vpopcntdq", "avx512_vpopcntdq"),
    ("x86_64", "avx512bf16", "avx512_bf16"),
    ("x86_64", "avx512fp16", "avx512_fp16"),
    ("x86_64", "avxvnni", "avx_vnni"),
    ("x86_64", "gfni", "gfni"),
    ("x86_64", "vaes", "vaes"),
    ("x86_64", "vpclmulqdq", "vpclmulqdq"),
    ("x86_64", "amx-tile", "amx_tile"),
    ("x86_64", "amx-int8", "amx_int8"),
    ("x86_64", "amx-bf16", "amx_bf16"),
    ("aarch64", "neon", "asimd"),
    ("aarch64", "dotprod", "asimddp"),
    ("aarch64", "i8mm", "i8mm"),
    ("aarch64", "sve", "sve"),
    ("aarch64", "sve2", "sve2"),
    ("aarch64", "fp16", "asimdhp"),
    ("aarch64", "bf16", "bf16"),
    ("aarch64", "rdm", "asimdrdm"),
    ("aarch64", "lse", "atomics"),
];

/// The CPU flags a node must list for this build to run there, as `/proc/cpuinfo` names them.
pub(crate) fn cpu_flags() -> Vec<&'static str> {
    required_flags(std::env::consts::ARCH, TARGET_FEATURES, GGML_FEATURES)
}

/// Those of `cpu_flags` that llama.cpp's own build adds (its default set, or a GGML_* variable),
/// apart from the compiler's.
pub(crate) fn ggml_cpu_flags() -> Vec<&'static str> {
    required_flags(std::env::consts::ARCH, "", GGML_FEATURES)
}

/// The `/proc/cpuinfo` names, for `arch`, of the compiler's `features` and llama.cpp's `ggml`
/// ones (both comma-separated Rust names).
fn required_flags(arch: &str, features: &str, ggml: &str) -> Vec<&'static str> {
    let wanted: Vec<&str> = features
        .split(',')
        .chain(ggml.split(','))
        .map(str::trim)
        .collect();
    CPU_FLAG_NAMES
        .iter()
        .filter(|(a, rust, _)| *a == arch && wanted.contains(rust))
        .map(|(_, _, flag)| *flag)
        .collect()
}

/// The flags of `required` a node's `/proc/cpuinfo` flags line does not list.
pub(crate) fn missing_flags<'a>(required: &[&'a str], node_flags: &[String]) -> Vec<&'a str> {
    required
        .iter()
        .filter(|f| !node_flags.iter().any(|n| n == *f))
        .copied()
        .collect()
}

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
    /// The CPU flags a machine needs to run this build, as `/proc/cpuinfo` names them.
    #[serde(default)]
    pub(crate) cpu_flags: Vec<String>,
    /// Whether it was built for the build machine's CPU (`-C target-cpu=native`).
    #[serde(default)]
    pub(crate) native: bool,
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
            cpu_flags: cpu_flags().into_iter().map(str::to_string).collect(),
            native: TARGET_CPU_NATIVE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_needs_the_compilers_features_and_llama_cpps_by_kernel_names() {
        // Rust's x86-64 baseline with llama.cpp's default set: an AVX2 build.
        assert_eq!(
            required_flags("x86_64", "fxsr,sse,sse2", "sse4.2,avx,avx2,bmi2,fma,f16c"),
            ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]
        );
        // A native build on an AVX-512 machine: what the compiler was told.
        assert_eq!(
            required_flags(
                "x86_64",
                "avx,avx2,avx512f,avx512vnni,fxsr,sha,sse,sse2",
                ""
            ),
            ["sha_ni", "avx", "avx2", "avx512f", "avx512_vnni"]
        );
        assert_eq!(
            required_flags("aarch64", "neon,dotprod,fp-armv8", ""),
            ["asimd", "asimddp"]
        );
        // Another architecture's names never leak in.
        assert!(required_flags("riscv64", "avx2", "avx2").is_empty());
    }

    #[test]
    fn missing_flags_are_those_the_node_does_not_list() {
        let node: Vec<String> = "fpu sse4_2 avx avx2 fma"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(
            missing_flags(&["avx2", "avx512f", "avx512_vnni"], &node),
            ["avx512f", "avx512_vnni"]
        );
        assert!(missing_flags(&["avx", "avx2"], &node).is_empty());
    }

    #[test]
    fn this_build_runs_on_the_machine_that_tests_it() {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let flags = crate::queen::probe::cpu_flags_line(&cpuinfo);
        assert!(!flags.is_empty(), "no flags line in /proc/cpuinfo");
        assert_eq!(missing_flags(&cpu_flags(), &flags), Vec::<&str>::new());
    }
}
