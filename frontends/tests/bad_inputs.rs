//! Bad inputs through the `cellgraph` binary, each run as a newcomer's reproduction was:
//! under `ulimit -v 4000000` and `timeout 20`. Every one must end with a clear error
//! (exit 2, a message naming the file, node or flag) — never a panic (101), a signal, a
//! run past 20 s — or, for colliding output names, keep every output.

use cellgraph::ir::onnx::Model;
use cellgraph::ir::{DType, Dim, Graph, Op, Tensor, TensorType, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the binary under the reproductions' limits: 4 GB of address space, 20 s.
fn run_limited(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000; exec timeout 20 \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_cellgraph"))
        .args(args)
        .output()
        .expect("run cellgraph under sh");
    (out, t.elapsed())
}

/// The stderr of a run that must have ended with a clear error.
fn clear_error(args: &[&str]) -> String {
    let (out, took) = run_limited(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: expected exit 2 (an error), got {:?} after {took:?}\nstderr: {err}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn save(g: Graph, path: &Path) {
    std::fs::write(path, Model::new(g).to_bytes()).expect("write model");
}

fn npy(path: &Path, t: &Tensor) {
    cellgraph::npy::write(path, t).expect("write npy");
}

/// `y = Expand(x, shape)`: the 79-byte model whose output size an input decides.
fn expand_model(dir: &Path) -> PathBuf {
    let mut g = Graph::new("expand");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[1]))
        .expect("x");
    let sh = g
        .add_input("shape", ValueType::tensor(DType::I64, &[1]))
        .expect("shape");
    let e = g
        .add_node("grow", Op::Expand {}, &[Some(x), Some(sh)], &["y"])
        .expect("expand");
    g.set_outputs(vec![ValueRef { node: e, slot: 0 }])
        .expect("outputs");
    let p = dir.join("expand.onnx");
    save(g, &p);
    npy(
        &dir.join("x.npy"),
        &Tensor::F32(ArrayD::from_elem(IxDyn(&[1]), 1.0)),
    );
    p
}

#[test]
fn a_shape_from_an_input_asking_for_4_gib_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = expand_model(dir.path());
    let shape = dir.path().join("s.npy");
    npy(&shape, &Tensor::vec_i64(&[1 << 30]));
    let x = format!("x={}", s(&dir.path().join("x.npy")));
    let sh = format!("shape={}", s(&shape));
    let out = dir.path().join("out");
    let err = clear_error(&[
        "run",
        s(&model),
        "--input",
        &x,
        "--input",
        &sh,
        "--output-dir",
        s(&out),
    ]);
    assert!(
        err.contains("node \"grow\" (Expand): asks for") && err.contains("4294967296 bytes"),
        "{err}"
    );
    // With a per-value limit of 1 MB, 4 MB is refused by that limit.
    npy(&shape, &Tensor::vec_i64(&[1 << 20]));
    let err = clear_error(&[
        "--max-tensor-bytes",
        "1000000",
        "run",
        s(&model),
        "--input",
        &x,
        "--input",
        &sh,
        "--output-dir",
        s(&out),
    ]);
    assert!(
        err.contains("4194304 bytes")
            && err.contains("per-value limit (--max-tensor-bytes) is 1000000 bytes"),
        "{err}"
    );
}

/// A `Loop` over an `M` initializer, with the condition passed through; its body
/// carries a 64×64 matrix through a MatMul and, with `piece`, emits that many f32 zeros
/// per trip.
fn loop_model(dir: &Path, trips: i64, piece: Option<i64>) -> PathBuf {
    let mut body = Graph::new("body");
    body.add_input("i", ValueType::tensor(DType::I64, &[]))
        .expect("i");
    let c = body
        .add_input("c", ValueType::tensor(DType::Bool, &[]))
        .expect("c");
    let m = body
        .add_input("m", ValueType::tensor(DType::F32, &[64, 64]))
        .expect("m");
    let co = body
        .add_node("", Op::Identity {}, &[Some(c)], &["c_out"])
        .expect("identity");
    let mm = body
        .add_node("step", Op::MatMul {}, &[Some(m), Some(m)], &["m_out"])
        .expect("matmul");
    let mut outs = vec![
        ValueRef { node: co, slot: 0 },
        ValueRef { node: mm, slot: 0 },
    ];
    if let Some(n) = piece {
        let shp = body
            .add_initializer("piece_shape", Tensor::vec_i64(&[n]), false)
            .expect("shape");
        let p = body
            .add_node(
                "piece",
                Op::ConstantOfShape { value: None },
                &[Some(shp)],
                &["piece"],
            )
            .expect("piece");
        outs.push(ValueRef { node: p, slot: 0 });
    }
    body.set_outputs(outs).expect("outputs");
    let mut g = Graph::new("loop");
    let mtrips = g
        .add_initializer(
            "M",
            Tensor::I64(ArrayD::from_elem(IxDyn(&[]), trips)),
            false,
        )
        .expect("M");
    let cond = g
        .add_initializer(
            "cond",
            Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), true)),
            false,
        )
        .expect("cond");
    let m0 = g
        .add_input("m0", ValueType::tensor(DType::F32, &[64, 64]))
        .expect("m0");
    let names: &[&str] = if piece.is_some() {
        &["m_final", "pieces"]
    } else {
        &["m_final"]
    };
    let l = g
        .add_node(
            "runaway",
            Op::Loop {
                body: Box::new(body),
            },
            &[Some(mtrips), Some(cond), Some(m0)],
            names,
        )
        .expect("loop");
    g.set_outputs(
        (0..names.len())
            .map(|slot| ValueRef { node: l, slot })
            .collect(),
    )
    .expect("outputs");
    let p = dir.join(format!("loop_{trips}.onnx"));
    save(g, &p);
    npy(
        &dir.join("m0.npy"),
        &Tensor::F32(ArrayD::from_elem(IxDyn(&[64, 64]), 1.0 / 64.0)),
    );
    p
}

#[test]
fn a_loop_of_2_pow_62_trips_ends_at_once_with_the_trip_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = loop_model(dir.path(), 1 << 62, None);
    let m0 = format!("m0={}", s(&dir.path().join("m0.npy")));
    let out = dir.path().join("out");
    let err = clear_error(&["run", s(&model), "--input", &m0, "--output-dir", s(&out)]);
    assert!(
        err.contains("(Loop): asks for 4611686018427387904 iterations")
            && err.contains("(--max-loop-trips) is 65536 iterations"),
        "{err}"
    );
    // The same loop stops at a deadline when the trip limit is raised.
    let err = clear_error(&[
        "--max-loop-trips",
        "9223372036854775807",
        "--max-seconds",
        "0.5",
        "run",
        s(&model),
        "--input",
        &m0,
        "--output-dir",
        s(&out),
    ]);
    assert!(err.contains("time limit (--max-seconds) is 0.5 s"), "{err}");
}

#[test]
fn a_scan_output_growing_1_mib_a_trip_hits_the_total_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = loop_model(dir.path(), 1000, Some(1 << 18));
    let m0 = format!("m0={}", s(&dir.path().join("m0.npy")));
    let out = dir.path().join("out");
    let err = clear_error(&[
        "--max-total-bytes",
        "100000000",
        "run",
        s(&model),
        "--input",
        &m0,
        "--output-dir",
        s(&out),
    ]);
    assert!(
        err.contains("limit on values alive at once (--max-total-bytes) is 100000000 bytes"),
        "{err}"
    );
}

#[test]
fn bench_with_a_huge_dim_is_refused_before_allocating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = Graph::new("seq");
    let ty = ValueType::Tensor(TensorType {
        dtype: Some(DType::F32),
        shape: Some(vec![
            Dim::Sym("batch".into()),
            Dim::Sym("time".into()),
            Dim::Known(28),
        ]),
    });
    let x = g.add_input("x", ty).expect("x");
    let n = g
        .add_node("neg", Op::Neg {}, &[Some(x)], &["y"])
        .expect("neg");
    g.set_outputs(vec![ValueRef { node: n, slot: 0 }])
        .expect("outputs");
    let model = dir.path().join("seq.onnx");
    save(g, &model);
    let err = clear_error(&["bench", s(&model), "--dim", "5000", "--runs", "1"]);
    assert!(
        err.contains("input 0 of shape [5000, 5000, 28] (--dim 5000) asks for"),
        "{err}"
    );
    for (args, needle) in [
        (vec!["--runs", "0"], "--runs 0: give at least 1"),
        (vec!["--dim", "0"], "--dim 0"),
        (
            vec!["--threads", "100000"],
            "--threads 100000: this machine has",
        ),
        (vec!["--threads", "0"], "--threads 0"),
    ] {
        let mut all = vec!["bench", s(&model)];
        all.extend(args);
        let err = clear_error(&all);
        assert!(err.contains(needle), "{all:?}: {err}");
    }
}

#[test]
fn outputs_whose_names_collide_are_both_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = Graph::new("two");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2]))
        .expect("x");
    let a = g
        .add_node("", Op::Identity {}, &[Some(x)], &["a/b"])
        .expect("a/b");
    let b = g
        .add_node("", Op::Neg {}, &[Some(x)], &["a_b"])
        .expect("a_b");
    let c = g
        .add_node("", Op::Abs {}, &[Some(x)], &["A_B"])
        .expect("A_B");
    g.set_outputs(vec![
        ValueRef { node: a, slot: 0 },
        ValueRef { node: b, slot: 0 },
        ValueRef { node: c, slot: 0 },
    ])
    .expect("outputs");
    let model = dir.path().join("two.onnx");
    save(g, &model);
    let xs = dir.path().join("x.npy");
    npy(
        &xs,
        &Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, -2.0]).expect("x")),
    );
    let out = dir.path().join("out");
    let (o, _) = run_limited(&[
        "run",
        s(&model),
        "--input",
        &format!("x={}", s(&xs)),
        "--output-dir",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let read = |f: &str| {
        cellgraph::npy::read(&out.join(f), None)
            .expect("output file")
            .to_f64_vec()
    };
    assert_eq!(read("a_b.npy"), vec![1.0, -2.0], "{text}");
    assert_eq!(read("a_b~2.npy"), vec![-1.0, 2.0], "{text}");
    assert_eq!(read("A_B~3.npy"), vec![1.0, 2.0], "{text}");
    // The mapping is printed.
    assert!(text.contains("a/b: f32 [2] -> "), "{text}");
    assert!(text.contains("a_b~2.npy"), "{text}");
}

/// A Keras model folder: `model.json` of `Input(3, 2) → LSTM(units)`, with or without
/// `weights/`.
fn keras_dir(dir: &Path, units: usize, weights: bool) -> PathBuf {
    let k = dir.join(format!("keras_{units}_{weights}"));
    std::fs::create_dir_all(&k).expect("mkdir");
    std::fs::write(
        k.join("model.json"),
        format!(
            r#"{{"class_name": "Sequential", "config": {{"name": "s", "layers": [
                {{"class_name": "InputLayer", "config": {{"batch_shape": [null, 3, 2], "name": "in"}}}},
                {{"class_name": "LSTM", "config": {{"units": {units}, "name": "lstm"}}}}]}}}}"#
        ),
    )
    .expect("model.json");
    if weights {
        let w = k.join("weights");
        std::fs::create_dir_all(&w).expect("mkdir");
        let h = units.max(1);
        for (i, shape) in [vec![2, 4 * h], vec![h, 4 * h], vec![4 * h]]
            .iter()
            .enumerate()
        {
            npy(
                &w.join(format!("{i:03}.npy")),
                &Tensor::zeros(DType::F32, shape),
            );
        }
    }
    k
}

#[test]
fn keras_models_get_the_limits_and_need_their_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with = keras_dir(dir.path(), 4, true);
    let (o, _) = run_limited(&["inspect", s(&with)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // File limits apply to model.json and to the weights.
    let err = clear_error(&["--max-file-bytes", "10", "inspect", s(&with)]);
    assert!(
        err.contains("model.json: the file has") && err.contains("--max-file-bytes"),
        "{err}"
    );
    let err = clear_error(&["--max-tensor-bytes", "16", "inspect", s(&with)]);
    assert!(
        err.contains("000.npy: the array [2, 16]") && err.contains("--max-tensor-bytes"),
        "{err}"
    );
    let err = clear_error(&["--max-total-bytes", "200", "inspect", s(&with)]);
    assert!(err.contains("--max-total-bytes"), "{err}");
    // No weights: an error unless asked for.
    let without = keras_dir(dir.path(), 4, false);
    let err = clear_error(&["inspect", s(&without)]);
    assert!(
        err.contains("no weights folder") && err.contains("--random-weights"),
        "{err}"
    );
    let (o, _) = run_limited(&["inspect", s(&without), "--random-weights"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A Keras model given to `run` says what `run` reads.
    for path in [with.clone(), with.join("model.json")] {
        let err = clear_error(&["run", s(&path), "--output-dir", s(&dir.path().join("o"))]);
        assert!(
            err.contains("is a Keras model; this command reads ONNX models"),
            "{err}"
        );
    }
    // A folder that is not a Keras model.
    let err = clear_error(&[
        "run",
        s(dir.path()),
        "--output-dir",
        s(&dir.path().join("o")),
    ]);
    assert!(err.contains("is a folder, expected an .onnx file"), "{err}");
    // units = 0 is a bad value, not an unsupported feature.
    let zero = keras_dir(dir.path(), 0, true);
    let err = clear_error(&["inspect", s(&zero)]);
    assert!(
        err.contains("units = 0: a recurrent layer needs at least 1 unit"),
        "{err}"
    );
    assert!(!err.contains("is not supported"), "{err}");
}

#[test]
fn a_functional_model_with_a_cycle_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = dir.path().join("cycle");
    std::fs::create_dir_all(&k).expect("mkdir");
    let node = |from: &str| {
        format!(
            r#"[{{"args": [{{"class_name": "__keras_tensor__", "config": {{"keras_history": ["{from}", 0, 0]}}}}], "kwargs": {{}}}}]"#
        )
    };
    let text = format!(
        r#"{{"class_name": "Functional", "config": {{"name": "f",
        "layers": [
          {{"class_name": "InputLayer", "name": "in", "config": {{"batch_shape": [null, 4], "name": "in"}}, "inbound_nodes": []}},
          {{"class_name": "Dense", "name": "a", "config": {{"units": 4, "name": "a"}}, "inbound_nodes": {}}},
          {{"class_name": "Dense", "name": "b", "config": {{"units": 4, "name": "b"}}, "inbound_nodes": {}}}
        ],
        "input_layers": [["in", 0, 0]], "output_layers": [["b", 0, 0]]}}}}"#,
        node("b"),
        node("a")
    );
    std::fs::write(k.join("model.json"), text).expect("model.json");
    let err = clear_error(&["inspect", s(&k), "--random-weights"]);
    assert!(
        err.contains("a cycle")
            && err.contains("\"a\" reads \"b\"")
            && err.contains("\"b\" reads \"a\""),
        "{err}"
    );
}

#[test]
fn npy_inputs_get_the_limits_and_clear_dtype_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = expand_model(dir.path());
    let shape = dir.path().join("s.npy");
    npy(&shape, &Tensor::vec_i64(&[4]));
    let sh = format!("shape={}", s(&shape));
    let out = dir.path().join("out");
    let x = format!("x={}", s(&dir.path().join("x.npy")));
    // The model has 118 bytes, x.npy 132.
    let err = clear_error(&[
        "--max-file-bytes",
        "125",
        "run",
        s(&model),
        "--input",
        &x,
        "--input",
        &sh,
        "--output-dir",
        s(&out),
    ]);
    assert!(
        err.contains("x.npy: the file has") && err.contains("--max-file-bytes"),
        "{err}"
    );
    // float16 and strings, written as numpy writes them.
    let mut f16 = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f2', 'fortran_order': False, 'shape': (1,), }";
    let mut h = header.to_string();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    f16.extend_from_slice(&(h.len() as u16).to_le_bytes());
    f16.extend_from_slice(h.as_bytes());
    f16.extend_from_slice(&half_one());
    let f16_path = dir.path().join("h.npy");
    std::fs::write(&f16_path, &f16).expect("f16");
    let err = clear_error(&[
        "run",
        s(&model),
        "--input",
        &format!("x={}", s(&f16_path)),
        "--input",
        &sh,
        "--output-dir",
        s(&out),
    ]);
    assert!(
        err.contains("holds float16 (\"<f2\"), expected f32")
            && err.contains("astype(\"float32\")"),
        "{err}"
    );
    // The same header saying one 1-character unicode string (4 bytes).
    let at = f16
        .windows(5)
        .position(|w| w == b"'<f2'")
        .expect("descr in the header");
    let mut strings = f16[..f16.len() - 2].to_vec();
    strings[at..at + 5].copy_from_slice(b"'<U1'");
    strings.extend_from_slice(&[b'a', 0, 0, 0]);
    let s_path = dir.path().join("str.npy");
    std::fs::write(&s_path, &strings).expect("strings");
    let err = clear_error(&[
        "run",
        s(&model),
        "--input",
        &format!("x={}", s(&s_path)),
        "--input",
        &sh,
        "--output-dir",
        s(&out),
    ]);
    assert!(err.contains("holds strings"), "{err}");
}

fn half_one() -> [u8; 2] {
    // 1.0 in IEEE binary16.
    0x3c00u16.to_le_bytes()
}

#[test]
fn malformed_model_files_get_messages_that_say_what_and_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").expect("empty");
    let err = clear_error(&["inspect", s(&empty)]);
    assert!(err.contains("is empty (0 bytes)"), "{err}");
    // 20,000 nested GraphProto → NodeProto → AttributeProto levels.
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn wrap(field: u8, payload: Vec<u8>) -> Vec<u8> {
        let mut out = vec![(field << 3) | 2];
        varint(payload.len(), &mut out);
        out.extend(payload);
        out
    }
    let mut inner = Vec::new();
    for _ in 0..20_000 {
        inner = wrap(1, wrap(5, wrap(6, inner)));
    }
    let deep = dir.path().join("deep.onnx");
    std::fs::write(&deep, wrap(7, inner)).expect("deep");
    let err = clear_error(&["inspect", s(&deep)]);
    assert!(err.len() < 400, "{} bytes: {err}", err.len());
    assert!(
        err.contains("nested deeper than") && err.contains("at ModelProto.graph: GraphProto.node"),
        "{err}"
    );
    // `convert` writes what the output's extension says, and nothing else.
    let model = expand_model(dir.path());
    let err = clear_error(&["convert", s(&model), s(&dir.path().join("x.txt"))]);
    assert!(
        err.contains("x.txt: the output's extension says what to write"),
        "{err}"
    );
    assert!(!dir.path().join("x.txt").exists());
    // IR JSON: an output pointing nowhere, and an edge removed.
    let json = dir.path().join("m.json");
    let (o, _) = run_limited(&["convert", s(&model), s(&json)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    v["graph"]["outputs"][0]["node"] = 99.into();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, v.to_string()).expect("bad");
    let err = clear_error(&["inspect", s(&bad)]);
    assert!(
        err.contains("graph output 0 reads \"output 0 of node #99"),
        "{err}"
    );
    assert!(!err.contains("NodeIndex"), "{err}");
    // An RNN whose bias edge was deleted by hand: legal (B is optional), but said.
    let rnn = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/onnx-rnn/rnn_rev_hardsigmoid_clip/model.onnx");
    let rnn_json = dir.path().join("rnn.json");
    let (o, _) = run_limited(&["convert", s(&rnn), s(&rnn_json)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rnn_json).expect("json")).expect("parse");
    let edges = v["graph"]["graph"]["edges"].as_array_mut().expect("edges");
    let before = edges.len();
    edges.retain(|e| e[2]["dst_slot"] != 3);
    assert_eq!(edges.len(), before - 1);
    let cut = dir.path().join("cut.json");
    std::fs::write(&cut, v.to_string()).expect("cut");
    let (o, _) = run_limited(&["inspect", s(&cut)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no node reads \"B\" (a missing edge?)"),
        "{err}"
    );
    // Keras JSON that is not the IR's, given where IR JSON is read.
    let plain = dir.path().join("plain.json");
    std::fs::write(&plain, "{}").expect("plain");
    let err = clear_error(&["inspect", s(&plain)]);
    assert!(
        err.contains("not the IR JSON that `cellgraph convert"),
        "{err}"
    );
    // Meaningless limits.
    let err = clear_error(&["--max-seconds", "0", "inspect", s(&model)]);
    assert!(
        err.contains("--max-seconds 0: give a positive number of seconds"),
        "{err}"
    );
    let err = clear_error(&["--max-loop-trips", "0", "inspect", s(&model)]);
    assert!(
        err.contains("--max-loop-trips 0 would refuse everything"),
        "{err}"
    );
}

#[test]
fn idx_files_get_the_limits() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist-10k");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let err = clear_error(&[
        "--max-file-bytes",
        "100000",
        "mnist",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--epochs",
        "1",
    ]);
    assert!(
        err.contains("train-images-idx3-ubyte.gz: the file has")
            && err.contains("(--max-file-bytes)"),
        "{err}"
    );
    // 7,996 images of 28×28 as float32 are 25 MB.
    let err = clear_error(&[
        "--max-tensor-bytes",
        "1000000",
        "mnist",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--epochs",
        "1",
    ]);
    assert!(
        err.contains(
            "train-images-idx3-ubyte.gz: more than 250000 bytes uncompressed \
             (1000000 bytes as float32: --max-tensor-bytes)"
        ),
        "{err}"
    );
    let err = clear_error(&[
        "--max-total-bytes",
        "30000000",
        "mnist",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--epochs",
        "1",
    ]);
    assert!(err.contains("--max-total-bytes"), "{err}");
}
