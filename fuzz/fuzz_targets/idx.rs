//! IDX bytes (gzip or raw) → array.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cellgraph::mnist::parse_idx(data, "fuzz.idx");
});
