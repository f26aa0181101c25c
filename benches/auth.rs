//! Cost of signing and verifying one request (`cargo bench --bench auth`): prints figures,
//! asserts nothing about speed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rbee::auth::{Covered, Key, Verifier, sign};

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
}
