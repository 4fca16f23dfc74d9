//! Run-time budgets: sizes computed at run time, loops that grow or never stop, and a
//! deadline end in `Error::Budget` naming the node, op, size and limit — never an abort
//! or a hang; within the budget the same plans run and report their peak.

use cellgraph_backends::budget::{Budget, Exceeded};
use cellgraph_backends::cpu::{CpuBackend, Recurrent};
use cellgraph_backends::{Backend, Data, Error, Plan};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

fn backend(budget: Budget) -> CpuBackend {
    CpuBackend {
        budget,
        ..CpuBackend::new(Recurrent::Fused)
    }
}

fn scalar_i64(v: i64) -> Data {
    Data::Tensor(Tensor::I64(ArrayD::from_elem(IxDyn(&[]), v)))
}

fn scalar_bool(v: bool) -> Data {
    Data::Tensor(Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), v)))
}

fn expect_over(r: Result<Vec<Data>, Error>, node: &str, op: &str, exceeded: Exceeded) -> String {
    match r {
        Err(e @ Error::Budget { .. }) => {
            let msg = e.to_string();
            let Error::Budget {
                node: n,
                op: o,
                overrun,
            } = e
            else {
                unreachable!()
            };
            assert_eq!((n.as_str(), o.as_str()), (node, op), "{msg}");
            assert_eq!(overrun.exceeded, exceeded, "{msg}");
            msg
        }
        other => panic!("expected {node} ({op}) to exceed {exceeded:?}, got {other:?}"),
    }
}

/// `y = Expand(x, shape)` with the shape read from an input (the 79-byte model).
fn expand_graph() -> Graph {
    let mut g = Graph::new("expand");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[1]))
        .expect("x");
    let s = g
        .add_input("shape", ValueType::tensor(DType::I64, &[1]))
        .expect("shape");
    let e = g
        .add_node("grow", Op::Expand {}, &[Some(x), Some(s)], &["y"])
        .expect("expand");
    g.set_outputs(vec![ValueRef { node: e, slot: 0 }])
        .expect("outputs");
    g
}

fn expand_inputs(n: i64) -> Vec<Data> {
    vec![
        Data::Tensor(Tensor::F32(ArrayD::from_elem(IxDyn(&[1]), 1.0))),
        Data::Tensor(Tensor::vec_i64(&[n])),
    ]
}

#[test]
fn a_shape_read_at_run_time_is_checked_before_allocating() {
    // 4 GiB asked under the default budget (4 GiB per value is allowed; 4 GiB + 4 is not).
    let mut plan = backend(Budget::default())
        .compile(&expand_graph())
        .expect("compile");
    let msg = expect_over(
        plan.run(expand_inputs((1 << 30) + 1)),
        "grow",
        "Expand",
        Exceeded::TensorBytes,
    );
    assert!(msg.contains("4294967300 bytes"), "{msg}");
    assert!(msg.contains("--max-tensor-bytes"), "{msg}");
    // The same with a per-value limit of 1 MB: 4 MB is refused, 0.4 MB runs.
    let small = Budget {
        max_tensor_bytes: 1_000_000,
        ..Budget::default()
    };
    let mut plan = backend(small).compile(&expand_graph()).expect("compile");
    let msg = expect_over(
        plan.run(expand_inputs(1_000_000)),
        "grow",
        "Expand",
        Exceeded::TensorBytes,
    );
    assert!(msg.contains("4000000 bytes"), "{msg}");
    assert!(msg.contains("1000000 bytes"), "{msg}");
    let out = plan.run(expand_inputs(100_000)).expect("within the budget");
    assert_eq!(out[0].tensor().expect("tensor").len(), 100_000);
    assert!(plan.peak_bytes() >= 400_000, "peak {}", plan.peak_bytes());
}

#[test]
fn a_small_declared_shape_does_not_hide_a_large_value() {
    // The file declares y : f32[4]; the shape input asks for 4 MB.
    let mut g = expand_graph();
    let y = g.outputs()[0];
    g.declare_type(y, &ValueType::tensor(DType::F32, &[4]))
        .expect("declare");
    let mut plan = backend(Budget {
        max_tensor_bytes: 1_000_000,
        ..Budget::default()
    })
    .compile(&g)
    .expect("compile");
    expect_over(
        plan.run(expand_inputs(1_000_000)),
        "grow",
        "Expand",
        Exceeded::TensorBytes,
    );
    // Refused before the kernel ran: the 4 MB value never existed (a check after the
    // kernel would have counted it).
    assert!(plan.peak_bytes() < 1000, "peak {}", plan.peak_bytes());
}

#[test]
fn a_broadcast_is_predicted_too() {
    // [n, 1] + [1, n] makes n² elements from 2n.
    let mut g = Graph::new("outer_sum");
    let a = g
        .add_input("a", ValueType::tensor(DType::F32, &[50_000, 1]))
        .expect("a");
    let b = g
        .add_input("b", ValueType::tensor(DType::F32, &[1, 50_000]))
        .expect("b");
    let s = g
        .add_node("sum", Op::Add {}, &[Some(a), Some(b)], &["y"])
        .expect("add");
    g.set_outputs(vec![ValueRef { node: s, slot: 0 }])
        .expect("outputs");
    let mut plan = backend(Budget {
        max_tensor_bytes: 1 << 30,
        ..Budget::default()
    })
    .compile(&g)
    .expect("compile");
    let t = Instant::now();
    let msg = expect_over(
        plan.run(vec![
            Data::Tensor(Tensor::zeros(DType::F32, &[50_000, 1])),
            Data::Tensor(Tensor::zeros(DType::F32, &[1, 50_000])),
        ]),
        "sum",
        "Add",
        Exceeded::TensorBytes,
    );
    assert!(msg.contains("10000000000 bytes"), "{msg}");
    assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
}

/// A `Loop` over `trips` (an input) whose body carries a `dim`×`dim` matrix through a
/// MatMul and, when `grow` is set, emits a `per_trip`-element scan output each trip.
fn loop_graph(dim: u64, per_trip: Option<i64>) -> Graph {
    let mut body = Graph::new("body");
    body.add_input("i", ValueType::tensor(DType::I64, &[]))
        .expect("i");
    let c = body
        .add_input("c", ValueType::tensor(DType::Bool, &[]))
        .expect("c");
    let m = body
        .add_input("m", ValueType::tensor(DType::F32, &[dim, dim]))
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
    if let Some(n) = per_trip {
        let shape = body
            .add_initializer("piece_shape", Tensor::vec_i64(&[n]), false)
            .expect("shape");
        let piece = body
            .add_node(
                "piece",
                Op::ConstantOfShape { value: None },
                &[Some(shape)],
                &["piece"],
            )
            .expect("piece");
        outs.push(ValueRef {
            node: piece,
            slot: 0,
        });
    }
    body.set_outputs(outs).expect("outputs");
    let mut g = Graph::new("loop");
    let trips = g
        .add_input("trips", ValueType::tensor(DType::I64, &[]))
        .expect("trips");
    let cond = g
        .add_input("cond", ValueType::tensor(DType::Bool, &[]))
        .expect("cond");
    let m0 = g
        .add_input("m0", ValueType::tensor(DType::F32, &[dim, dim]))
        .expect("m0");
    let names: &[&str] = if per_trip.is_some() {
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
            &[Some(trips), Some(cond), Some(m0)],
            names,
        )
        .expect("loop");
    g.set_outputs(
        (0..names.len())
            .map(|slot| ValueRef { node: l, slot })
            .collect(),
    )
    .expect("outputs");
    g
}

fn loop_inputs(trips: i64, dim: usize) -> Vec<Data> {
    // A matrix whose powers stay bounded: 1/dim everywhere.
    let m = ArrayD::from_elem(IxDyn(&[dim, dim]), 1.0 / dim as f32);
    vec![
        scalar_i64(trips),
        scalar_bool(true),
        Data::Tensor(Tensor::F32(m)),
    ]
}

#[test]
fn a_loop_asking_for_2_pow_62_trips_is_refused_before_it_starts() {
    // Its condition is passed through unchanged: it would run all 2^62 trips.
    let mut plan = backend(Budget::default())
        .compile(&loop_graph(64, None))
        .expect("compile");
    let t = Instant::now();
    let msg = expect_over(
        plan.run(loop_inputs(1 << 62, 64)),
        "runaway",
        "Loop",
        Exceeded::LoopTrips,
    );
    assert!(
        msg.contains("4611686018427387904 iterations (its condition never turns false)"),
        "{msg}"
    );
    assert!(msg.contains("65536 iterations"), "{msg}");
    assert!(msg.contains("--max-loop-trips"), "{msg}");
    assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
    // A loop within the budget runs to the end.
    let out = plan.run(loop_inputs(10, 64)).expect("ten trips");
    assert_eq!(out[0].tensor().expect("tensor").shape(), &[64, 64]);
}

#[test]
fn a_loop_whose_condition_stays_true_stops_at_the_default_trip_budget() {
    // cond_out = i < 2^62: computed every trip, so only the running count can stop it.
    let mut body = Graph::new("body");
    let i = body
        .add_input("i", ValueType::tensor(DType::I64, &[]))
        .expect("i");
    body.add_input("c", ValueType::tensor(DType::Bool, &[]))
        .expect("c");
    let v = body
        .add_input("v", ValueType::tensor(DType::F32, &[]))
        .expect("v");
    let big = body
        .add_initializer(
            "big",
            Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 1 << 62)),
            false,
        )
        .expect("big");
    let less = body
        .add_node("more", Op::Less {}, &[Some(i), Some(big)], &["c_out"])
        .expect("less");
    let vo = body
        .add_node("", Op::Identity {}, &[Some(v)], &["v_out"])
        .expect("identity");
    body.set_outputs(vec![
        ValueRef {
            node: less,
            slot: 0,
        },
        ValueRef { node: vo, slot: 0 },
    ])
    .expect("outputs");
    let mut g = Graph::new("loop");
    let v0 = g
        .add_input("v0", ValueType::tensor(DType::F32, &[]))
        .expect("v0");
    let l = g
        .add_node(
            "runaway",
            Op::Loop {
                body: Box::new(body),
            },
            &[None, None, Some(v0)],
            &["v_final"],
        )
        .expect("loop");
    g.set_outputs(vec![ValueRef { node: l, slot: 0 }])
        .expect("outputs");
    let mut plan = backend(Budget::default()).compile(&g).expect("compile");
    let t = Instant::now();
    let msg = expect_over(
        plan.run(vec![Data::Tensor(Tensor::scalar_f32(1.0))]),
        "runaway",
        "Loop",
        Exceeded::LoopTrips,
    );
    assert!(msg.contains("65536 iterations"), "{msg}");
    println!(
        "65536 trips stopped after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(t.elapsed().as_secs_f64() < 20.0);
}

#[test]
fn a_deadline_stops_a_long_loop() {
    let mut plan = backend(Budget {
        max_seconds: Some(0.3),
        max_loop_trips: u64::MAX,
        ..Budget::default()
    })
    .compile(&loop_graph(64, None))
    .expect("compile");
    let t = Instant::now();
    let msg = match plan.run(loop_inputs(1 << 62, 64)) {
        Err(e @ Error::Budget { .. }) => e.to_string(),
        other => panic!("expected the deadline, got {other:?}"),
    };
    let secs = t.elapsed().as_secs_f64();
    assert!(msg.contains("time limit (--max-seconds) is 0.3 s"), "{msg}");
    assert!(
        secs < 5.0,
        "the deadline of 0.3 s stopped the run after {secs:.2} s"
    );
}

#[test]
fn a_scan_output_growing_each_trip_hits_the_live_budget() {
    // 1 MiB per trip, 100 MB alive at most: stops near trip 95, long before 10,000.
    let mut plan = backend(Budget {
        max_live_bytes: 100_000_000,
        ..Budget::default()
    })
    .compile(&loop_graph(2, Some(1 << 18)))
    .expect("compile");
    let t = Instant::now();
    // The piece that does not fit is refused where the body makes it.
    let msg = expect_over(
        plan.run(loop_inputs(10_000, 2)),
        "piece",
        "ConstantOfShape",
        Exceeded::LiveBytes,
    );
    assert!(msg.contains("100000000 bytes"), "{msg}");
    assert!(msg.contains("--max-total-bytes"), "{msg}");
    assert!(t.elapsed().as_secs_f64() < 10.0);
    // 40 trips (40 MiB of pieces, and as much again once stacked) fit.
    let out = plan.run(loop_inputs(40, 2)).expect("forty trips");
    assert_eq!(out[1].tensor().expect("tensor").shape(), &[40, 1 << 18]);
    let peak = plan.peak_bytes();
    assert!(
        (80 << 20..100_000_000).contains(&peak),
        "peak {peak} should count the 40 MiB of pieces and the 40 MiB stacked"
    );
}

#[test]
fn the_process_address_space_is_respected_when_known() {
    // Whatever the machine, an ask beyond what it can give is refused by one of the
    // bounds: the configured one when it is smaller, else the system's.
    let huge = Budget {
        max_tensor_bytes: u64::MAX,
        max_live_bytes: u64::MAX,
        ..Budget::default()
    };
    let mut plan = backend(huge).compile(&expand_graph()).expect("compile");
    match cellgraph_backends::budget::system_headroom() {
        Some((left, which)) => {
            // Ask for more than is left (at most 2^62 elements of 4 bytes).
            let n = i64::try_from((left / 4).saturating_add(1 << 20)).unwrap_or(i64::MAX);
            let msg = expect_over(plan.run(expand_inputs(n)), "grow", "Expand", which);
            println!("refused: {msg}");
        }
        None => println!("skip: this system does not say how much memory is left (/proc)"),
    }
}
