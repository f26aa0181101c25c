//! Any header, any body: parsing and verifying never panic, and nothing unsigned passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee::auth::{Key, Verifier};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (header, body) = data.split_at(split);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    let _ = rbee::auth::parse(header);
    let key = Key::from_hex(&"11".repeat(32)).expect("fixed key");
    let verifier = Verifier::new(vec![key], std::time::Duration::from_secs(300));
    assert!(verifier.verify("POST", "/v1/infer", rbee::auth::Covered::default(), Some(header), body).is_err());
});
