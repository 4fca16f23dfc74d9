//! The fused recurrent kernels and the loop lowering against an independent oracle.
//!
//! `backends/tests/fused_vs_loop.rs` compares the two CPU paths with each other, but both
//! read the ONNX attributes through the same `Spec::from_op` / `parse_activations`, so a
//! misread activation list, alpha/beta order, clip, `input_forget` or layout would be wrong
//! on both sides alike. Here every random LSTM/GRU/RNN configuration — all activation names
//! the IR knows with random (also short or empty) alpha/beta lists, clip, `input_forget`,
//! peepholes, `linear_before_reset`, both layouts, `sequence_lens` with zero-length rows,
//! initial states, every direction, any subset of the outputs, `hidden_size` given or not —
//! runs on both paths and is compared with `common/onnx_rnn_oracle.rs`, an f64
//! implementation written from the ONNX operator text that shares no code with the kernels
//! (its reading of each attribute is documented there; `onnx_rnn_attr_cases.rs` checks it
//! against onnxruntime).
//!
//! Tolerances (`|got − oracle| ≤ atol + rtol·|oracle|`, elementwise):
//!
//! * f64, every configuration (at the threaded sizes: bounded functions and LSTM/GRU gates
//!   in [0, 1], see `threaded_cfg`): atol 1e-10, rtol 1e-9. The kernels and the oracle evaluate
//!   the same f64 formulas and differ only in summation order and fused multiply-adds (a
//!   few ulps per step, amplified along the sequence); anything misread is off by far more
//!   (a default alpha read as an exact 0.2 instead of the f32 attribute value 0.2f32
//!   already differs by 4e-9 relative after one step).
//! * f32, small configurations whose gates stay in [0, 1] and whose other functions are
//!   bounded (`f32_comparable`), and threaded ones with the default activations
//!   (`threaded_cfg`): atol 2e-5, rtol 2e-4 against the f64 oracle on the same (f32)
//!   inputs: float32 rounding of dot products of up to `I + H` = 72 terms over up to 16
//!   steps, and the fused kernels' fast f32 `exp`/`tanh`. The simple RNN at the threaded
//!   sizes gets atol 2e-4, rtol 2e-3: its recurrence is expansive there (R uniform in
//!   ±0.6, H ≥ 40), so rounding grows about 30× every 4 steps on both paths alike (one
//!   measured Tanh RNN, B 25, H 48: max error vs the oracle 1.4e-7 after 1 step, 1.4e-6
//!   after 4, 4.6e-5 fused / 3.5e-5 loop after 16), while LSTM and GRU of the same sizes
//!   stay below 1e-6.
//! * Once a state overflows (|v| > 1e150 or not finite; unbounded functions used as gates
//!   can do that in a few steps), both sides only have to have overflowed.

#[path = "common/onnx_rnn_oracle.rs"]
mod oracle;

use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::ops::rnn::ACTIVATIONS as ACTS;
use cellgraph::ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use oracle::{Activation, Array};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Cfg {
    /// 0 LSTM, 1 GRU, 2 RNN.
    cell: usize,
    /// 0 forward, 1 reverse, 2 bidirectional.
    dir: usize,
    layout: bool,
    batch: usize,
    seq: usize,
    input: usize,
    hidden: usize,
    lens: Option<Vec<usize>>,
    init_h: bool,
    init_c: bool,
    bias: bool,
    peep: bool,
    lbr: bool,
    input_forget: bool,
    hidden_attr: bool,
    /// Indices into `ACTS`, cycled to the op's count; `None`: the attribute is absent.
    acts: Option<Vec<usize>>,
    alpha: Option<Vec<f32>>,
    beta: Option<Vec<f32>>,
    clip: Option<f32>,
    outputs: [bool; 3],
    seed: u64,
}

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        (
            0usize..3,
            0usize..3,
            any::<bool>(),
            1usize..=6,
            1usize..=10,
            1usize..=5,
            1usize..=6,
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            prop::option::of(prop::collection::vec(0usize..ACTS.len(), 6)),
            prop::option::of(prop::collection::vec(-1.0f32..1.5, 0..7)),
            prop::option::of(prop::collection::vec(-1.0f32..1.5, 0..7)),
        ),
        (
            prop::option::of(0.1f32..2.0),
            any::<[bool; 3]>(),
            any::<u64>(),
            prop::collection::vec(0usize..=10, 6),
        ),
    )
        .prop_map(
            |(
                (cell, dir, layout, batch, seq, input, hidden),
                (use_lens, init_h, init_c, bias, peep, lbr, input_forget, hidden_attr),
                (acts, alpha, beta),
                (clip, outputs, seed, lens),
            )| Cfg {
                cell,
                dir,
                layout,
                batch,
                seq,
                input,
                hidden,
                lens: use_lens.then(|| lens[..batch].iter().map(|&l| l.min(seq)).collect()),
                init_h,
                init_c,
                bias,
                peep,
                lbr,
                input_forget,
                hidden_attr,
                acts,
                alpha,
                beta,
                clip,
                outputs,
                seed,
            },
        )
}

/// Activations whose values stay in a bounded range whatever the alpha/beta drawn here
/// (|alpha| ≤ 1.5).
fn bounded(name: &str) -> bool {
    matches!(
        name,
        "Tanh" | "Sigmoid" | "HardSigmoid" | "ScaledTanh" | "Softsign"
    )
}

/// Whether f32 results can be held to a fixed tolerance: every function bounded, and the
/// LSTM/GRU gate function `f` in [0, 1] (Sigmoid, HardSigmoid). With gates that go
/// negative (Tanh, Softsign, ScaledTanh as `f`), `H = (1 − z)·h̃ + z·H` and
/// `C = f·C + i·c̃` can expand, and f32 rounding grows with the state: a GRU with Softsign
/// gates (B 17, H 43, 10 steps) reaches |Y| ≈ 4.6 with f32 errors of 1e-4 on both paths
/// alike (fused 2.0e-4, loop 1.0e-4), while its f64 paths agree with the oracle to 1e-9.
fn f32_comparable(c: &Cfg) -> bool {
    let per = [3, 2, 1][c.cell];
    act_names(c).chunks(per).all(|fs| {
        fs.iter().all(|f| bounded(f)) && (c.cell == 2 || matches!(fs[0], "Sigmoid" | "HardSigmoid"))
    })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_f64_vec(dtype, shape, &v).expect("shape")
    }
}

/// A built case: the graph, its inputs, the oracle's inputs by ONNX slot, the op, and
/// the op output slot of each graph output.
struct Built {
    graph: Graph,
    inputs: Vec<Data>,
    slots: Vec<Option<Array>>,
    op: Op,
    outputs: Vec<usize>,
}

fn build(c: &Cfg, dtype: DType) -> Built {
    let mut rng = Rng(c.seed | 1);
    let d = if c.dir == 2 { 2 } else { 1 };
    let gates = [4, 3, 1][c.cell];
    let (h, n, t, i) = (c.hidden, c.batch, c.seq, c.input);
    let mut g = Graph::new("rnn");
    let mut inputs = Vec::new();
    let mut slots: Vec<Option<Array>> = vec![None; 8];
    let mut add = |g: &mut Graph, slot: usize, name: &str, t: Tensor| -> ValueRef {
        let dims: Vec<u64> = t.shape().iter().map(|&x| x as u64).collect();
        let v = g
            .add_input(name, ValueType::tensor(t.dtype(), &dims))
            .expect("input");
        // The oracle sees exactly the values the plan gets (f32-rounded for f32).
        slots[slot] = Some(Array {
            shape: t.shape().to_vec(),
            data: t.to_f64_vec(),
        });
        inputs.push(Data::Tensor(t));
        v
    };
    let xshape = if c.layout {
        vec![n, t, i]
    } else {
        vec![t, n, i]
    };
    let x = add(&mut g, 0, "X", rng.tensor(&xshape, 1.0, dtype));
    let w = add(&mut g, 1, "W", rng.tensor(&[d, gates * h, i], 0.6, dtype));
    let r = add(&mut g, 2, "R", rng.tensor(&[d, gates * h, h], 0.6, dtype));
    let b = c
        .bias
        .then(|| add(&mut g, 3, "B", rng.tensor(&[d, 2 * gates * h], 0.5, dtype)));
    let lens = c.lens.as_ref().map(|l| {
        let v: Vec<i32> = l.iter().map(|&x| x as i32).collect();
        add(
            &mut g,
            4,
            "seq_lens",
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("lens")),
        )
    });
    let sshape = if c.layout {
        vec![n, d, h]
    } else {
        vec![d, n, h]
    };
    let h0 = c
        .init_h
        .then(|| add(&mut g, 5, "h0", rng.tensor(&sshape, 0.8, dtype)));
    let c0 =
        (c.cell == 0 && c.init_c).then(|| add(&mut g, 6, "c0", rng.tensor(&sshape, 0.8, dtype)));
    let p =
        (c.cell == 0 && c.peep).then(|| add(&mut g, 7, "P", rng.tensor(&[d, 3 * h], 0.5, dtype)));
    let per = [3, 2, 1][c.cell];
    let activations = c.acts.as_ref().map(|a| {
        a.iter()
            .cycle()
            .take(per * d)
            .map(|&k| ACTS[k].to_string())
            .collect::<Vec<_>>()
    });
    let direction = ["forward", "reverse", "bidirectional"][c.dir].to_string();
    let layout = i64::from(c.layout);
    let hidden_size = c.hidden_attr.then_some(h as i64);
    let (alpha, beta) = (c.alpha.clone(), c.beta.clone());
    let op = match c.cell {
        0 => Op::LSTM {
            activation_alpha: alpha,
            activation_beta: beta,
            activations,
            clip: c.clip,
            direction,
            hidden_size,
            input_forget: i64::from(c.input_forget),
            layout,
        },
        1 => Op::GRU {
            activation_alpha: alpha,
            activation_beta: beta,
            activations,
            clip: c.clip,
            direction,
            hidden_size,
            layout,
            linear_before_reset: i64::from(c.lbr),
        },
        _ => Op::RNN {
            activation_alpha: alpha,
            activation_beta: beta,
            activations,
            clip: c.clip,
            direction,
            hidden_size,
            layout,
        },
    };
    let mut ins = vec![Some(x), Some(w), Some(r), b, lens, h0];
    if c.cell == 0 {
        ins.push(c0);
        ins.push(p);
    }
    while ins.last() == Some(&None) {
        ins.pop();
    }
    let nout = if c.cell == 0 { 3 } else { 2 };
    let mut want = c.outputs;
    if !want[..nout].iter().any(|&x| x) {
        want[0] = true;
    }
    let names: Vec<&str> = (0..nout)
        .map(|k| if want[k] { ["Y", "Y_h", "Y_c"][k] } else { "" })
        .collect();
    let id = g
        .add_node("rnn", op.clone(), &ins, &names)
        .expect("recurrent node");
    let outputs: Vec<usize> = (0..nout).filter(|&k| want[k]).collect();
    g.set_outputs(
        outputs
            .iter()
            .map(|&k| ValueRef { node: id, slot: k })
            .collect(),
    )
    .expect("outputs");
    cellgraph::ir::verify(&g).expect("valid graph");
    Built {
        graph: g,
        inputs,
        slots,
        op,
        outputs,
    }
}

fn has_recurrent(g: &Graph) -> bool {
    g.node_ids()
        .iter()
        .filter_map(|&n| g.node(n).op())
        .any(|op| {
            matches!(op, Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. })
                || op.subgraphs().iter().any(|(_, b)| has_recurrent(b))
        })
}

/// Elementwise `|got − want| ≤ atol + rtol·|want|`.
#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f64,
    rtol: f64,
}

/// f64 tolerance.
const F64: Tol = Tol {
    atol: 1e-10,
    rtol: 1e-9,
};
/// f32 tolerance.
const F32: Tol = Tol {
    atol: 2e-5,
    rtol: 2e-4,
};
/// f32 tolerance for the simple RNN at the threaded sizes (see the module comment).
const F32_WIDE_RNN: Tol = Tol {
    atol: 2e-4,
    rtol: 2e-3,
};

/// Beyond this magnitude a value counts as overflowed.
const HUGE: f64 = 1e150;

fn compare(got: &Tensor, want: &Array, tol: Tol) -> Result<(), String> {
    if got.shape() != want.shape.as_slice() {
        return Err(format!("shape {:?}, oracle {:?}", got.shape(), want.shape));
    }
    let g = got.to_f64_vec();
    if g.len() != want.data.len() {
        return Err(format!("{} values, oracle {}", g.len(), want.data.len()));
    }
    for (k, (&a, &b)) in g.iter().zip(&want.data).enumerate() {
        let overflowed = |v: f64| !v.is_finite() || v.abs() > HUGE;
        let ok = if overflowed(b) || overflowed(a) {
            // An overflowed state (unbounded functions as gates: Affine gates grow C
            // doubly exponentially) only has to have overflowed on both sides; inf vs NaN
            // then depends on the order of operations.
            overflowed(a) && overflowed(b)
        } else {
            (a - b).abs() <= tol.atol + tol.rtol * b.abs()
        };
        if !ok {
            return Err(format!("element {k}: got {a}, oracle {b}"));
        }
    }
    Ok(())
}

/// Runs the case on the fused kernels and on the loop lowering and compares every output
/// with the oracle.
fn check(c: &Cfg, dtype: DType, tol: Tol) -> Result<(), TestCaseError> {
    let built = build(c, dtype);
    let refs: Vec<Option<&Array>> = built.slots.iter().map(Option::as_ref).collect();
    let want = oracle::evaluate(&built.op, &refs).map_err(TestCaseError::fail)?;
    prop_assert_eq!(want.len(), if c.cell == 0 { 3 } else { 2 });
    for mode in [Recurrent::Fused, Recurrent::Loop] {
        let mut plan = CpuBackend::new(mode)
            .compile(&built.graph)
            .map_err(|e| TestCaseError::fail(format!("{mode:?}: compile: {e}")))?;
        prop_assert_eq!(
            has_recurrent(plan.graph()),
            mode == Recurrent::Fused,
            "{:?} plan: recurrent op present",
            mode
        );
        let got = plan
            .run(built.inputs.clone())
            .map_err(|e| TestCaseError::fail(format!("{mode:?}: run: {e}")))?;
        prop_assert_eq!(got.len(), built.outputs.len(), "{:?}: outputs", mode);
        for (data, &slot) in got.iter().zip(&built.outputs) {
            let t = data.tensor().map_err(TestCaseError::fail)?;
            prop_assert_eq!(t.dtype(), dtype);
            if let Err(e) = compare(t, &want[slot], tol) {
                return Err(TestCaseError::fail(format!(
                    "{mode:?} {dtype} output {}: {e}",
                    ["Y", "Y_h", "Y_c"][slot]
                )));
            }
        }
    }
    Ok(())
}

/// The activation names a configuration uses (the defaults when `acts` is `None`).
fn act_names(c: &Cfg) -> Vec<&'static str> {
    let per = [3, 2, 1][c.cell];
    let d = if c.dir == 2 { 2 } else { 1 };
    match &c.acts {
        Some(a) => a.iter().cycle().take(per * d).map(|&k| ACTS[k]).collect(),
        None => [
            vec!["Sigmoid", "Tanh", "Tanh"],
            vec!["Sigmoid", "Tanh"],
            vec!["Tanh"],
        ][c.cell]
            .repeat(d),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fused_and_loop_paths_match_the_oracle(c in cfg()) {
        check(&c, DType::F64, F64)?;
        if f32_comparable(&c) {
            check(&c, DType::F32, F32)?;
        }
    }
}

/// Sizes at which the fused kernels split the batch over threads and the packed GEMM
/// splits its products (as `threaded_cfg` in `backends/tests/fused_vs_loop.rs`), with
/// bounded activations and LSTM/GRU gates in [0, 1] (Sigmoid or HardSigmoid as `f`). At
/// these widths gates that go negative make the recurrence expansive and rounding grows
/// with the state even in f64: a GRU with Tanh gates (B 17, H 42, 14 steps) reaches
/// |Y| ≈ 15 and differs from the oracle by 8.8e-10 on both paths alike (the default
/// activations: 7e-16). f32 is compared for the default activations only: with others,
/// even with [0, 1] gates, the wide recurrences are not contractive enough for a fixed
/// f32 tolerance (an LSTM [HardSigmoid(0, 1.36), ScaledTanh, ScaledTanh], B 27, H 45,
/// 16 steps: f32 errors 3.2e-5 fused, 4.6e-5 loop at |Y| ≤ 1, while its f64 paths agree
/// with the oracle to 4e-14; with the defaults the same sizes give 3e-7 in f32). The small
/// sizes above cover every function in every position, in f64 and (where
/// `f32_comparable`) in f32.
fn threaded_cfg() -> impl Strategy<Value = Cfg> {
    (
        cfg(),
        17usize..=40,
        10usize..=16,
        8usize..=16,
        40usize..=56,
        prop::collection::vec(0usize..=16, 40),
        prop::option::of(prop::collection::vec(
            prop::sample::select(vec![1usize, 2, 6, 7, 9]),
            6,
        )),
    )
        .prop_map(|(mut c, batch, seq, input, hidden, lens, acts)| {
            debug_assert!([1, 2, 6, 7, 9].iter().all(|&k| bounded(ACTS[k])));
            c.batch = batch;
            c.seq = seq;
            c.input = input;
            c.hidden = hidden;
            c.lens = c
                .lens
                .map(|_| lens[..batch].iter().map(|&l| l.min(seq)).collect());
            let per = [3, 2, 1][c.cell];
            c.acts = acts.map(|mut a| {
                if c.cell != 2 {
                    // The gate function f of each direction: Sigmoid (2) or HardSigmoid (7).
                    for k in [0, per] {
                        a[k] = if a[k] % 2 == 0 { 2 } else { 7 };
                    }
                }
                a
            });
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn threaded_fused_and_loop_paths_match_the_oracle(c in threaded_cfg()) {
        check(&c, DType::F64, F64)?;
        // f32 with the default activations only (see `threaded_cfg`).
        if c.acts.is_none() {
            check(&c, DType::F32, if c.cell == 2 { F32_WIDE_RNN } else { F32 })?;
        }
    }
}

/// The oracle parses every activation name the IR accepts.
#[test]
fn the_oracle_knows_every_ir_activation() {
    for name in ACTS {
        oracle::parse_activations(&[name.to_string()], &[], &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The oracle's reading of alpha/beta consumption, spelled out: each list has its own
/// cursor, advanced only by the functions that take that parameter, in list order across
/// directions; exhausted lists give the op defaults.
#[test]
fn the_oracle_consumes_alpha_and_beta_in_order() {
    let names: Vec<String> = [
        "Sigmoid",
        "LeakyRelu",
        "Affine",
        "Tanh",
        "ScaledTanh",
        "HardSigmoid",
        "ThresholdedRelu",
        "Elu",
        "Softplus",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = oracle::parse_activations(&names, &[0.1, 0.2, 0.3, 0.4], &[0.5, 0.6]).unwrap();
    let a = |x: f32| f64::from(x);
    assert_eq!(
        got,
        vec![
            Activation::Sigmoid,
            Activation::LeakyRelu { alpha: a(0.1) },
            Activation::Affine {
                alpha: a(0.2),
                beta: a(0.5)
            },
            Activation::Tanh,
            Activation::ScaledTanh {
                alpha: a(0.3),
                beta: a(0.6)
            },
            Activation::HardSigmoid {
                alpha: a(0.4),
                beta: 0.5
            },
            Activation::ThresholdedRelu { alpha: 1.0 },
            Activation::Elu { alpha: 1.0 },
            Activation::Softplus,
        ]
    );
    let defaults = oracle::parse_activations(&names[1..3], &[], &[]).unwrap();
    assert_eq!(
        defaults,
        vec![
            Activation::LeakyRelu { alpha: a(0.01) },
            Activation::Affine {
                alpha: 1.0,
                beta: 0.0
            }
        ]
    );
}
