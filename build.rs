//! Records what this binary is built for: the target triple, which `rbee version` reports and
//! `[[binaries]]` entries are matched against, and the CPU features the compiler was told it
//! may use (with `-C target-cpu=native`, the build machine's), which a node's CPU must have.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=RBEE_TARGET={target}");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo:rustc-env=RBEE_TARGET_FEATURES={features}");
    // llama-cpp-sys-2 reads the same flags: `target-cpu=native` turns llama.cpp's GGML_NATIVE
    // on, anything else leaves llama.cpp at its default instruction set.
    let native = std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .unwrap_or_default()
        .split('\x1f')
        .any(|f| f.ends_with("target-cpu=native"));
    println!(
        "cargo:rustc-env=RBEE_TARGET_CPU_NATIVE={}",
        if native { "1" } else { "" }
    );
    // llama.cpp's default x86-64 instructions that the build's environment turned off
    // (llama-cpp-sys-2 hands every GGML_* variable to llama.cpp's CMake).
    let mut off = Vec::new();
    for (option, feature) in [
        ("GGML_SSE42", "sse4.2"),
        ("GGML_AVX", "avx"),
        ("GGML_AVX2", "avx2"),
        ("GGML_BMI2", "bmi2"),
        ("GGML_FMA", "fma"),
        ("GGML_F16C", "f16c"),
    ] {
        println!("cargo:rerun-if-env-changed={option}");
        let value = std::env::var(option)
            .unwrap_or_default()
            .to_ascii_uppercase();
        if matches!(value.as_str(), "OFF" | "0" | "FALSE" | "NO" | "N") {
            off.push(feature);
        }
    }
    println!("cargo:rustc-env=RBEE_GGML_OFF={}", off.join(","));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
}
