//! VJP rules of the `reduce` family (`OpKind::info().family`): `ReduceSum`, `ReduceMean`, `ReduceMax`, `ReduceMin`.

use super::{norm_axis, Grads, NodeCx};
use crate::emit::Emit;
use crate::{Error, Result};
use cellgraph_ir::{Op, Tensor};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
    let x = || cx.input(0);
    let y = cx.outs.first().copied();
    match cx.op {
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
        _ => Err(no_rule()),
    }
}
