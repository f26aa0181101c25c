//! Records the target triple this binary is built for, which `rbee version` reports and
//! `[[binaries]]` entries are matched against.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=RBEE_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
