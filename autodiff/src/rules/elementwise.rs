//! VJP rules of the `elementwise` family (`OpKind::info().family`): arithmetic with broadcasting, activations, `Clip`, `Cast`.

use super::{one, Grads, NodeCx};
use crate::emit::Emit;
use crate::{Error, Result};
use cellgraph_ir::{Op, ValueRef};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
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
