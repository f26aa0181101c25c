//! `rbee version [--json]`: this binary's version, target triple, variant, the CPU flags it
//! needs and the llama.cpp backends and devices its registry holds.

use crate::cmd::Context;
use crate::error::Result;
use crate::platform::VersionInfo;

pub(crate) fn run(ctx: &Context) -> Result<()> {
    // Only the answer on stdout: llama.cpp's own lines about the backends it loads stay quiet.
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let info = VersionInfo::this();
    ctx.out.result(&info, || {
        let mut text = format!(
            "rbee {}\ntarget: {}\nvariant: {}\nbackends: {}\ncpu: {}{}",
            info.version,
            info.target,
            info.variant,
            info.backends.join(", "),
            if info.native {
                "built for this build machine's CPU: "
            } else {
                ""
            },
            if info.cpu_flags.is_empty() {
                "the target's baseline".to_string()
            } else {
                info.cpu_flags.join(" ")
            }
        );
        for d in info.devices.iter().filter(|d| d.offloads()) {
            text.push_str(&format!(
                "\ndevice: {} ({}, {}), {:.1} of {:.1} GiB free",
                d.name,
                d.description,
                d.backend,
                d.memory_free as f64 / f64::from(1u32 << 30),
                d.memory_total as f64 / f64::from(1u32 << 30)
            ));
        }
        text
    });
    Ok(())
}
