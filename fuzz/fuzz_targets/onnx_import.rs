//! ONNX bytes → import → verify → compile on the CPU backend (no run: inputs are unknown).
#![no_main]
use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::Backend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = cellgraph::ir::onnx::Model::from_bytes(data) {
        if cellgraph::ir::verify(&m.graph).is_ok() {
            let _ = cellgraph::ir::print_graph(&m.graph);
            let _ = m.to_bytes();
            let _ = CpuBackend::new(Recurrent::Fused).compile(&m.graph);
        }
    }
});
