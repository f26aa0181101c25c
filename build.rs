//! Records what this binary is built for: the target triple, which `rbee version` reports and
//! `[[binaries]]` entries are matched against, and the CPU features its code may use, which a
//! node's CPU must have: the compiler's (with `-C target-cpu=native`, the build machine's) and
//! those llama.cpp's CMake build adds on its own.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=RBEE_TARGET={target}");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo:rustc-env=RBEE_TARGET_FEATURES={features}");
    // llama-cpp-sys-2 turns llama.cpp's GGML_NATIVE on when the first `target-cpu=` of the
    // flags is `native`; rustc takes the last one.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let cpus: Vec<&str> = flags
        .split('\x1f')
        .filter_map(|f| f.split("target-cpu=").nth(1))
        .collect();
    let native = cpus.first() == Some(&"native");
    if native != (cpus.last() == Some(&"native")) {
        println!(
            "cargo:warning=RUSTFLAGS name more than one target-cpu ({}): llama.cpp follows the \
             first, Rust the last, and the CPU check knows only Rust's features",
            cpus.join(", ")
        );
    }
    println!(
        "cargo:rustc-env=RBEE_TARGET_CPU_NATIVE={}",
        if native { "1" } else { "" }
    );
    if native {
        warn_of_amx_miscompile();
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let ggml = if arch == "x86_64" && !native {
        ggml_x86_features(&target)
    } else {
        // Native: llama.cpp uses the build machine's features, which the compiler's list
        // holds. Elsewhere llama-cpp-sys-2 pins the target's baseline.
        Vec::new()
    };
    println!("cargo:rustc-env=RBEE_GGML_FEATURES={}", ggml.join(","));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}

/// GGML_NATIVE on a build machine with AMX compiles in llama.cpp's AMX kernels, and GCC's RTL
/// dead-store elimination drops the stores that fill their tile configuration before
/// `ldtilecfg` reads it, so the worker dies with SIGSEGV on its first prompt (llama.cpp issue
/// 20824). `RBEE_NATIVE=1 scripts/setup.sh` passes -fno-dse through llama-cpp-sys-2's CMAKE_*
/// variables; a hand-made native build without it is told so here.
fn warn_of_amx_miscompile() {
    for var in [
        "CMAKE_CXX_FLAGS_RELEASE",
        "CMAKE_CXX_FLAGS_RELWITHDEBINFO",
        "CMAKE_CXX_FLAGS",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let amx = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|flag| flag == "amx_int8"));
    let fixed = ["CMAKE_CXX_FLAGS_RELEASE", "CMAKE_CXX_FLAGS"]
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| v.split_whitespace().any(|f| f == "-fno-dse")));
    if !amx || fixed {
        return;
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let gcc = std::process::Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("Free Software Foundation"));
    if gcc {
        println!(
            "cargo:warning=this CPU has AMX and {cxx} is GCC, which miscompiles llama.cpp's AMX \
             kernels without -fno-dse (GCC 12 does: the worker dies on its first prompt); build \
             with `RBEE_NATIVE=1 scripts/setup.sh`, which sets it and rebuilds llama.cpp"
        );
    }
}

/// llama.cpp's CMake options for x86 instruction sets, and the features each one compiles in
/// (ggml/src/ggml-cpu/CMakeLists.txt); the first six default to on.
const GGML_X86: &[(&str, &[&str])] = &[
    ("GGML_SSE42", &["sse4.2"]),
    ("GGML_AVX", &["avx"]),
    ("GGML_AVX2", &["avx2"]),
    ("GGML_BMI2", &["bmi2"]),
    ("GGML_FMA", &["fma"]),
    ("GGML_F16C", &["f16c"]),
    (
        "GGML_AVX512",
        &["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
    ),
    ("GGML_AVX512_VBMI", &["avx512vbmi"]),
    ("GGML_AVX512_VNNI", &["avx512vnni"]),
    ("GGML_AVX512_BF16", &["avx512bf16"]),
    ("GGML_AVX_VNNI", &["avxvnni"]),
    ("GGML_AMX_TILE", &["amx-tile"]),
    ("GGML_AMX_INT8", &["amx-int8"]),
    ("GGML_AMX_BF16", &["amx-bf16"]),
];

/// The x86 features llama.cpp compiles in without GGML_NATIVE, in Rust's names: its defaults
/// (on unless CMake cross-compiles or SOURCE_DATE_EPOCH is set, as ggml/CMakeLists.txt has it)
/// and whatever a GGML_* variable of the build's environment turns on or off (llama-cpp-sys-2
/// hands each one to CMake).
fn ggml_x86_features(target: &str) -> Vec<&'static str> {
    let host = std::env::var("HOST").unwrap_or_default();
    let defaults_on = host == target && std::env::var_os("SOURCE_DATE_EPOCH").is_none();
    let mut out = Vec::new();
    for (i, (option, features)) in GGML_X86.iter().enumerate() {
        println!("cargo:rerun-if-env-changed={option}");
        let on = match std::env::var(option) {
            Ok(value) => cmake_true(&value),
            Err(_) => defaults_on && i < 6,
        };
        if on {
            out.extend_from_slice(features);
        }
    }
    out
}

/// CMake's reading of a boolean: its false constants, else true.
fn cmake_true(value: &str) -> bool {
    let v = value.trim().to_ascii_uppercase();
    !(matches!(
        v.as_str(),
        "" | "0" | "OFF" | "NO" | "FALSE" | "N" | "IGNORE" | "NOTFOUND"
    ) || v.ends_with("-NOTFOUND"))
}
