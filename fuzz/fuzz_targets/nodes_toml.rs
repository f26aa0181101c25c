//! Any nodes.toml: loading gives a config or an error with exit code 3, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee::config::{Config, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(err) = Config::parse(text, Source::File("fuzz.toml".into())) {
        assert_eq!(err.code(), 3);
    }
});
