//! Plans over several backends: the test-only `subset` backend runs f32 elementwise ops
//! and 2-D MatMul in its own buffers, the CPU the rest. A placed plan must give the
//! CPU's results, put each node where the placement says, and copy values only at the
//! edges between backends and to the caller.

use cellgraph_backends::cpu::CpuBackend;
use cellgraph_backends::placed::{place, PlacedPlan, Transfers};
use cellgraph_backends::subset::SubsetBackend;
use cellgraph_backends::{Backend, Data, Device, Plan, Value};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use std::sync::Arc;

fn devices() -> Vec<Arc<dyn Device>> {
    vec![Arc::new(SubsetBackend), Arc::new(CpuBackend::default())]
}

fn f32s(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape"))
}

fn node(g: &mut Graph, name: &str, op: Op, ins: &[ValueRef]) -> ValueRef {
    let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
    let id = g.add_node(name, op, &ins, &[name]).expect(name);
    ValueRef { node: id, slot: 0 }
}

/// One step of a random graph: an op over earlier values (all `[n, d]` f32).
#[derive(Clone, Debug)]
enum StepKind {
    Unary(u8),
    Binary(u8, usize),
    Bias(u8),
    MatMulWeight,
    TransposeTwice,
    Softmax,
}

fn step() -> impl Strategy<Value = StepKind> {
    prop_oneof![
        (0u8..6).prop_map(StepKind::Unary),
        ((0u8..4), 0usize..64).prop_map(|(o, k)| StepKind::Binary(o, k)),
        (0u8..3).prop_map(StepKind::Bias),
        Just(StepKind::MatMulWeight),
        Just(StepKind::TransposeTwice),
        Just(StepKind::Softmax),
    ]
}

/// A graph over `x: [n, d]` (and `y` of the same shape): each step reads the last value
/// and maybe an earlier one; the graph outputs the last value and one earlier value.
fn build(n: usize, d: usize, steps: &[StepKind], seed: u64) -> Graph {
    let mut g = Graph::new("random");
    g.import_opset("", 21);
    let ty = ValueType::tensor(DType::F32, &[n as u64, d as u64]);
    let x = g.add_input("x", ty.clone()).expect("x");
    let y = g.add_input("y", ty).expect("y");
    let mut vals = vec![x, y];
    for (i, s) in steps.iter().enumerate() {
        let last = *vals.last().expect("a value");
        let name = format!("n{i}");
        let v = match s {
            StepKind::Unary(o) => {
                let op = match o {
                    0 => Op::Neg {},
                    1 => Op::Abs {},
                    2 => Op::Relu {},
                    3 => Op::Tanh {},
                    4 => Op::Sigmoid {},
                    _ => Op::Identity {},
                };
                node(&mut g, &name, op, &[last])
            }
            StepKind::Binary(o, k) => {
                let other = vals[k % vals.len()];
                let op = match o {
                    0 => Op::Add {},
                    1 => Op::Sub {},
                    2 => Op::Mul {},
                    // Division by 1 + |v|, never by 0.
                    _ => {
                        let a = node(&mut g, &format!("{name}_abs"), Op::Abs {}, &[other]);
                        let one = g
                            .add_initializer(
                                &format!("{name}_one"),
                                Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.0)),
                                false,
                            )
                            .expect("one");
                        let den = node(&mut g, &format!("{name}_den"), Op::Add {}, &[a, one]);
                        vals.push(den);
                        Op::Div {}
                    }
                };
                let other = *vals.last().filter(|_| *o == 3).unwrap_or(&other);
                node(&mut g, &name, op, &[last, other])
            }
            StepKind::Bias(o) => {
                let b = g
                    .add_initializer(&format!("{name}_b"), f32s(&[d], seed + i as u64), true)
                    .expect("bias");
                let op = match o {
                    0 => Op::Add {},
                    1 => Op::Mul {},
                    _ => Op::Sub {},
                };
                node(&mut g, &name, op, &[b, last])
            }
            StepKind::MatMulWeight => {
                let w = g
                    .add_initializer(
                        &format!("{name}_w"),
                        f32s(&[d, d], seed + 100 + i as u64),
                        true,
                    )
                    .expect("w");
                node(&mut g, &name, Op::MatMul {}, &[last, w])
            }
            StepKind::TransposeTwice => {
                let t = node(
                    &mut g,
                    &format!("{name}_t"),
                    Op::Transpose { perm: None },
                    &[last],
                );
                node(&mut g, &name, Op::Transpose { perm: None }, &[t])
            }
            StepKind::Softmax => node(&mut g, &name, Op::Softmax { axis: Some(1) }, &[last]),
        };
        vals.push(v);
    }
    let last = *vals.last().expect("a value");
    let early = vals[vals.len() / 2];
    g.set_outputs(vec![last, early]).expect("outputs");
    g
}

fn close(got: &[Data], want: &[Data]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} outputs, expected {}", got.len(), want.len()));
    }
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        let (a, b) = (a.tensor()?, b.tensor()?);
        if a.shape() != b.shape() || a.dtype() != b.dtype() {
            return Err(format!("output {k}: {:?} vs {:?}", a.shape(), b.shape()));
        }
        for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
            if !((x - y).abs() <= 1e-5 + 1e-5 * y.abs() || (x.is_nan() && y.is_nan())) {
                return Err(format!("output {k}[{i}]: {x} vs {y} (cpu)"));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random graphs mixing ops the subset backend runs with ones it refuses (Transpose,
    /// Softmax): the placed plan gives the CPU's outputs, each node runs where the
    /// placement says, and every copy is at an edge between the backends or an input or
    /// output of the caller's.
    #[test]
    fn placed_plans_compute_what_the_cpu_computes(
        n in 1usize..5,
        d in 1usize..6,
        steps in prop::collection::vec(step(), 1..12),
        seed in 0u64..1000,
    ) {
        let g = build(n, d, &steps, seed);
        let inputs = vec![Data::Tensor(f32s(&[n, d], seed)), Data::Tensor(f32s(&[n, d], seed + 7))];
        let want = CpuBackend::default().compile(&g).expect("cpu").run(inputs.clone()).expect("cpu run");
        let mut plan = PlacedPlan::compile(&g, devices()).expect("placed");
        for p in plan.placement() {
            let subset_op = matches!(
                p.op.as_str(),
                "Neg" | "Abs" | "Relu" | "Tanh" | "Sigmoid" | "Identity" | "Add" | "Sub" | "Mul" | "Div" | "MatMul"
            );
            prop_assert_eq!(p.backend, if subset_op { "subset" } else { "cpu" }, "{}", p);
            prop_assert_eq!(p.refused.is_empty(), subset_op, "{}", p);
        }
        let got = plan.run(inputs).expect("placed run");
        prop_assert!(close(&got, &want).is_ok(), "{}", close(&got, &want).unwrap_err());
        // Copies: each value crosses to a backend once at most, so no more uploads than
        // (values read by subset parts) and no more downloads than (values read by cpu
        // parts + outputs); with both backends present at least one copy happens.
        let parts = plan.parts();
        let t = plan.transfers();
        let mixed = parts.contains(&"subset") && parts.contains(&"cpu");
        if parts.contains(&"subset") {
            prop_assert!(t.uploads >= 1, "{t:?} {parts:?}");
        }
        if mixed || parts.last() == Some(&"subset") {
            prop_assert!(t.downloads >= 1, "{t:?} {parts:?}");
        }
        if !parts.contains(&"subset") {
            prop_assert_eq!(t, Transfers::default());
        }
    }
}

fn chain() -> Graph {
    // x → Add(b) → MatMul(w) → Tanh: every node on the subset backend.
    let mut g = Graph::new("chain");
    g.import_opset("", 21);
    let ty = ValueType::tensor(DType::F32, &[2, 3]);
    let x = g.add_input("x", ty).expect("x");
    let b = g.add_initializer("b", f32s(&[3], 1), true).expect("b");
    let w = g.add_initializer("w", f32s(&[3, 3], 2), true).expect("w");
    let a = node(&mut g, "add", Op::Add {}, &[x, b]);
    let m = node(&mut g, "mm", Op::MatMul {}, &[a, w]);
    let t = node(&mut g, "tanh", Op::Tanh {}, &[m]);
    g.set_outputs(vec![t]).expect("outputs");
    g
}

#[test]
fn weights_stay_on_the_backend_and_only_the_caller_s_values_cross() {
    let g = chain();
    let mut plan = PlacedPlan::compile(&g, devices()).expect("placed");
    assert_eq!(plan.parts(), ["subset"]);
    let x = Data::Tensor(f32s(&[2, 3], 3));
    let want = CpuBackend::default()
        .compile(&g)
        .expect("cpu")
        .run(vec![x.clone()])
        .expect("run");
    for k in 1..=3 {
        let got = plan.run(vec![x.clone()]).expect("run");
        close(&got, &want).expect("same as the cpu");
        // One upload (x) and one download (the output) per run: the weights b and w were
        // placed in the backend's memory when the part compiled.
        assert_eq!(
            plan.transfers(),
            Transfers {
                uploads: k,
                downloads: k
            }
        );
    }
    // A value already on the backend goes in without a copy, and the output can stay
    // there.
    let on = SubsetBackend.upload(x).expect("upload");
    let out = plan.run_values(vec![on]).expect("run on device values");
    assert_eq!(out[0].device(), Some("subset"));
    assert_eq!(
        plan.transfers(),
        Transfers {
            uploads: 3,
            downloads: 3
        }
    );
    // Chained: the output fed back in as an input (a weight updated in place, say)
    // never leaves the backend.
    assert!(matches!(out[0], Value::Device(_)));
    let again = plan.run_values(out).expect("again");
    assert_eq!(again[0].device(), Some("subset"));
    assert_eq!(
        plan.transfers(),
        Transfers {
            uploads: 3,
            downloads: 3
        }
    );
}

#[test]
fn edges_between_backends_are_copied_once_each_way() {
    // subset (Add) → cpu (Transpose, Transpose) → subset (Mul by the Add's output, then
    // Add x again).
    let mut g = Graph::new("edges");
    g.import_opset("", 21);
    let ty = ValueType::tensor(DType::F32, &[2, 2]);
    let x = g.add_input("x", ty).expect("x");
    let a = node(&mut g, "add", Op::Add {}, &[x, x]);
    let t1 = node(&mut g, "t1", Op::Transpose { perm: None }, &[a]);
    let t2 = node(&mut g, "t2", Op::Transpose { perm: None }, &[t1]);
    let m = node(&mut g, "mul", Op::Mul {}, &[t2, a]);
    let o = node(&mut g, "out", Op::Add {}, &[m, x]);
    g.set_outputs(vec![o]).expect("outputs");
    let mut plan = PlacedPlan::compile(&g, devices()).expect("placed");
    assert_eq!(plan.parts(), ["subset", "cpu", "subset"]);
    let lines: Vec<String> = plan.placement().iter().map(|p| p.to_string()).collect();
    assert_eq!(lines[0], "add (Add) → subset");
    assert!(
        lines[1].starts_with("t1 (Transpose) → cpu; not subset: ")
            && lines[1].contains("not Transpose"),
        "{}",
        lines[1]
    );
    let x = Data::Tensor(f32s(&[2, 2], 5));
    let got = plan.run(vec![x.clone()]).expect("run");
    let want = CpuBackend::default()
        .compile(&g)
        .expect("cpu")
        .run(vec![x])
        .expect("run");
    close(&got, &want).expect("same as the cpu");
    // Uploads: x, t2. Downloads: add's output (for the cpu part), the graph output. The
    // Add's output is read by both later parts but stays on the subset backend for the
    // Mul, and x, read by both subset parts, is uploaded once: no third upload.
    assert_eq!(
        plan.transfers(),
        Transfers {
            uploads: 2,
            downloads: 2
        }
    );
}

#[test]
fn a_node_no_backend_runs_is_refused_naming_it_and_the_reasons() {
    let mut g = Graph::new("t");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2, 2]))
        .expect("x");
    let t = node(&mut g, "flip", Op::Transpose { perm: None }, &[x]);
    g.set_outputs(vec![t]).expect("outputs");
    let only: Vec<Arc<dyn Device>> = vec![Arc::new(SubsetBackend)];
    let e = PlacedPlan::compile(&g, only)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("\"flip\" (Transpose) runs on no backend") && e.contains("subset: "),
        "{e}"
    );
    // And a type the subset refuses: f64.
    let mut g = Graph::new("f64");
    let x = g
        .add_input("x", ValueType::tensor(DType::F64, &[2]))
        .expect("x");
    let r = node(&mut g, "relu", Op::Relu {}, &[x]);
    g.set_outputs(vec![r]).expect("outputs");
    let p = place(&g, &devices()).expect("placed");
    assert_eq!(p[0].backend, "cpu");
    assert!(
        p[0].refused[0].1.contains("not an f32 tensor"),
        "{:?}",
        p[0]
    );
}

#[test]
fn wrong_inputs_are_named_by_the_backend_that_gets_them() {
    let g = chain();
    let mut plan = PlacedPlan::compile(&g, devices()).expect("placed");
    let e = plan
        .run(vec![Data::Tensor(f32s(&[3, 2], 1))])
        .expect_err("wrong shape")
        .to_string();
    assert!(e.contains("\"x\"") && e.contains("[3, 2]"), "{e}");
}

/// The selector's fused/loop choice is placement: a fused LSTM runs on the first backend
/// that accepts it, and when every backend of the list refuses it (the subset backend
/// runs no recurrent op, a CPU asked for loops refuses fused ones) it becomes its loop,
/// whose top-level nodes are placed one by one (the `Scan`'s body runs where the `Scan`
/// runs) — the reason names every backend — and the results are the fused kernel's.
#[test]
fn a_fused_op_no_backend_runs_becomes_its_loop_placed_node_by_node() {
    use cellgraph_backends::cpu::Recurrent;
    use cellgraph_backends::passes::select::{select, Placement};
    let (t, b, i, h) = (4, 2, 3, 5);
    let mut g = Graph::new("lstm");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[t, b, i]))
        .expect("x");
    let w = g
        .add_input("w", ValueType::tensor(DType::F32, &[1, 4 * h, i]))
        .expect("w");
    let r = g
        .add_input("r", ValueType::tensor(DType::F32, &[1, 4 * h, h]))
        .expect("r");
    let op = Op::LSTM {
        activation_alpha: None,
        activation_beta: None,
        activations: None,
        clip: None,
        direction: "forward".into(),
        hidden_size: Some(h as i64),
        input_forget: 0,
        layout: 0,
    };
    let id = g
        .add_node(
            "lstm",
            op,
            &[Some(x), Some(w), Some(r)],
            &["y", "y_h", "y_c"],
        )
        .expect("lstm");
    g.set_outputs(vec![ValueRef { node: id, slot: 1 }])
        .expect("outputs");
    let data = vec![
        Data::Tensor(f32s(&[t as usize, b as usize, i as usize], 1)),
        Data::Tensor(f32s(&[1, 4 * h as usize, i as usize], 2)),
        Data::Tensor(f32s(&[1, 4 * h as usize, h as usize], 3)),
    ];
    let fused = CpuBackend::default()
        .compile(&g)
        .expect("compile")
        .run(data.clone())
        .expect("run");
    // Accepted: fused on the CPU, after the subset backend's refusal.
    let list = CpuBackend::default().after(&[Arc::new(SubsetBackend)]);
    let sel = select(&list, &g, false).expect("select");
    assert_eq!(
        sel.choices[0].placement,
        Placement::Fused { backend: "cpu" },
        "{:?}",
        sel.choices
    );
    // Refused by every backend: a loop, with both reasons, placed node by node.
    let list = CpuBackend::new(Recurrent::Loop).after(&[Arc::new(SubsetBackend)]);
    let sel = select(&list, &g, false).expect("select");
    match &sel.choices[0].placement {
        Placement::Loop { reason } => assert!(
            reason.contains("subset: ") && reason.contains("cpu: LSTM asked to run as a loop"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    let mut plan = PlacedPlan::compile(&g, list).expect("placed");
    let ops: Vec<&str> = plan.placement().iter().map(|p| p.op.as_str()).collect();
    assert!(ops.contains(&"Scan") && !ops.contains(&"LSTM"), "{ops:?}");
    let got = plan.run(data).expect("run");
    close(&got, &fused).expect("the loop gives the fused kernel's results");
}
