//! `cellgraph bench`: times the recurrent workloads W1–W4 on the CPU backend (inference of
//! the ONNX layer, and a Keras training step), any ONNX model, and Keras models on the
//! loop and fused paths.

use crate::backends::cpu::{CpuBackend, Recurrent};
use crate::backends::Data;
use crate::ir::onnx::Model;
use crate::ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use crate::keras::{
    Bidirectional, Dense, Input, KerasError, Loss, Model as KerasModel, Optimizer, Sequential, GRU,
    LSTM,
};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

/// One benchmark workload: a single recurrent layer (float32).
#[derive(Clone, Debug)]
pub struct Workload {
    /// The label (`W1` … `W4`).
    pub id: &'static str,
    /// Short name (`w1_lstm_b64_t28_i28_h64`), also the exported file's stem.
    pub name: String,
    /// `LSTM` or `GRU` (GRU is reset-after: ONNX `linear_before_reset=1`, Keras's default).
    pub cell: &'static str,
    /// Both directions (ONNX `bidirectional`, Keras `Bidirectional(…)` with concat).
    pub bidirectional: bool,
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
        id: &'static str,
        cell: &'static str,
        bidirectional: bool,
        (batch, steps, input, hidden): (usize, usize, usize, usize),
    ) -> Workload {
        Workload {
            name: format!(
                "{}_{}{}_b{batch}_t{steps}_i{input}_h{hidden}",
                id.to_lowercase(),
                if bidirectional { "bi" } else { "" },
                cell.to_lowercase()
            ),
            id,
            cell,
            bidirectional,
            batch,
            steps,
            input,
            hidden,
        }
    }

    /// The four workloads: W1 LSTM B64 T28 I28 H64 (the guide's MNIST model), W2 LSTM
    /// B64 T100 I512 H512, W3 GRU (reset-after) at W2's size, W4 bidirectional W1.
    pub fn standard() -> Vec<Workload> {
        vec![
            Workload::new("W1", "LSTM", false, (64, 28, 28, 64)),
            Workload::new("W2", "LSTM", false, (64, 100, 512, 512)),
            Workload::new("W3", "GRU", false, (64, 100, 512, 512)),
            Workload::new("W4", "LSTM", true, (64, 28, 28, 64)),
        ]
    }

    fn gates(&self) -> usize {
        if self.cell == "LSTM" {
            4
        } else {
            3
        }
    }

    fn directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// Matrix-product FLOPs of one forward pass (gate arithmetic not counted).
    pub fn flops(&self) -> f64 {
        let gh = (self.gates() * self.hidden) as f64;
        2.0 * (self.directions() * self.steps * self.batch) as f64
            * (self.input + self.hidden) as f64
            * gh
    }

    /// Matrix-product FLOPs of the forward's input projections X·Wᵀ (part of
    /// [`Self::flops`]).
    pub fn input_flops(&self) -> f64 {
        let gh = (self.gates() * self.hidden) as f64;
        2.0 * (self.directions() * self.steps * self.batch * self.input) as f64 * gh
    }

    /// Matrix-product FLOPs of one training step of the recurrent layer and the
    /// `Dense(10)` head: the forward, then the backward's two products per forward
    /// product (the gradients of its input and of its weight) — 3× the forward — less
    /// dX = dG·W: the layer reads data, whose gradient nothing needs (the backward op
    /// skips it, as PyTorch and XLA do). Work a kernel does twice (a recomputed forward)
    /// is not counted.
    pub fn train_flops(&self) -> f64 {
        let head = 2.0 * (self.batch * self.directions() * self.hidden * 10) as f64;
        3.0 * (self.flops() + head) - self.input_flops()
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
        let (g_n, h, i, d) = (self.gates(), self.hidden, self.input, self.directions());
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
            .add_initializer("W", rand(&[d, g_n * h, i], scale), true)
            .expect("fresh graph");
        let r = g
            .add_initializer("R", rand(&[d, g_n * h, h], scale), true)
            .expect("fresh graph");
        let b = g
            .add_initializer("B", rand(&[d, 2 * g_n * h], scale), true)
            .expect("fresh graph");
        let direction = if self.bidirectional {
            "bidirectional"
        } else {
            "forward"
        };
        let (op, outs): (Op, &[&str]) = if self.cell == "LSTM" {
            (
                Op::LSTM {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: direction.into(),
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
                    direction: direction.into(),
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

    /// The training-step model, as Keras builds it: `Input((T, I))` → `LSTM(H)` /
    /// `GRU(H)` / `Bidirectional(LSTM(H))` → `Dense(10)`, compiled with `SGD(0.01)` and
    /// sparse categorical cross-entropy from logits.
    pub fn keras_model(&self, recurrent: Recurrent) -> Result<KerasModel, KerasError> {
        let mut m = Sequential::with_seed(1);
        m.add(Input::new(&[Some(self.steps), Some(self.input)]))?;
        let layer = if self.cell == "LSTM" {
            LSTM::new(self.hidden)
        } else {
            GRU::new(self.hidden)
        };
        if self.bidirectional {
            m.add(Bidirectional::new(layer))?;
        } else {
            m.add(layer)?;
        }
        m.add(Dense::new(10))?;
        m.set_recurrent(recurrent);
        m.compile(
            Optimizer::sgd(),
            Loss::SparseCategoricalCrossentropy { from_logits: true },
            &[],
        );
        Ok(m)
    }

    /// The training step's batch: `x [N, T, I]` (batch-major, as Keras feeds it) and
    /// integer labels `[N]`.
    pub fn train_batch(&self) -> (Tensor, Tensor) {
        let (b, t, i) = (self.batch, self.steps, self.input);
        let x: Vec<f32> = (0..b * t * i)
            .map(|k| ((k * 2654435761usize % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, t, i]), x).expect("shape matches"));
        let y = Tensor::I32(
            ArrayD::from_shape_vec(IxDyn(&[b]), (0..b as i32).map(|k| k % 10).collect())
                .expect("shape matches"),
        );
        (x, y)
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
    /// The process's peak resident memory while the runs (and the warm-up) ran, MiB:
    /// the kernel's high-water mark, reset before the first run (Linux; `None`
    /// elsewhere or when `/proc` is not readable).
    pub peak_mib: Option<f64>,
}

/// Resets the kernel's resident-memory high-water mark of this process (`VmHWM`);
/// false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's resident-memory high-water mark (`VmHWM`), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Times `f` `runs` times after one warm-up, with the peak memory of all of them.
pub fn time(runs: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<Timing, String> {
    let peak_known = reset_peak_rss();
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
        peak_mib: if peak_known { peak_rss_mib() } else { None },
    })
}

/// Times inference of a workload's ONNX layer (input `[T, N, I]`) on `before` (in order
/// of preference) and then the CPU for every node they refuse; with `before` empty, the
/// CPU's own plan.
pub fn bench_workload(
    w: &Workload,
    recurrent: Recurrent,
    runs: usize,
    before: &[std::sync::Arc<dyn cellgraph_backends::Device>],
) -> Result<Timing, String> {
    let g = w.graph();
    let mut plan = CpuBackend::new(recurrent)
        .compile_after(&g, before)
        .map_err(|e| e.to_string())?;
    let x = w.input();
    time(runs, || {
        plan.run(vec![Data::Tensor(x.clone())])
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Times a training step of a workload: [`Workload::keras_model`]'s `train_on_batch`
/// (forward, loss, backward through the recurrent layer and the head, SGD update).
/// The model runs on `before` and then the CPU ([`KerasModel::set_backends`]).
pub fn bench_train(
    w: &Workload,
    recurrent: Recurrent,
    runs: usize,
    before: &[std::sync::Arc<dyn cellgraph_backends::Device>],
) -> Result<Timing, String> {
    let e = |err: KerasError| err.to_string();
    let mut m = w.keras_model(recurrent).map_err(e)?;
    m.set_backends(before.to_vec());
    let (x, y) = w.train_batch();
    let (xs, ys) = ([x], [y]);
    time(runs, || m.train_on_batch(&xs, &ys).map(|_| ()).map_err(e))
}

/// Times inference of any ONNX model on deterministic pseudo-random inputs of its
/// declared shapes (symbolic or unknown dimensions take `dim`).
pub fn bench_model(
    model: &Model,
    recurrent: Recurrent,
    runs: usize,
    dim: usize,
) -> Result<Timing, String> {
    bench_model_on(model, recurrent, runs, dim, &[])
}

/// [`bench_model`] on a backend list: `before` (in order of preference), then the CPU
/// for every node they refuse (a [`cellgraph_backends::PlacedPlan`]); with `before`
/// empty, the CPU's own plan.
pub fn bench_model_on(
    model: &Model,
    recurrent: Recurrent,
    runs: usize,
    dim: usize,
    before: &[std::sync::Arc<dyn cellgraph_backends::Device>],
) -> Result<Timing, String> {
    let g = &model.graph;
    let mut inputs = Vec::new();
    let meter =
        cellgraph_backends::budget::Meter::new(cellgraph_backends::Budget::process_default());
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
        // The input and the f64 values it is made from must fit the run-time budget.
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("input {k} of shape {shape:?} has too many elements"))?;
        let bytes = (n as u64).saturating_mul(dt.size_of() as u64);
        meter
            .ask(&[bytes, (n as u64).saturating_mul(8)])
            .map_err(|o| {
                format!(
                    "input {k} of shape {shape:?} (--dim {dim}) asks for {}; the {} is {}",
                    o.asked,
                    o.exceeded.describe(),
                    o.limit
                )
            })?;
        meter.hold(bytes);
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
        .compile_after(g, before)
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
/// The models run on `before` and then the CPU ([`KerasModel::set_backends`]).
pub fn bench_keras(
    runs: usize,
    before: &[std::sync::Arc<dyn cellgraph_backends::Device>],
) -> Result<Vec<KerasRow>, String> {
    let e = |err: KerasError| err.to_string();
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
            m.set_backends(before.to_vec());
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
