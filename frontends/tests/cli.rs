//! The `cellgraph` binary: inspect, convert and run (on one backend or several), and their errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellgraph"))
}

/// The stdout of a run that must have succeeded (its stderr in the failure message).
fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let text = succeeded(&out);
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

fn pb_tensor(path: &Path) -> cellgraph::ir::Tensor {
    use cellgraph::ir::onnx::{decode_stored_value, Limits, StoredKind, StoredValue};
    let bytes = std::fs::read(path).expect("read pb");
    match decode_stored_value(&bytes, StoredKind::Tensor, "pb", &Limits::default()) {
        Ok(StoredValue::Tensor(t)) => t,
        other => panic!("{}: not a tensor: {other:?}", path.display()),
    }
}

#[test]
fn run_reads_npy_inputs_and_writes_npy_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = case("onnx-rnn/lstm_bidi_seqlens_init");
    let data = case.parent().expect("case dir").join("test_data_set_0");
    let names = [
        "X",
        "W",
        "R",
        "B",
        "sequence_lens",
        "initial_h",
        "initial_c",
    ];
    let mut cmd = bin();
    cmd.arg("run")
        .arg(&case)
        .arg("--output-dir")
        .arg(dir.path().join("out"));
    for (j, n) in names.iter().enumerate() {
        let f = dir.path().join(format!("{n}.npy"));
        cellgraph::npy::write(&f, &pb_tensor(&data.join(format!("input_{j}.pb"))))
            .expect("write npy");
        cmd.arg("--input").arg(format!("{n}={}", f.display()));
    }
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (j, n) in ["Y", "Y_h", "Y_c"].iter().enumerate() {
        let got = cellgraph::npy::read(&dir.path().join("out").join(format!("{n}.npy")), None)
            .expect("output npy");
        let want = pb_tensor(&data.join(format!("output_{j}.pb")));
        cellgraph::conformance::compare_tensors(&got, &want, Default::default())
            .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
}

#[test]
fn run_rejects_wrong_inputs_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = case("onnx-node/test_relu");
    let good = dir.path().join("x.npy");
    cellgraph::npy::write(
        &good,
        &cellgraph::ir::Tensor::zeros(cellgraph::ir::DType::F32, &[3, 4, 5]),
    )
    .expect("npy");
    let wrong_shape = dir.path().join("s.npy");
    cellgraph::npy::write(
        &wrong_shape,
        &cellgraph::ir::Tensor::zeros(cellgraph::ir::DType::F32, &[3, 4]),
    )
    .expect("npy");
    let wrong_dtype = dir.path().join("d.npy");
    cellgraph::npy::write(
        &wrong_dtype,
        &cellgraph::ir::Tensor::zeros(cellgraph::ir::DType::I64, &[3, 4, 5]),
    )
    .expect("npy");
    let out_dir = dir.path().join("out");
    let run = |args: &[String]| {
        let out = bin()
            .arg("run")
            .arg(&model)
            .arg("--output-dir")
            .arg(&out_dir)
            .args(args)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _) = run(&["--input".into(), format!("x={}", good.display())]);
    assert_eq!(code, Some(0));
    for (args, needle) in [
        (vec![], "missing --input for: x"),
        (
            vec!["--input".into(), format!("nope={}", good.display())],
            "no input of that name",
        ),
        (
            vec!["--input".into(), format!("x={}", wrong_shape.display())],
            "rank 2",
        ),
        (
            vec!["--input".into(), format!("x={}", wrong_dtype.display())],
            "holds i64, expected f32",
        ),
        (vec!["--input".into(), "x".into()], "expected NAME=FILE.npy"),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn conformance_runner_prints_a_line_per_case_and_a_summary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/onnx-rnn");
    let out = bin()
        .args(["conformance", "onnx"])
        .arg(&root)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("PASS lstm_bidi_seqlens_init\n") && text.ends_with("6 passed, 0 failed\n"),
        "{text}"
    );
    // A broken case is a FAIL line with the reason and exit status 1, not a crash.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken_case");
    std::fs::create_dir(&broken).expect("mkdir");
    std::fs::write(broken.join("model.onnx"), b"garbage").expect("write");
    let out = bin()
        .args(["conformance", "onnx"])
        .arg(dir.path())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.starts_with("FAIL broken_case: import: not a valid ONNX protobuf")
            && text.ends_with("0 passed, 1 failed\n"),
        "{text}"
    );
}

#[test]
fn conformance_keras_runs_the_seed_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/keras");
    let out = bin()
        .args(["conformance", "keras"])
        .arg(&dir)
        .output()
        .expect("run cellgraph");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().last(), Some("8 passed, 0 failed"), "{text}");
    assert!(text.contains("PASS seed_stateful (summary, 4 stateful calls, 8 states)"));
    assert!(
        text.contains("PASS seed_mnist_lstm (summary, 1 outputs, loss sparse_categorical_crossentropy_from_logits, 7 gradients)"),
        "{text}"
    );
    assert!(!text.contains("skipped"), "{text}");
    let missing = bin()
        .args(["conformance", "keras", "/no/such/folder"])
        .output()
        .expect("run cellgraph");
    assert!(!missing.status.success());
}

#[test]
fn inspect_prints_a_keras_models_summary_and_graph() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/keras/seed_bidirectional");
    let out = bin()
        .arg("inspect")
        .arg(&dir)
        .output()
        .expect("run cellgraph");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Total params: 80,266 (313.54 KB)"), "{text}");
    // Both Bidirectional layers: their two loops raised and merged into one fused op.
    let fused: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("LSTM → fused cpu (a forward/reverse pair merged by rule bidirectional)")
        })
        .collect();
    assert_eq!(fused.len(), 2, "{text}");
    assert!(
        text.contains("= Scan{"),
        "the printed graph is the model's: {text}"
    );
}

/// The acceptance cases: `LSTM(64)` and `RNN(LSTMCell(64))` both run fused, and an ONNX
/// Scan over a hand-built LSTM cell is raised too.
#[test]
fn inspect_reports_the_selectors_decision_per_recurrent_node() {
    for (case_dir, node) in [
        ("keras/seed_mnist_lstm", "lstm/scan"),
        ("keras/seed_rnn_lstmcell", "rnn/scan"),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/conformance")
            .join(case_dir);
        let out = bin().arg("inspect").arg(&dir).output().expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        let want = format!("  {node}: LSTM → fused cpu (raised from a Scan by rule lstm)");
        assert!(text.lines().any(|l| l == want), "{case_dir}: {text}");
    }
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/scan_lstm_cell"))
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("LSTM → fused cpu (raised from a Scan by rule lstm)"),
        "{text}"
    );
    // A Scan that is no cell says why it stays a loop.
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-node/test_scan9_sum"))
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": loop: "), "{text}");
}

#[test]
fn limit_flags_refuse_big_tensors_with_clear_errors() {
    let out = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/lstm_stacked_torch"))
        .args(["--max-tensor-bytes", "64"])
        .output()
        .expect("run cellgraph");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limit exceeded: initializer \"onnx::LSTM_W_l0\"")
            && err.contains("more than the limit of 64"),
        "{err}"
    );
    // The same file within the defaults is fine.
    let ok = bin()
        .arg("inspect")
        .arg(case("onnx-rnn/lstm_stacked_torch"))
        .output()
        .expect("run cellgraph");
    assert!(ok.status.success());
}

#[test]
fn bench_times_a_training_step_with_threads_and_peak_memory() {
    let out = bin()
        .args([
            "bench",
            "--workload",
            "w1",
            "--step",
            "train",
            "--runs",
            "1",
            "--threads",
            "1",
            "--json",
        ])
        .output()
        .expect("run cellgraph");
    let text = succeeded(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one workload, one step: {text}");
    let row: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON row");
    assert_eq!(row["id"], "W1");
    assert_eq!(row["workload"], "w1_lstm_b64_t28_i28_h64");
    assert_eq!(row["step"], "train");
    assert_eq!(row["threads"], 1);
    assert!(row["median_ms"].as_f64().expect("median") > 0.0);
    assert!(row["gflops"].as_f64().expect("gflops") > 0.0);
    if cfg!(target_os = "linux") {
        // At least the batch and the weights were resident.
        assert!(row["peak_mib"].as_f64().expect("peak memory on Linux") > 1.0);
    }

    let out = bin()
        .args(["bench", "--workload", "w9", "--runs", "1"])
        .output()
        .expect("run cellgraph");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no workload \"w9\"") && err.contains("W1, W2, W3, W4"),
        "{err}"
    );
}

/// A small ONNX model mixing ops the test-only `subset` backend runs (Add, Tanh) with one
/// it refuses (Transpose).
fn mixed_model(path: &Path) {
    use cellgraph::ir::{DType, Graph, Op, ValueRef, ValueType};
    let mut g = Graph::new("mixed");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2, 3]))
        .expect("x");
    let add = |g: &mut Graph, name: &str, op: Op, ins: &[ValueRef]| {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        let id = g.add_node(name, op, &ins, &[name]).expect(name);
        ValueRef { node: id, slot: 0 }
    };
    let a = add(&mut g, "add", Op::Add {}, &[x, x]);
    let t = add(&mut g, "flip", Op::Transpose { perm: None }, &[a]);
    let y = add(&mut g, "y", Op::Tanh {}, &[t]);
    g.set_outputs(vec![y]).expect("outputs");
    cellgraph::ir::onnx::Model::new(g).save(path).expect("save");
}

#[test]
fn backend_subset_places_nodes_and_gives_the_cpu_s_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("mixed.onnx");
    mixed_model(&model);
    let text = succeeded(
        &bin()
            .args(["inspect", "--backend", "subset"])
            .arg(&model)
            .output()
            .expect("inspect"),
    );
    assert!(text.contains("placement (backends subset, cpu):"), "{text}");
    assert!(text.contains("  add (Add) → subset\n"), "{text}");
    assert!(
        text.contains("  flip (Transpose) → cpu; not subset: ") && text.contains("not Transpose"),
        "{text}"
    );
    assert!(text.contains("  y (Tanh) → subset\n"), "{text}");
    let x = dir.path().join("x.npy");
    let v: Vec<f32> = (0..6).map(|i| i as f32 * 0.3 - 0.8).collect();
    cellgraph::npy::write(
        &x,
        &cellgraph::ir::Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![2, 3], v).expect("x")),
    )
    .expect("npy");
    let mut outs = Vec::new();
    for backend in ["cpu", "subset"] {
        let out = dir.path().join(backend);
        succeeded(
            &bin()
                .arg("run")
                .arg(&model)
                .arg("--input")
                .arg(format!("x={}", x.display()))
                .arg("--output-dir")
                .arg(&out)
                .args(["--backend", backend])
                .output()
                .expect("run"),
        );
        outs.push(cellgraph::npy::read(&out.join("y.npy"), None).expect("y.npy"));
    }
    assert_eq!(outs[0].shape(), [3, 2]);
    cellgraph::conformance::compare_tensors(
        &outs[1],
        &outs[0],
        cellgraph::conformance::Tolerance {
            rtol: 1e-6,
            atol: 1e-7,
        },
    )
    .expect("subset+cpu gives the cpu's outputs");
    // bench times a MODEL, a standard workload and a Keras training step on the list.
    let text = succeeded(
        &bin()
            .arg("bench")
            .arg(&model)
            .args(["--runs", "2", "--backend", "subset"])
            .output()
            .expect("bench"),
    );
    assert!(text.contains("median_ms: "), "{text}");
    let text = succeeded(
        &bin()
            .args([
                "bench",
                "--backend",
                "subset",
                "--runs",
                "1",
                "--workload",
                "W1",
            ])
            .output()
            .expect("bench"),
    );
    assert!(
        text.contains("W1") && text.contains("inference") && text.contains("train"),
        "{text}"
    );
}
