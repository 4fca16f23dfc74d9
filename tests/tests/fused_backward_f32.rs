//! The f32 fast paths of the fused recurrent backward against the f64 result.
//!
//! The CPU backward kernel (`backends/src/cpu/rnn_grad.rs`) runs f32 inputs on paths the
//! f64 finite-difference tests (`autodiff_fd.rs`, `vjp_fd_registry.rs`) do not reach:
//! the AVX2/FMA step kernels (`fastmath::lstm_rows_keep`/`gru_rows_keep`, vector lanes
//! for hidden ≥ 16 plus a scalar tail), the one-pass training forward of the plain LSTM
//! (σ, tanh, tanh; no clip, no peepholes or zero ones, no input_forget) and the plain GRU
//! (reset-after, σ and tanh, no clip), the forward/backward pairing (a plan runs the
//! forward once, saving what its `*Grad` op reads, when both read the same inputs and
//! there is no sequence_lens or mask), and batch rows split into blocks on rayon's
//! threads when `T·N·G·H·(H + I) ≥ PARALLEL_MIN_MACS` (2^18). Each test builds the same
//! differentiated graph in f32 and in f64 from the same (f32-representable) values, runs
//! both on `CpuBackend::new(Recurrent::Fused)`, and compares every gradient:
//!
//! `max|g32 − g64| ≤ 1e-5 · max|g64| + 1e-6` per gradient tensor (and the loss).
//!
//! (f32 rounding, ≈ 6e-8 relative, through five steps of recurrence and sums over
//! T·N = 120 rows, and the fast sigmoid/tanh approximations, measure 2e-7 to 7e-7 of
//! the scale on these configurations: the bound leaves a factor 14; a wrong fast path,
//! a lost term or a misplaced block, is off by far more.) The f64 result of each large graph is
//! itself spot-checked against central differences, since the f64 FD suites use sizes
//! that do not reach the threaded blocks.
//!
//! Every configuration runs on a pool of two threads that its test builds for itself
//! (whatever the machine has, so the blocks of rows are threaded even on one core; a
//! pool shared between tests could run one test's closure on a thread waiting inside
//! another's kernel, mixing the per-thread counts), and the kernel's path counts
//! (`backends::cpu::paths`, read on the pool thread that ran the plan) show, for the
//! f32 run and the f64 run alike, that it reached what it is meant to: the forward and
//! backward paired (`saving_forward`, `paired_backward`) without sequence_lens or
//! recomputing (`recomputing_backward`) with them, the plain LSTM/GRU training steps
//! (`plain_training_directions`) exactly where the cell is plain, and blocks of rows on
//! threads (`threaded_training_passes`) exactly where the work passes the threshold.
//! The counters do not tell the AVX2/FMA kernels from the portable ones: the vector
//! lanes run where hidden ≥ 16 and the CPU has AVX2 and FMA (reported).
//! `kernel_paths_agree_in_f32` also calls the kernel's entry points directly
//! (`rnn_grad::forward_saving` + `eval_saved`, and `eval`) and checks their counts too.

use cellgraph::autodiff::grad;
use cellgraph::backends::cpu::paths::{self, PathCounts};
use cellgraph::backends::cpu::{rnn_grad, CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::{DType, Graph, NodeId, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};

/// The threshold in `backends/src/cpu/rnn.rs` (`PARALLEL_MIN_MACS`, crate-private).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A pool of two threads, whatever the machine has. Each test builds its own: a pool
/// thread waiting inside one test's kernel may run another test's closure injected into
/// the same pool, and the path counts are the thread's.
fn two_threads() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a thread pool")
}

/// Whether the f32 step kernels run their AVX2/FMA lanes (hidden ≥ 16 given): the path
/// counts do not distinguish the SIMD kernels from the portable ones.
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cell {
    Lstm,
    Gru { lbr: bool },
    Rnn,
}

impl Cell {
    fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru { .. } => 3,
            Cell::Rnn => 1,
        }
    }
}

/// P: none, zeros (still the plain LSTM, computing dP), or random (the general path).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Peep {
    None,
    Zero,
    Random,
}

#[derive(Clone, Debug)]
struct Cfg {
    name: &'static str,
    cell: Cell,
    dir: &'static str,
    peep: Peep,
    init: bool,
    bias: bool,
    /// sequence_lens (None: absent, so the plan pairs forward and backward).
    lens: Option<Vec<i32>>,
    /// Whether the gradient of X is asked for (a first layer's is not: dX is skipped).
    want_dx: bool,
    /// T, N, I, H.
    dims: (usize, usize, usize, usize),
}

impl Cfg {
    fn nd(&self) -> usize {
        if self.dir == "bidirectional" {
            2
        } else {
            1
        }
    }
    fn macs(&self) -> usize {
        let (t, n, i, h) = self.dims;
        t * n * self.cell.gates() * h * (h + i)
    }
    /// On the two-thread pool the tests run in.
    fn threaded(&self) -> bool {
        self.macs() >= PARALLEL_MIN_MACS
    }
    /// The plan pairs the forward and backward (no sequence_lens) or recomputes.
    fn paired(&self) -> bool {
        self.lens.is_none()
    }
    fn plain(&self) -> bool {
        match self.cell {
            Cell::Lstm => self.peep != Peep::Random,
            Cell::Gru { lbr } => lbr,
            Cell::Rnn => false,
        }
    }
}

/// Deterministic values in [-scale, scale], representable in f32.
struct Rng(u64);

impl Rng {
    fn vals(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (self.0 >> 40) as f64 / (1u64 << 24) as f64;
                f64::from(((u * 2.0 - 1.0) * scale) as f32)
            })
            .collect()
    }
}

fn v0(node: NodeId) -> ValueRef {
    ValueRef { node, slot: 0 }
}

fn tensor(dt: DType, shape: &[usize], vals: &[f64]) -> Tensor {
    Tensor::from_f64_vec(dt, shape, vals).unwrap()
}

/// The graph in `dt`: the recurrent op, loss = Σ Y⊙CY + Σ Y_h⊙CH (+ Σ Y_c⊙CC), its
/// gradient with respect to every input (X only when `want_dx`), and the input values.
fn build(cfg: &Cfg, dt: DType) -> (Graph, Graph, Vec<Tensor>, Vec<ValueRef>) {
    let (t, n, isz, h) = cfg.dims;
    let nd = cfg.nd();
    let gh = cfg.cell.gates() * h;
    let mut rng = Rng(0x5eed ^ cfg.name.len() as u64);
    let mut g = Graph::new("f32_vs_f64");
    let mut inputs = Vec::new();
    let mut input = |g: &mut Graph, name: &str, shape: &[usize], scale: f64, zero: bool| {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let v = g.add_input(name, ValueType::tensor(dt, &dims)).unwrap();
        let n: usize = shape.iter().product();
        let vals = if zero {
            vec![0.0; n]
        } else {
            rng.vals(n, scale)
        };
        inputs.push(tensor(dt, shape, &vals));
        v
    };
    let x = input(&mut g, "X", &[t, n, isz], 1.0, false);
    let w = input(&mut g, "W", &[nd, gh, isz], 0.3, false);
    let r = input(&mut g, "R", &[nd, gh, h], 0.3, false);
    let b = cfg
        .bias
        .then(|| input(&mut g, "B", &[nd, 2 * gh], 0.5, false));
    let h0 = cfg
        .init
        .then(|| input(&mut g, "H0", &[nd, n, h], 0.8, false));
    let c0 =
        (cfg.init && cfg.cell == Cell::Lstm).then(|| input(&mut g, "C0", &[nd, n, h], 0.8, false));
    let p = (cfg.cell == Cell::Lstm && cfg.peep != Peep::None)
        .then(|| input(&mut g, "P", &[nd, 3 * h], 0.5, cfg.peep == Peep::Zero));
    let sl = cfg.lens.as_ref().map(|l| {
        v0(g.add_node(
            "",
            Op::constant(Tensor::I32(
                ArrayD::from_shape_vec(IxDyn(&[n]), l.clone()).unwrap(),
            )),
            &[],
            &["lens"],
        )
        .unwrap())
    });
    let direction = cfg.dir.to_string();
    let hidden_size = Some(h as i64);
    let (op, mut ins, outs): (Op, Vec<Option<ValueRef>>, Vec<&str>) = match cfg.cell {
        Cell::Lstm => (
            Op::LSTM {
                activation_alpha: None,
                activation_beta: None,
                activations: None,
                clip: None,
                direction,
                hidden_size,
                input_forget: 0,
                layout: 0,
            },
            vec![Some(x), Some(w), Some(r), b, sl, h0, c0, p],
            vec!["Y", "Y_h", "Y_c"],
        ),
        Cell::Gru { lbr } => (
            Op::GRU {
                activation_alpha: None,
                activation_beta: None,
                activations: None,
                clip: None,
                direction,
                hidden_size,
                layout: 0,
                linear_before_reset: i64::from(lbr),
            },
            vec![Some(x), Some(w), Some(r), b, sl, h0],
            vec!["Y", "Y_h"],
        ),
        Cell::Rnn => (
            Op::RNN {
                activation_alpha: None,
                activation_beta: None,
                activations: None,
                clip: None,
                direction,
                hidden_size,
                layout: 0,
            },
            vec![Some(x), Some(w), Some(r), b, sl, h0],
            vec!["Y", "Y_h"],
        ),
    };
    while ins.last().is_some_and(Option::is_none) {
        ins.pop();
    }
    let id = g.add_node("cell", op, &ins, &outs).unwrap();
    let mut sums = Vec::new();
    for (k, shape) in [vec![t, nd, n, h], vec![nd, n, h], vec![nd, n, h]]
        .iter()
        .take(outs.len())
        .enumerate()
    {
        let cnt: usize = shape.iter().product();
        let c = v0(g
            .add_node(
                "",
                Op::constant(tensor(dt, shape, &rng.vals(cnt, 1.0))),
                &[],
                &[&format!("cot{k}")],
            )
            .unwrap());
        let m = v0(g
            .add_node(
                "",
                Op::Mul {},
                &[Some(ValueRef { node: id, slot: k }), Some(c)],
                &[&format!("m{k}")],
            )
            .unwrap());
        sums.push(Some(v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(m)],
                &[&format!("s{k}")],
            )
            .unwrap())));
    }
    let loss = v0(g.add_node("", Op::Sum {}, &sums, &["loss"]).unwrap());
    g.set_outputs(vec![loss]).unwrap();
    let mut wrt = g.input_values();
    if !cfg.want_dx {
        wrt.remove(0);
    }
    let dg = grad(&g, loss, &wrt).unwrap_or_else(|e| panic!("grad: {e}"));
    (g, dg, inputs, wrt)
}

fn run(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    let mut plan = CpuBackend::new(Recurrent::Fused).compile(g).unwrap();
    plan.run(inputs.iter().cloned().map(Data::Tensor).collect())
        .unwrap()
        .into_iter()
        .map(|d| d.into_tensor().unwrap())
        .collect()
}

/// The fused forward and backward nodes of `dg`, and whether the plan pairs them: the
/// backward reads the forward's inputs and there is no sequence_lens.
fn pairing(dg: &Graph) -> (bool, bool) {
    let mut fwd = None;
    let mut bwd = None;
    for n in dg.node_ids() {
        match dg.node(n).op() {
            Some(Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. }) => fwd = Some(n),
            Some(Op::LSTMGrad { .. } | Op::GRUGrad { .. } | Op::RNNGrad { .. }) => bwd = Some(n),
            _ => {}
        }
    }
    let (Some(f), Some(b)) = (fwd, bwd) else {
        return (false, false);
    };
    let fi = dg.node_inputs(f);
    let bi = dg.node_inputs(b);
    let paired = fi.get(4).copied().flatten().is_none()
        && fi
            .iter()
            .enumerate()
            .all(|(k, v)| bi.get(k).copied().flatten() == *v);
    (true, paired)
}

/// The kernel paths one run of `cfg`'s gradient plan took, against what it is meant to
/// reach: paired or recomputing, plain steps or not, blocks on threads or one block.
fn check_paths(cfg: &Cfg, what: &str, p: &PathCounts) {
    let name = cfg.name;
    if cfg.paired() {
        assert!(
            p.saving_forward >= 1 && p.paired_backward >= 1,
            "{name} ({what}): the forward and backward did not pair: {p:?}"
        );
        assert_eq!(
            p.recomputing_backward, 0,
            "{name} ({what}): a paired plan recomputed: {p:?}"
        );
    } else {
        assert!(
            p.recomputing_backward >= 1,
            "{name} ({what}): the backward did not recompute: {p:?}"
        );
        assert_eq!(
            (p.saving_forward, p.paired_backward),
            (0, 0),
            "{name} ({what}): paired with sequence_lens: {p:?}"
        );
    }
    if cfg.plain() {
        assert!(
            p.plain_training_directions >= 1,
            "{name} ({what}): the plain training steps did not run: {p:?}"
        );
    } else {
        assert_eq!(
            p.plain_training_directions, 0,
            "{name} ({what}): the plain training steps ran: {p:?}"
        );
    }
    if cfg.threaded() {
        assert!(
            p.threaded_training_passes >= 1,
            "{name} ({what}): no training pass ran on threads: {p:?}"
        );
    } else {
        assert_eq!(
            p.threaded_training_passes, 0,
            "{name} ({what}): a training pass ran on threads: {p:?}"
        );
    }
}

/// Runs `cfg` in f32 and f64 (on the calling thread's pool) and compares every output;
/// returns the worst `max|g32 − g64| / max|g64|` over the gradients and the path
/// counts of the f64 and f32 runs, both checked against what `cfg` is meant to reach.
fn compare(cfg: &Cfg) -> (f64, PathCounts, PathCounts) {
    let (g64, dg64, in64, wrt) = build(cfg, DType::F64);
    let (_, dg32, in32, _) = build(cfg, DType::F32);
    for (a, b) in in64.iter().zip(&in32) {
        assert_eq!(a.to_f64_vec(), b.to_f64_vec(), "the same values in both");
    }
    let (fused, paired) = pairing(&dg32);
    assert!(
        fused,
        "{}: the gradient graph has no fused backward op",
        cfg.name
    );
    assert_eq!(
        paired,
        cfg.paired(),
        "{}: forward/backward pairing",
        cfg.name
    );
    paths::take();
    let o64 = run(&dg64, &in64);
    let p64 = paths::take();
    let o32 = run(&dg32, &in32);
    let p32 = paths::take();
    check_paths(cfg, "f64", &p64);
    check_paths(cfg, "f32", &p32);
    assert_eq!(o32.len(), o64.len());
    let names: Vec<String> = std::iter::once("loss".to_string())
        .chain(wrt.iter().map(|&v| format!("d{}", g64.value(v).name)))
        .collect();
    let mut worst = 0.0f64;
    let mut errs = Vec::new();
    for (k, (a, b)) in o32.iter().zip(&o64).enumerate() {
        assert_eq!(a.dtype(), DType::F32);
        assert_eq!(a.shape(), b.shape(), "{} {}", cfg.name, names[k]);
        let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        let bound = 1e-5 * scale + 1e-6;
        if k > 0 {
            worst = worst.max(diff / scale.max(1e-30));
        }
        if diff.is_nan() || diff > bound {
            errs.push(format!(
                "{}: max|f32 − f64| {diff:.3e} > {bound:.3e} (max|f64| {scale:.3e})",
                names[k]
            ));
        }
    }
    assert!(errs.is_empty(), "{}: {}", cfg.name, errs.join("; "));
    spot_check_f64(cfg, &g64, &in64, &o64);
    (worst, p64, p32)
}

/// A few elements of each f64 gradient against central differences (h = 1e-5;
/// |g − fd| ≤ 1e-8 + 1e-6·max|g| over the tensor): the large f64 graphs run the
/// threaded blocks the FD suites' small graphs do not.
fn spot_check_f64(cfg: &Cfg, g: &Graph, inputs: &[Tensor], out: &[Tensor]) {
    let mut plan = CpuBackend::new(Recurrent::Fused).compile(g).unwrap();
    let mut f = |xs: &[Tensor]| -> f64 {
        plan.run(xs.iter().cloned().map(Data::Tensor).collect())
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap()
            .to_f64_vec()[0]
    };
    let h = 1e-5;
    let first = usize::from(!cfg.want_dx);
    for (j, k) in (first..inputs.len()).enumerate() {
        let gv = out[1 + j].to_f64_vec();
        let scale = gv.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let len = gv.len();
        for i in [0, len / 3, len / 2 + 1, len - 1] {
            let mut p = inputs[k].to_f64_vec();
            let base = p[i];
            let mut xs = inputs.to_vec();
            p[i] = base + h;
            xs[k] = tensor(DType::F64, inputs[k].shape(), &p);
            let fp = f(&xs);
            p[i] = base - h;
            xs[k] = tensor(DType::F64, inputs[k].shape(), &p);
            let fm = f(&xs);
            let fd = (fp - fm) / (2.0 * h);
            let bound = 1e-8 + 1e-6 * scale;
            assert!(
                (gv[i] - fd).abs() <= bound,
                "{}: f64 gradient of {} [{i}]: g {} fd {fd} (bound {bound:.3e})",
                cfg.name,
                g.value(g.input_values()[k]).name,
                gv[i]
            );
        }
    }
}

const BIG: (usize, usize, usize, usize) = (5, 24, 24, 40);
const SMALL: (usize, usize, usize, usize) = (3, 4, 8, 40);

fn cfg(name: &'static str, cell: Cell, dir: &'static str) -> Cfg {
    Cfg {
        name,
        cell,
        dir,
        peep: Peep::None,
        init: true,
        bias: true,
        lens: None,
        want_dx: true,
        dims: BIG,
    }
}

/// The configurations: what each reaches is asserted from the path counts of its runs
/// (`check_paths`).
fn configs() -> Vec<Cfg> {
    let lstm = Cell::Lstm;
    let gru1 = Cell::Gru { lbr: true };
    let unequal: Vec<i32> = (0..BIG.1).map(|b| [5, 3, 5, 0, 1][b % 5]).collect();
    vec![
        // The Keras LSTM: paired, plain, threaded, dX not wanted (a first layer).
        Cfg {
            want_dx: false,
            init: false,
            ..cfg(
                "LSTM, Keras first layer (no P, no initial states, no dX)",
                lstm,
                "forward",
            )
        },
        cfg("LSTM, no P, paired", lstm, "forward"),
        Cfg {
            lens: Some(vec![BIG.0 as i32; BIG.1]),
            bias: false,
            init: false,
            ..cfg(
                "LSTM, no P, no bias, full sequence_lens (recomputing)",
                lstm,
                "forward",
            )
        },
        Cfg {
            lens: Some(unequal.clone()),
            ..cfg(
                "LSTM, no P, unequal sequence_lens, reverse",
                lstm,
                "reverse",
            )
        },
        Cfg {
            peep: Peep::Zero,
            ..cfg(
                "LSTM, P = 0 (plain, with dP), bidirectional",
                lstm,
                "bidirectional",
            )
        },
        Cfg {
            peep: Peep::Random,
            ..cfg(
                "LSTM, peepholes (general path), bidirectional",
                lstm,
                "bidirectional",
            )
        },
        Cfg {
            dims: SMALL,
            ..cfg("LSTM, no P, one block (not threaded)", lstm, "forward")
        },
        cfg("GRU reset-after, paired", gru1, "forward"),
        Cfg {
            lens: Some(vec![BIG.0 as i32; BIG.1]),
            ..cfg(
                "GRU reset-after, full sequence_lens (recomputing), reverse",
                gru1,
                "reverse",
            )
        },
        Cfg {
            lens: Some(unequal),
            init: false,
            ..cfg("GRU reset-after, unequal sequence_lens", gru1, "forward")
        },
        Cfg {
            dims: SMALL,
            ..cfg("GRU reset-after, one block", gru1, "bidirectional")
        },
        cfg(
            "GRU reset-before (general path), bidirectional",
            Cell::Gru { lbr: false },
            "bidirectional",
        ),
        Cfg {
            bias: false,
            ..cfg("RNN (general path)", Cell::Rnn, "forward")
        },
    ]
}

#[test]
fn fused_backward_f32_matches_f64() {
    eprintln!("AVX2+FMA: {} (f32 vector lanes)", avx2_fma());
    let pool = two_threads();
    let mut lines = Vec::new();
    for c in configs() {
        let (worst, p64, p32) = pool.install(|| compare(&c));
        lines.push(format!(
            "{}: paired {}, plain {}, threaded {} ({} MACs), worst max|g32 − g64| / max|g64| = {worst:.2e}\n  f64 {p64:?}\n  f32 {p32:?}",
            c.name,
            c.paired(),
            c.plain(),
            c.threaded(),
            c.macs()
        ));
    }
    eprintln!("{}", lines.join("\n"));
    // Every kind of configuration is there (each one's paths were checked above).
    let cs = configs();
    assert!(cs.iter().any(|c| c.plain() && c.threaded() && c.paired()));
    assert!(cs.iter().any(|c| c.plain() && c.threaded() && !c.paired()));
    assert!(cs.iter().any(|c| c.plain() && !c.threaded()));
    assert!(cs.iter().any(|c| !c.plain() && c.threaded()));
    assert!(
        cs.iter().all(|c| c.dims.3 >= 16),
        "vector lanes need H ≥ 16"
    );
}

/// The fused backward op of a gradient graph.
fn backward_op(dg: &Graph) -> Op {
    dg.node_ids()
        .into_iter()
        .find_map(|n| match dg.node(n).op() {
            Some(op @ (Op::LSTMGrad { .. } | Op::GRUGrad { .. } | Op::RNNGrad { .. })) => {
                Some(op.clone())
            }
            _ => None,
        })
        .expect("a fused backward op")
}

fn refs(d: &[Option<Data>]) -> Vec<Option<&Data>> {
    d.iter().map(Option::as_ref).collect()
}

/// The kernel's entry points directly, in f32 and f64: the saving forward then the
/// backward from what it saved (`forward_saving` + `eval_saved`, the paired path), and
/// the recomputing backward (`eval`), for the plain LSTM and GRU at threaded sizes; all
/// against f64 `eval`, and the saving forward's outputs against the f64 ones. Each call's
/// path counts show which entry point ran, with the plain steps and threaded blocks.
#[test]
fn kernel_paths_agree_in_f32() {
    let pool = two_threads();
    for cell in [Cell::Lstm, Cell::Gru { lbr: true }] {
        pool.install(|| kernel_paths(cell));
    }
}

/// The path counts of one direct call (the counts since the last `paths::take`): one
/// run of the entry point named by `saving`/`paired`/`recomputing`, no inference
/// forward, blocks of rows on threads, and (but for the backward from a saved forward,
/// which does not step the cell forward) the plain training steps.
fn check_call(cell: Cell, what: &str, saving: usize, paired: usize, recomputing: usize) {
    let p = paths::take();
    assert_eq!(
        (
            p.saving_forward,
            p.paired_backward,
            p.recomputing_backward,
            p.forward
        ),
        (saving, paired, recomputing, 0),
        "{cell:?} {what}: entry point run: {p:?}"
    );
    assert!(
        p.threaded_training_passes >= 1,
        "{cell:?} {what}: no training pass ran on threads: {p:?}"
    );
    if paired == 0 {
        assert!(
            p.plain_training_directions >= 1,
            "{cell:?} {what}: the plain training steps did not run: {p:?}"
        );
    }
}

/// `kernel_paths_agree_in_f32` for one plain cell, on the calling thread's pool.
fn kernel_paths(cell: Cell) {
    let c = cfg("kernel", cell, "forward");
    assert!(c.plain() && c.threaded());
    let (_, dg64, in64, _) = build(&c, DType::F64);
    let (_, dg32, in32, _) = build(&c, DType::F32);
    // The backward op the pass emitted; random cotangents (what reaches the op
    // in a graph is beside the point here).
    let (op64, op32) = (backward_op(&dg64), backward_op(&dg32));
    assert_eq!(op64, op32);
    let fwd_op = op32.recurrent_pair().unwrap();
    let (t, n, _, h) = c.dims;
    let lstm = cell == Cell::Lstm;
    let mut rng = Rng(99);
    let dy = rng.vals(t * n * h, 1.0);
    let dyh = rng.vals(n * h, 1.0);
    let dyc = rng.vals(n * h, 1.0);
    let data = |dt: DType, ins: &[Tensor]| -> Vec<Option<Data>> {
        // X, W, R, B, (no lens), H0, [C0, (no P)], dY, dY_h, [dY_c]
        let mut v: Vec<Option<Data>> = vec![
            Some(Data::Tensor(ins[0].clone())),
            Some(Data::Tensor(ins[1].clone())),
            Some(Data::Tensor(ins[2].clone())),
            Some(Data::Tensor(ins[3].clone())),
            None,
            Some(Data::Tensor(ins[4].clone())),
        ];
        if lstm {
            v.push(Some(Data::Tensor(ins[5].clone())));
            v.push(None);
        }
        v.push(Some(Data::Tensor(tensor(dt, &[t, 1, n, h], &dy))));
        v.push(Some(Data::Tensor(tensor(dt, &[1, n, h], &dyh))));
        if lstm {
            v.push(Some(Data::Tensor(tensor(dt, &[1, n, h], &dyc))));
        }
        v
    };
    let d64 = data(DType::F64, &in64);
    let d32 = data(DType::F32, &in32);
    let nout = if lstm { 7 } else { 5 };
    let want = vec![true; nout];
    paths::take();
    let ref64 = rnn_grad::eval(&op64, &refs(&d64), &want).unwrap();
    check_call(cell, "f64 eval", 0, 0, 1);
    let rec32 = rnn_grad::eval(&op32, &refs(&d32), &want).unwrap();
    check_call(cell, "f32 eval", 0, 0, 1);
    let nfwd = if lstm { 8 } else { 6 };
    let (fwd32, saved) = rnn_grad::forward_saving(
        &fwd_op,
        &refs(&d32)[..nfwd],
        &vec![true; if lstm { 3 } else { 2 }],
    )
    .unwrap();
    check_call(cell, "f32 forward_saving", 1, 0, 0);
    let sav32 = rnn_grad::eval_saved(&op32, &refs(&d32), &want, saved).unwrap();
    check_call(cell, "f32 eval_saved", 0, 1, 0);
    let (fwd64, _) = rnn_grad::forward_saving(
        &fwd_op,
        &refs(&d64)[..nfwd],
        &vec![true; if lstm { 3 } else { 2 }],
    )
    .unwrap();
    check_call(cell, "f64 forward_saving", 1, 0, 0);
    let close = |what: &str, a: &[Data], b: &[Data]| {
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            let (x, y) = (
                x.tensor().unwrap().to_f64_vec(),
                y.tensor().unwrap().to_f64_vec(),
            );
            assert_eq!(x.len(), y.len(), "{what} output {k}");
            let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = x
                .iter()
                .zip(&y)
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= 1e-5 * scale + 1e-6,
                "{cell:?} {what} output {k}: max|f32 − f64| {diff:.3e} (max|f64| {scale:.3e})"
            );
        }
    };
    close("recomputing backward", &rec32, &ref64);
    close("backward from the saved forward", &sav32, &ref64);
    close("saving forward", &fwd32, &fwd64);
}
