//! Cost of one audit append with its fsync (`cargo bench --bench audit`): prints the median and
//! 90th percentile over 500 appends; asserts nothing about speed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let fields = serde_json::json!({
        "model": "smollm2", "tokens_in": 15, "tokens_out": 64, "stop_reason": "eos",
        "prompt": rbee::audit::digest("Why is the sky blue?"),
    });
    let mut times = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        rbee::audit::append(
            &path,
            "bench",
            "request_completed",
            Some("r"),
            fields.clone(),
        )
        .expect("append");
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "audit append with fsync: median {:.0} us, p90 {:.0} us ({} appends, {})",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times.len(),
        dir.path().display()
    );
    rbee::audit::verify(&path).expect("valid chain");
}
