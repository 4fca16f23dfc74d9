//! Kernels of reductions and ArgMax.

use super::util::{axis, input, map_num, one, opt_ints};
use crate::data::Data;
use crate::num::Num;
use cellgraph_ir::{Op, Tensor};
use ndarray::{ArrayD, Axis};

/// Reduces `axes` of `a` with `f`, each lane seeded with its first element (so max and
/// min need no identity); `a` has no empty reduced axis.
fn reduce<T: Num>(
    a: &ArrayD<T>,
    axes: &[usize],
    keep: bool,
    f: impl Fn(T, T) -> T + Copy,
) -> ArrayD<T> {
    let mut out = a.clone();
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for &ax in sorted.iter().rev() {
        let mut acc = out.index_axis(Axis(ax), 0).to_owned();
        for view in out.axis_iter(Axis(ax)).skip(1) {
            acc.zip_mut_with(&view, |x, &y| *x = f(*x, y));
        }
        out = acc;
        if keep {
            out.insert_axis_inplace(Axis(ax));
        }
    }
    out
}

/// Sum over `axes`, with zeros for empty reduced axes.
fn sum<T: Num>(a: &ArrayD<T>, axes: &[usize], keep: bool) -> ArrayD<T> {
    let mut out = a.clone();
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for &ax in sorted.iter().rev() {
        out = out.fold_axis(Axis(ax), T::ZERO, |acc, &x| acc.add(x));
        if keep {
            out.insert_axis_inplace(Axis(ax));
        }
    }
    out
}

/// Runs a reduction.
pub fn eval(op: &Op, ins: &[Option<&Data>]) -> Result<Vec<Data>, String> {
    let x = input(ins, 0)?;
    let r = x.shape().len();
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
            let given = axes
                .clone()
                .map(Some)
                .unwrap_or(opt_ints(ins, 1)?)
                .filter(|a| !a.is_empty());
            let ax: Vec<usize> = match given {
                Some(a) => a.iter().map(|&v| axis(v, r)).collect::<Result<_, _>>()?,
                None if *noop_with_empty_axes != 0 => return one(x.clone()),
                None => (0..r).collect(),
            };
            let keep = *keepdims != 0;
            let count: usize = ax.iter().map(|&a| x.shape()[a]).product();
            if count == 0 && matches!(op, Op::ReduceMax { .. } | Op::ReduceMin { .. }) {
                return Err("cannot take the max or min of an empty set".into());
            }
            let t = match op {
                Op::ReduceSum { .. } => map_num!(x, a => sum(a, &ax, keep)),
                Op::ReduceMean { .. } => {
                    map_num!(x, a => sum(a, &ax, keep).mapv(|v| v.div(<_>::from_f64(count as f64)).unwrap_or_default()))
                }
                Op::ReduceMax { .. } => map_num!(x, a => reduce(a, &ax, keep, Num::max_)),
                _ => map_num!(x, a => reduce(a, &ax, keep, Num::min_)),
            };
            one(t)
        }
        Op::ArgMax {
            axis: ax,
            keepdims,
            select_last_index,
        } => {
            let a = axis(*ax, r)?;
            let v = x.to_f64_vec();
            let shape = x.shape();
            let (outer, n, inner) = (
                shape[..a].iter().product::<usize>(),
                shape[a],
                shape[a + 1..].iter().product::<usize>(),
            );
            if n == 0 {
                return Err("ArgMax over an empty axis".into());
            }
            let mut out = Vec::with_capacity(outer * inner);
            for o in 0..outer {
                for i in 0..inner {
                    let mut best = 0;
                    for k in 1..n {
                        let (cur, b) = (v[(o * n + k) * inner + i], v[(o * n + best) * inner + i]);
                        if cur > b || (*select_last_index != 0 && cur == b) {
                            best = k;
                        }
                    }
                    out.push(best as i64);
                }
            }
            let mut oshape = shape.to_vec();
            if *keepdims != 0 {
                oshape[a] = 1;
            } else {
                oshape.remove(a);
            }
            one(Tensor::I64(
                ArrayD::from_shape_vec(oshape, out).map_err(|e| e.to_string())?,
            ))
        }
        other => Err(format!("{} has no reduce kernel", other.name())),
    }
}
