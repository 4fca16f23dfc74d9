//! The ONNX conformance ratchet: every case in `tests/onnx-pass-manifest.txt` passes on
//! the CPU backend with fused recurrent kernels and with loops, and every passing case
//! is listed.

use cellgraph::backends::cpu::Recurrent;
use cellgraph::conformance::{find_cases, run_case, Tolerance};
use cellgraph_tests::conformance_dir;
use std::collections::BTreeSet;
use std::path::Path;

fn manifest() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx-pass-manifest.txt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn check(mode: Recurrent) {
    let expected = manifest();
    let root = conformance_dir();
    let mut cases = find_cases(&root.join("onnx-node"));
    cases.extend(find_cases(&root.join("onnx-rnn")));
    assert_eq!(cases.len(), 360, "the shipped ONNX cases");
    let mut regressions = Vec::new();
    let mut unlisted = Vec::new();
    let mut passed = 0;
    for case in &cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_case(case, mode, Tolerance::default()) {
            Ok(()) => {
                passed += 1;
                if !expected.contains(&name) {
                    unlisted.push(name);
                }
            }
            Err(e) if expected.contains(&name) => regressions.push(format!("{name}: {e}")),
            Err(_) => {}
        }
    }
    eprintln!("{mode:?}: {passed} passed, {} failed", cases.len() - passed);
    assert!(
        regressions.is_empty(),
        "{mode:?}: listed cases fail:\n{}",
        regressions.join("\n")
    );
    assert!(
        unlisted.is_empty(),
        "{mode:?}: cases pass but are not in the manifest (add them): {unlisted:?}"
    );
}

#[test]
fn manifest_cases_pass_with_fused_recurrent_kernels() {
    check(Recurrent::Fused);
}

#[test]
fn manifest_cases_pass_with_recurrent_loops() {
    check(Recurrent::Loop);
}
