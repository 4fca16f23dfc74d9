//! The raise rules on hand-written cells: each rule fires on a cell written in another
//! (equivalent) op order and refuses a cell that is not its kind, and the raised graph
//! computes what the loop computes.

use cellgraph_backends::cpu::{CpuBackend, Recurrent};
use cellgraph_backends::passes::raise::{raise_recurrent, Raised};
use cellgraph_backends::{Backend, Data, Plan};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};

const T: usize = 5;
const N: usize = 3;
const I: usize = 4;
const H: usize = 6;

fn ty(dims: &[usize]) -> ValueType {
    ValueType::tensor(
        DType::F32,
        &dims.iter().map(|&d| d as u64).collect::<Vec<_>>(),
    )
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64, scale: f64) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f64> = values(n, seed).iter().map(|x| x * scale).collect();
    Tensor::from_f64_vec(DType::F32, dims, &v).expect("tensor")
}

/// A step body under construction.
struct Body {
    g: Graph,
    k: usize,
}

impl Body {
    fn new(states: usize) -> (Body, Vec<ValueRef>) {
        let mut g = Graph::new("cell");
        let mut ins = Vec::new();
        for s in 0..states {
            ins.push(g.add_input(&format!("s{s}"), ty(&[N, H])).expect("state"));
        }
        ins.push(g.add_input("x_t", ty(&[N, I])).expect("x"));
        (Body { g, k: 0 }, ins)
    }
    fn outer(&mut self, name: &str, dims: &[usize]) -> ValueRef {
        self.g.add_outer(name, ty(dims)).expect("outer")
    }
    fn op(&mut self, op: Op, ins: &[ValueRef]) -> ValueRef {
        self.k += 1;
        let name = format!("v{}", self.k);
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        let id = self.g.add_node("", op, &ins, &[&name]).expect("node");
        ValueRef { node: id, slot: 0 }
    }
    fn ints(&mut self, v: &[i64]) -> ValueRef {
        self.op(Op::constant(Tensor::vec_i64(v)), &[])
    }
    fn mm(&mut self, a: ValueRef, b: ValueRef) -> ValueRef {
        self.op(Op::MatMul {}, &[a, b])
    }
    fn add(&mut self, a: ValueRef, b: ValueRef) -> ValueRef {
        self.op(Op::Add {}, &[a, b])
    }
    fn mul(&mut self, a: ValueRef, b: ValueRef) -> ValueRef {
        self.op(Op::Mul {}, &[a, b])
    }
    fn sig(&mut self, a: ValueRef) -> ValueRef {
        self.op(Op::Sigmoid {}, &[a])
    }
    fn tanh(&mut self, a: ValueRef) -> ValueRef {
        self.op(Op::Tanh {}, &[a])
    }
    /// Columns `lo..hi` of a `[N, M]` value with `Slice`.
    fn cols(&mut self, v: ValueRef, lo: usize, hi: usize) -> ValueRef {
        let (s, e, a) = (
            self.ints(&[lo as i64]),
            self.ints(&[hi as i64]),
            self.ints(&[1]),
        );
        self.op(Op::Slice {}, &[v, s, e, a])
    }
}

/// The outer graph: `Scan(states..., X)` with the weights as graph inputs; returns the
/// graph and its input values.
fn scan_graph(body: Body, weights: &[(&str, Vec<usize>)], states: usize) -> (Graph, Vec<Data>) {
    let mut g = Graph::new("hand");
    let mut data = Vec::new();
    let mut ins = Vec::new();
    for s in 0..states {
        ins.push(Some(
            g.add_input(&format!("init{s}"), ty(&[N, H])).expect("init"),
        ));
        data.push(Data::Tensor(tensor(&[N, H], 100 + s as u64, 0.5)));
    }
    let x = g.add_input("X", ty(&[T, N, I])).expect("X");
    data.push(Data::Tensor(tensor(&[T, N, I], 7, 1.0)));
    for (k, (name, dims)) in weights.iter().enumerate() {
        g.add_input(name, ty(dims)).expect("weight");
        data.push(Data::Tensor(tensor(dims, 20 + k as u64, 0.5)));
    }
    ins.push(Some(x));
    let mut names: Vec<String> = (0..states).map(|s| format!("final{s}")).collect();
    names.push("Y".into());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut body = body;
    body.g.import_opset("", 17);
    let id = g
        .add_node(
            "hand_scan",
            Op::Scan {
                body: Box::new(body.g),
                num_scan_inputs: 1,
                scan_input_axes: None,
                scan_input_directions: None,
                scan_output_axes: None,
                scan_output_directions: None,
                directions: None,
            },
            &ins,
            &refs,
        )
        .expect("scan");
    g.set_outputs(
        (0..=states)
            .map(|slot| ValueRef { node: id, slot })
            .collect(),
    )
    .expect("outputs");
    cellgraph_ir::verify(&g).expect("valid");
    (g, data)
}

fn run(g: &Graph, data: &[Data]) -> Vec<Tensor> {
    let mut plan = CpuBackend::new(Recurrent::Fused)
        .compile(g)
        .expect("compile");
    plan.run(data.to_vec())
        .expect("run")
        .into_iter()
        .map(|d| d.tensor().expect("tensor").clone())
        .collect()
}

fn assert_same(a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.shape(), y.shape(), "output {k}");
        for (p, q) in x.to_f64_vec().iter().zip(y.to_f64_vec()) {
            assert!(
                (p - q).abs() <= 1e-5 + 1e-4 * q.abs(),
                "output {k}: {p} vs {q}"
            );
        }
    }
}

/// Raises `g`, checks the one decision, and (when raised) that no Scan is left and the
/// outputs agree with the loop.
fn raise_and_check(g: &Graph, data: &[Data], rule: Option<&str>) -> Raised {
    let raised = raise_recurrent(g).expect("raise");
    assert_eq!(raised.decisions.len(), 1, "{:?}", raised.decisions);
    assert_eq!(raised.decisions[0].rule, rule, "{:?}", raised.decisions);
    cellgraph_ir::verify(&raised.graph).expect("raised graph verifies");
    let scans = raised
        .graph
        .node_ids()
        .into_iter()
        .filter(|&n| matches!(raised.graph.node(n).op(), Some(Op::Scan { .. })))
        .count();
    assert_eq!(scans, usize::from(rule.is_none()));
    assert_same(&run(&raised.graph, data), &run(g, data));
    raised
}

/// An LSTM written the "other" way: one matrix per gate for the input (gates declared
/// f, o, i, g), one concatenated recurrent matrix read with `Slice` after the product,
/// the bias added first, operands of every Add and Mul swapped, and one gate's input
/// product a `Gemm` with a transposed `[H, I]` matrix.
fn hand_lstm(change_a_gate: bool) -> (Graph, Vec<Data>) {
    let (mut b, ins) = Body::new(2);
    let (h, c, x) = (ins[0], ins[1], ins[2]);
    let wf = b.outer("Wf", &[I, H]);
    let wo = b.outer("Wo", &[I, H]);
    let wi_t = b.outer("Wi_t", &[H, I]);
    let wg = b.outer("Wg", &[I, H]);
    let rcat = b.outer("Rcat", &[H, 4 * H]);
    let bias = b.outer("bias", &[4 * H]);
    // Recurrent product once, gates at columns [i | f | g | o] of it and of the bias.
    let hr = b.mm(h, rcat);
    let hrb = b.add(bias, hr);
    let pre = |b: &mut Body, xw: ValueRef, k: usize| {
        let r = b.cols(hrb, k * H, (k + 1) * H);
        b.add(r, xw)
    };
    let xi = b.op(
        Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            transA: 0,
            transB: 1,
        },
        &[x, wi_t],
    );
    let xf = b.mm(x, wf);
    let xg = b.mm(x, wg);
    let xo = b.mm(x, wo);
    let pi = pre(&mut b, xi, 0);
    let pf = pre(&mut b, xf, 1);
    let pg = pre(&mut b, xg, 2);
    let po = pre(&mut b, xo, 3);
    let f = b.sig(pf);
    let o = b.sig(po);
    let i = b.sig(pi);
    let g = b.tanh(pg);
    let ig = b.mul(g, i);
    // The changed cell forgets from h instead of c.
    let fc = if change_a_gate {
        b.mul(h, f)
    } else {
        b.mul(c, f)
    };
    let c_new = b.add(ig, fc);
    let tc = b.tanh(c_new);
    let h_new = b.mul(tc, o);
    let y = b.op(Op::Identity {}, &[h_new]);
    b.g.set_outputs(vec![h_new, c_new, y]).expect("outputs");
    scan_graph(
        b,
        &[
            ("Wf", vec![I, H]),
            ("Wo", vec![I, H]),
            ("Wi_t", vec![H, I]),
            ("Wg", vec![I, H]),
            ("Rcat", vec![H, 4 * H]),
            ("bias", vec![4 * H]),
        ],
        2,
    )
}

#[test]
fn lstm_rule_fires_on_a_hand_written_cell_in_another_order() {
    let (g, data) = hand_lstm(false);
    let raised = raise_and_check(&g, &data, Some("lstm"));
    assert_eq!(raised.decisions[0].detail, "LSTM");
}

#[test]
fn lstm_rule_refuses_a_cell_with_one_gate_changed() {
    let (g, data) = hand_lstm(true);
    let raised = raise_and_check(&g, &data, None);
    let why = &raised.decisions[0].detail;
    assert!(why.contains("lstm:") && why.contains("f⊙c + i⊙g"), "{why}");
}

/// A GRU with the reset applied before the recurrent product, per-gate matrices, and
/// `h' = (1 − z)⊙ĥ + h⊙z` written in that order.
fn hand_gru(reset_before: bool, broken: bool) -> (Graph, Vec<Data>) {
    let (mut b, ins) = Body::new(1);
    let (h, x) = (ins[0], ins[1]);
    let wcat = b.outer("Wcat", &[I, 3 * H]);
    let uz = b.outer("Uz", &[H, H]);
    let ur = b.outer("Ur", &[H, H]);
    let uh = b.outer("Uh", &[H, H]);
    let bh = b.outer("bh", &[1, H]);
    let xw = b.mm(x, wcat);
    let sp = b.g.add_node(
        "",
        Op::Split {
            axis: 1,
            split: None,
            num_outputs: Some(3),
        },
        &[Some(xw)],
        &["xz", "xr", "xh"],
    );
    let sp = sp.expect("split");
    let (xz, xr, xh) = (
        ValueRef { node: sp, slot: 0 },
        ValueRef { node: sp, slot: 1 },
        ValueRef { node: sp, slot: 2 },
    );
    let hz = b.mm(h, uz);
    let hr = b.mm(h, ur);
    let pz = b.add(hz, xz);
    let pr = b.add(xr, hr);
    let z = b.sig(pz);
    let r = b.sig(pr);
    let rec = if reset_before {
        let rh = b.mul(h, r);
        b.mm(rh, uh)
    } else {
        let hu = b.mm(h, uh);
        let hub = b.add(hu, bh);
        b.mul(r, hub)
    };
    let xb = if reset_before { b.add(xh, bh) } else { xh };
    let ph = b.add(rec, xb);
    let cand = b.tanh(ph);
    let one = b.op(
        Op::constant(Tensor::from_f64_vec(DType::F32, &[], &[1.0]).expect("one")),
        &[],
    );
    let omz = b.op(Op::Sub {}, &[one, z]);
    let a = b.mul(cand, omz);
    // The broken cell keeps z⊙ĥ instead of z⊙h.
    let keep = if broken { b.mul(cand, z) } else { b.mul(h, z) };
    let h_new = b.add(a, keep);
    let y = b.op(Op::Identity {}, &[h_new]);
    b.g.set_outputs(vec![h_new, y]).expect("outputs");
    scan_graph(
        b,
        &[
            ("Wcat", vec![I, 3 * H]),
            ("Uz", vec![H, H]),
            ("Ur", vec![H, H]),
            ("Uh", vec![H, H]),
            ("bh", vec![1, H]),
        ],
        1,
    )
}

#[test]
fn gru_rule_fires_on_both_reset_forms() {
    for reset_before in [true, false] {
        let (g, data) = hand_gru(reset_before, false);
        raise_and_check(&g, &data, Some("gru"));
    }
}

#[test]
fn gru_rule_refuses_a_cell_that_mixes_the_wrong_terms() {
    let (g, data) = hand_gru(false, true);
    let raised = raise_and_check(&g, &data, None);
    let why = &raised.decisions[0].detail;
    assert!(why.contains("gru:") && why.contains("rnn:"), "{why}");
}

/// h' = relu(b + h·U + x·W) with a `[1, H]` bias, or with an extra `x·x`-like product
/// the rule cannot read.
fn hand_rnn(broken: bool) -> (Graph, Vec<Data>) {
    let (mut b, ins) = Body::new(1);
    let (h, x) = (ins[0], ins[1]);
    let w = b.outer("W", &[I, H]);
    let u = b.outer("U", &[H, H]);
    let bias = b.outer("b", &[1, H]);
    let hu = b.mm(h, u);
    let xw = b.mm(x, w);
    let s = b.add(hu, xw);
    let s = b.add(bias, s);
    let s = if broken { b.mul(s, h) } else { s };
    let h_new = b.op(Op::Relu {}, &[s]);
    let y = b.op(Op::Identity {}, &[h_new]);
    b.g.set_outputs(vec![h_new, y]).expect("outputs");
    scan_graph(
        b,
        &[("W", vec![I, H]), ("U", vec![H, H]), ("b", vec![1, H])],
        1,
    )
}

#[test]
fn rnn_rule_fires_and_refuses() {
    let (g, data) = hand_rnn(false);
    let raised = raise_and_check(&g, &data, Some("rnn"));
    assert_eq!(raised.decisions[0].detail, "RNN");
    let (g, data) = hand_rnn(true);
    let raised = raise_and_check(&g, &data, None);
    assert!(raised.decisions[0].detail.contains("not a linear function"));
}

#[test]
fn a_scan_that_is_no_cell_is_left_alone_with_a_reason() {
    // Three states: no rule applies.
    let (mut b, ins) = Body::new(3);
    let s0 = b.add(ins[0], ins[1]);
    let s1 = b.add(ins[1], ins[2]);
    let y = b.op(Op::Identity {}, &[s0]);
    b.g.set_outputs(vec![s0, s1, ins[2], y]).expect("outputs");
    let (g, data) = scan_graph(b, &[], 3);
    let raised = raise_and_check(&g, &data, None);
    assert!(raised.decisions[0].detail.contains("3 states"));
}
