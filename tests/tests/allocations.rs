//! "The fused recurrent kernels allocate nothing per time step in f32" (README,
//! architecture invariants), measured with a counting global allocator: the same fused
//! LSTM/GRU/RNN plan (inference, and the training forward + fused backward) run on
//! sequences of 8 and of 64 steps makes the same number of allocations. Any allocation
//! inside the step loop shows as a difference of at least 56. (Not claimed for f64: its
//! per-step products go through `matrixmultiply::dgemm`, which allocates a packing buffer
//! on every call.)
//!
//! One test in this binary, so no other test allocates while it counts.

use cellgraph::autodiff::grad;
use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy, Debug)]
struct Cfg {
    cell: usize,
    bidirectional: bool,
    lens: bool,
    dtype: DType,
    batch: usize,
    input: usize,
    hidden: usize,
    train: bool,
}

fn values(n: usize, seed: &mut u64, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed % 2001) as f64 / 1000.0 - 1.0) * scale
        })
        .collect()
}

/// The recurrent graph of `c` over `t` steps and its inputs; for training, the graph of
/// Σ(Y ⊙ C) and its gradients with respect to X, W, R and B.
fn graph(c: &Cfg, t: usize) -> (Graph, Vec<Data>) {
    let d = if c.bidirectional { 2 } else { 1 };
    let gates = [4, 3, 1][c.cell];
    let (n, i, h) = (c.batch, c.input, c.hidden);
    let mut g = Graph::new("alloc");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut inputs = Vec::new();
    let dtype = c.dtype;
    let mut add = |g: &mut Graph,
                   inputs: &mut Vec<Data>,
                   name: &str,
                   shape: &[usize],
                   scale: f64|
     -> ValueRef {
        let dims: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        let v = g.add_input(name, ValueType::tensor(dtype, &dims)).unwrap();
        let n = shape.iter().product();
        inputs.push(Data::Tensor(
            Tensor::from_f64_vec(dtype, shape, &values(n, &mut seed, scale)).unwrap(),
        ));
        v
    };
    let x = add(&mut g, &mut inputs, "X", &[t, n, i], 1.0);
    let w = add(&mut g, &mut inputs, "W", &[d, gates * h, i], 0.3);
    let r = add(&mut g, &mut inputs, "R", &[d, gates * h, h], 0.3);
    let b = add(&mut g, &mut inputs, "B", &[d, 2 * gates * h], 0.2);
    let lens = c.lens.then(|| {
        let v: Vec<i32> = (0..n).map(|k| (t - k % 3) as i32).collect();
        let id = g
            .add_input("lens", ValueType::tensor(DType::I32, &[n as u64]))
            .unwrap();
        inputs.push(Data::Tensor(Tensor::I32(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[n]), v).unwrap(),
        )));
        id
    });
    let direction = if c.bidirectional {
        "bidirectional"
    } else {
        "forward"
    }
    .to_string();
    let op = match c.cell {
        0 => Op::LSTM {
            activation_alpha: None,
            activation_beta: None,
            activations: None,
            clip: None,
            direction,
            hidden_size: Some(h as i64),
            input_forget: 0,
            layout: 0,
        },
        1 => Op::GRU {
            activation_alpha: None,
            activation_beta: None,
            activations: None,
            clip: None,
            direction,
            hidden_size: Some(h as i64),
            layout: 0,
            linear_before_reset: 1,
        },
        _ => Op::RNN {
            activation_alpha: None,
            activation_beta: None,
            activations: None,
            clip: None,
            direction,
            hidden_size: Some(h as i64),
            layout: 0,
        },
    };
    let id = g
        .add_node(
            "rnn",
            op,
            &[Some(x), Some(w), Some(r), Some(b), lens],
            &["Y"],
        )
        .unwrap();
    let y = ValueRef { node: id, slot: 0 };
    if !c.train {
        g.set_outputs(vec![y]).unwrap();
        return (g, inputs);
    }
    let cy = add(&mut g, &mut inputs, "C", &[t, d, n, h], 1.0);
    let prod = g
        .add_node("", Op::Mul {}, &[Some(y), Some(cy)], &["p"])
        .unwrap();
    let loss = g
        .add_node(
            "",
            Op::ReduceSum {
                axes: None,
                keepdims: 0,
                noop_with_empty_axes: 0,
            },
            &[Some(ValueRef {
                node: prod,
                slot: 0,
            })],
            &["loss"],
        )
        .unwrap();
    let loss = ValueRef {
        node: loss,
        slot: 0,
    };
    g.set_outputs(vec![loss]).unwrap();
    let dg = grad(&g, loss, &[x, w, r, b]).unwrap();
    (dg, inputs)
}

/// Allocations of one run of the plan of `c` over `t` steps (the plan compiled and run
/// once before, so lazily built state is not counted); the fewest of three runs.
fn allocations(c: &Cfg, t: usize) -> usize {
    let (g, inputs) = graph(c, t);
    let mut plan = CpuBackend::new(Recurrent::Fused).compile(&g).unwrap();
    let ops: Vec<String> = plan
        .graph()
        .node_ids()
        .iter()
        .filter_map(|&n| plan.graph().node(n).op().map(|o| o.name().to_string()))
        .collect();
    let fused = ["LSTM", "GRU", "RNN"][c.cell];
    assert!(
        ops.iter().any(|o| o == fused),
        "{c:?}: no fused op in {ops:?}"
    );
    if c.train {
        assert!(
            ops.iter().any(|o| *o == format!("{fused}Grad")),
            "{c:?}: no fused backward in {ops:?}"
        );
    }
    plan.run(inputs.clone()).unwrap();
    (0..3)
        .map(|_| {
            let feed = inputs.clone();
            let before = ALLOCS.load(Ordering::Relaxed);
            let out = plan.run(feed).unwrap();
            let n = ALLOCS.load(Ordering::Relaxed) - before;
            drop(out);
            n
        })
        .min()
        .unwrap()
}

#[test]
fn fused_recurrent_kernels_allocate_nothing_per_step() {
    let mut cases = Vec::new();
    for cell in 0..3 {
        for (bidirectional, lens) in [(false, false), (true, true)] {
            for train in [false, true] {
                // Small (one block) and large enough for the packed products and row
                // blocks (batch 48, hidden 64).
                for (batch, input, hidden) in [(3, 4, 5), (48, 32, 64)] {
                    cases.push(Cfg {
                        cell,
                        bidirectional,
                        lens,
                        dtype: DType::F32,
                        batch,
                        input,
                        hidden,
                        train,
                    });
                }
            }
        }
    }
    // One thread: the count is exact. (With several, a thread that runs out of rows may
    // take rows from another between two steps, allocating that part's buffers once;
    // how often depends on timing, not on the number of steps.)
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut failures = Vec::new();
    pool.install(|| {
        for c in &cases {
            let (short, long) = (allocations(c, 8), allocations(c, 64));
            if long != short {
                failures.push(format!(
                    "{c:?}: {short} allocations over 8 steps, {long} over 64"
                ));
            }
        }
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Two threads, f32, sizes that split the rows into blocks: a thread that runs out of
    // rows may take rows from another between steps (allocating that part's buffers
    // once, as often as the timing makes it happen), never per step.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        for cell in 0..3 {
            for train in [false, true] {
                let c = Cfg {
                    cell,
                    bidirectional: false,
                    lens: false,
                    dtype: DType::F32,
                    batch: 48,
                    input: 32,
                    hidden: 64,
                    train,
                };
                let (short, long) = (allocations(&c, 8), allocations(&c, 64));
                assert!(
                    long <= short + 16,
                    "{c:?} on 2 threads: {short} allocations over 8 steps, {long} over 64"
                );
            }
        }
    });
}
