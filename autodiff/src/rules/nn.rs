//! VJP rules of the `nn` family (`OpKind::info().family`): products and neural-network ops (`MatMul`, `Gemm`, `Einsum`, `Softmax`,
//! `Dropout`, `BatchNormalization`).

use super::{one, Grads, NodeCx};
use crate::emit::Emit;
use crate::{Error, Result};
use cellgraph_ir::{Op, ValueRef};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
    match cx.op {
        Op::Dropout { ratio, .. } => dropout(cx, *ratio),
        Op::MatMul {} => matmul(e, cx),
        Op::Gemm {
            alpha,
            beta,
            transA,
            transB,
        } => gemm(e, cx, *alpha, *beta, *transA != 0, *transB != 0),
        Op::Softmax { axis } | Op::LogSoftmax { axis } => softmax(e, cx, *axis),
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
        Op::Einsum { equation } => einsum(e, cx, equation),
        _ => Err(no_rule()),
    }
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
