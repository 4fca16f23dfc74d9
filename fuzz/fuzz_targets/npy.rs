//! .npy bytes → tensor.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cellgraph::npy::parse(data, None, "fuzz.npy");
    let _ = cellgraph::npy::parse(data, Some(cellgraph::ir::DType::F32), "fuzz.npy");
});
