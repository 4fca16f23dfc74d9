//! Shape rules of reductions and ArgMax.

use super::infer::{norm_axis, outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::types::Dim;

/// Output types of a reduction.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    let x = cx.tensor(0)?;
    match op {
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
            if cx.has(1) {
                cx.dtype_in(1, |d| d == DType::I64, "i64")?;
            }
            let axes = axes.clone().or_else(|| cx.const_ints(1));
            let shape = match (x.shape, axes) {
                (Some(s), Some(ax)) if !(ax.is_empty() && *noop_with_empty_axes == 0) => {
                    let mut red = vec![false; s.len()];
                    for a in ax {
                        red[norm_axis(a, s.len())?] = true;
                    }
                    Some(reduce_dims(&s, &red, *keepdims != 0))
                }
                (Some(s), _) if !cx.has(1) || cx.const_ints(1).is_some_and(|a| a.is_empty()) => {
                    if *noop_with_empty_axes != 0 {
                        Some(s)
                    } else {
                        Some(reduce_dims(&s, &vec![true; s.len()], *keepdims != 0))
                    }
                }
                (Some(s), _) if *keepdims != 0 => Some(vec![Dim::Unknown; s.len()]),
                _ => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::ArgMax { axis, keepdims, .. } => {
            let shape = match x.shape {
                Some(s) => {
                    let mut red = vec![false; s.len()];
                    red[norm_axis(*axis, s.len())?] = true;
                    Some(reduce_dims(&s, &red, *keepdims != 0))
                }
                None => None,
            };
            outputs(cx, vec![tensor(Some(DType::I64), shape)])
        }
        other => Err(format!("{} is not a reduction", other.name())),
    }
}

fn reduce_dims(s: &[Dim], red: &[bool], keep: bool) -> Vec<Dim> {
    s.iter()
        .zip(red)
        .filter_map(|(d, &r)| match (r, keep) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Known(1)),
            (true, false) => None,
        })
        .collect()
}
