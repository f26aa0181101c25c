//! Cost of signing and verifying one request, and one event of a stream, the per-token cost of
//! the hive's proof (`cargo bench --bench auth`): prints figures, asserts nothing about speed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rbee::auth::{Covered, EventChain, Key, Verifier, sign};

fn main() {
    let key = Key::random();
    let verifier = Verifier::new(vec![key.clone()], Duration::from_secs(300));
    let covered = Covered {
        budget_ms: "59950",
        request_id: "0123456789abcdef0123456789abcdef",
    };
    for body_len in [256usize, 4096, 65536] {
        let body = vec![b'x'; body_len];
        let n = 20_000;
        let t = Instant::now();
        let headers: Vec<String> = (0..n)
            .map(|_| sign(&key, "POST", "/v1/infer", covered, &body))
            .collect();
        let signing = t.elapsed();
        let t = Instant::now();
        for header in &headers {
            verifier
                .verify("POST", "/v1/infer", covered, Some(header), &body)
                .expect("verifies");
        }
        let verifying = t.elapsed();
        println!(
            "body {body_len:>6} B: sign {:>6.2} us, verify {:>6.2} us per request ({n} requests)",
            signing.as_secs_f64() * 1e6 / f64::from(n),
            verifying.as_secs_f64() * 1e6 / f64::from(n),
        );
    }
    // One token event as the hive sends it: signed by the hive, verified by the queen before
    // the token is printed.
    let nonce = "0123456789abcdef0123456789abcdef";
    let data = r#"{"text":" blue"}"#;
    let n = 200_000u32;
    let mut hive = EventChain::new(&key, nonce);
    let t = Instant::now();
    let sigs: Vec<String> = (0..n).map(|_| hive.sign("token", data)).collect();
    let signing = t.elapsed();
    let mut queen = EventChain::new(&key, nonce);
    let t = Instant::now();
    for sig in &sigs {
        queen.verify("token", data, Some(sig)).expect("verifies");
    }
    let verifying = t.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "token event: sign {:>6.2} us, verify {:>6.2} us, together {:>6.2} us per token ({n} events)",
        per(signing),
        per(verifying),
        per(signing + verifying),
    );
}
