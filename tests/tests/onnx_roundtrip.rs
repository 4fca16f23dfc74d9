//! Every shipped ONNX model imports, verifies, and round-trips: import → export →
//! import gives the same IR (identical printer output).

use cellgraph::ir::onnx::Model;
use cellgraph::ir::{print_graph, verify};
use cellgraph_tests::{case_name, conformance_dir, onnx_models};

#[test]
fn every_conformance_model_imports_verifies_and_round_trips() {
    let models = onnx_models(&conformance_dir());
    assert!(
        models.len() >= 360,
        "expected the shipped conformance models, found {}",
        models.len()
    );
    let mut failures = Vec::new();
    for path in &models {
        let name = case_name(path);
        let result = (|| -> Result<(), String> {
            let m = Model::load(path).map_err(|e| format!("import: {e}"))?;
            verify(&m.graph).map_err(|e| format!("verify: {e}"))?;
            let text = print_graph(&m.graph);
            let bytes = m.to_bytes();
            let m2 = Model::from_bytes(&bytes).map_err(|e| format!("re-import: {e}"))?;
            verify(&m2.graph).map_err(|e| format!("verify after round trip: {e}"))?;
            let text2 = print_graph(&m2.graph);
            if text != text2 {
                return Err(format!("printer output differs after round trip:\n--- first\n{text}\n--- second\n{text2}"));
            }
            if m2.to_bytes() != bytes {
                return Err("second export differs from the first".into());
            }
            Ok(())
        })();
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} models failed:\n{}",
        failures.len(),
        models.len(),
        failures.join("\n")
    );
}
