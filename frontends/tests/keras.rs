//! The Keras frontend: the guide's examples and their parameter totals, clear errors on
//! wrong use, and semantics checked between equivalent formulations.

use cellgraph::ir::{Op, Tensor};
use cellgraph::keras::{
    model_from_json, Bidirectional, CallArgs, Dense, Embedding, Functional, Input, KerasError,
    LSTMCell, Masking, MergeMode, Sequential, SimpleRNNCell, StackedRNNCells, GRU, LSTM, RNN,
};
use ndarray::{ArrayD, IxDyn};
use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries: target/<profile>/examples.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile.join("examples").join(name)
}

fn run_example(name: &str) -> String {
    run_example_with(name, &[])
}

fn run_example_with(name: &str, args: &[&str]) -> String {
    let path = example(name);
    if !path.exists() {
        // `cargo test --test keras` alone does not build the examples: build this one.
        let release = path.components().any(|c| c.as_os_str() == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "cellgraph", "--example", name]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --example");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo test builds the examples)", path.display()));
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn examples_print_the_guides_parameter_totals() {
    for (name, total) in [
        ("guide_sequential_lstm", "164,106"),
        ("guide_gru_simplernn", "361,866"),
        ("guide_encoder_decoder", "258,698"),
        ("guide_bidirectional", "80,266"),
    ] {
        let text = run_example(name);
        assert!(
            text.contains(&format!("Total params: {total} (")),
            "{name} did not print Total params: {total}:\n{text}"
        );
        assert!(text.contains("┃ Layer (type)"), "{name}: no summary table");
    }
}

/// The GRU built by hand with the graph builder (`examples/gru_scan_by_hand.rs`): its
/// gradient agrees with a central finite difference, and the subset backend placed
/// before the CPU runs some of its nodes and gives the same loss and gradient.
#[test]
fn the_gru_built_by_hand_differentiates_and_runs_on_both_backend_lists() {
    let number = |text: &str, prefix: &str, after: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"));
        let rest = &line[line.find(after).expect("marker") + after.len()..];
        rest.trim_start()
            .split([' ', ')'])
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
    };
    let cpu = run_example_with("gru_scan_by_hand", &["cpu"]);
    let subset = run_example_with("gru_scan_by_hand", &["subset"]);
    for text in [&cpu, &subset] {
        let analytic = number(text, "d loss / d Rh", ":");
        let numeric = number(text, "d loss / d Rh", "central difference:");
        assert!(
            (analytic - numeric).abs() <= 1e-4 + 1e-3 * numeric.abs(),
            "{analytic} vs {numeric}:\n{text}"
        );
        assert!(text.contains("it imports back"), "{text}");
    }
    let (a, b) = (number(&cpu, "loss:", ":"), number(&subset, "loss:", ":"));
    assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
    assert!(cpu.contains("0 node(s) off the cpu"), "{cpu}");
    assert!(
        !subset.contains(" 0 node(s) off the cpu") && subset.contains("(Mul)"),
        "{subset}"
    );
}

fn max_diff_line(text: &str, prefix: &str) -> f32 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
}

#[test]
fn examples_show_equivalences_of_the_guide() {
    let text = run_example("guide_rnn_lstmcell");
    assert!(
        max_diff_line(&text, "max |LSTM - RNN(LSTMCell)|") <= 1e-6,
        "{text}"
    );
    assert!(
        text.contains("Non-trainable params: 128 (512.00 B)"),
        "{text}"
    );
    let text = run_example("guide_stateful");
    assert!(
        max_diff_line(&text, "max |three stateful calls") <= 1e-5,
        "{text}"
    );
    assert!(text.contains("after reset_states: max |h| = 0"), "{text}");
    let text = run_example("guide_state_reuse");
    assert!(text.contains("new_output shape: [20, 64]"), "{text}");
    assert!(
        text.contains("state_h[0][0]"),
        "connected-to column: {text}"
    );
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    })
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn unroll_computes_what_the_loop_computes() {
    for masked in [false, true] {
        let build = |unroll: bool| {
            let mut m = Sequential::with_seed(3);
            m.add(Input::new(&[Some(6), Some(4)])).unwrap();
            if masked {
                m.add(Masking::new(0.0)).unwrap();
            }
            m.add(
                GRU::new(5)
                    .return_sequences(true)
                    .go_backwards(true)
                    .unroll(unroll),
            )
            .unwrap();
            m.add(LSTM::new(3).unroll(unroll)).unwrap();
            m
        };
        let (mut a, mut b) = (build(false), build(true));
        let mut x = random(&[3, 6, 4], 9);
        if masked {
            for f in 0..4 {
                x[[0, 5, f]] = 0.0;
                x[[1, 2, f]] = 0.0;
            }
        }
        let ya = a.predict_f32(std::slice::from_ref(&x)).unwrap();
        let yb = b.predict_f32(&[x]).unwrap();
        assert!(max_abs_diff(&ya[0], &yb[0]) < 1e-6);
        // The loop form is a Scan; the unrolled form has none.
        let count_scans = |m: &cellgraph::keras::Model| {
            let g = m
                .to_graph(&[(cellgraph::ir::DType::F32, vec![3, 6, 4])])
                .unwrap();
            g.node_ids()
                .into_iter()
                .filter(|&n| matches!(g.node(n).op(), Some(Op::Scan { .. })))
                .count()
        };
        assert_eq!(count_scans(&a), 2);
        assert_eq!(count_scans(&b), 0);
    }
}

#[test]
fn stacked_cells_equal_stacked_layers() {
    let mut stacked = Sequential::with_seed(5);
    stacked.add(Input::new(&[None, Some(3)])).unwrap();
    stacked
        .add(RNN::stacked(StackedRNNCells::new(vec![
            LSTMCell::new(4),
            SimpleRNNCell::new(2),
        ])))
        .unwrap();
    let mut layers = Sequential::with_seed(6);
    layers.add(Input::new(&[None, Some(3)])).unwrap();
    layers
        .add(RNN::new(LSTMCell::new(4)).return_sequences(true))
        .unwrap();
    layers.add(RNN::new(SimpleRNNCell::new(2))).unwrap();
    layers.set_weights(stacked.get_weights()).unwrap();
    let x = random(&[2, 5, 3], 1);
    let a = stacked.predict_f32(std::slice::from_ref(&x)).unwrap();
    let b = layers.predict_f32(&[x]).unwrap();
    assert!(max_abs_diff(&a[0], &b[0]) < 1e-6);
}

#[test]
fn bidirectional_merge_modes_relate_to_each_other() {
    let build = |mode: Option<MergeMode>| {
        let mut m = Sequential::with_seed(2);
        m.add(Input::new(&[Some(4), Some(3)])).unwrap();
        m.add(Bidirectional::new(LSTM::new(2).return_sequences(true)).merge_mode(mode))
            .map(|_| ())
            .map(|()| m)
    };
    let x = random(&[2, 4, 3], 4);
    let run = |mode| {
        build(Some(mode))
            .unwrap()
            .predict_f32(std::slice::from_ref(&x))
            .unwrap()
    };
    let concat = run(MergeMode::Concat);
    let sum = run(MergeMode::Sum);
    let ave = run(MergeMode::Ave);
    let c = &concat[0];
    for b in 0..2 {
        for t in 0..4 {
            for u in 0..2 {
                let (f, bw) = (c[[b, t, u]], c[[b, t, u + 2]]);
                assert!((sum[0][[b, t, u]] - (f + bw)).abs() < 1e-6);
                assert!((ave[0][[b, t, u]] - (f + bw) / 2.0).abs() < 1e-6);
            }
        }
    }
    // merge_mode=None gives two outputs: not a Sequential layer.
    let e = err_text(build(None));
    assert!(e.contains("gives 2 outputs"), "{e}");
}

fn err_text<T: std::fmt::Debug>(r: Result<T, KerasError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn wrong_input_rank_or_width_is_a_clear_error() {
    let mut m = Sequential::new();
    m.add(Input::new(&[None, Some(28)])).unwrap();
    m.add(LSTM::new(8)).unwrap();
    let e = err_text(m.predict_f32(&[ArrayD::zeros(IxDyn(&[2, 28]))]));
    assert!(
        e.contains("expected shape (None, None, 28), got (2, 28)"),
        "{e}"
    );
    let e = err_text(m.predict_f32(&[ArrayD::zeros(IxDyn(&[2, 5, 27]))]));
    assert!(
        e.contains("expected shape (None, None, 28), got (2, 5, 27)"),
        "{e}"
    );
    let e = err_text(m.predict_f32(&[]));
    assert!(e.contains("takes 1 inputs, got 0"), "{e}");
    let mut nan = ArrayD::zeros(IxDyn(&[1, 2, 28]));
    nan[[0, 1, 3]] = f32::NAN;
    let e = err_text(m.predict_f32(&[nan]));
    assert!(e.contains("NaN"), "{e}");
    // A recurrent layer on a 2-D input is refused when the model is built.
    let mut m = Sequential::new();
    m.add(Input::new(&[Some(28)])).unwrap();
    let e = err_text(m.add(LSTM::new(8)));
    assert!(e.contains("expects inputs of rank 3"), "{e}");
}

#[test]
fn initial_state_of_the_wrong_shape_is_a_clear_error() {
    let mut f = Functional::new();
    let x = f.input(Input::new(&[None, Some(4)])).unwrap();
    let h = f.input(Input::new(&[Some(5)])).unwrap();
    let c = f.input(Input::new(&[Some(6)])).unwrap();
    let lstm = f.layer(LSTM::new(6).name("lstm")).unwrap();
    let e = err_text(f.call_with(
        lstm,
        &[x],
        CallArgs {
            initial_state: vec![h, c],
            mask: None,
        },
    ));
    assert!(
        e.contains("\"lstm\"")
            && e.contains("initial_state[0] has shape (None, 5), expected (None, 6)"),
        "{e}"
    );
    let e = err_text(f.call_with(
        lstm,
        &[x],
        CallArgs {
            initial_state: vec![c],
            mask: None,
        },
    ));
    assert!(
        e.contains("initial_state has 1 tensors, the layer has 2 states"),
        "{e}"
    );
}

#[test]
fn stateful_layer_fed_another_batch_size_is_a_clear_error() {
    let mut m = Sequential::new();
    m.add(Input::new(&[None, Some(3)])).unwrap();
    m.add(LSTM::new(4).stateful(true)).unwrap();
    m.predict_f32(&[random(&[2, 5, 3], 1)]).unwrap();
    let e = err_text(m.predict_f32(&[random(&[3, 5, 3], 1)]));
    assert!(
        e.contains("\"lstm\"") && e.contains("stateful with batch size 2, got a batch of 3"),
        "{e}"
    );
    // And states are kept: calling twice differs from calling once.
    let mut fresh = Sequential::new();
    fresh.add(Input::new(&[None, Some(3)])).unwrap();
    fresh.add(LSTM::new(4).stateful(true)).unwrap();
    let x = random(&[2, 5, 3], 7);
    let first = fresh.predict_f32(std::slice::from_ref(&x)).unwrap();
    let second = fresh.predict_f32(std::slice::from_ref(&x)).unwrap();
    assert!(max_abs_diff(&first[0], &second[0]) > 1e-4);
    fresh.reset_states();
    let again = fresh.predict_f32(&[x]).unwrap();
    assert!(max_abs_diff(&first[0], &again[0]) < 1e-7);
    assert!(err_text(fresh.layer_states("nope")).contains("no layer of this name"));
}

fn seq_json(layer: &str) -> String {
    format!(
        r#"{{"class_name": "Sequential", "config": {{"name": "s", "layers": [
            {{"class_name": "InputLayer", "config": {{"batch_shape": [null, 5, 3], "name": "in"}}}},
            {layer}]}}}}"#
    )
}

#[test]
fn unknown_layer_or_activation_in_json_is_a_clear_error() {
    let e = err_text(model_from_json(
        &seq_json(r#"{"class_name": "ConvLSTM2D", "config": {"name": "conv", "filters": 3}}"#),
        "model.json",
    ));
    assert!(
        e.contains("\"conv\"") && e.contains("layer class \"ConvLSTM2D\""),
        "{e}"
    );
    let e = err_text(model_from_json(
        &seq_json(
            r#"{"class_name": "LSTM", "config": {"name": "l", "units": 3, "activation": "gelu"}}"#,
        ),
        "model.json",
    ));
    assert!(
        e.contains("\"l\"") && e.contains("activation activation \"gelu\""),
        "{e}"
    );
    let e = err_text(model_from_json(
        &seq_json(
            r#"{"class_name": "LSTM", "config": {"name": "l", "units": 3, "kernel_regularizer": {"class_name": "L2"}}}"#,
        ),
        "model.json",
    ));
    assert!(e.contains("option kernel_regularizer"), "{e}");
    let e = err_text(model_from_json(
        &seq_json(r#"{"class_name": "LSTM", "config": {"name": "l"}}"#),
        "m.json",
    ));
    assert!(
        e.contains("m.json (l)") && e.contains("missing \"units\""),
        "{e}"
    );
    let e = err_text(model_from_json("{not json", "m.json"));
    assert!(e.contains("m.json") && e.contains("not JSON"), "{e}");
}

#[test]
fn set_weights_checks_count_and_shapes() {
    let mut m = Sequential::new();
    m.add(Input::new(&[None])).unwrap();
    m.add(Embedding::new(10, 4)).unwrap();
    m.add(Dense::new(2)).unwrap();
    let mut w = m.get_weights();
    assert_eq!(w.len(), 3);
    w[1] = ArrayD::zeros(IxDyn(&[4, 3]));
    let e = err_text(m.set_weights(w));
    assert!(
        e.contains("dense/kernel: expected shape [4, 2], got [4, 3]"),
        "{e}"
    );
    let e = err_text(m.set_weights(vec![]));
    assert!(e.contains("the model has 3 weights, got 0"), "{e}");
    // Token ids outside the table are refused by the backend, not read out of bounds.
    let ids = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![3i64, 10]).unwrap();
    let e = err_text(m.predict(&[Tensor::I64(ids)]));
    assert!(e.contains("10"), "{e}");
}

#[test]
fn sequential_misuse_is_refused() {
    let mut m = Sequential::new();
    let e = err_text(m.add(LSTM::new(3)));
    assert!(e.contains("starts with Input"), "{e}");
    m.add(Input::new(&[None, Some(2)])).unwrap();
    let e = err_text(m.add(LSTM::new(3).return_state(true)));
    assert!(e.contains("gives 3 outputs"), "{e}");
}

#[test]
fn training_mode_with_unit_dropout_masks_equals_inference() {
    // A rate of 1e-9 keeps every unit (1 − 1e-9 rounds to 1 in f32): training mode then
    // runs the per-gate (recurrent dropout) and masked-input forms with masks of ones,
    // which must compute what inference computes.
    for cell in ["lstm", "gru", "gru_before", "simple"] {
        let layer = match cell {
            "lstm" => LSTM::new(4),
            "gru" => GRU::new(4),
            "gru_before" => GRU::new(4).reset_after(false),
            _ => cellgraph::keras::SimpleRNN::new(4),
        };
        for (d, rd) in [(1e-9, 0.0), (0.0, 1e-9), (1e-9, 1e-9)] {
            let mut m = Sequential::with_seed(8);
            m.add(Input::new(&[Some(5), Some(3)])).unwrap();
            m.add(
                layer
                    .clone()
                    .dropout(d)
                    .recurrent_dropout(rd)
                    .return_sequences(true),
            )
            .unwrap();
            let x = Tensor::F32(random(&[2, 5, 3], 3));
            let a = m.call(std::slice::from_ref(&x), false).unwrap();
            let b = m.call(&[x], true).unwrap();
            let (Tensor::F32(a), Tensor::F32(b)) = (&a[0], &b[0]) else {
                panic!("float outputs")
            };
            assert!(
                max_abs_diff(a, b) < 1e-6,
                "{cell} dropout {d} recurrent {rd}"
            );
        }
    }
}

#[test]
fn training_mode_drops_units_and_inference_does_not() {
    let mut m = Sequential::with_seed(1);
    m.add(Input::new(&[Some(1000)])).unwrap();
    m.add(cellgraph::keras::Dropout::new(0.25)).unwrap();
    let x = ArrayD::from_elem(IxDyn(&[4, 1000]), 1.0f32);
    let inf = m.predict_f32(std::slice::from_ref(&x)).unwrap();
    assert!(inf[0].iter().all(|&v| v == 1.0));
    let run = |m: &mut cellgraph::keras::Model| match m.call(&[Tensor::F32(x.clone())], true) {
        Ok(mut v) => match v.remove(0) {
            Tensor::F32(a) => a,
            _ => panic!("float"),
        },
        Err(e) => panic!("{e}"),
    };
    let a = run(&mut m);
    let b = run(&mut m);
    let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
    assert!((zeros - 0.25).abs() < 0.03, "dropped fraction {zeros}");
    assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert_ne!(a, b, "a fresh mask per call");
    // Recurrent dropout changes the output in training mode only.
    let mut r = Sequential::with_seed(2);
    r.add(Input::new(&[Some(6), Some(3)])).unwrap();
    r.add(LSTM::new(8).dropout(0.5).recurrent_dropout(0.5))
        .unwrap();
    let x = Tensor::F32(random(&[2, 6, 3], 5));
    let p1 = r.call(std::slice::from_ref(&x), false).unwrap();
    let p2 = r.call(std::slice::from_ref(&x), false).unwrap();
    let t1 = r.call(&[x], true).unwrap();
    assert_eq!(p1, p2);
    assert_ne!(p1, t1);
}

#[test]
fn batch_normalization_in_training_mode_uses_and_tracks_batch_statistics() {
    let mut m = Sequential::new();
    m.add(Input::new(&[Some(3)])).unwrap();
    m.add(cellgraph::keras::BatchNormalization::new()).unwrap();
    let x = random(&[8, 3], 11);
    let y = match m.call(&[Tensor::F32(x.clone())], true).unwrap().remove(0) {
        Tensor::F32(a) => a,
        _ => panic!("float"),
    };
    let w = m.get_weights(); // gamma, beta, moving_mean, moving_variance
    for c in 0..3 {
        let col: Vec<f64> = (0..8).map(|b| x[[b, c]] as f64).collect();
        let mean = col.iter().sum::<f64>() / 8.0;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
        for b in 0..8 {
            let want = (col[b] - mean) / (var + 1e-3).sqrt();
            assert!((y[[b, c]] as f64 - want).abs() < 1e-5);
        }
        assert!((w[2][[c]] as f64 - 0.01 * mean).abs() < 1e-6, "moving mean");
        assert!(
            (w[3][[c]] as f64 - (0.99 + 0.01 * var)).abs() < 1e-6,
            "moving variance"
        );
    }
}

#[test]
fn a_model_file_declaring_huge_weights_is_refused_before_allocating() {
    let e = err_text(model_from_json(
        &seq_json(r#"{"class_name": "LSTM", "config": {"name": "big", "units": 2000000000}}"#),
        "model.json",
    ));
    assert!(
        e.contains("\"big\"") && e.contains("exceeds the limit"),
        "{e}"
    );
    let e = err_text(model_from_json(
        r#"{"class_name": "Sequential", "config": {"name": "s", "layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [null, 3], "name": "in"}},
            {"class_name": "Embedding", "config": {"name": "emb", "input_dim": 4000000000, "output_dim": 4000000000}}]}}"#,
        "model.json",
    ));
    assert!(
        e.contains("model.json (emb)") && e.contains("input_dim"),
        "{e}"
    );
}

#[test]
fn fuzz_regression_a_huge_orthogonal_initialisation_is_refused_not_computed() {
    // Found by the keras_json fuzz target: a GRU(3077) made the orthogonal
    // initialisation of its 3077×9231 recurrent kernel run for minutes.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz_regressions/keras_json_timeout_gru3077.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let e = err_text(model_from_json(&text, "f.json"));
    assert!(
        e.contains("orthogonal initialisation") && e.contains("too costly"),
        "{e}"
    );
    // Loading for given weights does not initialise at all.
    let m = cellgraph::keras::model_from_json_with(&text, "f.json", false).unwrap();
    assert!(m.count_params() > 10_000_000, "{}", m.count_params());
}
