//! The ONNX conformance ratchet: every case in `tests/onnx-pass-manifest.txt` passes on
//! each backend list — the CPU backend with fused recurrent kernels and with loops, and
//! the test-only `subset` backend placed before the CPU (elementwise ops and MatMul on
//! it, the rest on the CPU, copies at the edges) — and every passing case is listed.

use cellgraph::backends::cpu::Recurrent;
use cellgraph::backends::subset::SubsetBackend;
use cellgraph::backends::Device;
use cellgraph::conformance::{find_cases, run_case_on, Tolerance};
use cellgraph_tests::conformance_dir;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

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

fn check(mode: Recurrent, before: &[Arc<dyn Device>]) {
    let list: Vec<&str> = before.iter().map(|d| d.name()).chain(["cpu"]).collect();
    let expected = manifest();
    let root = conformance_dir();
    let mut cases = find_cases(&root.join("onnx-node"));
    cases.extend(find_cases(&root.join("onnx-rnn")));
    assert_eq!(cases.len(), 360, "the shipped ONNX cases");
    let ran_before = cellgraph::backends::subset::nodes_run();
    let mut regressions = Vec::new();
    let mut unlisted = Vec::new();
    let mut passed = 0;
    for case in &cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_case_on(case, mode, Tolerance::default(), before) {
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
    let on_subset = cellgraph::backends::subset::nodes_run() - ran_before;
    eprintln!(
        "{mode:?} on {list:?}: {passed} passed, {} failed; {on_subset} nodes ran on the subset backend",
        cases.len() - passed
    );
    if !before.is_empty() {
        // The elementwise and MatMul cases (and the loop lowering's ops outside Scan
        // bodies) run there: 146 nodes (fused) and 179 (loops) when measured alone.
        assert!(
            on_subset >= 100,
            "only {on_subset} nodes ran on the subset backend"
        );
    }
    assert!(
        regressions.is_empty(),
        "{mode:?} on {list:?}: listed cases fail:\n{}",
        regressions.join("\n")
    );
    assert!(
        unlisted.is_empty(),
        "{mode:?} on {list:?}: cases pass but are not in the manifest (add them): {unlisted:?}"
    );
}

#[test]
fn manifest_cases_pass_with_fused_recurrent_kernels() {
    check(Recurrent::Fused, &[]);
}

#[test]
fn manifest_cases_pass_with_recurrent_loops() {
    check(Recurrent::Loop, &[]);
}

#[test]
fn manifest_cases_pass_with_the_subset_backend_before_the_cpu() {
    check(Recurrent::Fused, &[Arc::new(SubsetBackend)]);
}

#[test]
fn manifest_cases_pass_with_the_subset_backend_and_recurrent_loops() {
    check(Recurrent::Loop, &[Arc::new(SubsetBackend)]);
}
