//! Golden tests of the IR text printer. Regenerate with `UPDATE_EXPECT=1 cargo test`.

use cellgraph_ir::onnx::Model;
use cellgraph_ir::{print_graph, to_dot, DType, Dim, Graph, Op, TensorType, ValueRef, ValueType};
use std::path::{Path, PathBuf};

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var("UPDATE_EXPECT").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_EXPECT=1)", path.display()));
    assert_eq!(
        actual, expected,
        "printer output for {name} changed (UPDATE_EXPECT=1 to accept)"
    );
}

fn conformance(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance")
        .join(case)
        .join("model.onnx")
}

#[test]
fn printer_golden_files() {
    for (name, case) in [
        ("scan_lstm_cell", "onnx-rnn/scan_lstm_cell"),
        ("lstm_bidi_seqlens_init", "onnx-rnn/lstm_bidi_seqlens_init"),
        (
            "gru_layout1_fwd_lbr1_init",
            "onnx-rnn/gru_layout1_fwd_lbr1_init",
        ),
        (
            "loop_rnn_shape_tripcount",
            "onnx-rnn/loop_rnn_shape_tripcount",
        ),
        ("lstm_stacked_torch", "onnx-rnn/lstm_stacked_torch"),
        ("test_loop13_seq", "onnx-node/test_loop13_seq"),
        ("test_scan_sum", "onnx-node/test_scan_sum"),
    ] {
        let m = Model::load(conformance(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        golden(name, &print_graph(&m.graph));
    }
}

fn api_graph() -> Graph {
    let mut g = Graph::new("dense_softmax");
    let x = g
        .add_input(
            "x",
            ValueType::Tensor(TensorType::with_dims(
                DType::F32,
                vec![Dim::Sym("batch".into()), Dim::Known(4)],
            )),
        )
        .expect("input");
    let w = g
        .add_initializer("w", cellgraph_ir::Tensor::zeros(DType::F32, &[4, 3]), true)
        .expect("init");
    let b = g
        .add_initializer("b", cellgraph_ir::Tensor::zeros(DType::F32, &[3]), true)
        .expect("init");
    let mm = g
        .add_node("dense/matmul", Op::MatMul {}, &[Some(x), Some(w)], &["xw"])
        .expect("matmul");
    let add = g
        .add_node(
            "dense/bias",
            Op::Add {},
            &[Some(ValueRef { node: mm, slot: 0 }), Some(b)],
            &["logits"],
        )
        .expect("add");
    let sm = g
        .add_node(
            "",
            Op::Softmax { axis: Some(-1) },
            &[Some(ValueRef { node: add, slot: 0 })],
            &["probs"],
        )
        .expect("softmax");
    g.set_outputs(vec![ValueRef { node: sm, slot: 0 }])
        .expect("outputs");
    g
}

#[test]
fn printer_golden_api_graph_and_symbolic_dims() {
    golden("api_dense_softmax", &print_graph(&api_graph()));
}

#[test]
fn dot_output_names_every_op_and_edge() {
    let dot = to_dot(&api_graph());
    assert!(dot.starts_with("digraph \"dense_softmax\" {"));
    for needle in [
        "MatMul\\ndense/matmul",
        "Add\\ndense/bias",
        "Softmax",
        "label=\"0:xw f32[batch,3]\"",
        "output probs",
    ] {
        assert!(dot.contains(needle), "DOT lacks {needle}:\n{dot}");
    }
    assert_eq!(
        dot.matches(" -> ").count(),
        5 + 1,
        "five edges and one output arrow"
    );
}
