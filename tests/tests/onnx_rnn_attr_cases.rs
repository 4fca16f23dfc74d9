//! The onnxruntime cases for the recurrent ops' attributes (`tests/conformance/onnx-rnn-attrs`,
//! made by `tests/python/make_onnx_rnn_attr_cases.py`): every case passes on the CPU backend
//! with fused recurrent kernels and with loops, the folder holds exactly the cases its
//! `CASES.txt` lists, and the independent f64 oracle (`common/onnx_rnn_oracle.rs`) agrees
//! with every output onnxruntime stored — so the oracle that `onnx_rnn_reference.rs` holds
//! the kernels to is itself checked against an external implementation.

#[path = "common/onnx_rnn_oracle.rs"]
#[allow(dead_code)]
mod oracle;
#[path = "common/tensor_pb.rs"]
mod tensor_pb;

use cellgraph::backends::cpu::Recurrent;
use cellgraph::conformance::{find_cases, run_case, Tolerance};
use cellgraph::ir::onnx::Model;
use cellgraph::ir::Op;
use cellgraph_tests::conformance_dir;
use oracle::Array;
use std::path::{Path, PathBuf};

fn folder() -> PathBuf {
    conformance_dir().join("onnx-rnn-attrs")
}

fn case_name(case: &Path) -> String {
    case.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The case names `CASES.txt` lists (its first line is the header).
fn listed() -> Vec<String> {
    let path = folder().join("CASES.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().expect("CASES.txt header");
    assert!(header.starts_with("case |"), "header: {header}");
    lines
        .map(|l| l.split('|').next().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn the_folder_holds_exactly_the_listed_cases() {
    let listed = listed();
    let found: Vec<String> = find_cases(&folder()).iter().map(|c| case_name(c)).collect();
    assert!(listed.len() >= 15, "{} cases listed", listed.len());
    let mut a = listed.clone();
    a.sort();
    let mut b = found.clone();
    b.sort();
    assert_eq!(a, b, "CASES.txt and the case folders differ");
    assert_eq!(found.len(), listed.len());
}

fn run_all(mode: Recurrent) {
    let cases = find_cases(&folder());
    assert_eq!(cases.len(), listed().len(), "the cases CASES.txt lists");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            run_case(c, mode, Tolerance::default())
                .err()
                .map(|e| format!("{}: {e}", case_name(c)))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{mode:?}: {} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn every_case_passes_with_fused_recurrent_kernels() {
    run_all(Recurrent::Fused);
}

#[test]
fn every_case_passes_with_recurrent_loops() {
    run_all(Recurrent::Loop);
}

/// The oracle against onnxruntime's float32 outputs, both computed from the same float32
/// inputs: `|oracle − ort| ≤ ATOL + RTOL·|ort|`. onnxruntime computes in float32 with
/// MLAS's approximate logistic/tanh (and, in its GRU, rational approximations clamped to
/// ±10/±20), so agreement to about 1e-6 is what an exact f64 evaluation can expect; the
/// worst case measured with onnxruntime 1.32.0 is printed by the test.
const ATOL: f64 = 5e-7;
const RTOL: f64 = 5e-6;

#[test]
fn the_oracle_agrees_with_onnxruntime_on_every_case() {
    let cases = find_cases(&folder());
    assert_eq!(cases.len(), listed().len(), "the cases CASES.txt lists");
    let mut worst = (0.0f64, String::new());
    let mut compared = 0;
    for case in &cases {
        let name = case_name(case);
        let model =
            Model::load(case.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: import: {e}"));
        let g = &model.graph;
        let ops: Vec<_> = g
            .node_ids()
            .into_iter()
            .filter(|&n| g.node(n).op().is_some())
            .collect();
        assert_eq!(ops.len(), 1, "{name}: one recurrent node");
        let id = ops[0];
        let op = g.node(id).op().expect("op").clone();
        assert!(
            matches!(op, Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. }),
            "{name}: {}",
            op.name()
        );
        let data = case.join("test_data_set_0");
        let graph_inputs = g.input_values();
        let node_inputs = g.node_inputs(id);
        let mut inputs: Vec<Option<Array>> = Vec::new();
        for v in &node_inputs {
            inputs.push(v.map(|v| {
                let j = graph_inputs
                    .iter()
                    .position(|&gi| gi == v)
                    .unwrap_or_else(|| panic!("{name}: a node input is not a graph input"));
                let t = tensor_pb::read_tensor(&data.join(format!("input_{j}.pb")))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(t.name, g.value(v).name, "{name}: input_{j}.pb");
                Array {
                    shape: t.dims,
                    data: t.values,
                }
            }));
        }
        let refs: Vec<Option<&Array>> = inputs.iter().map(Option::as_ref).collect();
        let want = oracle::evaluate(&op, &refs).unwrap_or_else(|e| panic!("{name}: oracle: {e}"));
        assert!(!g.outputs().is_empty(), "{name}: outputs");
        for (j, out) in g.outputs().iter().enumerate() {
            assert_eq!(out.node, id, "{name}: output {j} comes from the node");
            let ort = tensor_pb::read_tensor(&data.join(format!("output_{j}.pb")))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mine = &want[out.slot];
            assert_eq!(mine.shape, ort.dims, "{name}: output {j} shape");
            assert_eq!(mine.data.len(), ort.values.len(), "{name}: output {j} size");
            for (k, (&a, &b)) in mine.data.iter().zip(&ort.values).enumerate() {
                let ratio = (a - b).abs() / (ATOL + RTOL * b.abs());
                assert!(
                    ratio <= 1.0,
                    "{name}: output {j} ({}) element {k}: oracle {a}, onnxruntime {b}",
                    ort.name
                );
                if ratio > worst.0 {
                    worst = (ratio, format!("{name} output {j} element {k}: {a} vs {b}"));
                }
                compared += 1;
            }
        }
    }
    eprintln!(
        "oracle vs onnxruntime: {compared} values, worst |a-b|/(atol+rtol|b|) = {:.3} ({})",
        worst.0, worst.1
    );
}
