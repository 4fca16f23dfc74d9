//! Custom cells (`CustomCell` in `RNN`): the guide's nested cell against a hand-written
//! loop and against central finite differences in f64, a hand-written LSTM cell fused and
//! equal to `LSTM`, named-map inputs, saving and loading through the registry, `inspect`,
//! multi-output `fit` logs, and clear errors for misshaped nested inputs.

#[path = "../examples/common/nested_cell.rs"]
mod nested_cell;

use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::{DType, Graph, Tensor};
use cellgraph::keras::{
    CallArgs, CellBuilder, CellOps, CustomCell, CustomRnn, FitOptions, Functional, Init, Input,
    KerasError, KerasTensor, Loss, Metric, Model, Nest, Optimizer, Sequential, Sym, LSTM,
};
use ndarray::{ArrayD, IxDyn};
use nested_cell::NestedCell;
use std::sync::Arc;

const CELL: NestedCell = NestedCell {
    unit_1: 3,
    unit_2: 2,
    unit_3: 3,
};
const I1: usize = 4;
const I2: usize = 3;
const I3: usize = 2;

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect()
}

fn f32s(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let n = shape.iter().product();
    let v = values(n, seed).into_iter().map(|x| x as f32).collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// The guide's model at small sizes: two inputs, the nested RNN, its outputs (and states).
fn nested_model(rnn: CustomRnn, mask: bool) -> (Model, Vec<KerasTensor>) {
    let mut f = Functional::with_seed(3);
    let a = f.input(Input::new(&[None, Some(I1)])).unwrap();
    let b = f.input(Input::new(&[None, Some(I2), Some(I3)])).unwrap();
    let mut ins = vec![a, b];
    let args = if mask {
        let m = f.input(Input::new(&[None]).name("mask")).unwrap();
        ins.push(m);
        CallArgs {
            mask: Some(m),
            ..CallArgs::default()
        }
    } else {
        CallArgs::default()
    };
    let id = f.layer(rnn).unwrap();
    let outs = f.call_nested(id, &Nest::leaves([a, b]), args).unwrap();
    (f.build(&ins, &outs).unwrap(), ins)
}

#[test]
fn nested_cell_matches_a_hand_written_loop() {
    let (batch, steps) = (2, 5);
    let (mut model, _) = nested_model(
        CustomRnn::new(CELL)
            .return_sequences(true)
            .return_state(true),
        false,
    );
    let x1 = f32s(&[batch, steps, I1], 1);
    let x2 = f32s(&[batch, steps, I2, I3], 2);
    let out = model.predict_f32(&[x1.clone(), x2.clone()]).unwrap();
    let shapes: Vec<&[usize]> = out.iter().map(|o| o.shape()).collect();
    assert_eq!(
        shapes,
        [
            &[batch, steps, 3][..],
            &[batch, steps, 2, 3],
            &[batch, 3],
            &[batch, 2, 3]
        ]
    );
    let w = model.get_weights();
    let (k1, k23) = (&w[0], &w[1]);
    assert_eq!(k1.shape(), &[I1, 3]);
    assert_eq!(k23.shape(), &[I2, I3, 2, 3]);
    for b in 0..batch {
        let (mut s1, mut s23) = (vec![0f64; 3], vec![0f64; 6]);
        for t in 0..steps {
            for u in 0..3 {
                let o: f64 = (0..I1)
                    .map(|i| f64::from(x1[[b, t, i]]) * f64::from(k1[[i, u]]))
                    .sum();
                s1[u] += o;
                assert!((f64::from(out[0][[b, t, u]]) - o).abs() < 1e-5);
            }
            for k in 0..2 {
                for l in 0..3 {
                    let mut o = 0f64;
                    for i in 0..I2 {
                        for j in 0..I3 {
                            o += f64::from(x2[[b, t, i, j]]) * f64::from(k23[[i, j, k, l]]);
                        }
                    }
                    s23[k * 3 + l] += o;
                    assert!((f64::from(out[1][[b, t, k, l]]) - o).abs() < 1e-5);
                }
            }
        }
        for u in 0..3 {
            assert!((f64::from(out[2][[b, u]]) - s1[u]).abs() < 1e-5);
        }
        for k in 0..2 {
            for l in 0..3 {
                assert!((f64::from(out[3][[b, k, l]]) - s23[k * 3 + l]).abs() < 1e-5);
            }
        }
    }
}

fn run(g: &Graph, inputs: Vec<Tensor>) -> Vec<Tensor> {
    let mut plan = CpuBackend::new(Recurrent::Fused).compile(g).unwrap();
    plan.run(inputs.into_iter().map(Data::Tensor).collect())
        .unwrap()
        .into_iter()
        .map(|d| d.into_tensor().unwrap())
        .collect()
}

/// The gradient graph of `mse(output)` in f64, checked against central differences for
/// every weight element; returns the worst error relative to max(1, |gradient|).
fn check_fd(model: &Model, sig: &[(DType, Vec<usize>)], feeds: &[Tensor], output: usize) -> f64 {
    let g32 = model
        .gradient_graph(sig, Loss::MeanSquaredError, output, false)
        .unwrap();
    let g = cellgraph::ir::convert::to_f64(&g32).unwrap();
    cellgraph::ir::verify(&g).unwrap();
    let names: Vec<String> = g
        .inputs()
        .iter()
        .map(|&n| g.node(n).outputs[0].name.clone())
        .collect();
    let weights = model.weights();
    let loss_at = g
        .outputs()
        .iter()
        .position(|&o| g.value(o).name == "output_loss/value" || g.value(o).name == "loss/value")
        .unwrap_or(model_outputs(model) + 1);
    let widen =
        |t: &Tensor| Tensor::F64(ArrayD::from_shape_vec(IxDyn(t.shape()), t.to_f64_vec()).unwrap());
    // Graph inputs by name: model inputs (in order), weights, then the targets.
    let mut data: Vec<Tensor> = Vec::new();
    let mut fed = 0;
    let mut weight_pos = Vec::new();
    for name in &names {
        if let Some(w) = weights.iter().find(|w| &w.name == name) {
            weight_pos.push(data.len());
            data.push(Tensor::F64(w.value.mapv(f64::from)));
        } else if name.starts_with("loss/targets") {
            let shape: Vec<usize> = g
                .value(g.find(name).unwrap())
                .ty
                .dims()
                .unwrap()
                .iter()
                .map(|d| d.known().unwrap() as usize)
                .collect();
            let n = shape.iter().product();
            data.push(Tensor::from_f64_vec(DType::F64, &shape, &values(n, 99)).unwrap());
        } else {
            data.push(widen(&feeds[fed]));
            fed += 1;
        }
    }
    let n_out = g.outputs().len();
    let n_grads = weight_pos.len();
    let outs = run(&g, data.clone());
    let loss = |d: Vec<Tensor>| run(&g, d)[loss_at].to_f64_vec()[0];
    let mut worst: f64 = 0.0;
    for (k, &pos) in weight_pos.iter().enumerate() {
        let got = outs[n_out - n_grads + k].to_f64_vec();
        let base = data[pos].to_f64_vec();
        let shape = data[pos].shape().to_vec();
        assert_eq!(got.len(), base.len());
        for i in 0..base.len() {
            let h = 1e-6;
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let mut dp = data.clone();
            dp[pos] = Tensor::from_f64_vec(DType::F64, &shape, &plus).unwrap();
            let mut dm = data.clone();
            dm[pos] = Tensor::from_f64_vec(DType::F64, &shape, &minus).unwrap();
            let fd = (loss(dp) - loss(dm)) / (2.0 * h);
            worst = worst.max((fd - got[i]).abs() / got[i].abs().max(1.0));
        }
    }
    worst
}

fn model_outputs(m: &Model) -> usize {
    m.output_shapes().len()
}

#[test]
fn nested_cell_gradients_match_finite_differences_in_f64() {
    let (batch, steps) = (2, 4);
    let x1 = Tensor::F32(f32s(&[batch, steps, I1], 5));
    let x2 = Tensor::F32(f32s(&[batch, steps, I2, I3], 6));
    // Plain: the last outputs.
    let (model, _) = nested_model(CustomRnn::new(CELL), false);
    let sig = vec![
        (DType::F32, vec![batch, steps, I1]),
        (DType::F32, vec![batch, steps, I2, I3]),
    ];
    for output in 0..2 {
        let worst = check_fd(&model, &sig, &[x1.clone(), x2.clone()], output);
        assert!(worst < 1e-6, "output {output}: worst error {worst}");
    }
    // Sequences, reversed, with a mask that has holes.
    let (model, _) = nested_model(
        CustomRnn::new(CELL)
            .return_sequences(true)
            .go_backwards(true),
        true,
    );
    let mask = Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[batch, steps]), vec![1., 0., 1., 1., 1., 1., 0., 0.])
            .unwrap(),
    );
    let mut sig3 = sig.clone();
    sig3.push((DType::F32, vec![batch, steps]));
    for output in 0..2 {
        let worst = check_fd(
            &model,
            &sig3,
            &[x1.clone(), x2.clone(), mask.clone()],
            output,
        );
        assert!(worst < 1e-6, "masked, output {output}: worst error {worst}");
    }
}

/// Keras's LSTM step written by hand with the cell operations.
#[derive(Debug)]
struct HandLstm {
    units: usize,
}

impl CustomCell for HandLstm {
    fn class_name(&self) -> &str {
        "HandLstm"
    }
    fn state_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.units], vec![self.units]]
    }
    fn output_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.units]]
    }
    fn build(&self, inputs: &Nest<Vec<usize>>, w: &mut CellBuilder) -> Result<(), String> {
        let i = inputs.flatten()[0][0];
        w.add_weight("kernel", &[i, 4 * self.units], Init::GlorotUniform);
        w.add_weight(
            "recurrent_kernel",
            &[self.units, 4 * self.units],
            Init::Orthogonal,
        );
        w.add_weight("bias", &[4 * self.units], Init::Zeros);
        Ok(())
    }
    fn call(
        &self,
        ops: &mut CellOps,
        inputs: &Nest<Sym>,
        states: &[Sym],
    ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError> {
        let x = inputs.flat()[0];
        let (h, c) = (states[0], states[1]);
        let xk = ops.matmul(x, ops.weight("kernel")?)?;
        let hr = ops.matmul(h, ops.weight("recurrent_kernel")?)?;
        let z = ops.add(xk, hr)?;
        let z = ops.add(z, ops.weight("bias")?)?;
        let g = ops.split(z, 4, -1)?;
        let (i, f, cc, o) = (
            ops.sigmoid(g[0])?,
            ops.sigmoid(g[1])?,
            ops.tanh(g[2])?,
            ops.sigmoid(g[3])?,
        );
        let fc = ops.mul(f, c)?;
        let ic = ops.mul(i, cc)?;
        let c2 = ops.add(fc, ic)?;
        let tc = ops.tanh(c2)?;
        let h2 = ops.mul(o, tc)?;
        Ok((vec![h2], vec![h2, c2]))
    }
    fn get_config(&self) -> serde_json::Value {
        serde_json::json!({ "units": self.units })
    }
}

#[test]
fn a_custom_cell_that_is_an_lstm_is_fused_and_computes_lstm() {
    let (batch, steps, feat, units) = (3, 6, 5, 4);
    for return_sequences in [false, true] {
        let mut custom = Sequential::with_seed(7);
        custom.add(Input::new(&[None, Some(feat)])).unwrap();
        custom
            .add(CustomRnn::new(HandLstm { units }).return_sequences(return_sequences))
            .unwrap();
        let mut builtin = Sequential::with_seed(8);
        builtin.add(Input::new(&[None, Some(feat)])).unwrap();
        builtin
            .add(LSTM::new(units).return_sequences(return_sequences))
            .unwrap();
        let mut w = builtin.get_weights();
        w[2] = f32s(&[4 * units], 11);
        builtin.set_weights(w.clone()).unwrap();
        custom.set_weights(w).unwrap();
        let sig = [(DType::F32, vec![batch, steps, feat])];
        let choices = custom.recurrent_choices(&sig).unwrap();
        let shown: Vec<String> = choices.iter().map(|c| c.to_string()).collect();
        assert!(
            shown.len() == 1 && shown[0].contains("LSTM → fused"),
            "{shown:?}"
        );
        let x = f32s(&[batch, steps, feat], 12);
        let a = custom.predict_f32(std::slice::from_ref(&x)).unwrap();
        let b = builtin.predict_f32(&[x]).unwrap();
        assert_eq!(a[0].shape(), b[0].shape());
        for (p, q) in a[0].iter().zip(b[0].iter()) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

/// A cell reading `{"location": [x, y], "pressure": [force]}`: `h' = tanh(h + x·A + y·B
/// + force·C)`.
#[derive(Debug)]
struct Sensors {
    units: usize,
}

impl CustomCell for Sensors {
    fn class_name(&self) -> &str {
        "Sensors"
    }
    fn state_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.units]]
    }
    fn output_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.units]]
    }
    fn build(&self, inputs: &Nest<Vec<usize>>, w: &mut CellBuilder) -> Result<(), String> {
        for (k, shape) in inputs.flatten().iter().enumerate() {
            w.add_weight(
                &format!("w{k}"),
                &[shape[0], self.units],
                Init::GlorotUniform,
            );
        }
        Ok(())
    }
    fn call(
        &self,
        ops: &mut CellOps,
        inputs: &Nest<Sym>,
        states: &[Sym],
    ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError> {
        let Nest::Dict(m) = inputs else {
            return Err(KerasError::Internal("expects a map".into()));
        };
        let leaves = [
            m["location"].flat()[0],
            m["location"].flat()[1],
            m["pressure"].flat()[0],
        ];
        let mut acc = states[0];
        for (k, x) in leaves.into_iter().enumerate() {
            let p = ops.matmul(x, ops.weight(&format!("w{k}"))?)?;
            acc = ops.add(acc, p)?;
        }
        let h = ops.tanh(acc)?;
        Ok((vec![h], vec![h]))
    }
    fn get_config(&self) -> serde_json::Value {
        serde_json::json!({ "units": self.units })
    }
}

#[test]
fn named_map_inputs_flow_through_the_scan() {
    let (batch, steps, units) = (2, 3, 4);
    let mut f = Functional::with_seed(1);
    let x = f.input(Input::new(&[None, Some(2)]).name("x")).unwrap();
    let y = f.input(Input::new(&[None, Some(3)]).name("y")).unwrap();
    let force = f.input(Input::new(&[None, Some(1)]).name("force")).unwrap();
    let id = f.layer(CustomRnn::new(Sensors { units })).unwrap();
    let nest = Nest::dict([
        ("location", Nest::leaves([x, y])),
        ("pressure", Nest::leaves([force])),
    ]);
    let out = f.call_nested(id, &nest, CallArgs::default()).unwrap();
    let mut model = f.build(&[x, y, force], &out).unwrap();
    let xs = [
        f32s(&[batch, steps, 2], 21),
        f32s(&[batch, steps, 3], 22),
        f32s(&[batch, steps, 1], 23),
    ];
    let got = model.predict_f32(&xs).unwrap();
    let w = model.get_weights();
    for b in 0..batch {
        let mut h = vec![0f64; units];
        for t in 0..steps {
            let mut acc = h.clone();
            for (k, xk) in xs.iter().enumerate() {
                for (u, a) in acc.iter_mut().enumerate() {
                    *a += (0..xk.shape()[2])
                        .map(|i| f64::from(xk[[b, t, i]]) * f64::from(w[k][[i, u]]))
                        .sum::<f64>();
                }
            }
            h = acc.iter().map(|a| a.tanh()).collect();
        }
        for u in 0..units {
            assert!((f64::from(got[0][[b, u]]) - h[u]).abs() < 1e-5);
        }
    }
}

#[test]
fn a_saved_custom_cell_model_loads_back_through_the_registry() {
    nested_cell::register();
    let (mut model, _) = nested_model(CustomRnn::new(CELL).return_state(true), false);
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let mut loaded = cellgraph::keras::load_model(dir.path()).unwrap();
    assert_eq!(loaded.summary(), model.summary());
    let xs = [f32s(&[2, 3, I1], 31), f32s(&[2, 3, I2, I3], 32)];
    let a = model.predict_f32(&xs).unwrap();
    let b = loaded.predict_f32(&xs).unwrap();
    assert_eq!(a, b);

    // An unregistered cell class is an error naming the class and the layer.
    let json = std::fs::read_to_string(dir.path().join("model.json")).unwrap();
    let renamed = json.replace("\"NestedCell\"", "\"UnknownCell\"");
    let err =
        cellgraph::keras::model_from_json(&renamed, "model.json").expect_err("unknown cell class");
    let msg = err.to_string();
    assert!(
        msg.contains("UnknownCell") && msg.contains("not registered") && msg.contains("rnn"),
        "{msg}"
    );
}

#[test]
fn inspect_explains_why_the_nested_cell_runs_as_a_loop() {
    let (model, _) = nested_model(CustomRnn::new(CELL), false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.onnx");
    model.save_onnx(&path).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgraph"))
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rnn/scan: loop: state 1 has shape")
            && text.contains("the fused LSTM/GRU/RNN kernels keep [batch, hidden] states"),
        "{text}"
    );
}

#[test]
fn fit_logs_each_output_loss_and_accuracy_by_keras_names() {
    let (mut model, _) = nested_model(CustomRnn::new(CELL), false);
    model.compile(
        Optimizer::adam(),
        Loss::MeanSquaredError,
        &[Metric::Accuracy],
    );
    let n = 12;
    let x = [
        Tensor::F32(f32s(&[n, 4, I1], 41)),
        Tensor::F32(f32s(&[n, 4, I2, I3], 42)),
    ];
    let y = [
        Tensor::F32(f32s(&[n, 3], 43)),
        Tensor::F32(f32s(&[n, 2, 3], 44)),
    ];
    let opts = FitOptions {
        batch_size: 4,
        epochs: 2,
        verbose: false,
        ..FitOptions::default()
    };
    let before = model.evaluate_outputs(&x, &y, 4).unwrap();
    let h = model.fit_outputs(&x, &y, &opts).unwrap();
    let keys: Vec<&str> = h.history.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "loss",
            "rnn_loss",
            "rnn_1_loss",
            "rnn_accuracy",
            "rnn_1_accuracy"
        ]
    );
    // The total is the sum of the per-output losses.
    let (l, a, b) = (
        h.get("loss").unwrap(),
        h.get("rnn_loss").unwrap(),
        h.get("rnn_1_loss").unwrap(),
    );
    for e in 0..2 {
        assert!((l[e] - a[e] - b[e]).abs() < 1e-5);
    }
    let after = model.evaluate_outputs(&x, &y, 4).unwrap();
    assert!(after.loss < before.loss, "{} → {}", before.loss, after.loss);
    assert_eq!(after.metrics[0].0, "rnn_loss");
}

fn build_err(i2_shape: &[Option<usize>], batch: [Option<usize>; 2]) -> String {
    let mut f = Functional::new();
    let a = f
        .input(Input::batch_shape(&[batch[0], None, Some(I1)]))
        .unwrap();
    let mut s = vec![batch[1]];
    s.extend_from_slice(i2_shape);
    let b = f.input(Input::batch_shape(&s)).unwrap();
    let id = f.layer(CustomRnn::new(CELL)).unwrap();
    // Built once for the right shapes, then called on the misshaped ones.
    let good_a = f.input(Input::new(&[None, Some(I1)])).unwrap();
    let good_b = f.input(Input::new(&[None, Some(I2), Some(I3)])).unwrap();
    f.call_nested(id, &Nest::leaves([good_a, good_b]), CallArgs::default())
        .unwrap();
    f.call_nested(id, &Nest::leaves([a, b]), CallArgs::default())
        .expect_err("a misshaped call fails")
        .to_string()
}

#[test]
fn misshaped_nested_inputs_are_errors_naming_the_part() {
    // Wrong rank.
    let msg = build_err(&[None, Some(I2)], [None, None]);
    assert!(
        msg.contains("input part [1]") && msg.contains("built for (None, None, 3, 2)"),
        "{msg}"
    );
    // Wrong inner width.
    let msg = build_err(&[None, Some(I2), Some(I3 + 1)], [None, None]);
    assert!(
        msg.contains("input part [1] has shape (None, None, 3, 3)"),
        "{msg}"
    );
    // Batch sizes that disagree.
    let msg = build_err(&[None, Some(I2), Some(I3)], [Some(4), Some(5)]);
    assert!(
        msg.contains("input part [1] has batch size 5, part [0] has 4"),
        "{msg}"
    );
    // A part without the time axis.
    let msg = build_err(&[Some(I2)], [None, None]);
    assert!(msg.contains("input part [1] has shape (None, 3)"), "{msg}");

    // At run time: declared shapes agree, the fed batches do not.
    let (mut model, _) = nested_model(CustomRnn::new(CELL), false);
    let err = model
        .predict_f32(&[f32s(&[2, 3, I1], 1), f32s(&[3, 3, I2, I3], 2)])
        .expect_err("mismatched batches fail");
    let msg = err.to_string();
    assert!(
        msg.contains("input part [1] has batch size 3, part [0] has 2"),
        "{msg}"
    );

    // The cell's own shape contract: an output that is not what output_size declares.
    #[derive(Debug)]
    struct Liar;
    impl CustomCell for Liar {
        fn class_name(&self) -> &str {
            "Liar"
        }
        fn state_size(&self) -> Vec<Vec<usize>> {
            vec![vec![2]]
        }
        fn output_size(&self) -> Vec<Vec<usize>> {
            vec![vec![5]]
        }
        fn build(&self, _: &Nest<Vec<usize>>, _: &mut CellBuilder) -> Result<(), String> {
            Ok(())
        }
        fn call(
            &self,
            _: &mut CellOps,
            _: &Nest<Sym>,
            states: &[Sym],
        ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError> {
            Ok((vec![states[0]], vec![states[0]]))
        }
        fn get_config(&self) -> serde_json::Value {
            serde_json::json!({})
        }
    }
    let mut m = Sequential::new();
    m.add(Input::new(&[None, Some(3)])).unwrap();
    m.add(CustomRnn::from_arc(Arc::new(Liar))).unwrap();
    let msg = m
        .predict_f32(&[f32s(&[1, 2, 3], 1)])
        .expect_err("a lying cell fails")
        .to_string();
    assert!(
        msg.contains("output 0 has shape") && msg.contains("(batch, 5)"),
        "{msg}"
    );
}
