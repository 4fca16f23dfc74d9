//! Vector-Jacobian product rules, one per differentiable op.
//!
//! A rule reads the node (its op, the values of its inputs and outputs in the gradient
//! graph) and the cotangents of its outputs, and emits the cotangents of its inputs.
//! Broadcasting is undone with [`Emit::unbroadcast`]; values whose gradient nobody needs
//! (`need[i] == false`) are skipped.
//!
//! Conventions where a function has no derivative (each documented at its rule):
//! `Max`/`Min`/`ReduceMax`/`ReduceMin` split the cotangent evenly among tied extremes
//! (JAX's convention: the tied copies together get what one untied extreme would);
//! `Clip` gives the cotangent to x on the bounds (min ≤ x ≤ max, as TensorFlow and
//! PyTorch) and to a bound only strictly outside; `Relu` and `Abs` give 0 at 0.
//! Softmax/LogSoftmax below opset 13 follow ONNX's 2-D coercion at `axis` (default 1),
//! as the CPU kernel does.

use crate::emit::Emit;
use crate::{branch_vjp, loop_body_vjp, scan_body_vjp, Error, Result};
use cellgraph_ir::ops::rnn::GradSlots;
use cellgraph_ir::{DType, Graph, NodeId, Op, Tensor, ValueRef};

/// What a rule sees of one node.
pub(crate) struct NodeCx<'a> {
    /// The op.
    pub op: &'a Op,
    /// The node's display name (for errors).
    pub name: String,
    /// Input values in the gradient graph (`None`: an omitted optional input).
    pub ins: &'a [Option<ValueRef>],
    /// Output values in the gradient graph.
    pub outs: &'a [ValueRef],
    /// Cotangents of the outputs (`None`: nothing flows back through that output).
    pub cots: &'a [Option<ValueRef>],
    /// Whether each input's gradient is needed.
    pub need: &'a [bool],
    /// The extra per-step outputs of an augmented forward `Scan`.
    pub residuals: &'a [ValueRef],
    /// The source graph and node (for constant attributes held in inputs).
    pub src: &'a Graph,
    /// The node in `src`.
    pub node: NodeId,
}

/// The cotangents a rule produces.
#[derive(Default)]
pub(crate) struct Grads {
    /// One per input (`None`: no gradient).
    pub inputs: Vec<Option<ValueRef>>,
    /// Gradients of values the node's bodies read from outside, by name.
    pub outer: Vec<(String, ValueRef)>,
}

impl NodeCx<'_> {
    fn unsupported(&self, why: impl Into<String>) -> Error {
        Error::Unsupported {
            op: self.op.name().to_string(),
            node: self.name.clone(),
            why: why.into(),
        }
    }

    fn input(&self, i: usize) -> Result<ValueRef> {
        self.ins
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| self.unsupported(format!("input {i} is missing")))
    }

    fn g(&self) -> Result<ValueRef> {
        self.cots
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| Error::Internal("no output cotangent".into()))
    }

    fn need(&self, i: usize) -> bool {
        self.need.get(i).copied().unwrap_or(false)
    }

    /// A constant input's tensor (`None`: omitted, or not a constant).
    fn const_tensor(&self, i: usize) -> Option<Tensor> {
        let v = self.src.node_inputs(self.node).get(i).copied().flatten()?;
        self.src.constant(v)
    }

    /// A constant input's integer values (axes, shapes, slice bounds).
    fn const_ints(&self, i: usize) -> Option<Vec<i64>> {
        self.const_tensor(i)?.as_i64_vec()
    }

    /// A constant input's values as f64 (bool tensors included: false 0, true 1).
    fn const_f64s(&self, i: usize) -> Option<Vec<f64>> {
        Some(self.const_tensor(i)?.to_f64_vec())
    }
}

fn one(g: Option<ValueRef>) -> Grads {
    Grads {
        inputs: vec![g],
        outer: Vec::new(),
    }
}

fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64).max(0) as usize
    } else {
        a as usize
    }
}

/// Runs the rule for `cx.op`.
pub(crate) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || Error::NoRule {
        op: cx.op.name().to_string(),
        node: cx.name.clone(),
    };
    if crate::is_non_differentiable(cx.op) {
        return Ok(Grads::default());
    }
    let x = || cx.input(0);
    let y = cx.outs.first().copied();
    match cx.op {
        Op::Identity {} => Ok(one(Some(cx.g()?))),
        Op::Add {} | Op::Sub {} => {
            let g = cx.g()?;
            let (a, b) = (cx.input(0)?, cx.input(1)?);
            let ga = if cx.need(0) {
                Some(e.unbroadcast(g, &e.static_shape(a, "Add/Sub operand")?)?)
            } else {
                None
            };
            let gb = if cx.need(1) {
                let gg = if matches!(cx.op, Op::Sub {}) {
                    e.neg(g)?
                } else {
                    g
                };
                Some(e.unbroadcast(gg, &e.static_shape(b, "Add/Sub operand")?)?)
            } else {
                None
            };
            Ok(Grads {
                inputs: vec![ga, gb],
                outer: vec![],
            })
        }
        Op::Mul {} => {
            let g = cx.g()?;
            let (a, b) = (cx.input(0)?, cx.input(1)?);
            let mut out = vec![None, None];
            if cx.need(0) {
                let t = e.mul(g, b)?;
                out[0] = Some(e.unbroadcast(t, &e.static_shape(a, "Mul operand")?)?);
            }
            if cx.need(1) {
                let t = e.mul(g, a)?;
                out[1] = Some(e.unbroadcast(t, &e.static_shape(b, "Mul operand")?)?);
            }
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Div {} => {
            let g = cx.g()?;
            let (a, b) = (cx.input(0)?, cx.input(1)?);
            let y = y.ok_or_else(no_rule)?;
            let mut out = vec![None, None];
            if cx.need(0) {
                let t = e.div(g, b)?;
                out[0] = Some(e.unbroadcast(t, &e.static_shape(a, "Div operand")?)?);
            }
            if cx.need(1) {
                // d(a/b)/db = −y/b
                let t = e.mul(g, y)?;
                let t = e.div(t, b)?;
                let t = e.neg(t)?;
                out[1] = Some(e.unbroadcast(t, &e.static_shape(b, "Div operand")?)?);
            }
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Pow {} => {
            let g = cx.g()?;
            let (a, b) = (cx.input(0)?, cx.input(1)?);
            let y = y.ok_or_else(no_rule)?;
            let mut out = vec![None, None];
            if cx.need(0) {
                // b · a^(b−1) = b · y / a, written without the division (a may be 0):
                let dt = e.dtype(a);
                let one = e.scalar(dt, 1.0)?;
                let bm1 = e.sub(b, one)?;
                let p = e.op(Op::Pow {}, &[a, bm1], "pow")?;
                let t = e.mul(p, b)?;
                let t = e.mul(t, g)?;
                out[0] = Some(e.unbroadcast(t, &e.static_shape(a, "Pow base")?)?);
            }
            if cx.need(1) {
                let l = e.op(Op::Log {}, &[a], "log")?;
                let t = e.mul(y, l)?;
                let t = e.mul(t, g)?;
                out[1] = Some(e.unbroadcast(t, &e.static_shape(b, "Pow exponent")?)?);
            }
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Sum {} | Op::Mean {} => {
            let g = cx.g()?;
            let n = cx.ins.len();
            let g = if matches!(cx.op, Op::Mean {}) {
                let dt = e.dtype(g);
                let s = e.scalar(dt, 1.0 / n as f64)?;
                e.mul(g, s)?
            } else {
                g
            };
            let mut out = Vec::new();
            for i in 0..n {
                out.push(if cx.need(i) {
                    let v = cx.input(i)?;
                    Some(e.unbroadcast(g, &e.static_shape(v, "Sum/Mean operand")?)?)
                } else {
                    None
                });
            }
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Min {} | Op::Max {} => min_max(e, cx),
        Op::Where {} => {
            let g = cx.g()?;
            let (c, a, b) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
            let z = e.scalar(e.dtype(g), 0.0)?;
            let mut out = vec![None, None, None];
            if cx.need(1) {
                let t = e.where_(c, g, z)?;
                out[1] = Some(e.unbroadcast(t, &e.static_shape(a, "Where operand")?)?);
            }
            if cx.need(2) {
                let t = e.where_(c, z, g)?;
                out[2] = Some(e.unbroadcast(t, &e.static_shape(b, "Where operand")?)?);
            }
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Neg {} => {
            let g = cx.g()?;
            Ok(one(Some(e.neg(g)?)))
        }
        Op::Abs {} => {
            let g = cx.g()?;
            let a = x()?;
            let z = e.scalar(e.dtype(a), 0.0)?;
            let pos = e.op(Op::Greater {}, &[a, z], "pos")?;
            let neg = e.op(Op::Less {}, &[a, z], "neg")?;
            let ng = e.neg(g)?;
            let t = e.where_(neg, ng, z)?;
            Ok(one(Some(e.where_(pos, g, t)?)))
        }
        Op::Exp {} => {
            let g = cx.g()?;
            Ok(one(Some(e.mul(g, y.ok_or_else(no_rule)?)?)))
        }
        Op::Log {} => {
            let g = cx.g()?;
            Ok(one(Some(e.div(g, x()?)?)))
        }
        Op::Sqrt {} => {
            // g / (2·y)
            let g = cx.g()?;
            let y = y.ok_or_else(no_rule)?;
            let two = e.scalar(e.dtype(y), 2.0)?;
            let d = e.mul(y, two)?;
            Ok(one(Some(e.div(g, d)?)))
        }
        Op::Reciprocal {} => {
            let g = cx.g()?;
            let y = y.ok_or_else(no_rule)?;
            let yy = e.mul(y, y)?;
            let t = e.mul(g, yy)?;
            Ok(one(Some(e.neg(t)?)))
        }
        Op::Sigmoid {} => {
            let g = cx.g()?;
            let y = y.ok_or_else(no_rule)?;
            let one_ = e.scalar(e.dtype(y), 1.0)?;
            let omy = e.sub(one_, y)?;
            let d = e.mul(y, omy)?;
            Ok(one(Some(e.mul(g, d)?)))
        }
        Op::Tanh {} => {
            let g = cx.g()?;
            let y = y.ok_or_else(no_rule)?;
            let one_ = e.scalar(e.dtype(y), 1.0)?;
            let yy = e.mul(y, y)?;
            let d = e.sub(one_, yy)?;
            Ok(one(Some(e.mul(g, d)?)))
        }
        Op::Relu {} => {
            let g = cx.g()?;
            let a = x()?;
            let z = e.scalar(e.dtype(a), 0.0)?;
            let pos = e.op(Op::Greater {}, &[a, z], "pos")?;
            Ok(one(Some(e.where_(pos, g, z)?)))
        }
        Op::LeakyRelu { alpha } => {
            let g = cx.g()?;
            let a = x()?;
            let z = e.scalar(e.dtype(a), 0.0)?;
            let al = e.scalar(e.dtype(a), *alpha as f64)?;
            let pos = e.op(Op::Greater {}, &[a, z], "pos")?;
            let ga = e.mul(g, al)?;
            Ok(one(Some(e.where_(pos, g, ga)?)))
        }
        Op::ThresholdedRelu { alpha } => {
            let g = cx.g()?;
            let a = x()?;
            let th = e.scalar(e.dtype(a), *alpha as f64)?;
            let z = e.scalar(e.dtype(a), 0.0)?;
            let on = e.op(Op::Greater {}, &[a, th], "on")?;
            Ok(one(Some(e.where_(on, g, z)?)))
        }
        Op::Elu { alpha } => {
            // x > 0: g; else g·(y + alpha)
            let g = cx.g()?;
            let a = x()?;
            let y = y.ok_or_else(no_rule)?;
            let z = e.scalar(e.dtype(a), 0.0)?;
            let al = e.scalar(e.dtype(a), *alpha as f64)?;
            let pos = e.op(Op::Greater {}, &[a, z], "pos")?;
            let ya = e.add(y, al)?;
            let gn = e.mul(g, ya)?;
            Ok(one(Some(e.where_(pos, g, gn)?)))
        }
        Op::Softsign {} => {
            // g / (1 + |x|)²
            let g = cx.g()?;
            let a = x()?;
            let ab = e.op(Op::Abs {}, &[a], "abs")?;
            let one_ = e.scalar(e.dtype(a), 1.0)?;
            let d = e.add(one_, ab)?;
            let dd = e.mul(d, d)?;
            Ok(one(Some(e.div(g, dd)?)))
        }
        Op::Softplus {} => {
            let g = cx.g()?;
            let s = e.op(Op::Sigmoid {}, &[x()?], "sigmoid")?;
            Ok(one(Some(e.mul(g, s)?)))
        }
        Op::HardSigmoid { alpha, .. } => {
            // alpha·g where 0 < y < 1, else 0.
            let g = cx.g()?;
            let y = y.ok_or_else(no_rule)?;
            let dt = e.dtype(y);
            let z = e.scalar(dt, 0.0)?;
            let o = e.scalar(dt, 1.0)?;
            let al = e.scalar(dt, *alpha as f64)?;
            let above = e.op(Op::Greater {}, &[y, z], "above")?;
            let below = e.op(Op::Less {}, &[y, o], "below")?;
            let inside = e.op(Op::And {}, &[above, below], "inside")?;
            let ga = e.mul(g, al)?;
            Ok(one(Some(e.where_(inside, ga, z)?)))
        }
        Op::Clip { min, max } => clip(e, cx, *min, *max),
        Op::Cast { .. } | Op::CastLike { .. } => {
            let a = x()?;
            let from = e.dtype(a);
            if !from.is_float() {
                return Ok(Grads::default());
            }
            let g = cx.g()?;
            Ok(one(Some(e.cast(g, from)?)))
        }
        Op::Dropout { ratio, .. } => dropout(cx, *ratio),
        Op::MatMul {} => matmul(e, cx),
        Op::Gemm {
            alpha,
            beta,
            transA,
            transB,
        } => gemm(e, cx, *alpha, *beta, *transA != 0, *transB != 0),
        Op::Softmax { axis } | Op::LogSoftmax { axis } => softmax(e, cx, *axis),
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => {
            let g = cx.g()?;
            let s = e.static_shape(x()?, "the input of a reshape")?;
            let mut out = vec![Some(e.reshape(g, &s)?)];
            out.resize(cx.ins.len(), None);
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Expand {} => {
            let g = cx.g()?;
            let s = e.static_shape(x()?, "the input of Expand")?;
            Ok(Grads {
                inputs: vec![Some(e.unbroadcast(g, &s)?), None],
                outer: vec![],
            })
        }
        Op::Transpose { perm } => {
            let g = cx.g()?;
            let rank = e.static_shape(x()?, "the input of Transpose")?.len();
            let perm: Vec<i64> = perm
                .clone()
                .unwrap_or_else(|| (0..rank as i64).rev().collect());
            let mut inv = vec![0i64; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[norm_axis(p, rank)] = i as i64;
            }
            Ok(one(Some(e.transpose(g, inv)?)))
        }
        Op::Concat { axis } => {
            let g = cx.g()?;
            let rank = e.static_shape(g, "the output of Concat")?.len();
            let ax = norm_axis(*axis, rank);
            let mut sizes = Vec::new();
            for i in 0..cx.ins.len() {
                sizes.push(e.static_shape(cx.input(i)?, "a Concat operand")?[ax]);
            }
            let parts = e.split(g, ax as i64, &sizes)?;
            Ok(Grads {
                inputs: parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| cx.need(i).then_some(p))
                    .collect(),
                outer: vec![],
            })
        }
        Op::Split { axis, .. } => {
            let a = x()?;
            let rank = e.static_shape(a, "the input of Split")?.len();
            let ax = norm_axis(*axis, rank);
            let mut parts = Vec::new();
            for (k, &o) in cx.outs.iter().enumerate() {
                parts.push(match cx.cots.get(k).copied().flatten() {
                    Some(c) => c,
                    None => e.zeros_like(o, "an unused Split output")?,
                });
            }
            let g = e.op(Op::Concat { axis: ax as i64 }, &parts, "concat")?;
            let mut out = vec![Some(g)];
            out.resize(cx.ins.len(), None);
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::Slice {} => slice(e, cx),
        Op::Gather { axis } => gather(e, cx, *axis),
        Op::ReduceSum {
            axes,
            keepdims,
            noop_with_empty_axes,
        }
        | Op::ReduceMean {
            axes,
            keepdims,
            noop_with_empty_axes,
        }
        | Op::ReduceMax {
            axes,
            keepdims,
            noop_with_empty_axes,
        }
        | Op::ReduceMin {
            axes,
            keepdims,
            noop_with_empty_axes,
        } => {
            // The axes as the kernel reads them: the attribute, else the (constant)
            // input; none or empty means every axis, or, with noop_with_empty_axes,
            // no reduction at all (the op is the identity, whatever keepdims says).
            // ReduceMax/ReduceMin split the cotangent evenly among tied extremes:
            // dx = g · [x = y] / Σ_axes [x = y] (JAX's convention), so k tied copies of
            // one value get g in total. Works with dynamic sizes: only the rank must be
            // known.
            let given = match axes {
                Some(v) => Some(v.clone()),
                None if cx.ins.get(1).copied().flatten().is_some() => Some(
                    cx.const_ints(1)
                        .ok_or_else(|| cx.unsupported("axes that are not a constant"))?,
                ),
                None => None,
            }
            .filter(|v| !v.is_empty());
            let g = cx.g()?;
            if given.is_none() && *noop_with_empty_axes != 0 {
                let mut out = vec![Some(g)];
                out.resize(cx.ins.len(), None);
                return Ok(Grads {
                    inputs: out,
                    outer: vec![],
                });
            }
            let a = x()?;
            let rank =
                e.g.value(a)
                    .ty
                    .dims()
                    .map(<[_]>::len)
                    .ok_or_else(|| cx.unsupported("an input of unknown rank"))?;
            let mut axes: Vec<i64> = match given {
                Some(v) => v.iter().map(|&a| norm_axis(a, rank) as i64).collect(),
                None => (0..rank as i64).collect(),
            };
            axes.sort_unstable();
            let gk = if *keepdims == 0 {
                e.unsqueeze(g, &axes)?
            } else {
                g
            };
            // A constant target shape when it is static (keeps later shapes known).
            let shape = match e.shape_of(a) {
                Some(xs) => e.ints(&xs.iter().map(|&d| d as i64).collect::<Vec<_>>())?,
                None => e.op(
                    Op::Shape {
                        start: None,
                        end: None,
                    },
                    &[a],
                    "shape",
                )?,
            };
            let ge = e.op(Op::Expand {}, &[gk, shape], "expand")?;
            let r = match cx.op {
                Op::ReduceSum { .. } => ge,
                Op::ReduceMean { .. } => {
                    let dt = e.dtype(a);
                    let n = match e.shape_of(a) {
                        Some(xs) => {
                            let n: usize = axes.iter().map(|&k| xs[k as usize]).product();
                            e.scalar(dt, n.max(1) as f64)?
                        }
                        None => {
                            // The count of reduced elements, at run time.
                            let one = Tensor::from_f64_vec(dt, &[1], &[1.0])
                                .map_err(|err| Error::Internal(err.to_string()))?;
                            let ones =
                                e.op(Op::ConstantOfShape { value: Some(one) }, &[shape], "ones")?;
                            e.reduce_sum(ones, &axes, true)?
                        }
                    };
                    e.div(ge, n)?
                }
                _ => {
                    let y = y.ok_or_else(no_rule)?;
                    let yk = if *keepdims == 0 {
                        e.unsqueeze(y, &axes)?
                    } else {
                        y
                    };
                    let eq = e.op(Op::Equal {}, &[a, yk], "is_extreme")?;
                    let dt = e.dtype(a);
                    let z = e.scalar(dt, 0.0)?;
                    // Ties share the cotangent: g / k for k tied extremes (k ≥ 1 where
                    // eq holds; the share is unused elsewhere).
                    let ones = e.cast(eq, dt)?;
                    let k = e.reduce_sum(ones, &axes, true)?;
                    let share = e.div(ge, k)?;
                    e.where_(eq, share, z)?
                }
            };
            let mut out = vec![Some(r)];
            out.resize(cx.ins.len(), None);
            Ok(Grads {
                inputs: out,
                outer: vec![],
            })
        }
        Op::BatchNormalization {
            epsilon,
            training_mode,
            ..
        } => {
            if *training_mode != 0 || cx.outs.len() > 1 {
                return Err(cx.unsupported("training-mode BatchNormalization"));
            }
            batch_norm(e, cx, *epsilon)
        }
        Op::Scan { .. } => scan(e, cx),
        Op::Tile {} => tile(e, cx),
        Op::LSTM { .. }
        | Op::GRU { .. }
        | Op::RNN { .. }
        | Op::LSTMMasked { .. }
        | Op::GRUMasked { .. }
        | Op::RNNMasked { .. } => fused_rnn(e, cx),
        Op::If { .. } => if_rule(e, cx),
        Op::Loop { .. } => loop_rule(e, cx),
        Op::Einsum { equation } => einsum(e, cx, equation),
        _ => Err(no_rule()),
    }
}

/// Elementwise variadic `Max`/`Min` (with broadcasting). Where one operand is the
/// extreme, it gets the whole cotangent; where `k` operands tie for it (after
/// broadcasting), each gets `g / k`, as JAX's `jnp.maximum`/`jnp.minimum` do:
/// `dx_i = unbroadcast(g · [x_i = y] / Σ_j [x_j = y])`. The shares add up to `g`, so
/// `Max(x, x)` has gradient `g` (it is `x`), not `2g`.
fn min_max(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let g = cx.g()?;
    let n = cx.ins.len();
    if n == 1 {
        return Ok(one(cx.need(0).then_some(g)));
    }
    let y = cx
        .outs
        .first()
        .copied()
        .ok_or_else(|| Error::Internal("Min/Max without an output".into()))?;
    let dt = e.dtype(g);
    // [x_i = y], each broadcast to y's shape (the broadcast of every operand).
    let mut eqs = Vec::with_capacity(n);
    for i in 0..n {
        eqs.push(e.op(Op::Equal {}, &[cx.input(i)?, y], "is_extreme")?);
    }
    let mut count = e.cast(eqs[0], dt)?;
    for &eq in &eqs[1..] {
        let c = e.cast(eq, dt)?;
        count = e.add(count, c)?;
    }
    // count ≥ 1 wherever some operand equals y; elsewhere (NaN) the share is unused.
    let share = e.div(g, count)?;
    let z = e.scalar(dt, 0.0)?;
    let mut out = Vec::with_capacity(n);
    for (i, &eq) in eqs.iter().enumerate() {
        out.push(if cx.need(i) {
            let v = cx.input(i)?;
            let t = e.where_(eq, share, z)?;
            Some(e.unbroadcast(t, &e.static_shape(v, "Min/Max operand")?)?)
        } else {
            None
        });
    }
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

/// `Softmax` and `LogSoftmax`, with the kernel's (and ONNX's) axis semantics:
///
/// - opset ≥ 13: along the one axis `axis` (default −1);
/// - opset < 13 (Softmax-1/11): the input is coerced to 2-D at `axis` (default 1),
///   `[∏ dims[..axis], ∏ dims[axis..]]`, and normalised along its second axis, i.e.
///   jointly over every axis from `axis` on. The rule reshapes `g` and `y` the same way,
///   applies the one-axis rule on axis 1 and reshapes back (nothing to reshape when
///   `axis` is the last axis).
///
/// One axis: Softmax `dx = y ⊙ (g − Σ g⊙y)`, LogSoftmax `dx = g − exp(y) ⊙ Σ g`. A
/// rank-0 input has a constant output (1 or 0), so its gradient is zero.
fn softmax(e: &mut Emit, cx: &NodeCx, axis: Option<i64>) -> Result<Grads> {
    let g = cx.g()?;
    let y = cx
        .outs
        .first()
        .copied()
        .ok_or_else(|| Error::Internal("Softmax without an output".into()))?;
    let log = matches!(cx.op, Op::LogSoftmax { .. });
    let rank =
        e.g.value(y)
            .ty
            .dims()
            .map(<[_]>::len)
            .ok_or_else(|| cx.unsupported("an input of unknown rank"))?;
    if rank == 0 {
        return Ok(one(Some(e.zeros_like(y, "a rank-0 Softmax")?)));
    }
    let old = cx.src.opset("") < 13;
    let default = if old { 1 } else { -1 };
    let ax = cellgraph_ir::ops::infer::norm_axis(axis.unwrap_or(default), rank)
        .map_err(|why| cx.unsupported(why))?;
    let one_axis = |e: &mut Emit, g: ValueRef, y: ValueRef, ax: i64| -> Result<ValueRef> {
        if log {
            // g − exp(y) ⊙ Σ g
            let s = e.reduce_sum(g, &[ax], true)?;
            let p = e.op(Op::Exp {}, &[y], "exp")?;
            let t = e.mul(p, s)?;
            Ok(e.sub(g, t)?)
        } else {
            // y ⊙ (g − Σ g⊙y)
            let gy = e.mul(g, y)?;
            let s = e.reduce_sum(gy, &[ax], true)?;
            let d = e.sub(g, s)?;
            Ok(e.mul(y, d)?)
        }
    };
    if !old || ax == rank - 1 {
        return Ok(one(Some(one_axis(e, g, y, ax as i64)?)));
    }
    // Opset < 13 over the axes ax..: the 2-D coercion.
    let shape = e.static_shape(y, "an opset < 13 Softmax output (coerced to 2-D)")?;
    let flat = [
        shape[..ax].iter().product::<usize>(),
        shape[ax..].iter().product::<usize>(),
    ];
    let g2 = e.reshape(g, &flat)?;
    let y2 = e.reshape(y, &flat)?;
    let d2 = one_axis(e, g2, y2, 1)?;
    Ok(one(Some(e.reshape(d2, &shape)?)))
}

/// `Dropout` where it is the identity: in inference mode (no `training_mode` input, or a
/// constant false one: a bool scalar, as ONNX types it) or with a constant ratio of 0
/// (training mode then keeps every element and scales by 1/(1 − 0)). The ratio is the
/// `ratio` input, else the attribute (opset < 12), else 0.5. A training-mode Dropout
/// with another ratio, or a `training_mode` that is not a constant, is random (the IR
/// has no random op to replay its mask) and is refused. The mask output has no
/// gradient.
fn dropout(cx: &NodeCx, ratio_attr: Option<f32>) -> Result<Grads> {
    // As the kernel reads them: the first element of each.
    let training = match cx.ins.get(2).copied().flatten() {
        None => Some(false),
        Some(_) => cx
            .const_f64s(2)
            .map(|v| v.first().is_some_and(|&t| t != 0.0)),
    };
    let ratio = match cx.ins.get(1).copied().flatten() {
        None => Some(ratio_attr.map_or(0.5, f64::from)),
        Some(_) => cx.const_f64s(1).map(|v| v.first().copied().unwrap_or(0.5)),
    };
    let identity = training == Some(false) || ratio == Some(0.0);
    if !identity {
        let why = match training {
            None => "a training_mode that is not a constant (training-mode Dropout is random)",
            Some(_) => "training-mode Dropout (random) with a ratio that is not a constant 0",
        };
        return Err(cx.unsupported(why));
    }
    let mut out = vec![Some(cx.g()?)];
    out.resize(cx.ins.len().max(1), None);
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

/// `Clip`: y = min(max(x, lo), hi) (the kernel's order, and `jnp.clip`'s), the bounds
/// given as inputs (opset ≥ 11, differentiable) or attributes (opset < 11), each
/// optional. Every element's cotangent goes to exactly one of x, lo, hi:
///
/// - x where lo ≤ x ≤ hi (ties go to x, the bounds inclusive);
/// - lo where x < lo ≤ hi;
/// - hi where x > hi, or everywhere when lo > hi (then y = hi).
///
/// For ordered bounds (lo ≤ hi) that is the convention of TensorFlow's `clip_by_value`
/// and PyTorch's `clamp` (x's gradient inclusive of the bounds, the bounds' strict), and
/// it matches the x gradient this rule always had; JAX instead splits a tie between x
/// and the bound. Crossed bounds follow the kernel's order: the outer min picks hi. The bounds' cotangents are summed to their shapes (scalars).
fn clip(e: &mut Emit, cx: &NodeCx, min: Option<f32>, max: Option<f32>) -> Result<Grads> {
    let g = cx.g()?;
    let a = cx.input(0)?;
    let dt = e.dtype(a);
    let input_lo = cx.ins.get(1).copied().flatten();
    let input_hi = cx.ins.get(2).copied().flatten();
    let lo = match (input_lo, min) {
        (Some(v), _) => Some(v),
        (None, Some(m)) => Some(e.scalar(dt, m as f64)?),
        (None, None) => None,
    };
    let hi = match (input_hi, max) {
        (Some(v), _) => Some(v),
        (None, Some(m)) => Some(e.scalar(dt, m as f64)?),
        (None, None) => None,
    };
    let z = e.scalar(dt, 0.0)?;
    // Shapes: the cotangent has x's shape; a mask may broadcast further only when a
    // bound has a higher rank than x (then it is summed back).
    let fit = |e: &mut Emit, t: ValueRef, like: ValueRef| -> Result<ValueRef> {
        match (e.shape_of(t), e.shape_of(like)) {
            (Some(ts), Some(ls)) if ts != ls => e.unbroadcast(t, &ls),
            _ => Ok(t),
        }
    };
    let mut out = vec![None; cx.ins.len().max(1)];
    if cx.need(0) {
        let mut inside: Option<ValueRef> = None;
        if let Some(lo) = lo {
            let below = e.op(Op::Less {}, &[a, lo], "below_min")?;
            inside = Some(e.op(Op::Not {}, &[below], "at_least_min")?);
        }
        if let Some(hi) = hi {
            let above = e.op(Op::Greater {}, &[a, hi], "above_max")?;
            let le = e.op(Op::Not {}, &[above], "at_most_max")?;
            inside = Some(match inside {
                Some(m) => e.op(Op::And {}, &[m, le], "inside")?,
                None => le,
            });
        }
        out[0] = Some(match inside {
            Some(m) => {
                let t = e.where_(m, g, z)?;
                fit(e, t, a)?
            }
            None => g,
        });
    }
    if let (Some(lo), true) = (input_lo, cx.need(1)) {
        let mut mask = e.op(Op::Less {}, &[a, lo], "below_min")?;
        if let Some(hi) = hi {
            let crossed = e.op(Op::Greater {}, &[lo, hi], "min_above_max")?;
            let ok = e.op(Op::Not {}, &[crossed], "min_at_most_max")?;
            mask = e.op(Op::And {}, &[mask, ok], "clipped_to_min")?;
        }
        let t = e.where_(mask, g, z)?;
        out[1] = Some(e.unbroadcast(t, &e.static_shape(lo, "the min of Clip")?)?);
    }
    if let (Some(hi), true) = (input_hi, cx.need(2)) {
        let mut mask = e.op(Op::Greater {}, &[a, hi], "above_max")?;
        if let Some(lo) = lo {
            let crossed = e.op(Op::Greater {}, &[lo, hi], "min_above_max")?;
            mask = e.op(Op::Or {}, &[mask, crossed], "clipped_to_max")?;
        }
        let t = e.where_(mask, g, z)?;
        out[2] = Some(e.unbroadcast(t, &e.static_shape(hi, "the max of Clip")?)?);
    }
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

fn matmul(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let g = cx.g()?;
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    let sa = e.static_shape(a, "a MatMul operand")?;
    let sb = e.static_shape(b, "a MatMul operand")?;
    if sa.len() < 2 || sb.len() < 2 {
        return Err(cx.unsupported("MatMul with a rank-1 operand"));
    }
    let mut out = vec![None, None];
    if cx.need(0) {
        let bt = e.swap_last(b, sb.len())?;
        let t = e.matmul(g, bt)?;
        out[0] = Some(e.unbroadcast(t, &sa)?);
    }
    if cx.need(1) {
        let gs = e.static_shape(g, "the MatMul output")?;
        let t = if sb.len() == 2 && sa.len() > 2 {
            // Fold the batch axes: aᵀ·g over [n·m, k] and [n·m, p].
            let rows: usize = sa[..sa.len() - 1].iter().product();
            let a2 = e.reshape(a, &[rows, sa[sa.len() - 1]])?;
            let g2 = e.reshape(g, &[rows, gs[gs.len() - 1]])?;
            let at = e.swap_last(a2, 2)?;
            e.matmul(at, g2)?
        } else {
            let at = e.swap_last(a, sa.len())?;
            e.matmul(at, g)?
        };
        out[1] = Some(e.unbroadcast(t, &sb)?);
    }
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

fn gemm(e: &mut Emit, cx: &NodeCx, alpha: f32, beta: f32, ta: bool, tb: bool) -> Result<Grads> {
    let g = cx.g()?;
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    let dt = e.dtype(g);
    let ga_s = if alpha != 1.0 {
        let s = e.scalar(dt, alpha as f64)?;
        e.mul(g, s)?
    } else {
        g
    };
    let mut out = vec![None, None, None];
    // Y = A'·B' with A' = op(A), B' = op(B): dA' = g·B'ᵀ, dB' = A'ᵀ·g.
    if cx.need(0) {
        out[0] = Some(if ta {
            // dA = (g·B'ᵀ)ᵀ = B'·gᵀ
            let bb = if tb { e.swap_last(b, 2)? } else { b };
            let gt = e.swap_last(ga_s, 2)?;
            e.matmul(bb, gt)?
        } else {
            let bt = if tb { b } else { e.swap_last(b, 2)? };
            e.matmul(ga_s, bt)?
        });
    }
    if cx.need(1) {
        out[1] = Some(if tb {
            // dB = (A'ᵀ·g)ᵀ = gᵀ·A'
            let aa = if ta { e.swap_last(a, 2)? } else { a };
            let gt = e.swap_last(ga_s, 2)?;
            e.matmul(gt, aa)?
        } else {
            let at = if ta { a } else { e.swap_last(a, 2)? };
            e.matmul(at, ga_s)?
        });
    }
    if cx.need(2) {
        let c = cx.input(2)?;
        let gb = if beta != 1.0 {
            let s = e.scalar(dt, beta as f64)?;
            e.mul(g, s)?
        } else {
            g
        };
        out[2] = Some(e.unbroadcast(gb, &e.static_shape(c, "the Gemm C operand")?)?);
    }
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

fn slice(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let g = cx.g()?;
    let a = cx.input(0)?;
    let xs = e.static_shape(a, "the input of Slice")?;
    let rank = xs.len();
    let (Some(starts), Some(ends)) = (cx.const_ints(1), cx.const_ints(2)) else {
        return Err(cx.unsupported("slice bounds that are not constants"));
    };
    let axes = match cx.ins.get(3).copied().flatten() {
        Some(_) => cx
            .const_ints(3)
            .ok_or_else(|| cx.unsupported("slice axes that are not constants"))?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match cx.ins.get(4).copied().flatten() {
        Some(_) => cx
            .const_ints(4)
            .ok_or_else(|| cx.unsupported("slice steps that are not constants"))?,
        None => vec![1; starts.len()],
    };
    let mut r = g;
    for i in 0..starts.len() {
        let ax = norm_axis(axes[i], rank);
        let n = xs[ax] as i64;
        let step = steps[i];
        if step == -1 {
            // A full reversal along the axis: its gradient reverses back.
            let s = if starts[i] < 0 {
                starts[i] + n
            } else {
                starts[i]
            }
            .clamp(-1, n - 1);
            let en = if ends[i] < -n {
                -1
            } else if ends[i] < 0 {
                ends[i] + n
            } else {
                ends[i]
            };
            if s != n - 1 || en != -1 {
                return Err(cx.unsupported("a reversed slice that is not the whole axis"));
            }
            r = {
                let st = e.ints(&[-1])?;
                let en = e.ints(&[i64::MIN])?;
                let ax_v = e.ints(&[ax as i64])?;
                let sp = e.ints(&[-1])?;
                e.op(Op::Slice {}, &[r, st, en, ax_v, sp], "unreverse")?
            };
            continue;
        }
        if step != 1 {
            return Err(cx.unsupported(format!("slice step {step}")));
        }
        let clampi = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
        let (s, en) = (clampi(starts[i]), clampi(ends[i]).max(clampi(starts[i])));
        let cur = e.static_shape(r, "a slice gradient")?;
        let mut parts = Vec::new();
        if s > 0 {
            let mut z = cur.clone();
            z[ax] = s as usize;
            parts.push(e.zeros(e.dtype(g), &z)?);
        }
        parts.push(r);
        if en < n {
            let mut z = cur.clone();
            z[ax] = (n - en) as usize;
            parts.push(e.zeros(e.dtype(g), &z)?);
        }
        if parts.len() > 1 {
            r = e.op(Op::Concat { axis: ax as i64 }, &parts, "pad")?;
        }
    }
    let mut out = vec![Some(r)];
    out.resize(cx.ins.len(), None);
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

fn gather(e: &mut Emit, cx: &NodeCx, axis: i64) -> Result<Grads> {
    let g = cx.g()?;
    let (data, idx) = (cx.input(0)?, cx.input(1)?);
    let ds = e.static_shape(data, "the data of Gather")?;
    let is = e.static_shape(idx, "the indices of Gather")?;
    let ax = norm_axis(axis, ds.len());
    let n = ds[ax];
    let dt = e.dtype(data);
    // one_hot[..., k] = (index == k), indices wrapped like Gather does.
    let idx64 = e.cast(idx, DType::I64)?;
    let nn = e.constant(Tensor::I64(ndarray::ArrayD::from_elem(
        ndarray::IxDyn(&[]),
        n as i64,
    )))?;
    let zero = e.constant(Tensor::I64(ndarray::ArrayD::from_elem(
        ndarray::IxDyn(&[]),
        0,
    )))?;
    let neg = e.op(Op::Less {}, &[idx64, zero], "negative")?;
    let wrapped = e.add(idx64, nn)?;
    let idx_n = e.where_(neg, wrapped, idx64)?;
    let one_ = e.constant(Tensor::I64(ndarray::ArrayD::from_elem(
        ndarray::IxDyn(&[]),
        1,
    )))?;
    let range = e.op(Op::Range {}, &[zero, nn, one_], "range")?;
    let last = is.len() as i64;
    let iu = e.unsqueeze(idx_n, &[last])?;
    let eq = e.op(Op::Equal {}, &[iu, range], "one_hot")?;
    let oh = e.cast(eq, dt)?; // indices shape + [n]
    let s: usize = is.iter().product();
    if ax == 0 {
        // d data = one_hotᵀ · g over the flattened indices.
        let rest: usize = ds[1..].iter().product();
        let oh2 = e.reshape(oh, &[s, n])?;
        let g2 = e.reshape(g, &[s, rest])?;
        let oht = e.swap_last(oh2, 2)?;
        let d = e.matmul(oht, g2)?;
        return Ok(Grads {
            inputs: vec![Some(e.reshape(d, &ds)?), None],
            outer: vec![],
        });
    }
    if is.is_empty() {
        // A scalar index on another axis: g broadcast into its row of the axis.
        let gu = e.unsqueeze(g, &[ax as i64])?;
        let mut shape = vec![1usize; ds.len()];
        shape[ax] = n;
        let m = e.reshape(oh, &shape)?;
        return Ok(Grads {
            inputs: vec![Some(e.mul(gu, m)?), None],
            outer: vec![],
        });
    }
    Err(cx.unsupported("Gather with non-scalar indices on an axis other than 0"))
}

fn batch_norm(e: &mut Emit, cx: &NodeCx, eps: f32) -> Result<Grads> {
    // y = (x − mean)·scale/√(var + ε) + b over channel axis 1.
    let g = cx.g()?;
    let (xv, scale, mean, var) = (cx.input(0)?, cx.input(1)?, cx.input(3)?, cx.input(4)?);
    let xs = e.static_shape(xv, "the input of BatchNormalization")?;
    let c = *xs
        .get(1)
        .ok_or_else(|| cx.unsupported("an input of rank < 2"))?;
    let mut bshape = vec![1usize; xs.len()];
    bshape[1] = c;
    let axes: Vec<i64> = (0..xs.len() as i64).filter(|&a| a != 1).collect();
    let dt = e.dtype(xv);
    let ep = e.scalar(dt, eps as f64)?;
    let ve = e.add(var, ep)?;
    let sd = e.op(Op::Sqrt {}, &[ve], "sqrt")?;
    let inv = e.op(Op::Reciprocal {}, &[sd], "inv")?;
    let k = e.mul(scale, inv)?;
    let kb = e.reshape(k, &bshape)?;
    let mb = e.reshape(mean, &bshape)?;
    let mut out = vec![None; 5];
    if cx.need(0) {
        out[0] = Some(e.mul(g, kb)?);
    }
    let xc = e.sub(xv, mb)?;
    if cx.need(1) {
        let ib = e.reshape(inv, &bshape)?;
        let t = e.mul(xc, ib)?;
        let t = e.mul(g, t)?;
        let s = e.reduce_sum(t, &axes, false)?;
        out[1] = Some(s);
    }
    if cx.need(2) {
        out[2] = Some(e.reduce_sum(g, &axes, false)?);
    }
    if cx.need(3) {
        let s = e.reduce_sum(g, &axes, false)?;
        let t = e.mul(s, k)?;
        out[3] = Some(e.neg(t)?);
    }
    if cx.need(4) {
        // d/dvar = Σ g·(x − mean) · scale · (−½)(var + ε)^(−3/2)
        let t = e.mul(g, xc)?;
        let s = e.reduce_sum(t, &axes, false)?;
        let i3 = e.mul(inv, inv)?;
        let i3 = e.mul(i3, inv)?;
        let h = e.scalar(dt, -0.5)?;
        let f = e.mul(scale, i3)?;
        let f = e.mul(f, h)?;
        out[4] = Some(e.mul(s, f)?);
    }
    Ok(Grads {
        inputs: out,
        outer: vec![],
    })
}

/// Scan attributes (opset 9+ form) with defaults filled in.
struct ScanAttrs {
    n_scan: usize,
    in_axes: Vec<i64>,
    in_dirs: Vec<i64>,
    out_axes: Vec<i64>,
    out_dirs: Vec<i64>,
}

fn scan_attrs(op: &Op, n_in: usize, n_out: usize, opset: i64, cx_name: &str) -> Result<ScanAttrs> {
    let Op::Scan {
        num_scan_inputs,
        scan_input_axes,
        scan_input_directions,
        scan_output_axes,
        scan_output_directions,
        ..
    } = op
    else {
        return Err(Error::Internal("not a Scan".into()));
    };
    if opset < 9 {
        return Err(Error::Unsupported {
            op: "Scan".into(),
            node: cx_name.to_string(),
            why: "the opset 8 form (batched, sequence_lens)".into(),
        });
    }
    let m = usize::try_from(*num_scan_inputs).unwrap_or(0).min(n_in);
    let n = n_in - m;
    let k = n_out.saturating_sub(n);
    let fill = |v: &Option<Vec<i64>>, len: usize| {
        let mut v = v.clone().unwrap_or_default();
        v.resize(len, 0);
        v
    };
    Ok(ScanAttrs {
        n_scan: m,
        in_axes: fill(scan_input_axes, m),
        in_dirs: fill(scan_input_directions, m),
        out_axes: fill(scan_output_axes, k),
        out_dirs: fill(scan_output_directions, k),
    })
}

/// The forward Scan with one more scan output per state: the state each step starts
/// from, stacked on axis 0 in iteration order. Returns the new op and the number of
/// extra outputs.
pub(crate) fn augment_scan(
    op: &Op,
    ins: &[Option<ValueRef>],
    src: &Graph,
    node: NodeId,
) -> Result<(Op, usize)> {
    let n_out = src.node(node).outputs.len();
    let name = src.node(node).display_name();
    let a = scan_attrs(op, ins.len(), n_out, src.opset(""), &name)?;
    let n = ins.len() - a.n_scan;
    let Op::Scan { body, .. } = op else {
        return Err(Error::Internal("not a Scan".into()));
    };
    let mut body = (**body).clone();
    let mut outs = body.outputs().to_vec();
    let states: Vec<ValueRef> = body.input_values()[..n].to_vec();
    for (k, s) in states.into_iter().enumerate() {
        let mut e = Emit::new(&mut body, &format!("residual_{k}"));
        outs.push(e.op(Op::Identity {}, &[s], "state")?);
    }
    body.set_outputs(outs)?;
    let mut out_axes = a.out_axes.clone();
    out_axes.resize(a.out_axes.len() + n, 0);
    let mut out_dirs = a.out_dirs.clone();
    out_dirs.resize(a.out_dirs.len() + n, 0);
    Ok((
        Op::Scan {
            body: Box::new(body),
            num_scan_inputs: a.n_scan as i64,
            scan_input_axes: Some(a.in_axes),
            scan_input_directions: Some(a.in_dirs),
            scan_output_axes: Some(out_axes),
            scan_output_directions: Some(out_dirs),
            directions: None,
        },
        n,
    ))
}

/// The VJP of a Scan: a backward Scan over the body's VJP, in the opposite direction.
fn scan(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::Scan { body, .. } = cx.op else {
        return Err(Error::Internal("not a Scan".into()));
    };
    let a = scan_attrs(
        cx.op,
        cx.ins.len(),
        cx.outs.len(),
        cx.src.opset(""),
        &cx.name,
    )?;
    let m = a.n_scan;
    let n = cx.ins.len() - m;
    let k = cx.outs.len() - n;
    if cx.residuals.len() != n {
        return Err(Error::Internal(format!(
            "Scan {}: {} residual outputs for {n} states",
            cx.name,
            cx.residuals.len()
        )));
    }
    let (bwd_body, outer_names) = scan_body_vjp(body, n)?;
    let mut ins = Vec::new();
    // Carries: dS (the cotangents of the final states), then zero dW accumulators.
    for s in 0..n {
        ins.push(match cx.cots[s] {
            Some(c) => c,
            None => e.zeros_like(cx.outs[s], "a Scan state")?,
        });
    }
    for name in &outer_names {
        let w =
            e.g.find(name)
                .ok_or_else(|| cx.unsupported(format!("outer value {name} not found")))?;
        ins.push(e.zeros_like(w, "a value a Scan body reads")?);
    }
    // Scanned, in the opposite direction: residual states, the scanned inputs, dy.
    let mut axes = Vec::new();
    let mut dirs = Vec::new();
    for &r in cx.residuals {
        ins.push(r);
        axes.push(0);
        dirs.push(1);
    }
    for j in 0..m {
        ins.push(cx.input(n + j)?);
        axes.push(a.in_axes[j]);
        dirs.push(1 - a.in_dirs[j]);
    }
    for o in 0..k {
        ins.push(match cx.cots[n + o] {
            Some(c) => c,
            None => e.zeros_like(cx.outs[n + o], "a Scan output")?,
        });
        axes.push(a.out_axes[o]);
        dirs.push(1 - a.out_dirs[o]);
    }
    let n_carry = n + outer_names.len();
    let mut hints: Vec<String> = (0..n).map(|s| format!("dinit_{s}")).collect();
    hints.extend((0..outer_names.len()).map(|w| format!("douter_{w}")));
    hints.extend((0..m).map(|j| format!("dxs_{j}")));
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let ins_opt: Vec<Option<ValueRef>> = ins.into_iter().map(Some).collect();
    let id = e.node(
        Op::Scan {
            body: Box::new(bwd_body),
            num_scan_inputs: (n + m + k) as i64,
            scan_input_axes: Some(axes),
            scan_input_directions: Some(dirs),
            scan_output_axes: Some(a.in_axes.clone()),
            scan_output_directions: Some(a.in_dirs.iter().map(|d| 1 - d).collect()),
            directions: None,
        },
        &ins_opt,
        &hint_refs,
    )?;
    let at = |slot| ValueRef { node: id, slot };
    let mut inputs: Vec<Option<ValueRef>> = (0..n).map(|s| cx.need(s).then(|| at(s))).collect();
    for j in 0..m {
        inputs.push(cx.need(n + j).then(|| at(n_carry + j)));
    }
    let outer = outer_names
        .into_iter()
        .enumerate()
        .map(|(w, name)| (name, at(n + w)))
        .collect();
    Ok(Grads { inputs, outer })
}

fn tile(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    // y = tile(x, r): along each axis y[k·s + i] = x[i]; sum the r copies.
    let g = cx.g()?;
    let xs = e.static_shape(cx.input(0)?, "the input of Tile")?;
    let reps = cx
        .const_ints(1)
        .ok_or_else(|| cx.unsupported("repeats that are not a constant"))?;
    if reps.len() != xs.len() || reps.iter().any(|&r| r < 1) {
        return Err(cx.unsupported(format!("repeats {reps:?} for a rank-{} input", xs.len())));
    }
    let mut split = Vec::new();
    let mut axes = Vec::new();
    for (k, (&s, &r)) in xs.iter().zip(&reps).enumerate() {
        split.push(r as usize);
        split.push(s);
        axes.push(2 * k as i64);
    }
    let r = e.reshape(g, &split)?;
    let s = e.reduce_sum(r, &axes, false)?;
    let s = e.reshape(s, &xs)?;
    Ok(Grads {
        inputs: vec![Some(s), None],
        outer: vec![],
    })
}

/// Splits an einsum equation into operand specs and the output spec (letters only).
fn parse_einsum(eq: &str, n: usize) -> Option<(Vec<Vec<char>>, Vec<char>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    if eq.contains("...") {
        return None;
    }
    let (lhs, out) = match eq.split_once("->") {
        Some((l, o)) => (l.to_string(), Some(o.to_string())),
        None => (eq.clone(), None),
    };
    let ins: Vec<Vec<char>> = lhs.split(',').map(|s| s.chars().collect()).collect();
    if ins.len() != n || ins.iter().flatten().any(|c| !c.is_ascii_alphabetic()) {
        return None;
    }
    let out: Vec<char> = match out {
        Some(o) => o.chars().collect(),
        None => {
            // Implicit output: the letters that appear once, in alphabetical order.
            let mut once: Vec<char> = ins
                .iter()
                .flatten()
                .copied()
                .filter(|c| ins.iter().flatten().filter(|d| *d == c).count() == 1)
                .collect();
            once.sort_unstable();
            once
        }
    };
    Some((ins, out))
}

fn einsum(e: &mut Emit, cx: &NodeCx, equation: &str) -> Result<Grads> {
    let g = cx.g()?;
    let n = cx.ins.len();
    let (specs, out) = parse_einsum(equation, n)
        .ok_or_else(|| cx.unsupported(format!("equation {equation:?} (ellipsis or malformed)")))?;
    let mut grads = Vec::new();
    for i in 0..n {
        if !cx.need(i) {
            grads.push(None);
            continue;
        }
        let spec = &specs[i];
        let mut seen = std::collections::HashSet::new();
        if !spec.iter().all(|c| seen.insert(*c)) {
            return Err(cx.unsupported(format!("a repeated index in operand {i} (a diagonal)")));
        }
        // Letters of this operand that appear nowhere else were summed away: the gradient
        // is constant along them (computed without them, then expanded).
        let elsewhere = |c: &char| {
            out.contains(c)
                || specs
                    .iter()
                    .enumerate()
                    .any(|(j, s)| j != i && s.contains(c))
        };
        let kept: Vec<char> = spec.iter().copied().filter(elsewhere).collect();
        let mut terms = vec![out.iter().collect::<String>()];
        let mut operands = vec![g];
        for (j, s) in specs.iter().enumerate() {
            if j != i {
                terms.push(s.iter().collect());
                operands.push(cx.input(j)?);
            }
        }
        let eq = format!("{}->{}", terms.join(","), kept.iter().collect::<String>());
        let mut r = e.op(Op::Einsum { equation: eq }, &operands, "einsum_grad")?;
        let shape = e.static_shape(cx.input(i)?, "an Einsum operand")?;
        if kept.len() != spec.len() {
            let missing: Vec<i64> = spec
                .iter()
                .enumerate()
                .filter(|(_, c)| !kept.contains(c))
                .map(|(k, _)| k as i64)
                .collect();
            r = e.unsqueeze(r, &missing)?;
            r = e.expand(r, &shape)?;
        }
        grads.push(Some(r));
    }
    Ok(Grads {
        inputs: grads,
        outer: vec![],
    })
}

/// The fused recurrent ops: their backward is one fused op of the cellgraph domain
/// (`LSTMGrad`/`GRUGrad`/`RNNGrad`, a CPU kernel that recomputes the forward and runs
/// backpropagation through time).
fn fused_rnn(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let op = cx
        .op
        .recurrent_pair()
        .ok_or_else(|| Error::Internal("not a recurrent op".into()))?;
    // Forward inputs, cotangent inputs and gradient outputs of the backward op.
    let slots =
        GradSlots::of_op(cx.op).ok_or_else(|| Error::Internal("not a recurrent op".into()))?;
    let (n_fwd, n_cot) = (slots.forward_inputs, slots.cotangents);
    // A masked op's mask (after its forward inputs) goes last, after the cotangents.
    let mask = match cx.op {
        Op::LSTMMasked { .. } | Op::GRUMasked { .. } | Op::RNNMasked { .. } => Some(
            cx.ins
                .get(n_fwd)
                .copied()
                .flatten()
                .ok_or_else(|| cx.unsupported("a masked recurrent op without its mask"))?,
        ),
        _ => None,
    };
    let layout = match &op {
        Op::LSTMGrad { layout, .. } | Op::GRUGrad { layout, .. } | Op::RNNGrad { layout, .. } => {
            *layout
        }
        _ => 0,
    };
    if layout != 0 {
        return Err(cx.unsupported("layout=1 (the importer canonicalises it to layout 0)"));
    }
    e.g.import_opset(cellgraph_ir::ops::CELLGRAPH_DOMAIN, 1);
    let mut ins: Vec<Option<ValueRef>> = cx.ins.to_vec();
    ins.resize(n_fwd, None);
    for k in 0..n_cot {
        ins.push(cx.cots.get(k).copied().flatten());
    }
    // Trailing omitted inputs are dropped (the op's arity allows it).
    while ins.last().is_some_and(Option::is_none) {
        ins.pop();
    }
    if let Some(m) = mask {
        ins.resize(n_fwd + n_cot, None);
        ins.push(Some(m));
    }
    let mut names = Vec::new();
    for &s in slots.outputs {
        names.push(
            if cx.need(s) && cx.ins.get(s).copied().flatten().is_some() {
                e.fresh("d_rnn")
            } else {
                String::new()
            },
        );
    }
    while names.last().is_some_and(String::is_empty) {
        names.pop();
    }
    if names.is_empty() {
        return Ok(Grads::default());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let id = e.g.add_node("", op, &ins, &refs)?;
    let mut inputs = vec![None; cx.ins.len()];
    for (k, name) in names.iter().enumerate() {
        if !name.is_empty() && slots.outputs[k] < inputs.len() {
            inputs[slots.outputs[k]] = Some(ValueRef { node: id, slot: k });
        }
    }
    Ok(Grads {
        inputs,
        outer: vec![],
    })
}

/// `If`: an `If` on the same condition whose branches are the branches' VJPs; it outputs
/// the gradient of every float value either branch reads from outside.
fn if_rule(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::If {
        then_branch,
        else_branch,
    } = cx.op
    else {
        return Err(Error::Internal("not an If".into()));
    };
    let cond = cx.input(0)?;
    let cots: Vec<Option<(String, cellgraph_ir::ValueType)>> = cx
        .cots
        .iter()
        .map(|c| c.map(|c| (e.g.value(c).name.clone(), e.g.value(c).ty.clone())))
        .collect();
    let mut names: Vec<String> = Vec::new();
    for b in [then_branch, else_branch] {
        for &o in b.outers() {
            let v = ValueRef { node: o, slot: 0 };
            let val = b.value(v);
            if val.ty.dtype().is_some_and(DType::is_float) && !names.contains(&val.name) {
                names.push(val.name.clone());
            }
        }
    }
    let wrt: Vec<(String, cellgraph_ir::ValueType)> = names
        .iter()
        .filter_map(|n| e.g.find(n).map(|v| (n.clone(), e.g.value(v).ty.clone())))
        .collect();
    if wrt.is_empty() {
        return Ok(Grads::default());
    }
    let then_g = branch_vjp(then_branch, &cots, &wrt)?;
    let else_g = branch_vjp(else_branch, &cots, &wrt)?;
    let hints: Vec<String> = (0..wrt.len()).map(|k| format!("dif_{k}")).collect();
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let id = e.node(
        Op::If {
            then_branch: Box::new(then_g),
            else_branch: Box::new(else_g),
        },
        &[Some(cond)],
        &hint_refs,
    )?;
    Ok(Grads {
        inputs: vec![None; cx.ins.len()],
        outer: wrt
            .into_iter()
            .enumerate()
            .map(|(k, (name, _))| (name, ValueRef { node: id, slot: k }))
            .collect(),
    })
}

/// The forward Loop with more scan outputs: each carried value at the start of every
/// iteration, then the iteration number.
pub(crate) fn augment_loop(op: &Op, ins: &[Option<ValueRef>]) -> Result<(Op, usize)> {
    let Op::Loop { body } = op else {
        return Err(Error::Internal("not a Loop".into()));
    };
    let n = ins.len().saturating_sub(2);
    let mut body = (**body).clone();
    let mut outs = body.outputs().to_vec();
    let bins = body.input_values();
    for (k, v) in bins[2..].iter().enumerate() {
        let mut e = Emit::new(&mut body, &format!("residual_{k}"));
        outs.push(e.op(Op::Identity {}, &[*v], "carried")?);
    }
    let mut e = Emit::new(&mut body, "residual_iter");
    outs.push(e.op(Op::Identity {}, &[bins[0]], "iter")?);
    body.set_outputs(outs)?;
    Ok((
        Op::Loop {
            body: Box::new(body),
        },
        n + 1,
    ))
}

/// `Loop`: a backward `Scan` over the recorded iterations (carried values and iteration
/// numbers), in reverse, whose body recomputes each iteration and runs its VJP.
fn loop_rule(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::Loop { body } = cx.op else {
        return Err(Error::Internal("not a Loop".into()));
    };
    let n = cx.ins.len().saturating_sub(2);
    let k = cx.outs.len() - n;
    if cx.residuals.len() != n + 1 {
        return Err(Error::Internal(format!(
            "Loop {}: {} residual outputs for {n} carried values",
            cx.name,
            cx.residuals.len()
        )));
    }
    let (bwd, outer_names) = loop_body_vjp(body, n)?;
    let mut ins = Vec::new();
    for s in 0..n {
        ins.push(match cx.cots[s] {
            Some(c) => c,
            None => e.zeros_dyn(cx.outs[s])?,
        });
    }
    for name in &outer_names {
        let w =
            e.g.find(name)
                .ok_or_else(|| cx.unsupported(format!("outer value {name} not found")))?;
        ins.push(e.zeros_like(w, "a value a Loop body reads")?);
    }
    for &r in cx.residuals {
        ins.push(r);
    }
    for o in 0..k {
        ins.push(match cx.cots[n + o] {
            Some(c) => c,
            None => e.zeros_dyn(cx.outs[n + o])?,
        });
    }
    let n_scan = n + 1 + k;
    let mut hints: Vec<String> = (0..n).map(|s| format!("dloop_init_{s}")).collect();
    hints.extend((0..outer_names.len()).map(|w| format!("dloop_outer_{w}")));
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let ins_opt: Vec<Option<ValueRef>> = ins.into_iter().map(Some).collect();
    let id = e.node(
        Op::Scan {
            body: Box::new(bwd),
            num_scan_inputs: n_scan as i64,
            scan_input_axes: None,
            scan_input_directions: Some(vec![1; n_scan]),
            scan_output_axes: None,
            scan_output_directions: None,
            directions: None,
        },
        &ins_opt,
        &hint_refs,
    )?;
    let at = |slot| ValueRef { node: id, slot };
    let mut inputs = vec![None, None];
    for s in 0..n {
        inputs.push(cx.need(2 + s).then(|| at(s)));
    }
    inputs.truncate(cx.ins.len());
    Ok(Grads {
        inputs,
        outer: outer_names
            .into_iter()
            .enumerate()
            .map(|(w, name)| (name, at(n + w)))
            .collect(),
    })
}
