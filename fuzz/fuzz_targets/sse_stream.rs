//! Any byte stream, cut anywhere: the SSE reader gives the same events however it is fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee::protocol::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut whole = SseParser::default();
    let all = whole.push(data);
    let mut parts = SseParser::default();
    let first = parts.push(&data[..cut]);
    let second = parts.push(&data[cut..]);
    if let (Ok(all), Ok(mut first), Ok(second)) = (all, first, second) {
        first.extend(second);
        assert_eq!(all, first);
    }
});
