//! VJP rules of the `shape` family (`OpKind::info().family`): reshapes, transposes, concatenation, splits, slices, gathers, tiles.

use super::{norm_axis, one, Grads, NodeCx};
use crate::emit::Emit;
use crate::Result;
use cellgraph_ir::{DType, Op, Tensor};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
    let x = || cx.input(0);
    match cx.op {
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
        Op::Tile {} => tile(e, cx),
        _ => Err(no_rule()),
    }
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
