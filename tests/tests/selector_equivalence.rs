//! Equivalence suite: for random Keras recurrent configurations, every execution path
//! (the loop path — each layer's `Scan` over its cell — and the fused path the selector
//! raises it to) gives the same outputs and the same gradients, and the selector reports
//! fused for every configuration the fused kernels support.
//!
//! A new backend joins the suite with one line in [`paths`].

use cellgraph::backends::cpu::paths::{self as kernel_paths, PathCounts};
use cellgraph::backends::cpu::Recurrent as Mode;
use cellgraph::backends::passes::select::Placement;
use cellgraph::backends::subset::SubsetBackend;
use cellgraph::ir::{DType, Tensor};
use cellgraph::keras::{
    Activation, Bidirectional, CallArgs, Functional, Input, Loss, Masking, MergeMode, Model,
    Recurrent, GRU, LSTM,
};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// One way of running a model.
struct PathUnderTest {
    name: &'static str,
    /// Puts the model on this path.
    configure: fn(&mut Model),
    /// Whether every recurrent layer must run fused on this path.
    fused: bool,
}

/// The paths compared against the first (the reference loop path).
fn paths() -> Vec<PathUnderTest> {
    vec![
        PathUnderTest {
            name: "cpu loop",
            configure: |m| m.set_recurrent(Mode::Loop),
            fused: false,
        },
        PathUnderTest {
            name: "cpu fused",
            configure: |m| m.set_recurrent(Mode::Fused),
            fused: true,
        },
        // The test-only subset backend before the CPU: Dense, masks' arithmetic and the
        // gradient's elementwise ops and MatMuls on it, the fused recurrent ops on the
        // CPU, copies at the edges.
        PathUnderTest {
            name: "subset + cpu fused",
            configure: |m| {
                m.set_recurrent(Mode::Fused);
                m.set_backends(vec![std::sync::Arc::new(SubsetBackend)]);
            },
            fused: true,
        },
    ]
}

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    Right,
    Left,
    Random,
}

#[derive(Clone, Debug)]
struct Cfg {
    cell: usize, // 0 LSTM, 1 GRU reset_after, 2 GRU reset_before, 3 SimpleRNN
    units: usize,
    input: usize,
    batch: usize,
    steps: usize,
    go_backwards: bool,
    mask: MaskKind,
    initial_state: bool,
    return_sequences: bool,
    return_state: bool,
    stacked: bool,
    /// The last layer is `RNN(StackedRNNCells([cell, cell]))`: two cells in one loop.
    stacked_cells: bool,
    bidirectional: Option<usize>,
    activation: usize,
    recurrent_activation: usize,
    seed: u64,
}

const ACTS: [Activation; 5] = [
    Activation::Tanh,
    Activation::Relu,
    Activation::Sigmoid,
    Activation::Softsign,
    Activation::HardSigmoid,
];
const REC_ACTS: [Activation; 3] = [
    Activation::Sigmoid,
    Activation::HardSigmoid,
    Activation::Tanh,
];

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        (0usize..4, 1usize..=6, 1usize..=5, 1usize..=4, 1usize..=6),
        (
            any::<bool>(),
            prop_oneof![
                Just(MaskKind::None),
                Just(MaskKind::Right),
                Just(MaskKind::Left),
                Just(MaskKind::Random)
            ],
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            prop::option::weighted(0.25, 0usize..4),
            0usize..ACTS.len(),
            0usize..REC_ACTS.len(),
            any::<u64>(),
            prop::bool::weighted(0.2),
        ),
    )
        .prop_map(
            |(
                (cell, units, input, batch, steps),
                (go_backwards, mask, initial_state, return_sequences, return_state, stacked),
                (bidirectional, activation, recurrent_activation, seed, stacked_cells),
            )| Cfg {
                cell,
                units,
                input,
                batch,
                steps,
                go_backwards,
                mask,
                initial_state: initial_state && bidirectional.is_none(),
                return_sequences,
                return_state,
                stacked,
                stacked_cells: stacked_cells && bidirectional.is_none(),
                bidirectional,
                activation,
                recurrent_activation,
                seed,
            },
        )
}

fn cell(c: &Cfg, kind: usize, units: usize) -> cellgraph::keras::Cell {
    use cellgraph::keras::{GRUCell, LSTMCell, SimpleRNNCell};
    let cl = match kind {
        0 => LSTMCell::new(units).recurrent_activation(REC_ACTS[c.recurrent_activation]),
        1 | 2 => GRUCell::new(units)
            .reset_after(kind == 1)
            .recurrent_activation(REC_ACTS[c.recurrent_activation]),
        _ => SimpleRNNCell::new(units),
    };
    cl.activation(ACTS[c.activation])
}

fn layer(c: &Cfg, return_sequences: bool, name: &str) -> Recurrent {
    if c.stacked_cells && name == "last" {
        // A different cell kind on top, with the configured one below.
        let cells = vec![cell(c, c.cell, c.units), cell(c, (c.cell + 1) % 4, c.units)];
        return cellgraph::keras::RNN::stacked(cellgraph::keras::StackedRNNCells::new(cells))
            .go_backwards(c.go_backwards)
            .return_sequences(return_sequences)
            .return_state(c.return_state)
            .name(name);
    }
    let l = match c.cell {
        0 => LSTM::new(c.units).recurrent_activation(REC_ACTS[c.recurrent_activation]),
        1 | 2 => GRU::new(c.units)
            .reset_after(c.cell == 1)
            .recurrent_activation(REC_ACTS[c.recurrent_activation]),
        _ => cellgraph::keras::SimpleRNN::new(c.units),
    };
    l.activation(ACTS[c.activation])
        .go_backwards(c.go_backwards)
        .return_sequences(return_sequences)
        .return_state(c.return_state)
        .name(name)
}

fn state_count(c: &Cfg) -> usize {
    let n = |kind: usize| if kind == 0 { 2 } else { 1 };
    if c.stacked_cells {
        n(c.cell) + n((c.cell + 1) % 4)
    } else {
        n(c.cell)
    }
}

/// The model: `Input → Masking → [recurrent(return_sequences)] → recurrent`, with
/// `initial_state` inputs when asked; outputs all of the last layer's outputs.
fn build(c: &Cfg) -> Model {
    let mut f = Functional::with_seed(c.seed);
    let x = f.input(Input::new(&[None, Some(c.input)])).expect("input");
    let mut inputs = vec![x];
    let mut h = f.apply(Masking::new(0.0), &[x]).expect("masking")[0];
    if c.stacked {
        h = f
            .apply(layer(c, true, "first").return_state(false), &[h])
            .expect("first layer")[0];
    }
    let outs = match c.bidirectional {
        Some(m) => {
            let mode = [
                MergeMode::Concat,
                MergeMode::Sum,
                MergeMode::Mul,
                MergeMode::Ave,
            ][m];
            f.apply(
                Bidirectional::new(layer(c, c.return_sequences, "last")).merge_mode(Some(mode)),
                &[h],
            )
            .expect("bidirectional")
        }
        None if c.initial_state => {
            let states: Vec<_> = (0..state_count(c))
                .map(|k| {
                    f.input(Input::new(&[Some(c.units)]).name(&format!("state_{k}")))
                        .expect("state input")
                })
                .collect();
            inputs.extend(&states);
            let l = f
                .layer(layer(c, c.return_sequences, "last"))
                .expect("layer");
            f.call_with(
                l,
                &[h],
                CallArgs {
                    initial_state: states,
                    mask: None,
                },
            )
            .expect("call")
        }
        None => f
            .apply(layer(c, c.return_sequences, "last"), &[h])
            .expect("layer"),
    };
    f.build(&inputs, &outs).expect("model")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
    }
}

/// Inputs: the sequence with masked steps zeroed (Masking reads them), the initial
/// states when the model takes them.
fn inputs(c: &Cfg) -> Vec<Tensor> {
    let mut rng = Rng(c.seed | 1);
    let (n, t, i) = (c.batch, c.steps, c.input);
    let lens: Vec<usize> = (0..n)
        .map(|_| ((rng.next() * 0.5 + 0.5) * (t + 1) as f32) as usize % (t + 1))
        .collect();
    let mut x = ArrayD::<f32>::zeros(IxDyn(&[n, t, i]));
    for b in 0..n {
        for s in 0..t {
            let keep = match c.mask {
                MaskKind::None => true,
                MaskKind::Right => s < lens[b],
                MaskKind::Left => s >= t - lens[b],
                MaskKind::Random => rng.next() > -0.4,
            };
            for k in 0..i {
                let v = rng.next();
                // A kept step never has all features zero.
                x[[b, s, k]] = if keep {
                    if v == 0.0 {
                        0.5
                    } else {
                        v
                    }
                } else {
                    0.0
                };
            }
        }
    }
    let mut out = vec![Tensor::F32(x)];
    if c.initial_state && c.bidirectional.is_none() {
        for _ in 0..state_count(c) {
            let v: Vec<f32> = (0..n * c.units).map(|_| rng.next() * 0.8).collect();
            out.push(Tensor::F32(
                ArrayD::from_shape_vec(IxDyn(&[n, c.units]), v).expect("state"),
            ));
        }
    }
    out
}

fn close(what: &str, a: &[f32], b: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len(), "{}: lengths", what);
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(
            (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
            "{}: element {}: {} vs {}",
            what,
            k,
            x,
            y
        );
    }
    Ok(())
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().into_iter().map(|v| v as f32).collect()
}

/// The printed graphs of every plan a model compiled, as one text.
fn plan_text(m: &Model) -> String {
    m.compiled_graphs()
        .into_iter()
        .map(cellgraph::ir::print_graph)
        .collect()
}

/// What one path computes: outputs, loss, gradients.
struct Run {
    outputs: Vec<Vec<f32>>,
    loss: f32,
    grads: Vec<Vec<f32>>,
    /// The fused kernels' paths in inference and in the gradient run.
    paths: (PathCounts, PathCounts),
}

fn run(c: &Cfg, path: &PathUnderTest, x: &[Tensor]) -> Result<Run, TestCaseError> {
    let mut m = build(c);
    (path.configure)(&mut m);
    let sig: Vec<(DType, Vec<usize>)> = x.iter().map(|t| (t.dtype(), t.shape().to_vec())).collect();
    let choices = m.recurrent_choices(&sig).expect("choices");
    // One loop per direction; the fused path merges a Bidirectional's pair into one op.
    let directions = if c.bidirectional.is_some() && !path.fused {
        2
    } else {
        1
    };
    // A stack of two cells is one loop, or two fused ops.
    let last = if c.stacked_cells && path.fused {
        2
    } else {
        directions
    };
    let layers = usize::from(c.stacked) + last;
    prop_assert_eq!(choices.len(), layers, "{}: {:?}", path.name, choices);
    for ch in &choices {
        let fused = matches!(ch.placement, Placement::Fused { .. });
        prop_assert_eq!(fused, path.fused, "{}: {}", path.name, ch);
    }
    kernel_paths::take();
    let outputs: Vec<Vec<f32>> = m.predict(x).expect("predict").iter().map(flat).collect();
    let inference = kernel_paths::take();
    let first = m.predict(x).expect("predict")[0].clone();
    let mut rng = Rng(c.seed.rotate_left(17) | 1);
    let target: Vec<f32> = (0..first.len()).map(|_| rng.next()).collect();
    let target = Tensor::F32(ArrayD::from_shape_vec(IxDyn(first.shape()), target).expect("target"));
    kernel_paths::take();
    let g = m
        .gradients(x, &target, Loss::MeanSquaredError, 0, false)
        .expect("gradients");
    let training = kernel_paths::take();
    // The compiled plans run what the selector chose: fused ops (and their fused
    // backward) and no Scan on the fused path.
    let texts: Vec<String> = m
        .compiled_graphs()
        .into_iter()
        .map(cellgraph::ir::print_graph)
        .collect();
    prop_assert_eq!(
        texts.len(),
        2,
        "{}: one inference and one gradient plan",
        path.name
    );
    for text in &texts {
        prop_assert_eq!(text.contains("Scan{"), !path.fused, "{}", path.name);
    }
    let backward = texts.iter().any(|t| {
        ["LSTMGrad", "GRUGrad", "RNNGrad"]
            .iter()
            .any(|op| t.contains(op))
    });
    prop_assert_eq!(backward, path.fused, "{}: fused backward ops", path.name);
    // A path with a backend before the CPU puts nodes on it (and only there, the CPU's
    // own plans otherwise).
    let on_subset = m
        .placements()
        .iter()
        .flatten()
        .filter(|p| p.backend == "subset")
        .count();
    prop_assert_eq!(
        on_subset > 0,
        path.name.starts_with("subset"),
        "{}: {} nodes on the subset backend",
        path.name,
        on_subset
    );
    Ok(Run {
        outputs,
        loss: g.loss,
        grads: g
            .grads
            .iter()
            .map(|a| a.iter().copied().collect())
            .collect(),
        paths: (inference, training),
    })
}

/// Every path agrees with the loop path on outputs, loss and every weight gradient;
/// returns each path's runs.
fn agree(c: &Cfg) -> Result<Vec<Run>, TestCaseError> {
    let x = inputs(c);
    let all = paths();
    let reference = run(c, &all[0], &x)?;
    let mut runs = Vec::new();
    for p in &all[1..] {
        let got = run(c, p, &x)?;
        prop_assert_eq!(got.outputs.len(), reference.outputs.len());
        for (k, (a, b)) in got.outputs.iter().zip(&reference.outputs).enumerate() {
            close(&format!("{} output {k}", p.name), a, b)?;
        }
        close(&format!("{} loss", p.name), &[got.loss], &[reference.loss])?;
        prop_assert_eq!(got.grads.len(), reference.grads.len());
        for (k, (a, b)) in got.grads.iter().zip(&reference.grads).enumerate() {
            close(&format!("{} gradient {k}", p.name), a, b)?;
        }
        runs.push(got);
    }
    Ok(runs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every path agrees with the loop path on outputs, loss and every weight gradient,
    /// and the fused path runs fused kernels both ways.
    #[test]
    fn loop_and_fused_paths_agree(c in cfg()) {
        agree(&c)?;
    }
}

/// Sizes past the kernels' threading threshold (`PARALLEL_MIN_MACS`, 2^18 multiply-adds
/// over the sequence): blocks of batch rows run on two threads, forward and backward.
/// The default activations (bounded: f32 rounding differences between the paths stay
/// small at these widths).
fn threaded_cfg() -> impl Strategy<Value = Cfg> {
    (cfg(), 17usize..=40, 8usize..=12, 40usize..=64, 12usize..=24).prop_map(
        |(mut c, batch, steps, units, input)| {
            c.batch = batch;
            c.steps = steps;
            c.units = units;
            c.input = input;
            c.activation = 0;
            c.recurrent_activation = 0;
            c
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// The threaded paths agree with the loop too; the kernels' path counts show the
    /// fused path ran blocks of rows on threads in inference and in training.
    #[test]
    fn threaded_fused_paths_agree_with_the_loop(c in threaded_cfg()) {
        static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
        let pool = POOL.get_or_init(|| {
            rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a thread pool")
        });
        let runs = pool.install(|| agree(&c))?;
        let fused = runs.iter().find(|r| r.paths.0.forward > 0);
        let Some(fused) = fused else {
            return Err(TestCaseError::fail("no path ran a fused kernel"));
        };
        let (inference, training) = fused.paths;
        prop_assert!(inference.forward_threaded > 0, "inference on threads: {:?}", inference);
        prop_assert!(
            training.threaded_training_passes > 0,
            "training on threads: {:?}",
            training
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The raised graph (fused and masked ops of the cellgraph domain included) survives
    /// IR → ONNX → IR: the re-imported graph computes the same outputs.
    #[test]
    fn raised_graphs_round_trip_through_onnx(c in cfg()) {
        use cellgraph::backends::{Backend, Data, Plan};
        use cellgraph::ir::onnx::{import_model, model_to_bytes, ImportOptions};
        let x = inputs(&c);
        let m = build(&c);
        let sig: Vec<(DType, Vec<usize>)> = x
            .iter()
            .map(|t| (t.dtype(), t.shape().to_vec()))
            .collect();
        let g = m.to_graph(&sig).expect("graph");
        let backend = cellgraph::backends::cpu::CpuBackend::default();
        let list: Vec<std::sync::Arc<dyn cellgraph::backends::Device>> =
            vec![std::sync::Arc::new(backend)];
        let sel = cellgraph::backends::passes::select::select(&list, &g, true).expect("select");
        prop_assert!(sel.all_fused(), "{:?}", sel.choices);
        let bytes = model_to_bytes(&cellgraph::ir::onnx::Model::new(sel.graph.clone()));
        let back = import_model(&bytes, &ImportOptions::default()).expect("re-import");
        cellgraph::ir::verify(&back.graph).expect("verifies");
        let data: Vec<Data> = x.iter().cloned().map(Data::Tensor).collect();
        let a = backend.compile(&sel.graph).expect("compile").run(data.clone()).expect("run");
        let b = backend.compile(&back.graph).expect("compile").run(data).expect("run");
        prop_assert_eq!(a.len(), b.len());
        for (k, (p, q)) in a.iter().zip(&b).enumerate() {
            let (p, q) = (p.tensor().expect("tensor"), q.tensor().expect("tensor"));
            prop_assert_eq!(p.shape(), q.shape());
            close(&format!("round trip output {k}"), &flat(p), &flat(q))?;
        }
    }
}

/// Training-mode input dropout (`dropout > 0`, one mask per call as Keras) stays fused:
/// the mask multiplies the whole sequence outside the fused op. Recurrent dropout (a
/// mask on the state inside the recurrence) stays a loop, with the reason.
#[test]
fn training_with_input_dropout_runs_fused_and_matches_the_loop() {
    for cell in 0..4 {
        for go_backwards in [false, true] {
            let c = Cfg {
                cell,
                units: 5,
                input: 4,
                batch: 3,
                steps: 6,
                go_backwards,
                mask: MaskKind::Random,
                initial_state: false,
                return_sequences: true,
                return_state: false,
                stacked: false,
                stacked_cells: false,
                bidirectional: None,
                activation: 0,
                recurrent_activation: 0,
                seed: 11 + cell as u64,
            };
            let x = inputs(&c);
            let mut grads = Vec::new();
            for mode in [Mode::Loop, Mode::Fused] {
                let mut f = Functional::with_seed(c.seed);
                let inp = f.input(Input::new(&[None, Some(c.input)])).unwrap();
                let h = f.apply(Masking::new(0.0), &[inp]).unwrap()[0];
                let l = layer(&c, true, "last").dropout(0.3);
                let out = f.apply(l, &[h]).unwrap();
                let mut m = f.build(&[inp], &out).unwrap();
                m.set_recurrent(mode);
                let first = m.predict(&x).unwrap()[0].clone();
                let target = Tensor::F32(ArrayD::from_elem(IxDyn(first.shape()), 0.25f32));
                let g = m
                    .gradients(&x, &target, Loss::MeanSquaredError, 0, true)
                    .unwrap();
                let text = plan_text(&m);
                let fused = mode == Mode::Fused;
                assert_eq!(text.contains("Scan{"), !fused, "cell {cell}: {mode:?}");
                grads.push(g);
            }
            let (a, b) = (&grads[0], &grads[1]);
            assert!((a.loss - b.loss).abs() <= 1e-5 + 1e-4 * b.loss.abs());
            for (p, q) in a.grads.iter().zip(&b.grads) {
                for (u, v) in p.iter().zip(q) {
                    assert!(
                        (u - v).abs() <= 1e-5 + 1e-4 * v.abs(),
                        "cell {cell}: {u} vs {v}"
                    );
                }
            }
        }
    }
    // Recurrent dropout (a mask on the state inside the recurrence): a loop.
    let mut f = Functional::with_seed(3);
    let inp = f.input(Input::new(&[Some(4), Some(2)])).unwrap();
    let out = f
        .apply(LSTM::new(3).recurrent_dropout(0.2), &[inp])
        .unwrap();
    let mut m = f.build(&[inp], &out).unwrap();
    let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[2, 4, 2]), 0.5f32));
    let target = Tensor::F32(ArrayD::from_elem(IxDyn(&[2, 3]), 0.1f32));
    m.gradients(&[x], &target, Loss::MeanSquaredError, 0, true)
        .unwrap();
    let text = plan_text(&m);
    assert!(text.contains("Scan{"), "recurrent dropout runs as a loop");
}
