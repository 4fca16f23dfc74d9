//! Finite-difference checks of every VJP rule, driven by the op registry.
//!
//! [`cases`] is a table: for each op with a rule, small f64 graphs that exercise it with
//! its attribute variants (broadcasting, optional inputs, attribute and input forms,
//! axes, every output of multi-output ops). Each graph's loss is Σₖ Σ(outₖ ⊙ Cₖ) for
//! fixed random Cₖ, so every element of every float output carries gradient. The pass's
//! gradient of each graph input is compared, tensor by tensor, with central differences:
//!
//! `max|g − fd| ≤ atol + rtol · max|fd|`, with h = 1e-5, atol = 1e-8, rtol = 1e-6.
//!
//! Why these: in f64 the central difference has truncation error h²·|f'''|/6 ≈ 2e-11·|f'''|
//! and rounding error ≈ ε·Σ|terms of the loss|/h ≈ 1e-11·Σ|terms|; inputs are kept where
//! |f'''| ≲ 100 (away from 0 for Log/Reciprocal/Div/Sqrt) and the graphs have tens of
//! elements, so both stay near 1e-9, an order of magnitude below atol. A wrong rule
//! (a factor, a sign, a missing term) is off by far more than 1e-8 + 1e-6·max|fd|.
//! Inputs are drawn away from kinks (Relu/Abs/Clip/HardSigmoid/ThresholdedRelu corners,
//! Max/Min/ReduceMax ties): at least 0.02 ≫ h from them; the harness also measures the
//! second difference |f(x+h) − 2f(x) + f(x−h)|/h and fails a case whose input sits on a
//! kink (it would mean the case, not the rule, is wrong).
//!
//! [`every_op_with_a_vjp_rule_has_a_finite_difference_case`] enumerates
//! `OpKind::ALL`: an op with a rule but no case here (and no pointer to a test in
//! `autodiff_fd.rs`, for the recurrent and control ops) fails by name.

use cellgraph::autodiff::{differentiability, grad, Differentiability};
use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::{DType, Graph, Op, OpKind, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// Step and tolerances of one comparison.
#[derive(Clone, Copy, Debug)]
struct Tol {
    h: f64,
    atol: f64,
    rtol: f64,
}

/// The default: see the module documentation.
const TOL: Tol = Tol {
    h: 1e-5,
    atol: 1e-8,
    rtol: 1e-6,
};

/// A second difference |f(x+h) − 2f(x) + f(x−h)| / h above this (|f''| > 1e3 at the
/// point) means the input sits on a kink of the function.
const KINK: f64 = 1e-2;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

/// How an input's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Dist {
    /// Uniform in `[lo, hi]`.
    U(f64, f64),
    /// Uniform in `[lo, hi]`, at least 0.03 from each of the listed kinks.
    Away(f64, f64, &'static [f64]),
    /// In `[-1.5, 1.5]`, at least 0.03 from every other `Distinct` value of the case
    /// (Max/Min/ReduceMax/ReduceMin: no ties, across inputs and broadcasting).
    Distinct,
}

/// Builds one case's graph: f64 inputs with their values, constants, op nodes.
struct B {
    g: Graph,
    inputs: Vec<Tensor>,
    rng: Rng,
    used: Vec<f64>,
    n: usize,
}

fn v0(node: cellgraph::ir::NodeId) -> ValueRef {
    ValueRef { node, slot: 0 }
}

fn t64(shape: &[usize], vals: &[f64]) -> Tensor {
    Tensor::from_f64_vec(DType::F64, shape, vals).unwrap()
}

fn shape_of(g: &Graph, v: ValueRef) -> Vec<usize> {
    g.value(v)
        .ty
        .dims()
        .expect("a tensor value")
        .iter()
        .map(|d| d.known().expect("a static dim") as usize)
        .collect()
}

impl B {
    fn new(seed: u64, opset: i64) -> B {
        let mut opsets = BTreeMap::new();
        opsets.insert(String::new(), opset);
        B {
            g: Graph::with_opsets("case", opsets),
            inputs: Vec::new(),
            rng: Rng::new(seed),
            used: Vec::new(),
            n: 0,
        }
    }

    fn name(&mut self, p: &str) -> String {
        self.n += 1;
        format!("{p}{}", self.n)
    }

    fn draw(&mut self, d: Dist) -> f64 {
        match d {
            Dist::U(lo, hi) => self.rng.uniform(lo, hi),
            Dist::Away(lo, hi, kinks) => loop {
                let v = self.rng.uniform(lo, hi);
                if kinks.iter().all(|k| (v - k).abs() >= 0.03) {
                    return v;
                }
            },
            Dist::Distinct => loop {
                let v = self.rng.uniform(-1.5, 1.5);
                if self.used.iter().all(|u| (v - u).abs() >= 0.03) {
                    self.used.push(v);
                    return v;
                }
            },
        }
    }

    /// A graph input (the gradient is taken with respect to every input).
    fn input(&mut self, shape: &[usize], d: Dist) -> ValueRef {
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| self.draw(d)).collect();
        let name = self.name("x");
        let dims: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
        let v = self
            .g
            .add_input(&name, ValueType::tensor(DType::F64, &dims))
            .unwrap();
        self.inputs.push(t64(shape, &vals));
        v
    }

    fn konst(&mut self, t: Tensor) -> ValueRef {
        let name = self.name("k");
        v0(self.g.add_node("", Op::constant(t), &[], &[&name]).unwrap())
    }

    fn ints(&mut self, v: &[i64]) -> ValueRef {
        self.konst(Tensor::vec_i64(v))
    }

    fn f64c(&mut self, shape: &[usize], vals: &[f64]) -> ValueRef {
        self.konst(t64(shape, vals))
    }

    fn bools(&mut self, shape: &[usize], vals: &[bool]) -> ValueRef {
        self.konst(Tensor::Bool(
            ArrayD::from_shape_vec(IxDyn(shape), vals.to_vec()).unwrap(),
        ))
    }

    /// A node with `nout` outputs.
    fn node(&mut self, op: Op, ins: &[Option<ValueRef>], nout: usize) -> Vec<ValueRef> {
        let names: Vec<String> = (0..nout).map(|_| self.name("v")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let id = self
            .g
            .add_node("", op, ins, &refs)
            .unwrap_or_else(|e| panic!("building the case: {e}"));
        (0..nout).map(|slot| ValueRef { node: id, slot }).collect()
    }

    /// A node with one output and every input given.
    fn op(&mut self, op: Op, ins: &[ValueRef]) -> ValueRef {
        let ins: Vec<Option<ValueRef>> = ins.iter().map(|&v| Some(v)).collect();
        self.node(op, &ins, 1)[0]
    }
}

type Build = Box<dyn Fn(&mut B) -> Vec<ValueRef>>;

/// One row of the table: the op it covers, what variant, the graph's opset, the
/// tolerances, and the builder (returning the outputs the loss reads).
struct Case {
    op: &'static str,
    what: String,
    opset: i64,
    tol: Tol,
    build: Build,
    /// A recorded disagreement with finite differences (a rule defect, reported): the
    /// case must keep failing until the rule is fixed, then the marker goes.
    known: Option<&'static str>,
}

fn case(op: &'static str, what: impl Into<String>, build: Build) -> Case {
    Case {
        op,
        what: what.into(),
        opset: 21,
        tol: TOL,
        build,
        known: None,
    }
}

fn at_opset(mut c: Case, opset: i64) -> Case {
    c.opset = opset;
    c
}

/// Records a case as a known disagreement (a rule defect, reported with `why`): it must
/// keep failing until the rule is fixed. (None is recorded now: the five defects found
/// by this suite, Dropout's bool training_mode, opset < 13 Softmax, noop reductions,
/// Clip's bounds and ties, are fixed and their cases are ordinary.)
#[allow(dead_code)]
fn known(mut c: Case, why: &'static str) -> Case {
    c.known = Some(why);
    c
}

const STD: Dist = Dist::U(-1.5, 1.5);
const POS: Dist = Dist::U(0.5, 1.5);
const NEG: Dist = Dist::U(-1.5, -0.5);
const AWAY0: Dist = Dist::Away(-1.5, 1.5, &[0.0]);

/// A unary op on a `[2, 3]` input drawn from `d`.
fn unary(op: &'static str, what: &str, d: Dist, make: fn() -> Op) -> Case {
    case(
        op,
        what,
        Box::new(move |b| {
            let x = b.input(&[2, 3], d);
            vec![b.op(make(), &[x])]
        }),
    )
}

/// A binary op on inputs of the given shapes and distributions.
fn binary(
    op: &'static str,
    sa: &'static [usize],
    da: Dist,
    sb: &'static [usize],
    db: Dist,
    make: fn() -> Op,
) -> Case {
    case(
        op,
        format!("{sa:?} with {sb:?}"),
        Box::new(move |b| {
            let x = b.input(sa, da);
            let y = b.input(sb, db);
            vec![b.op(make(), &[x, y])]
        }),
    )
}

/// A variadic op over inputs of the given shapes.
fn variadic(
    op: &'static str,
    shapes: &'static [&'static [usize]],
    d: Dist,
    make: fn() -> Op,
) -> Case {
    case(
        op,
        format!("inputs {shapes:?}"),
        Box::new(move |b| {
            let ins: Vec<ValueRef> = shapes.iter().map(|s| b.input(s, d)).collect();
            vec![b.op(make(), &ins)]
        }),
    )
}

fn reduce_op(name: &str, axes: Option<Vec<i64>>, keepdims: i64, noop: i64) -> Op {
    match name {
        "ReduceSum" => Op::ReduceSum {
            axes,
            keepdims,
            noop_with_empty_axes: noop,
        },
        "ReduceMean" => Op::ReduceMean {
            axes,
            keepdims,
            noop_with_empty_axes: noop,
        },
        "ReduceMax" => Op::ReduceMax {
            axes,
            keepdims,
            noop_with_empty_axes: noop,
        },
        _ => Op::ReduceMin {
            axes,
            keepdims,
            noop_with_empty_axes: noop,
        },
    }
}

/// The table.
fn cases() -> Vec<Case> {
    let mut c: Vec<Case> = Vec::new();

    // ---- elementwise binary, with broadcasting ----
    c.push(unary("Identity", "[2, 3]", STD, || Op::Identity {}));
    for (sa, sb) in [
        (&[2usize, 3][..], &[2usize, 3][..]),
        (&[2, 3], &[3]),
        (&[2, 1], &[1, 3]),
        (&[2, 3], &[]),
        (&[3], &[2, 2, 3]),
    ] {
        c.push(binary("Add", sa, STD, sb, STD, || Op::Add {}));
        c.push(binary("Sub", sa, STD, sb, STD, || Op::Sub {}));
        c.push(binary("Mul", sa, STD, sb, STD, || Op::Mul {}));
        c.push(binary("Div", sa, STD, sb, POS, || Op::Div {}));
    }
    c.push(binary("Div", &[2, 3], STD, &[2, 3], NEG, || Op::Div {}));
    // Pow: tensor exponents (base > 0 so ln(base) exists), a scalar exponent input,
    // a broadcast exponent, constant exponents (with negative bases for integer ones).
    c.push(binary("Pow", &[2, 3], POS, &[2, 3], STD, || Op::Pow {}));
    c.push(binary("Pow", &[2, 3], POS, &[], STD, || Op::Pow {}));
    c.push(binary("Pow", &[2, 3], POS, &[3], STD, || Op::Pow {}));
    c.push(binary("Pow", &[3], POS, &[2, 3], STD, || Op::Pow {}));
    for (what, e, d) in [
        ("constant exponent 3, any base", 3.0, STD),
        ("constant exponent 2, any base", 2.0, STD),
        ("constant exponent -1.5, base > 0", -1.5, POS),
        ("constant exponent 0.5, base > 0", 0.5, POS),
    ] {
        c.push(case(
            "Pow",
            what,
            Box::new(move |b| {
                let x = b.input(&[2, 3], d);
                let k = b.f64c(&[], &[e]);
                vec![b.op(Op::Pow {}, &[x, k])]
            }),
        ));
    }

    // ---- variadic: Sum, Mean, Max, Min with 1–3 inputs and broadcasting ----
    let shape_sets: [&'static [&'static [usize]]; 5] = [
        &[&[2, 3]],
        &[&[2, 3], &[2, 3]],
        &[&[2, 3], &[3]],
        &[&[2, 1], &[1, 3], &[]],
        &[&[2, 3], &[2, 3], &[2, 3]],
    ];
    for shapes in shape_sets {
        c.push(variadic("Sum", shapes, STD, || Op::Sum {}));
        c.push(variadic("Mean", shapes, STD, || Op::Mean {}));
        c.push(variadic("Max", shapes, Dist::Distinct, || Op::Max {}));
        c.push(variadic("Min", shapes, Dist::Distinct, || Op::Min {}));
    }

    // ---- Where: constant conditions, with broadcasting ----
    for (sc, sa, sb) in [
        (&[2usize, 3][..], &[2usize, 3][..], &[2usize, 3][..]),
        (&[2, 3], &[3], &[2, 1]),
        (&[2, 1], &[2, 3], &[]),
        (&[3], &[2, 3], &[2, 3]),
    ] {
        c.push(case(
            "Where",
            format!("cond {sc:?}, x {sa:?}, y {sb:?}"),
            Box::new(move |b| {
                let n: usize = sc.iter().product();
                let bits: Vec<bool> = (0..n).map(|i| i % 3 != 1).collect();
                let cond = b.bools(sc, &bits);
                let x = b.input(sa, STD);
                let y = b.input(sb, STD);
                vec![b.op(Op::Where {}, &[cond, x, y])]
            }),
        ));
    }
    c.push(case(
        "Where",
        "condition computed from an input (Greater), both sides read x",
        Box::new(|b| {
            let x = b.input(&[2, 3], AWAY0);
            let y = b.input(&[2, 3], STD);
            let z = b.f64c(&[], &[0.0]);
            let cond = b.op(Op::Greater {}, &[x, z]);
            let x2 = b.op(Op::Mul {}, &[x, x]);
            vec![b.op(Op::Where {}, &[cond, x2, y])]
        }),
    ));

    // ---- unary maths ----
    c.push(unary("Neg", "[2, 3]", STD, || Op::Neg {}));
    c.push(unary(
        "Abs",
        "both signs, away from 0",
        AWAY0,
        || Op::Abs {},
    ));
    c.push(unary("Exp", "[2, 3]", STD, || Op::Exp {}));
    c.push(unary("Log", "x in [0.5, 1.5]", POS, || Op::Log {}));
    c.push(unary("Sqrt", "x in [0.5, 1.5]", POS, || Op::Sqrt {}));
    c.push(unary("Reciprocal", "x > 0", POS, || Op::Reciprocal {}));
    c.push(unary("Reciprocal", "x < 0", NEG, || Op::Reciprocal {}));

    // ---- activations, default and non-default parameters ----
    c.push(unary("Sigmoid", "[2, 3]", Dist::U(-3.0, 3.0), || {
        Op::Sigmoid {}
    }));
    c.push(unary("Tanh", "[2, 3]", Dist::U(-2.0, 2.0), || Op::Tanh {}));
    c.push(unary("Relu", "both signs", AWAY0, || Op::Relu {}));
    c.push(unary("LeakyRelu", "alpha 0.01 (default)", AWAY0, || {
        Op::LeakyRelu { alpha: 0.01 }
    }));
    c.push(unary("LeakyRelu", "alpha 0.3", AWAY0, || Op::LeakyRelu {
        alpha: 0.3,
    }));
    c.push(unary("LeakyRelu", "alpha -0.7", AWAY0, || Op::LeakyRelu {
        alpha: -0.7,
    }));
    c.push(unary(
        "ThresholdedRelu",
        "alpha 1 (default)",
        Dist::Away(-2.0, 2.0, &[1.0]),
        || Op::ThresholdedRelu { alpha: 1.0 },
    ));
    c.push(unary(
        "ThresholdedRelu",
        "alpha 0.4",
        Dist::Away(-1.0, 1.5, &[0.4]),
        || Op::ThresholdedRelu { alpha: 0.4 },
    ));
    c.push(unary("Elu", "alpha 1 (default)", AWAY0, || Op::Elu {
        alpha: 1.0,
    }));
    c.push(unary("Elu", "alpha 0.7", AWAY0, || Op::Elu { alpha: 0.7 }));
    c.push(unary(
        "Elu",
        "alpha 2.5",
        Dist::Away(-2.5, 1.0, &[0.0]),
        || Op::Elu { alpha: 2.5 },
    ));
    c.push(unary("Softsign", "both signs", AWAY0, || Op::Softsign {}));
    c.push(unary("Softplus", "[2, 3]", Dist::U(-3.0, 3.0), || {
        Op::Softplus {}
    }));
    c.push(unary(
        "HardSigmoid",
        "alpha 0.2, beta 0.5 (default): all three pieces",
        Dist::Away(-3.5, 3.5, &[-2.5, 2.5]),
        || Op::HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
    ));
    c.push(unary(
        "HardSigmoid",
        "alpha 0.5, beta 0.3",
        Dist::Away(-1.5, 2.0, &[-0.6, 1.4]),
        || Op::HardSigmoid {
            alpha: 0.5,
            beta: 0.3,
        },
    ));
    // Clip: attribute form (opset < 11) and input form, bounds given or omitted.
    const CLIP: Dist = Dist::Away(-1.5, 1.5, &[-0.5, 0.6]);
    for (what, min, max) in [
        ("attributes min -0.5, max 0.6", Some(-0.5f32), Some(0.6f32)),
        ("attribute min -0.5 only", Some(-0.5), None),
        ("attribute max 0.6 only", None, Some(0.6)),
        ("no bounds", None, None),
    ] {
        c.push(at_opset(
            case(
                "Clip",
                what,
                Box::new(move |b| {
                    let x = b.input(&[2, 3], CLIP);
                    vec![b.op(Op::Clip { min, max }, &[x])]
                }),
            ),
            10,
        ));
    }
    for (what, min, max) in [
        ("inputs min -0.5, max 0.6", true, true),
        ("input min only (max omitted)", true, false),
        ("input max only (min omitted)", false, true),
        ("both bound inputs omitted", false, false),
    ] {
        c.push(case(
            "Clip",
            what,
            Box::new(move |b| {
                let x = b.input(&[2, 3], CLIP);
                let lo = min.then(|| b.f64c(&[], &[-0.5]));
                let hi = max.then(|| b.f64c(&[], &[0.6]));
                vec![
                    b.node(
                        Op::Clip {
                            min: None,
                            max: None,
                        },
                        &[Some(x), lo, hi],
                        1,
                    )[0],
                ]
            }),
        ));
    }

    // Differentiable bounds: d/dmin sums g where x < min, d/dmax where x > max (and
    // every element when min > max, where y = max).
    for (what, min, max, dx) in [
        (
            "min and max as differentiable graph inputs",
            Some(-0.5),
            Some(0.6),
            CLIP,
        ),
        ("min a graph input, max omitted", Some(-0.5), None, CLIP),
        ("max a graph input, min omitted", None, Some(0.6), CLIP),
        (
            "crossed bounds min 0.6 > max -0.5 (y = max everywhere)",
            Some(0.6),
            Some(-0.5),
            CLIP,
        ),
    ] {
        c.push(case(
            "Clip",
            what,
            Box::new(move |b| {
                let x = b.input(&[2, 3], dx);
                let lo = min.map(|m| b.input(&[], Dist::U(m, m)));
                let hi = max.map(|m| b.input(&[], Dist::U(m, m)));
                vec![
                    b.node(
                        Op::Clip {
                            min: None,
                            max: None,
                        },
                        &[Some(x), lo, hi],
                        1,
                    )[0],
                ]
            }),
        ));
    }
    c.push(case(
        "Clip",
        "min a graph input, max a constant",
        Box::new(|b| {
            let x = b.input(&[2, 3], CLIP);
            let lo = b.input(&[], Dist::U(-0.5, -0.5));
            let hi = b.f64c(&[], &[0.6]);
            vec![b.op(
                Op::Clip {
                    min: None,
                    max: None,
                },
                &[x, lo, hi],
            )]
        }),
    ));

    // ---- Cast, CastLike ----
    c.push(unary("Cast", "f64 to f64", STD, || Op::Cast {
        to: 11,
        saturate: None,
        round_mode: None,
    }));
    // Through f32 and back: the function is linear, so a large step has no truncation
    // error; the f32 rounding (≈ 6e-8·|x|) over 2h = 0.02 bounds the error by ≈ 1e-5.
    let mut through_f32 = case(
        "Cast",
        "f64 to f32 and back (h = 1e-2, atol 1e-4)",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let f = b.op(
                Op::Cast {
                    to: 1,
                    saturate: None,
                    round_mode: None,
                },
                &[x],
            );
            vec![b.op(
                Op::Cast {
                    to: 11,
                    saturate: None,
                    round_mode: None,
                },
                &[f],
            )]
        }),
    );
    through_f32.tol = Tol {
        h: 1e-2,
        atol: 1e-4,
        rtol: 0.0,
    };
    c.push(through_f32);
    c.push(case(
        "CastLike",
        "like an f64 graph input (whose gradient is zero)",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let like = b.input(&[2], STD);
            vec![b.op(
                Op::CastLike {
                    saturate: None,
                    round_mode: None,
                },
                &[x, like],
            )]
        }),
    ));
    let mut castlike_f32 = case(
        "CastLike",
        "like an f32 constant, then back to f64 (h = 1e-2, atol 1e-4)",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let like = b.konst(Tensor::scalar_f32(0.0));
            let f = b.op(
                Op::CastLike {
                    saturate: None,
                    round_mode: None,
                },
                &[x, like],
            );
            vec![b.op(
                Op::Cast {
                    to: 11,
                    saturate: None,
                    round_mode: None,
                },
                &[f],
            )]
        }),
    );
    castlike_f32.tol = through_f32_tol();
    c.push(castlike_f32);

    // ---- Dropout (inference forms; the IR has no fixed-mask training form) ----
    c.push(case(
        "Dropout",
        "no ratio, no training_mode",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            vec![b.op(
                Op::Dropout {
                    seed: None,
                    ratio: None,
                },
                &[x],
            )]
        }),
    ));
    c.push(at_opset(
        case(
            "Dropout",
            "ratio attribute 0.3 (opset 10), mask output too",
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                vec![
                    b.node(
                        Op::Dropout {
                            seed: None,
                            ratio: Some(0.3),
                        },
                        &[Some(x)],
                        2,
                    )[0],
                ]
            }),
        ),
        10,
    ));
    c.push(case(
        "Dropout",
        "ratio input 0.3, training_mode omitted",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let r = b.f64c(&[], &[0.3]);
            vec![b.op(
                Op::Dropout {
                    seed: Some(7),
                    ratio: None,
                },
                &[x, r],
            )]
        }),
    ));
    c.push(case(
        "Dropout",
        "ratio input 0.3, training_mode a constant false",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let r = b.f64c(&[], &[0.3]);
            let t = b.bools(&[], &[false]);
            vec![b.op(
                Op::Dropout {
                    seed: None,
                    ratio: None,
                },
                &[x, r, t],
            )]
        }),
    ));
    c.push(case(
        "Dropout",
        "training_mode a constant true, ratio input 0 (the identity), mask output too",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let r = b.f64c(&[], &[0.0]);
            let t = b.bools(&[], &[true]);
            vec![
                b.node(
                    Op::Dropout {
                        seed: None,
                        ratio: None,
                    },
                    &[Some(x), Some(r), Some(t)],
                    2,
                )[0],
            ]
        }),
    ));

    // ---- MatMul: plain, batched, broadcast batch axes ----
    for (sa, sb) in [
        (&[2usize, 3][..], &[3usize, 4][..]),
        (&[2, 2, 3], &[2, 3, 2]),
        (&[2, 2, 3], &[3, 2]),
        (&[2, 2, 3], &[1, 3, 2]),
        (&[1, 2, 3], &[2, 3, 2]),
        (&[2, 1, 2, 3], &[3, 3, 2]),
    ] {
        c.push(binary("MatMul", sa, STD, sb, STD, || Op::MatMul {}));
    }

    // ---- Gemm: transposes, alpha, beta, C omitted / full / broadcast ----
    for ta in [0i64, 1] {
        for tb in [0i64, 1] {
            for (alpha, beta) in [(1.0f32, 1.0f32), (0.7, -1.3)] {
                for cs in [None, Some(&[2usize, 4][..]), Some(&[4][..])] {
                    c.push(gemm_case(ta, tb, alpha, beta, cs));
                }
            }
        }
    }
    for cs in [&[2usize, 1][..], &[1, 4], &[]] {
        c.push(gemm_case(0, 0, 0.5, 2.0, Some(cs)));
    }

    // ---- Softmax, LogSoftmax: axes, default axis, the opset < 13 flattening ----
    for log in [false, true] {
        let name = if log { "LogSoftmax" } else { "Softmax" };
        let mk = move |axis: Option<i64>| {
            if log {
                Op::LogSoftmax { axis }
            } else {
                Op::Softmax { axis }
            }
        };
        for (shape, axis, opset) in [
            (&[2usize, 3][..], Some(0i64), 21i64),
            (&[2, 3], Some(1), 21),
            (&[2, 3], None, 21),
            (&[2, 3, 2], Some(1), 21),
            (&[2, 3, 2], Some(-1), 21),
            (&[2, 3], None, 11),
            (&[2, 3, 2], Some(2), 11),
            (&[2, 3, 2], None, 11),
            (&[2, 3, 2], Some(1), 11),
            (&[2, 3, 2], Some(0), 11),
            (&[2, 3, 2], Some(-2), 11),
            (&[2, 2, 3], Some(1), 9),
            (&[2, 3, 2], None, 12),
        ] {
            c.push(at_opset(
                case(
                    name,
                    format!("{shape:?}, axis {axis:?}, opset {opset}"),
                    Box::new(move |b| {
                        let x = b.input(shape, Dist::U(-2.0, 2.0));
                        vec![b.op(mk(axis), &[x])]
                    }),
                ),
                opset,
            ));
        }
    }

    // ---- shape ops ----
    for target in [&[3i64, 2][..], &[-1, 2], &[0, 3, 1], &[6]] {
        c.push(case(
            "Reshape",
            format!("[2, 3] to {target:?}"),
            Box::new(move |b| {
                let x = b.input(&[2, 3], STD);
                let s = b.ints(target);
                vec![b.op(Op::Reshape { allowzero: 0 }, &[x, s])]
            }),
        ));
    }
    for axis in [0i64, 1, 2, -1] {
        c.push(case(
            "Flatten",
            format!("[2, 3, 2] at axis {axis}"),
            Box::new(move |b| {
                let x = b.input(&[2, 3, 2], STD);
                vec![b.op(Op::Flatten { axis }, &[x])]
            }),
        ));
    }
    c.push(at_opset(
        case(
            "Squeeze",
            "axes attribute [1] (opset 11)",
            Box::new(|b| {
                let x = b.input(&[2, 1, 3], STD);
                vec![b.op(
                    Op::Squeeze {
                        axes: Some(vec![1]),
                    },
                    &[x],
                )]
            }),
        ),
        11,
    ));
    c.push(case(
        "Squeeze",
        "axes input [-1, 1]",
        Box::new(|b| {
            let x = b.input(&[2, 1, 3, 1], STD);
            let a = b.ints(&[-1, 1]);
            vec![b.op(Op::Squeeze { axes: None }, &[x, a])]
        }),
    ));
    c.push(case(
        "Squeeze",
        "no axes: every size-1 axis",
        Box::new(|b| {
            let x = b.input(&[1, 2, 1, 3], STD);
            vec![b.op(Op::Squeeze { axes: None }, &[x])]
        }),
    ));
    c.push(at_opset(
        case(
            "Unsqueeze",
            "axes attribute [0, 3] (opset 11)",
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                vec![b.op(
                    Op::Unsqueeze {
                        axes: Some(vec![0, 3]),
                    },
                    &[x],
                )]
            }),
        ),
        11,
    ));
    c.push(case(
        "Unsqueeze",
        "axes input [1, -1]",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            let a = b.ints(&[1, -1]);
            vec![b.op(Op::Unsqueeze { axes: None }, &[x, a])]
        }),
    ));
    for (from, to) in [
        (&[3usize][..], &[2i64, 3][..]),
        (&[2, 1], &[2, 2, 3]),
        (&[2, 3], &[1, 3]),
        (&[1, 3, 1], &[2, 3, 2]),
    ] {
        c.push(case(
            "Expand",
            format!("{from:?} to {to:?}"),
            Box::new(move |b| {
                let x = b.input(from, STD);
                let s = b.ints(to);
                vec![b.op(Op::Expand {}, &[x, s])]
            }),
        ));
    }
    for perm in [Some(vec![1i64, 0, 2]), Some(vec![2, 0, 1]), None] {
        c.push(case(
            "Transpose",
            format!("[2, 3, 2], perm {perm:?}"),
            Box::new(move |b| {
                let x = b.input(&[2, 3, 2], STD);
                vec![b.op(Op::Transpose { perm: perm.clone() }, &[x])]
            }),
        ));
    }
    const CONCATS: &[(i64, &[&[usize]])] = &[
        (0, &[&[2, 3], &[1, 3]]),
        (1, &[&[2, 3], &[2, 1], &[2, 2]]),
        (-1, &[&[2, 2, 1], &[2, 2, 3]]),
        (0, &[&[2, 3]]),
    ];
    for &(axis, shapes) in CONCATS {
        c.push(case(
            "Concat",
            format!("axis {axis}, {shapes:?}"),
            Box::new(move |b| {
                let ins: Vec<ValueRef> = shapes.iter().map(|s| b.input(s, STD)).collect();
                vec![b.op(Op::Concat { axis }, &ins)]
            }),
        ));
    }
    // Split: every output read by the loss.
    c.push(case(
        "Split",
        "split input [1, 3, 2] on axis 1",
        Box::new(|b| {
            let x = b.input(&[2, 6], STD);
            let s = b.ints(&[1, 3, 2]);
            b.node(
                Op::Split {
                    axis: 1,
                    split: None,
                    num_outputs: None,
                },
                &[Some(x), Some(s)],
                3,
            )
        }),
    ));
    c.push(at_opset(
        case(
            "Split",
            "split attribute [2, 1] on axis 0 (opset 11)",
            Box::new(|b| {
                let x = b.input(&[3, 2], STD);
                b.node(
                    Op::Split {
                        axis: 0,
                        split: Some(vec![2, 1]),
                        num_outputs: None,
                    },
                    &[Some(x)],
                    2,
                )
            }),
        ),
        11,
    ));
    c.push(case(
        "Split",
        "num_outputs 3 on axis -1",
        Box::new(|b| {
            let x = b.input(&[2, 2, 6], STD);
            b.node(
                Op::Split {
                    axis: -1,
                    split: None,
                    num_outputs: Some(3),
                },
                &[Some(x)],
                3,
            )
        }),
    ));
    c.push(at_opset(
        case(
            "Split",
            "equal parts by output count (opset 13)",
            Box::new(|b| {
                let x = b.input(&[4, 3], STD);
                b.node(
                    Op::Split {
                        axis: 0,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(x)],
                    2,
                )
            }),
        ),
        13,
    ));
    c.push(case(
        "Split",
        "only the second of two outputs read",
        Box::new(|b| {
            let x = b.input(&[2, 4], STD);
            let s = b.ints(&[1, 3]);
            vec![
                b.node(
                    Op::Split {
                        axis: 1,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(x), Some(s)],
                    2,
                )[1],
            ]
        }),
    ));
    type SliceSpec = (
        &'static [i64],
        &'static [i64],
        Option<&'static [i64]>,
        Option<&'static [i64]>,
    );
    let slices: [(&str, SliceSpec); 6] = [
        ("starts/ends only (axes omitted)", (&[1], &[3], None, None)),
        ("axes [1], negative start", (&[-2], &[4], Some(&[1]), None)),
        (
            "two axes, end past the size",
            (&[0, 1], &[1, 100], Some(&[0, 1]), None),
        ),
        ("steps 1 given", (&[1], &[3], Some(&[-1]), Some(&[1]))),
        (
            "whole axis reversed (step -1)",
            (&[-1], &[i64::MIN], Some(&[1]), Some(&[-1])),
        ),
        ("empty range", (&[2], &[2], Some(&[0]), None)),
    ];
    for (what, (st, en, ax, sp)) in slices {
        c.push(case(
            "Slice",
            format!("[3, 4]: {what}"),
            Box::new(move |b| {
                let x = b.input(&[3, 4], STD);
                let st = b.ints(st);
                let en = b.ints(en);
                let ax = ax.map(|a| b.ints(a));
                let sp = sp.map(|s| b.ints(s));
                let mut ins = vec![Some(x), Some(st), Some(en), ax, sp];
                while ins.last().is_some_and(Option::is_none) {
                    ins.pop();
                }
                vec![b.node(Op::Slice {}, &ins, 1)[0]]
            }),
        ));
    }
    for (what, axis, idx) in [
        (
            "axis 0, indices [2, 0, 2] (repeated)",
            0i64,
            Tensor::vec_i64(&[2, 0, 2]),
        ),
        (
            "axis 0, 2-D indices with a negative one",
            0,
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0, -1, 1, 1]).unwrap()),
        ),
        (
            "axis 0, scalar index",
            0,
            Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 1)),
        ),
        (
            "axis 1, scalar index",
            1,
            Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 2)),
        ),
        (
            "axis -1, scalar negative index, i32",
            -1,
            Tensor::I32(ArrayD::from_elem(IxDyn(&[]), -3)),
        ),
    ] {
        c.push(case(
            "Gather",
            format!("[3, 4]: {what}"),
            Box::new(move |b| {
                let x = b.input(&[3, 4], STD);
                let i = b.konst(idx.clone());
                vec![b.op(Op::Gather { axis }, &[x, i])]
            }),
        ));
    }
    for reps in [&[2i64, 1][..], &[1, 3], &[2, 2]] {
        c.push(case(
            "Tile",
            format!("[2, 3] by {reps:?}"),
            Box::new(move |b| {
                let x = b.input(&[2, 3], STD);
                let r = b.ints(reps);
                vec![b.op(Op::Tile {}, &[x, r])]
            }),
        ));
    }
    c.push(case(
        "Tile",
        "[1, 2, 2] by [3, 1, 2]",
        Box::new(|b| {
            let x = b.input(&[1, 2, 2], STD);
            let r = b.ints(&[3, 1, 2]);
            vec![b.op(Op::Tile {}, &[x, r])]
        }),
    ));
    const EINSUMS: &[(&str, &[&[usize]])] = &[
        ("ij,jk->ik", &[&[2, 3], &[3, 2]]),
        ("bij,bjk->bik", &[&[2, 2, 3], &[2, 3, 2]]),
        ("ij->ji", &[&[2, 3]]),
        ("ij->i", &[&[2, 3]]),
        ("ij,ij->", &[&[2, 3], &[2, 3]]),
        ("ij,jk", &[&[2, 3], &[3, 2]]),
        ("ij,ij,jk->k", &[&[2, 3], &[2, 3], &[3, 2]]),
        ("i,j->ij", &[&[2], &[3]]),
    ];
    for &(eq, shapes) in EINSUMS {
        c.push(case(
            "Einsum",
            format!("{eq:?} on {shapes:?}"),
            Box::new(move |b| {
                let ins: Vec<ValueRef> = shapes.iter().map(|s| b.input(s, STD)).collect();
                vec![b.op(
                    Op::Einsum {
                        equation: eq.into(),
                    },
                    &ins,
                )]
            }),
        ));
    }

    // ---- reductions: axes given / omitted / empty, keepdims, attribute (opset 11)
    // and input (opset 18+) forms ----
    for name in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"] {
        let d = if matches!(name, "ReduceMax" | "ReduceMin") {
            Dist::Distinct
        } else {
            STD
        };
        for (axes, keep) in [
            (Some(vec![1i64]), 1i64),
            (Some(vec![0, 2]), 0),
            (Some(vec![-1]), 0),
            (None, 1),
            (None, 0),
        ] {
            c.push(at_opset(
                case(
                    name_static(name),
                    format!("axes attribute {axes:?}, keepdims {keep} (opset 11)"),
                    Box::new(move |b| {
                        let x = b.input(&[2, 3, 2], d);
                        vec![b.op(reduce_op(name, axes.clone(), keep, 0), &[x])]
                    }),
                ),
                11,
            ));
        }
        for (axes, keep, noop) in [
            (Some(&[1i64][..]), 0i64, 0i64),
            (Some(&[0, -1]), 1, 0),
            (Some(&[]), 0, 0),
            (None, 1, 0),
            (None, 1, 1),
            (None, 0, 1),
        ] {
            c.push(case(
                name_static(name),
                format!("axes input {axes:?}, keepdims {keep}, noop_with_empty_axes {noop}"),
                Box::new(move |b| {
                    let x = b.input(&[2, 3, 2], d);
                    let a = axes.map(|a| b.ints(a));
                    vec![b.node(reduce_op(name, None, keep, noop), &[Some(x), a], 1)[0]]
                }),
            ));
        }
        // noop_with_empty_axes with axes given: an ordinary reduction.
        c.push(case(
            name_static(name),
            "axes input [1], keepdims 0, noop_with_empty_axes 1",
            Box::new(move |b| {
                let x = b.input(&[2, 3, 2], d);
                let a = b.ints(&[1]);
                vec![b.op(reduce_op(name, None, 0, 1), &[x, a])]
            }),
        ));
    }

    // Ties of identical values: smooth functions (max(x, x) = x), so finite differences
    // are exact there, and the tied copies' shares must add up to the gradient.
    c.push(case(
        "Max",
        "Max(x, x)",
        Box::new(|b| {
            let x = b.input(&[2, 3], STD);
            vec![b.op(Op::Max {}, &[x, x])]
        }),
    ));
    c.push(case(
        "Min",
        "Min(x, y, x): x tied with itself where it is the minimum",
        Box::new(|b| {
            let x = b.input(&[2, 3], Dist::Distinct);
            let y = b.input(&[2, 3], Dist::Distinct);
            vec![b.op(Op::Min {}, &[x, y, x])]
        }),
    ));
    c.push(case(
        "Max",
        "Max(expand(x [2, 1]) to [2, 3], x): tied everywhere, through broadcasting",
        Box::new(|b| {
            let x = b.input(&[2, 1], STD);
            let s = b.ints(&[2, 3]);
            let e = b.op(Op::Expand {}, &[x, s]);
            vec![b.op(Op::Max {}, &[e, x])]
        }),
    ));
    c.push(case(
        "ReduceMax",
        "ReduceMax over axis 1 of x [2, 1] expanded to [2, 3]",
        Box::new(|b| {
            let x = b.input(&[2, 1], STD);
            let s = b.ints(&[2, 3]);
            let e = b.op(Op::Expand {}, &[x, s]);
            let a = b.ints(&[1]);
            vec![b.op(reduce_op("ReduceMax", None, 0, 0), &[e, a])]
        }),
    ));
    c.push(at_opset(
        case(
            "ReduceMin",
            "ReduceMin over axis 1 (attribute, keepdims 1) of Concat(x, y, x) (opset 11)",
            Box::new(|b| {
                let x = b.input(&[2, 2], Dist::Distinct);
                let y = b.input(&[2, 1], Dist::Distinct);
                let cat = b.op(Op::Concat { axis: 1 }, &[x, y, x]);
                vec![b.op(reduce_op("ReduceMin", Some(vec![1]), 1, 0), &[cat])]
            }),
        ),
        11,
    ));

    // ---- BatchNormalization (inference form: the rule refuses training mode) ----
    for (shape, eps) in [
        (&[3usize, 2][..], 1e-5f32),
        (&[2, 3, 2][..], 1e-5),
        (&[2, 2, 2, 2][..], 0.1),
    ] {
        c.push(case(
            "BatchNormalization",
            format!("x {shape:?}, epsilon {eps}, every input a parameter"),
            Box::new(move |b| {
                let ch = shape[1];
                let x = b.input(shape, STD);
                let scale = b.input(&[ch], STD);
                let bias = b.input(&[ch], STD);
                let mean = b.input(&[ch], Dist::U(-0.5, 0.5));
                let var = b.input(&[ch], POS);
                vec![b.op(
                    Op::BatchNormalization {
                        epsilon: eps,
                        momentum: 0.9,
                        training_mode: 0,
                    },
                    &[x, scale, bias, mean, var],
                )]
            }),
        ));
    }

    c
}

fn through_f32_tol() -> Tol {
    Tol {
        h: 1e-2,
        atol: 1e-4,
        rtol: 0.0,
    }
}

fn name_static(name: &str) -> &'static str {
    ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"]
        .into_iter()
        .find(|n| *n == name)
        .expect("a reduction")
}

fn gemm_case(ta: i64, tb: i64, alpha: f32, beta: f32, cs: Option<&'static [usize]>) -> Case {
    case(
        "Gemm",
        format!("transA {ta}, transB {tb}, alpha {alpha}, beta {beta}, C {cs:?}"),
        Box::new(move |b| {
            let sa: &[usize] = if ta != 0 { &[3, 2] } else { &[2, 3] };
            let sb: &[usize] = if tb != 0 { &[4, 3] } else { &[3, 4] };
            let a = b.input(sa, STD);
            let bb = b.input(sb, STD);
            let mut ins = vec![a, bb];
            if let Some(s) = cs {
                ins.push(b.input(s, STD));
            }
            vec![b.op(
                Op::Gemm {
                    alpha,
                    beta,
                    transA: ta,
                    transB: tb,
                },
                &ins,
            )]
        }),
    )
}

/// Ops with a rule whose finite-difference checks live in `autodiff_fd.rs`: the op and
/// the test function there (checked to exist).
const ELSEWHERE: &[(&str, &str)] = &[
    ("Scan", "recurrent_loops_match_finite_differences"),
    ("Loop", "loop_gradients_match_finite_differences"),
    (
        "If",
        "if_gradients_match_finite_differences_in_both_branches",
    ),
    ("LSTM", "fused_backward_matches_finite_differences"),
    ("GRU", "fused_backward_matches_finite_differences"),
    ("RNN", "fused_backward_matches_finite_differences"),
    (
        "LSTMMasked",
        "masked_fused_backward_matches_finite_differences",
    ),
    (
        "GRUMasked",
        "masked_fused_backward_matches_finite_differences",
    ),
    (
        "RNNMasked",
        "masked_fused_backward_matches_finite_differences",
    ),
];

fn run(plan: &mut impl Plan, inputs: &[Tensor]) -> Vec<Tensor> {
    plan.run(inputs.iter().cloned().map(Data::Tensor).collect())
        .unwrap_or_else(|e| panic!("run: {e}"))
        .into_iter()
        .map(|d| d.into_tensor().unwrap())
        .collect()
}

/// What one case's check measured.
#[derive(Debug, Default)]
struct Report {
    /// Per graph input: (max |g − fd|, max |fd|, bound).
    tensors: Vec<(f64, f64, f64)>,
    /// Elements compared.
    elements: usize,
}

/// Builds the case with `seed`, adds the loss, differentiates with respect to every
/// input, and compares with central differences. Returns the failures as text.
fn check_case(c: &Case, seed: u64) -> Result<Report, String> {
    let mut b = B::new(seed, c.opset);
    let outs = (c.build)(&mut b);
    let B {
        mut g,
        inputs,
        mut rng,
        ..
    } = b;
    // The op under test is in the graph.
    let found = g
        .node_ids()
        .into_iter()
        .any(|n| g.node(n).op().is_some_and(|o| o.name() == c.op));
    if !found {
        return Err(format!("the graph has no {} node", c.op));
    }
    // loss = Σ_k Σ(out_k ⊙ C_k) over the float outputs.
    let mut sums = Vec::new();
    for (k, &o) in outs.iter().enumerate() {
        if !g.value(o).ty.dtype().is_some_and(DType::is_float) {
            continue;
        }
        let shape = shape_of(&g, o);
        let n: usize = shape.iter().product();
        let cv: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let cc = v0(g
            .add_node("", Op::constant(t64(&shape, &cv)), &[], &[&format!("C{k}")])
            .unwrap());
        let p = v0(g
            .add_node("", Op::Mul {}, &[Some(o), Some(cc)], &[&format!("oc{k}")])
            .unwrap());
        sums.push(v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(p)],
                &[&format!("s{k}")],
            )
            .unwrap()));
    }
    let ins: Vec<Option<ValueRef>> = sums.iter().map(|&s| Some(s)).collect();
    let loss = v0(g.add_node("", Op::Sum {}, &ins, &["loss"]).unwrap());
    g.set_outputs(vec![loss]).unwrap();

    let wrt = g.input_values();
    let dg = grad(&g, loss, &wrt).map_err(|e| format!("grad: {e}"))?;
    cellgraph::ir::verify(&dg).map_err(|e| format!("verify: {e}"))?;
    let backend = CpuBackend::new(Recurrent::Fused);
    let got = run(&mut backend.compile(&dg).unwrap(), &inputs);
    if got.len() != 1 + inputs.len() {
        return Err(format!("{} outputs for {} inputs", got.len(), inputs.len()));
    }
    let mut plan = backend.compile(&g).unwrap();
    let mut f = |xs: &[Tensor]| run(&mut plan, xs)[0].to_f64_vec()[0];
    let f0 = f(&inputs);
    let h = c.tol.h;
    let mut errs = Vec::new();
    let mut rep = Report::default();
    for (k, x) in inputs.iter().enumerate() {
        let gk = &got[1 + k];
        if gk.shape() != x.shape() || gk.dtype() != DType::F64 {
            errs.push(format!(
                "input {k}: gradient {:?} {:?}, input {:?} f64",
                gk.dtype(),
                gk.shape(),
                x.shape()
            ));
            continue;
        }
        let gv = gk.to_f64_vec();
        let base = x.to_f64_vec();
        let mut fd = Vec::with_capacity(base.len());
        for i in 0..base.len() {
            let mut xs = inputs.to_vec();
            let mut p = base.clone();
            p[i] += h;
            xs[k] = t64(x.shape(), &p);
            let fp = f(&xs);
            p[i] = base[i] - h;
            xs[k] = t64(x.shape(), &p);
            let fm = f(&xs);
            let second = (fp - 2.0 * f0 + fm).abs() / h;
            if second > KINK {
                errs.push(format!(
                    "input {k}[{i}] = {} sits on a kink (second difference {second:e})",
                    base[i]
                ));
            }
            fd.push((fp - fm) / (2.0 * h));
        }
        let (mut worst, mut at) = (0.0f64, 0);
        for i in 0..fd.len() {
            let e = (gv[i] - fd[i]).abs();
            if e > worst || e.is_nan() {
                (worst, at) = (e, i);
            }
        }
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let bound = c.tol.atol + c.tol.rtol * scale;
        rep.tensors.push((worst, scale, bound));
        rep.elements += fd.len();
        if worst.is_nan() || worst > bound {
            errs.push(format!(
                "input {k} {:?}: max|g − fd| = {worst:.3e} > {bound:.3e} (at [{at}]: g {:.9}, fd {:.9}; g {gv:?}, fd {fd:?})",
                x.shape(),
                gv[at],
                fd[at]
            ));
        }
    }
    if errs.is_empty() {
        Ok(rep)
    } else {
        Err(errs.join("\n    "))
    }
}

/// Every case of the table against central differences.
#[test]
fn registry_cases_match_finite_differences() {
    let cases = cases();
    let mut failures = Vec::new();
    let mut recorded = Vec::new();
    let mut worst_ratio = 0.0f64;
    let mut elements = 0;
    for (i, c) in cases.iter().enumerate() {
        match (check_case(c, 1000 + i as u64), c.known) {
            (Ok(r), None) => {
                elements += r.elements;
                for (e, _, b) in r.tensors {
                    worst_ratio = worst_ratio.max(e / b);
                }
            }
            (Err(e), None) => failures.push(format!("{} ({}): {e}", c.op, c.what)),
            (Err(e), Some(why)) => {
                let first = e.lines().next().unwrap_or_default().chars().take(160);
                recorded.push(format!(
                    "{} ({}): {why}\n      {}",
                    c.op,
                    c.what,
                    first.collect::<String>()
                ))
            }
            (Ok(_), Some(why)) => failures.push(format!(
                "{} ({}): recorded as disagreeing ({why}) but agrees now: drop the marker",
                c.op, c.what
            )),
        }
    }
    eprintln!(
        "{} cases, {elements} elements; worst max|g − fd| / bound = {worst_ratio:.3}",
        cases.len()
    );
    eprintln!(
        "{} recorded disagreements (rule defects):\n  {}",
        recorded.len(),
        recorded.join("\n  ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree with finite differences:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random cases of the table on random inputs (the distributions keep them off
    /// kinks and ties whatever the seed).
    #[test]
    fn registry_cases_match_finite_differences_on_random_inputs(pick in any::<usize>(), seed in any::<u64>()) {
        let cases = cases();
        let c = &cases[pick % cases.len()];
        prop_assume!(c.known.is_none());
        if let Err(e) = check_case(c, seed) {
            prop_assert!(false, "{} ({}), seed {seed}: {e}", c.op, c.what);
        }
    }
}

/// The registry: every op with a VJP rule has a case above or a named test elsewhere.
#[test]
fn every_op_with_a_vjp_rule_has_a_finite_difference_case() {
    let table: BTreeSet<&str> = cases().iter().map(|c| c.op).collect();
    let elsewhere: BTreeSet<&str> = ELSEWHERE.iter().map(|(op, _)| *op).collect();
    let with_rule: BTreeSet<&str> = OpKind::ALL
        .iter()
        .filter(|k| differentiability(**k) == Differentiability::Rule)
        .map(|k| k.info().name)
        .collect();
    let missing: Vec<&&str> = with_rule
        .iter()
        .filter(|op| !table.contains(*op) && !elsewhere.contains(*op))
        .collect();
    assert!(
        missing.is_empty(),
        "ops with a VJP rule but no finite-difference case in vjp_fd_registry.rs: {missing:?}"
    );
    // No stale rows: every op named here has a rule.
    let stale: Vec<&&str> = table
        .iter()
        .chain(&elsewhere)
        .filter(|op| !with_rule.contains(*op))
        .collect();
    assert!(
        stale.is_empty(),
        "table rows for ops without a rule: {stale:?}"
    );
    // The pointers name tests that exist.
    let src = include_str!("autodiff_fd.rs");
    for (op, test) in ELSEWHERE {
        assert!(
            src.contains(&format!("fn {test}(")),
            "{op}: autodiff_fd.rs has no test {test}"
        );
    }
    eprintln!(
        "{} ops with a rule: {} in the table, {} in autodiff_fd.rs",
        with_rule.len(),
        table.len(),
        elsewhere.len()
    );
}

/// Builds a case's graph with its loss and returns what `grad` says about it.
fn grad_error(opset: i64, build: impl Fn(&mut B) -> Vec<ValueRef>) -> String {
    let mut b = B::new(1, opset);
    let outs = build(&mut b);
    let mut g = b.g;
    let mut sums = Vec::new();
    for (k, &o) in outs.iter().enumerate() {
        sums.push(v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(o)],
                &[&format!("s{k}")],
            )
            .unwrap()));
    }
    let ins: Vec<Option<ValueRef>> = sums.iter().map(|&s| Some(s)).collect();
    let loss = v0(g.add_node("", Op::Sum {}, &ins, &["loss"]).unwrap());
    g.set_outputs(vec![loss]).unwrap();
    match grad(&g, loss, &g.input_values()) {
        Ok(_) => "no error".into(),
        Err(e) => e.to_string(),
    }
}

/// Variants the rules refuse, by name (so they have no finite-difference case): when a
/// rule learns one, this fails, and the variant gets a case in the table.
#[test]
fn refused_variants_fail_by_name() {
    let cases: Vec<(&str, i64, Build)> = vec![
        (
            "training-mode Dropout",
            21,
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                let r = b.f64c(&[], &[0.5]);
                let t = b.bools(&[], &[true]);
                vec![b.op(
                    Op::Dropout {
                        seed: None,
                        ratio: None,
                    },
                    &[x, r, t],
                )]
            }),
        ),
        (
            "training-mode BatchNormalization",
            21,
            Box::new(|b| {
                let x = b.input(&[3, 2], STD);
                let s = b.input(&[2], STD);
                let bb = b.input(&[2], STD);
                let m = b.f64c(&[2], &[0.0, 0.0]);
                let v = b.f64c(&[2], &[1.0, 1.0]);
                vec![
                    b.node(
                        Op::BatchNormalization {
                            epsilon: 1e-5,
                            momentum: 0.9,
                            training_mode: 1,
                        },
                        &[Some(x), Some(s), Some(bb), Some(m), Some(v)],
                        3,
                    )[0],
                ]
            }),
        ),
        (
            "Gather with non-scalar indices on an axis other than 0",
            21,
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                let i = b.ints(&[2, 0]);
                vec![b.op(Op::Gather { axis: 1 }, &[x, i])]
            }),
        ),
        (
            "MatMul with a rank-1 operand",
            21,
            Box::new(|b| {
                let x = b.input(&[3], STD);
                let w = b.input(&[3, 2], STD);
                vec![b.op(Op::MatMul {}, &[x, w])]
            }),
        ),
        (
            "slice step 2",
            21,
            Box::new(|b| {
                let x = b.input(&[4], STD);
                let (s, e, a, st) = (b.ints(&[0]), b.ints(&[4]), b.ints(&[0]), b.ints(&[2]));
                vec![b.op(Op::Slice {}, &[x, s, e, a, st])]
            }),
        ),
        (
            "axes that are not a constant",
            21,
            Box::new(|b| {
                // Axes [1] computed at run time (the shape of a [1] input).
                let x = b.input(&[2, 3], STD);
                let w = b.input(&[1], STD);
                let a = b.op(
                    Op::Shape {
                        start: None,
                        end: None,
                    },
                    &[w],
                );
                vec![b.op(reduce_op("ReduceSum", None, 1, 0), &[x, a])]
            }),
        ),
        (
            "a training_mode that is not a constant",
            21,
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                let r = b.f64c(&[], &[0.5]);
                // training_mode = w > 0 for a scalar input w.
                let w = b.input(&[], STD);
                let z = b.f64c(&[], &[0.0]);
                let t = b.op(Op::Greater {}, &[w, z]);
                vec![b.op(
                    Op::Dropout {
                        seed: None,
                        ratio: None,
                    },
                    &[x, r, t],
                )]
            }),
        ),
        (
            "ellipsis or malformed",
            21,
            Box::new(|b| {
                let x = b.input(&[2, 3], STD);
                vec![b.op(
                    Op::Einsum {
                        equation: "...j->...".into(),
                    },
                    &[x],
                )]
            }),
        ),
        (
            "a repeated index in operand 0 (a diagonal)",
            21,
            Box::new(|b| {
                let x = b.input(&[3, 3], STD);
                vec![b.op(
                    Op::Einsum {
                        equation: "ii->i".into(),
                    },
                    &[x],
                )]
            }),
        ),
        (
            "layout=1",
            21,
            Box::new(|b| {
                // Batch-major LSTM: X [N, T, I]; the importer canonicalises such ops.
                let x = b.input(&[2, 3, 2], STD);
                let w = b.input(&[1, 8, 2], STD);
                let r = b.input(&[1, 8, 2], STD);
                let outs = b.node(
                    Op::LSTM {
                        activation_alpha: None,
                        activation_beta: None,
                        activations: None,
                        clip: None,
                        direction: "forward".into(),
                        hidden_size: Some(2),
                        input_forget: 0,
                        layout: 1,
                    },
                    &[Some(x), Some(w), Some(r)],
                    2,
                );
                vec![outs[0]]
            }),
        ),
    ];
    let mut wrong = Vec::new();
    for (why, opset, build) in &cases {
        let e = grad_error(*opset, build);
        if !e.contains(why) {
            wrong.push(format!("expected an error naming {why:?}, got: {e}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Ties (where finite differences say nothing about where the gradient goes): the
/// gradient of Max/Min/ReduceMax/ReduceMin reaches the tied extremes only, split evenly
/// among them (JAX's convention): k tied extremes get g/k each, so the tied copies
/// together get exactly what one untied extreme would.
#[test]
fn ties_route_the_gradient_to_the_tied_extremes_only() {
    // x = [[1, 3, 3, 2], [0, 0, -1, 0]]: maxima along axis 1 at {1, 2} and {0, 1, 3},
    // minima at {0} and {2}.
    let x = t64(&[2, 4], &[1.0, 3.0, 3.0, 2.0, 0.0, 0.0, -1.0, 0.0]);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
    let check = |name: &str, op: Op, tied: [&[usize]; 2]| {
        let mut g = Graph::new("ties");
        let xi = g
            .add_input("x", ValueType::tensor(DType::F64, &[2, 4]))
            .unwrap();
        let mut ins = vec![Some(xi)];
        if matches!(op, Op::ReduceMax { .. } | Op::ReduceMin { .. }) {
            ins.push(Some(v0(g
                .add_node("", Op::constant(Tensor::vec_i64(&[1])), &[], &["ax"])
                .unwrap())));
        }
        let y = v0(g.add_node("", op, &ins, &["y"]).unwrap());
        let loss = v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(y)],
                &["loss"],
            )
            .unwrap());
        g.set_outputs(vec![loss]).unwrap();
        let dg = grad(&g, loss, &[xi]).unwrap();
        cellgraph::ir::verify(&dg).unwrap();
        let mut plan = CpuBackend::new(Recurrent::Fused).compile(&dg).unwrap();
        let gx = run(&mut plan, std::slice::from_ref(&x))[1].to_f64_vec();
        for (row, t) in tied.iter().enumerate() {
            let r = &gx[row * 4..row * 4 + 4];
            // d loss / d y = 1 per row, shared by the t.len() tied extremes.
            let share = 1.0 / t.len() as f64;
            for j in 0..4 {
                let want = if t.contains(&j) { share } else { 0.0 };
                assert!(
                    close(r[j], want),
                    "{name}: row {row} gradient {r:?}, tied extremes at {t:?} should get {share} each"
                );
            }
            assert!(
                close(r.iter().sum::<f64>(), 1.0),
                "{name}: row {row} gradient {r:?} should add up to the untied gradient 1"
            );
        }
    };
    check(
        "ReduceMax",
        reduce_op("ReduceMax", None, 0, 0),
        [&[1, 2], &[0, 1, 3]],
    );
    check(
        "ReduceMin",
        reduce_op("ReduceMin", None, 1, 0),
        [&[0], &[2]],
    );
    // Max/Min of x with its own reversal along axis 1 ([2, 3, 3, 1], [0, -1, 0, 0]):
    // elementwise ties where x equals the reversal (the gradient of both operands lands
    // on x).
    for (name, is_max) in [("Max", true), ("Min", false)] {
        let mut g = Graph::new("ties");
        let xi = g
            .add_input("x", ValueType::tensor(DType::F64, &[2, 4]))
            .unwrap();
        let k = |g: &mut Graph, n: &str, v: &[i64]| {
            v0(g.add_node("", Op::constant(Tensor::vec_i64(v)), &[], &[n])
                .unwrap())
        };
        let (st, en, ax, sp) = (
            k(&mut g, "st", &[-1]),
            k(&mut g, "en", &[i64::MIN]),
            k(&mut g, "ax", &[1]),
            k(&mut g, "sp", &[-1]),
        );
        let rev = v0(g
            .add_node(
                "",
                Op::Slice {},
                &[Some(xi), Some(st), Some(en), Some(ax), Some(sp)],
                &["rev"],
            )
            .unwrap());
        let op = if is_max { Op::Max {} } else { Op::Min {} };
        let y = v0(g.add_node("", op, &[Some(xi), Some(rev)], &["y"]).unwrap());
        let loss = v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(y)],
                &["loss"],
            )
            .unwrap());
        g.set_outputs(vec![loss]).unwrap();
        let dg = grad(&g, loss, &[xi]).unwrap();
        cellgraph::ir::verify(&dg).unwrap();
        let mut plan = CpuBackend::new(Recurrent::Fused).compile(&dg).unwrap();
        let gx = run(&mut plan, std::slice::from_ref(&x))[1].to_f64_vec();
        // y[j] = ext(x[j], x[3 − j]); x[i] is operand 0 of y[i] and operand 1 of
        // y[3 − i], both ext(x[i], x[3 − i]). Strictly the extreme of its pair, x[i]
        // gets 1 from each: 2. Tied, each of y[i], y[3 − i] splits its 1 between x[i]
        // and x[3 − i]: x[i] gets 1/2 + 1/2 = 1, the pair 2 in all, as untied.
        let xv = x.to_f64_vec();
        for row in 0..2 {
            for i in 0..4 {
                let (a, b) = (xv[row * 4 + i], xv[row * 4 + 3 - i]);
                let wins = if is_max { a > b } else { a < b };
                let want = if a == b {
                    1.0
                } else if wins {
                    2.0
                } else {
                    0.0
                };
                let g = gx[row * 4 + i];
                assert!(
                    close(g, want),
                    "{name}: row {row}, x[{i}] = {a}, pair {b}: gradient {g}, want {want}"
                );
            }
            let total: f64 = gx[row * 4..row * 4 + 4].iter().sum();
            assert!(
                close(total, 4.0),
                "{name}: row {row}: the gradients add up to {total}, want 4 (one per y)"
            );
        }
    }
}

/// Clip at its corners (where finite differences say nothing): each element's cotangent
/// goes to exactly one of x, min, max. x keeps it on the bounds (min ≤ x ≤ max, ties to
/// x, as TensorFlow's clip_by_value and PyTorch's clamp); min gets it where x < min ≤ max;
/// max where x > max, or everywhere when min > max (y = max).
#[test]
fn clip_corners_send_each_cotangent_to_one_operand() {
    // (x values, min, max, want dx, want dmin, want dmax) with loss Σ y.
    type Corner = (&'static [f64], f64, f64, &'static [f64], f64, f64);
    let cases: [Corner; 4] = [
        // Below, on min, inside, on max, above.
        (
            &[-1.0, -0.5, 0.0, 0.6, 1.0],
            -0.5,
            0.6,
            &[0.0, 1.0, 1.0, 1.0, 0.0],
            1.0,
            1.0,
        ),
        // min = max: below and above go to the bounds, on them to x.
        (
            &[-1.0, 0.2, 1.0, 0.2, 0.3],
            0.2,
            0.2,
            &[0.0, 1.0, 0.0, 1.0, 0.0],
            1.0,
            2.0,
        ),
        // Crossed bounds: y = max everywhere, including x == max and x == min.
        (&[-1.0, 0.6, 0.0, -0.5, 1.0], 0.6, -0.5, &[0.0; 5], 0.0, 5.0),
        // Every element inside: nothing for the bounds.
        (&[-0.4, 0.0, 0.5, 0.1, -0.2], -0.5, 0.6, &[1.0; 5], 0.0, 0.0),
    ];
    for (xs, lo, hi, want_dx, want_lo, want_hi) in cases {
        let mut g = Graph::new("clip");
        let xi = g
            .add_input("x", ValueType::tensor(DType::F64, &[5]))
            .unwrap();
        let li = g
            .add_input("lo", ValueType::tensor(DType::F64, &[]))
            .unwrap();
        let hi_v = g
            .add_input("hi", ValueType::tensor(DType::F64, &[]))
            .unwrap();
        let y = v0(g
            .add_node(
                "",
                Op::Clip {
                    min: None,
                    max: None,
                },
                &[Some(xi), Some(li), Some(hi_v)],
                &["y"],
            )
            .unwrap());
        let loss = v0(g
            .add_node(
                "",
                Op::ReduceSum {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[Some(y)],
                &["loss"],
            )
            .unwrap());
        g.set_outputs(vec![loss]).unwrap();
        let dg = grad(&g, loss, &[xi, li, hi_v]).unwrap();
        cellgraph::ir::verify(&dg).unwrap();
        let mut plan = CpuBackend::new(Recurrent::Fused).compile(&dg).unwrap();
        let out = run(
            &mut plan,
            &[t64(&[5], xs), t64(&[], &[lo]), t64(&[], &[hi])],
        );
        let (dx, dlo, dhi) = (
            out[1].to_f64_vec(),
            out[2].to_f64_vec()[0],
            out[3].to_f64_vec()[0],
        );
        assert_eq!(
            (dx.as_slice(), dlo, dhi),
            (want_dx, want_lo, want_hi),
            "Clip(x = {xs:?}, min {lo}, max {hi})"
        );
        // Each element's cotangent (1) lands on exactly one operand.
        assert_eq!(dx.iter().sum::<f64>() + dlo + dhi, xs.len() as f64);
    }
}
