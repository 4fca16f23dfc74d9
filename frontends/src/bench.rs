//! `cellgraph bench`: times inference of the recurrent workloads on the CPU backend.

use crate::backends::cpu::{CpuBackend, Recurrent};
use crate::backends::{Backend, Data, Plan};
use crate::ir::onnx::Model;
use crate::ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

/// One benchmark workload: a single recurrent layer.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Short name (`lstm_b64_t28_i28_h64`).
    pub name: String,
    /// `LSTM` or `GRU`.
    pub cell: &'static str,
    /// Batch.
    pub batch: usize,
    /// Steps.
    pub steps: usize,
    /// Input features.
    pub input: usize,
    /// Units.
    pub hidden: usize,
}

impl Workload {
    fn new(
        cell: &'static str,
        batch: usize,
        steps: usize,
        input: usize,
        hidden: usize,
    ) -> Workload {
        Workload {
            name: format!(
                "{}_b{batch}_t{steps}_i{input}_h{hidden}",
                cell.to_lowercase()
            ),
            cell,
            batch,
            steps,
            input,
            hidden,
        }
    }

    /// The workloads: LSTM B64 T28 I28 H64, LSTM and GRU B64 T100 I512 H512.
    pub fn standard() -> Vec<Workload> {
        vec![
            Workload::new("LSTM", 64, 28, 28, 64),
            Workload::new("LSTM", 64, 100, 512, 512),
            Workload::new("GRU", 64, 100, 512, 512),
        ]
    }

    fn gates(&self) -> usize {
        if self.cell == "LSTM" {
            4
        } else {
            3
        }
    }

    /// Matrix-product FLOPs of one forward pass (gate arithmetic not counted).
    pub fn flops(&self) -> f64 {
        let gh = (self.gates() * self.hidden) as f64;
        2.0 * (self.steps * self.batch) as f64 * (self.input + self.hidden) as f64 * gh
    }

    /// The workload as an ONNX graph: input `X [T, N, I]`, weights as initializers,
    /// outputs `Y` and `Y_h` (and `Y_c` for LSTM).
    pub fn graph(&self) -> Graph {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |shape: &[usize], scale: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    ((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect();
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape matches"))
        };
        let (g_n, h, i) = (self.gates(), self.hidden, self.input);
        let scale = 1.0 / (h as f32).sqrt();
        let mut g = Graph::new(self.name.clone());
        let x = g
            .add_input(
                "X",
                ValueType::tensor(
                    DType::F32,
                    &[self.steps as u64, self.batch as u64, i as u64],
                ),
            )
            .expect("fresh graph");
        let w = g
            .add_initializer("W", rand(&[1, g_n * h, i], scale), true)
            .expect("fresh graph");
        let r = g
            .add_initializer("R", rand(&[1, g_n * h, h], scale), true)
            .expect("fresh graph");
        let b = g
            .add_initializer("B", rand(&[1, 2 * g_n * h], scale), true)
            .expect("fresh graph");
        let (op, outs): (Op, &[&str]) = if self.cell == "LSTM" {
            (
                Op::LSTM {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: "forward".into(),
                    hidden_size: Some(h as i64),
                    input_forget: 0,
                    layout: 0,
                },
                &["Y", "Y_h", "Y_c"],
            )
        } else {
            (
                Op::GRU {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: "forward".into(),
                    hidden_size: Some(h as i64),
                    layout: 0,
                    linear_before_reset: 1,
                },
                &["Y", "Y_h"],
            )
        };
        let id = g
            .add_node(
                &self.cell.to_lowercase(),
                op,
                &[Some(x), Some(w), Some(r), Some(b)],
                outs,
            )
            .expect("valid recurrent node");
        g.set_outputs(
            (0..outs.len())
                .map(|s| ValueRef { node: id, slot: s })
                .collect(),
        )
        .expect("outputs exist");
        g
    }

    /// A random input of the workload's shape.
    pub fn input(&self) -> Tensor {
        let n = self.steps * self.batch * self.input;
        let v: Vec<f32> = (0..n)
            .map(|k| ((k * 2654435761usize % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[self.steps, self.batch, self.input]), v)
                .expect("shape matches"),
        )
    }
}

/// Timing summary of one workload.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Median milliseconds.
    pub median_ms: f64,
    /// Fastest run, ms.
    pub min_ms: f64,
    /// Slowest run, ms.
    pub max_ms: f64,
    /// Runs timed.
    pub runs: usize,
}

/// Times `f` `runs` times after one warm-up.
pub fn time(runs: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<Timing, String> {
    f()?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(Timing {
        median_ms: v[v.len() / 2],
        min_ms: v[0],
        max_ms: v[v.len() - 1],
        runs,
    })
}

/// Times inference of a workload on the CPU backend.
pub fn bench_workload(w: &Workload, recurrent: Recurrent, runs: usize) -> Result<Timing, String> {
    let g = w.graph();
    let mut plan = CpuBackend::new(recurrent)
        .compile(&g)
        .map_err(|e| e.to_string())?;
    let x = w.input();
    time(runs, || {
        plan.run(vec![Data::Tensor(x.clone())])
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Times inference of any ONNX model on deterministic pseudo-random inputs of its
/// declared shapes (symbolic or unknown dimensions take `dim`).
pub fn bench_model(
    model: &Model,
    recurrent: Recurrent,
    runs: usize,
    dim: usize,
) -> Result<Timing, String> {
    let g = &model.graph;
    let mut inputs = Vec::new();
    for (k, t) in g.input_types().iter().enumerate() {
        let tt = t
            .as_tensor()
            .ok_or_else(|| format!("input {k} is not a tensor"))?;
        let dt = tt
            .dtype
            .ok_or_else(|| format!("input {k} has an unknown dtype"))?;
        let shape: Vec<usize> = tt
            .shape
            .as_ref()
            .ok_or_else(|| format!("input {k} has an unknown rank"))?
            .iter()
            .map(|d| d.known().map(|v| v as usize).unwrap_or(dim))
            .collect();
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n)
            .map(|i| {
                if dt.is_float() {
                    ((i * 2654435761usize % 1000) as f64 / 500.0) - 1.0
                } else {
                    0.0
                }
            })
            .collect();
        inputs.push(Data::Tensor(
            Tensor::from_f64_vec(dt, &shape, &vals).map_err(|e| e.to_string())?,
        ));
    }
    let mut plan = CpuBackend::new(recurrent)
        .compile(g)
        .map_err(|e| e.to_string())?;
    time(runs, || {
        plan.run(inputs.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// One row of `cellgraph bench --keras`: a Keras `LSTM(H)` + `Dense(10)` model run on the
/// loop path and on the fused path the selector raises it to.
#[derive(Clone, Debug)]
pub struct KerasRow {
    /// `lstm_b64_t28_i28_h64 inference` and the like.
    pub name: String,
    /// The loop path (each layer's `Scan` over its cell).
    pub looped: Timing,
    /// The fused path (raised to `LSTM`, backward `LSTMGrad`).
    pub fused: Timing,
}

/// The selector workloads (batch, steps, input, units).
pub const KERAS_WORKLOADS: [(usize, usize, usize, usize); 2] =
    [(64, 28, 28, 64), (64, 100, 512, 512)];

/// Times a Keras `Input(T, I) → LSTM(H) → Dense(10)` model on both paths: inference
/// (`predict`) and a training step (forward and backward of the sparse categorical
/// cross-entropy from logits with respect to every weight: `Model::gradients`).
pub fn bench_keras(runs: usize) -> Result<Vec<KerasRow>, String> {
    use crate::keras::{Dense, Input, Loss, Sequential, LSTM};
    let e = |err: crate::keras::KerasError| err.to_string();
    let mut rows = Vec::new();
    for (b, t, i, h) in KERAS_WORKLOADS {
        let name = format!("lstm_b{b}_t{t}_i{i}_h{h}");
        let x: Vec<f32> = (0..b * t * i)
            .map(|k| ((k * 2654435761usize % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let x =
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, t, i]), x).map_err(|er| er.to_string())?);
        let y = Tensor::I32(
            ArrayD::from_shape_vec(IxDyn(&[b]), (0..b as i32).map(|k| k % 10).collect())
                .map_err(|er| er.to_string())?,
        );
        let mut timings = Vec::new();
        for mode in [Recurrent::Loop, Recurrent::Fused] {
            let mut m = Sequential::with_seed(1);
            m.add(Input::new(&[Some(t), Some(i)])).map_err(e)?;
            m.add(LSTM::new(h)).map_err(e)?;
            m.add(Dense::new(10)).map_err(e)?;
            m.set_recurrent(mode);
            let xs = [x.clone()];
            let inf = time(runs, || m.predict(&xs).map(|_| ()).map_err(e))?;
            let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
            let train = time(runs, || {
                m.gradients(&xs, &y, loss, 0, true).map(|_| ()).map_err(e)
            })?;
            timings.push((inf, train));
        }
        let (lo, fu) = (timings[0].clone(), timings[1].clone());
        rows.push(KerasRow {
            name: format!("{name} inference"),
            looped: lo.0,
            fused: fu.0,
        });
        rows.push(KerasRow {
            name: format!("{name} train step"),
            looped: lo.1,
            fused: fu.1,
        });
    }
    Ok(rows)
}
