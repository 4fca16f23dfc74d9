//! The `cellgraph` binary: inspect and convert, and their errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellgraph"))
}

fn case(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance")
        .join(rel)
        .join("model.onnx")
}

#[test]
fn inspect_prints_opsets_io_parameters_and_the_graph() {
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-node/test_lstm_defaults"))
        .output()
        .expect("run cellgraph");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "opset imports: ai.onnx 22",
        "inputs:\n  X : f32[1,3,2]\n  W : f32[1,12,2]\n  R : f32[1,12,3]\n",
        "outputs:\n  Y_h : f32[1,3,3]\n",
        "parameters: 0",
        "_, %Y_h = LSTM{hidden_size=3}(%X, %W, %R) : f32[1,1,3,3], f32[1,3,3]",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/lstm_stacked_torch"))
        .output()
        .expect("run cellgraph");
    let text = String::from_utf8_lossy(&out.stdout);
    // Two layers of W [1,20,in], R [1,20,5], B [1,40]: 200 + 240 floats, plus 9 integer
    // constants (axes, shape, slice bounds), which are not trainable.
    assert!(
        text.contains("parameters: 449 (440 in trainable initializers)"),
        "{text}"
    );
}

#[test]
fn inspect_dot_writes_graphviz() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dot = dir.path().join("g.dot");
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/scan_lstm_cell"))
        .arg("--dot")
        .arg(&dot)
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&dot).expect("dot file");
    assert!(
        text.starts_with("digraph \"scan_lstm_cell\"") && text.contains("Scan\\nbody: 15 ops"),
        "{text}"
    );
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/scan_lstm_cell"))
        .args(["--dot", "-"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("digraph"));
}

#[test]
fn convert_round_trips_through_onnx_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = case("onnx-rnn/loop_rnn_shape_tripcount");
    let onnx = dir.path().join("m.onnx");
    let json = dir.path().join("m.json");
    let back = dir.path().join("back.onnx");
    for (a, b) in [(&src, &onnx), (&onnx, &json), (&json, &back)] {
        let out = bin().arg("convert").arg(a).arg(b).output().expect("run");
        assert!(
            out.status.success(),
            "convert {} {}: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read(&onnx).expect("read"),
        std::fs::read(&back).expect("read"),
        "ONNX → JSON → ONNX changed the bytes"
    );
}

#[test]
fn bad_files_are_clear_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"this is not a protobuf \xff\xff\xff").expect("write");
    for (file, needle) in [
        (junk.clone(), "not a valid ONNX protobuf"),
        (dir.path().join("missing.onnx"), "No such file"),
    ] {
        let out = bin().arg("inspect").arg(&file).output().expect("run");
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(needle) && !err.contains("panicked"),
            "{err}"
        );
    }
}
