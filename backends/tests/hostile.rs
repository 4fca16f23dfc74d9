//! Kernels refuse absurd sizes and runaway loops with errors naming node and op, never
//! an out-of-memory abort or a hang.

use cellgraph_backends::budget::{Budget, Exceeded};
use cellgraph_backends::cpu::{CpuBackend, Recurrent};
use cellgraph_backends::{Backend, Data, Error, Plan};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

fn run_one(op: Op, inputs: Vec<(&str, Tensor)>, backend: CpuBackend) -> Result<Vec<Data>, Error> {
    let mut g = Graph::new("hostile");
    let mut refs = Vec::new();
    let mut data = Vec::new();
    for (name, t) in inputs {
        let dims: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        refs.push(Some(
            g.add_input(name, ValueType::tensor(t.dtype(), &dims))
                .expect("input"),
        ));
        data.push(Data::Tensor(t));
    }
    let id = g.add_node("victim", op, &refs, &["y"]).expect("node");
    g.set_outputs(vec![ValueRef { node: id, slot: 0 }])
        .expect("outputs");
    backend.compile(&g).expect("compile").run(data)
}

fn expect_kernel_error(r: Result<Vec<Data>, Error>, op: &str, needle: &str) {
    match r {
        Err(Error::Kernel { node, op: o, msg }) => {
            assert_eq!((node.as_str(), o.as_str()), ("victim", op));
            assert!(msg.contains(needle), "{msg}");
        }
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

/// Expects the run to stop at `op` on the `exceeded` budget.
fn expect_budget(r: Result<Vec<Data>, Error>, op: &str, exceeded: Exceeded) {
    match r {
        Err(Error::Budget {
            node,
            op: o,
            overrun,
        }) => {
            assert_eq!((node.as_str(), o.as_str()), ("victim", op));
            assert_eq!(overrun.exceeded, exceeded, "{overrun:?}");
        }
        other => panic!("expected {op} to exceed {exceeded:?}, got {other:?}"),
    }
}

#[test]
fn huge_outputs_are_refused_before_allocating() {
    let t = Instant::now();
    let shape = Tensor::vec_i64(&[1 << 20, 1 << 20]);
    expect_budget(
        run_one(
            Op::ConstantOfShape { value: None },
            vec![("s", shape.clone())],
            CpuBackend::default(),
        ),
        "ConstantOfShape",
        Exceeded::TensorBytes,
    );
    let one = Tensor::zeros(DType::F32, &[1, 1]);
    expect_budget(
        run_one(
            Op::Expand {},
            vec![("x", one), ("s", shape)],
            CpuBackend::default(),
        ),
        "Expand",
        Exceeded::TensorBytes,
    );
    let x = Tensor::zeros(DType::F32, &[2, 2]);
    let reps = Tensor::vec_i64(&[1 << 40, 1]);
    expect_budget(
        run_one(
            Op::Tile {},
            vec![("x", x), ("r", reps)],
            CpuBackend::default(),
        ),
        "Tile",
        Exceeded::TensorBytes,
    );
    let f = |v: f32| Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v));
    expect_kernel_error(
        run_one(
            Op::Range {},
            vec![("a", f(0.0)), ("b", f(1e12)), ("c", f(1.0))],
            CpuBackend::default(),
        ),
        "Range",
        "elements",
    );
    assert!(
        t.elapsed().as_secs_f64() < 2.0,
        "refusals took {:?}",
        t.elapsed()
    );
}

#[test]
fn integer_division_by_zero_is_an_error() {
    let a = Tensor::vec_i64(&[1, 2]);
    let b = Tensor::vec_i64(&[1, 0]);
    expect_kernel_error(
        run_one(Op::Div {}, vec![("a", a), ("b", b)], CpuBackend::default()),
        "Div",
        "division by zero",
    );
}

#[test]
fn a_loop_that_never_stops_hits_the_trip_limit() {
    // A Loop with no trip count whose body always says "continue", carrying one value.
    let mut g = Graph::new("hostile");
    let cond = g
        .add_input("cond", ValueType::tensor(DType::Bool, &[]))
        .expect("input");
    let mut body = Graph::new("forever");
    let _i = body
        .add_input("i", ValueType::tensor(DType::I64, &[]))
        .expect("iter");
    let c = body
        .add_input("c", ValueType::tensor(DType::Bool, &[]))
        .expect("cond");
    let v = body
        .add_input("v", ValueType::tensor(DType::F32, &[]))
        .expect("carried");
    let co = body
        .add_node("", Op::Identity {}, &[Some(c)], &["c_out"])
        .expect("identity");
    let vo = body
        .add_node("", Op::Identity {}, &[Some(v)], &["v_out"])
        .expect("identity");
    body.set_outputs(vec![
        ValueRef { node: co, slot: 0 },
        ValueRef { node: vo, slot: 0 },
    ])
    .expect("outputs");
    let v0 = g
        .add_input("v0", ValueType::tensor(DType::F32, &[]))
        .expect("input");
    let id = g
        .add_node(
            "victim",
            Op::Loop {
                body: Box::new(body),
            },
            &[None, Some(cond), Some(v0)],
            &["v_final"],
        )
        .expect("loop");
    g.set_outputs(vec![ValueRef { node: id, slot: 0 }])
        .expect("outputs");
    let backend = CpuBackend {
        budget: Budget {
            max_loop_trips: 1000,
            ..Budget::default()
        },
        ..CpuBackend::new(Recurrent::Fused)
    };
    let mut plan = backend.compile(&g).expect("compile");
    let t = Instant::now();
    let r = plan.run(vec![
        Data::Tensor(Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), true))),
        Data::Tensor(Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.0))),
    ]);
    match r {
        Err(Error::Budget { op, overrun, .. }) => {
            assert_eq!(op, "Loop");
            assert_eq!(overrun.exceeded, Exceeded::LoopTrips);
            assert_eq!(overrun.limit, "1000 iterations");
        }
        other => panic!("expected the Loop to hit its trip budget, got {other:?}"),
    }
    assert!(t.elapsed().as_secs_f64() < 5.0);
    // With cond false it stops at once and carries the value through.
    let out = plan
        .run(vec![
            Data::Tensor(Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), false))),
            Data::Tensor(Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 7.0))),
        ])
        .expect("no iterations");
    assert_eq!(out[0].tensor().expect("tensor").to_f64_vec(), vec![7.0]);
}

#[test]
fn wrong_run_time_inputs_are_named() {
    let mut g = Graph::new("g");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2, 3]))
        .expect("x");
    let id = g
        .add_node("", Op::Relu {}, &[Some(x)], &["y"])
        .expect("relu");
    g.set_outputs(vec![ValueRef { node: id, slot: 0 }])
        .expect("outputs");
    let mut plan = CpuBackend::default().compile(&g).expect("compile");
    for (inputs, needle) in [
        (vec![], "0 inputs given, the graph has 1"),
        (
            vec![Data::Tensor(Tensor::zeros(DType::F32, &[2, 4]))],
            "dimension 1 is 4, the graph expects 3",
        ),
        (
            vec![Data::Tensor(Tensor::zeros(DType::F64, &[2, 3]))],
            "dtype f64 but the graph expects f32",
        ),
        (vec![Data::Sequence(vec![])], "a sequence was given"),
    ] {
        match plan.run(inputs) {
            Err(e @ Error::Input { .. }) => assert!(e.to_string().contains(needle), "{e}"),
            other => panic!("expected an input error, got {other:?}"),
        }
    }
}
