//! Kernels of data-movement and shape-computation ops, and `Constant`.

use super::util::{axis, checked_len, input, ints, map_all, one, opt_ints};
use crate::data::Data;
use cellgraph_ir::ops::shape::{constant_value, reshape_dims};
use cellgraph_ir::{DType, Op, Tensor, ValueType};
use ndarray::{concatenate, ArrayD, Axis, IxDyn, Slice};

/// Runs a shape op.
pub fn eval(op: &Op, ins: &[Option<&Data>], out_types: &[&ValueType]) -> Result<Vec<Data>, String> {
    match op {
        Op::Constant { .. } => one(constant_value(op).ok_or("Constant has no value")?),
        Op::Shape { start, end } => {
            let s = input(ins, 0)?.shape();
            let r = s.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (clamp(start.unwrap_or(0)), clamp(end.unwrap_or(r)));
            let v: Vec<i64> = if a < b {
                s[a..b].iter().map(|&d| d as i64).collect()
            } else {
                vec![]
            };
            one(Tensor::vec_i64(&v))
        }
        Op::Concat { axis: ax } => {
            let ts: Vec<&Tensor> = (0..ins.len())
                .map(|i| input(ins, i))
                .collect::<Result<_, _>>()?;
            let r = ts[0].shape().len();
            let a = axis(*ax, r)?;
            one(concat(&ts, a)?)
        }
        Op::Split {
            axis: ax,
            split,
            num_outputs,
        } => {
            let x = input(ins, 0)?;
            let a = axis(*ax, x.shape().len())?;
            let n = out_types.len();
            let total = x.shape()[a];
            let sizes: Vec<usize> = match split.clone().map(Some).unwrap_or(opt_ints(ins, 1)?) {
                Some(s) => s
                    .iter()
                    .map(|&v| usize::try_from(v).map_err(|_| format!("negative split {v}")))
                    .collect::<Result<_, _>>()?,
                None if num_outputs.is_some() => {
                    let chunk = total.div_ceil(n.max(1));
                    (0..n)
                        .map(|i| chunk.min(total.saturating_sub(i * chunk)))
                        .collect()
                }
                None => {
                    if n == 0 || total % n != 0 {
                        return Err(format!(
                            "axis of size {total} does not split evenly into {n}"
                        ));
                    }
                    vec![total / n; n]
                }
            };
            if sizes.iter().sum::<usize>() != total || sizes.len() != n {
                return Err(format!(
                    "split sizes {sizes:?} do not fit an axis of {total} into {n} outputs"
                ));
            }
            let mut start = 0;
            let mut out = Vec::new();
            for s in sizes {
                let sl = Slice::from(start..start + s);
                out.push(Data::Tensor(
                    map_all!(x, v => v.slice_axis(Axis(a), sl).to_owned()),
                ));
                start += s;
            }
            Ok(out)
        }
        Op::Slice {} => {
            let x = input(ins, 0)?;
            let r = x.shape().len();
            let starts = ints(ins, 1)?;
            let ends = ints(ins, 2)?;
            let axes = opt_ints(ins, 3)?.unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = opt_ints(ins, 4)?.unwrap_or_else(|| vec![1; starts.len()]);
            if ends.len() != starts.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return Err("starts, ends, axes and steps differ in length".into());
            }
            let mut t = x.clone();
            for k in 0..starts.len() {
                let a = axis(axes[k], r)?;
                let n = t.shape()[a] as i64;
                let step = steps[k];
                if step == 0 {
                    return Err("slice step 0".into());
                }
                let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
                let (s, e) = (norm(starts[k]), norm(ends[k]));
                let sl = if step > 0 {
                    let (s, e) = (s.clamp(0, n), e.clamp(0, n));
                    Slice::new(s as isize, Some(e.max(s) as isize), step as isize)
                } else {
                    let (s, e) = (s.clamp(-1, n - 1), e.clamp(-1, n - 1));
                    if s <= e {
                        Slice::new(0, Some(0), 1)
                    } else {
                        // ndarray slices with negative steps count from the end of the range.
                        Slice::new((e + 1) as isize, Some((s + 1) as isize), step as isize)
                    }
                };
                t = map_all!(&t, v => v.slice_axis(Axis(a), sl).to_owned());
            }
            one(t)
        }
        Op::Gather { axis: ax } => {
            let x = input(ins, 0)?;
            let idx = ints(ins, 1)?;
            let ishape = input(ins, 1)?.shape().to_vec();
            let a = axis(*ax, x.shape().len())?;
            let n = x.shape()[a] as i64;
            let idx: Vec<usize> = idx
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + n } else { i };
                    if j < 0 || j >= n {
                        Err(format!("index {i} is out of range for an axis of {n}"))
                    } else {
                        Ok(j as usize)
                    }
                })
                .collect::<Result<_, _>>()?;
            let mut oshape = x.shape()[..a].to_vec();
            oshape.extend(&ishape);
            oshape.extend(&x.shape()[a + 1..]);
            checked_len(&oshape)?;
            one(map_all!(x, v => {
                let sel = v.select(Axis(a), &idx);
                sel.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&oshape)).map_err(|e| e.to_string())?
            }))
        }
        Op::Reshape { allowzero } => {
            let x = input(ins, 0)?;
            let target = ints(ins, 1)?;
            let dims: Vec<cellgraph_ir::Dim> = x
                .shape()
                .iter()
                .map(|&d| cellgraph_ir::Dim::Known(d as u64))
                .collect();
            let out = reshape_dims(Some(&dims), &target, *allowzero != 0)?;
            let shape: Vec<usize> = out
                .iter()
                .map(|d| {
                    d.known()
                        .map(|k| k as usize)
                        .ok_or("cannot infer the reshape target")
                })
                .collect::<Result<_, _>>()?;
            one(reshape(x, &shape)?)
        }
        Op::Flatten { axis: ax } => {
            let x = input(ins, 0)?;
            let r = x.shape().len() as i64;
            let a = if *ax < 0 { ax + r } else { *ax };
            if a < 0 || a > r {
                return Err(format!("axis {ax} is out of range"));
            }
            let (p, q) = x.shape().split_at(a as usize);
            one(reshape(x, &[p.iter().product(), q.iter().product()])?)
        }
        Op::Squeeze { axes } => {
            let x = input(ins, 0)?;
            let ax = axes.clone().map(Some).unwrap_or(opt_ints(ins, 1)?);
            let s = x.shape();
            let drop: Vec<bool> = match ax {
                Some(ax) => {
                    let mut d = vec![false; s.len()];
                    for a in ax {
                        let a = axis(a, s.len())?;
                        if s[a] != 1 {
                            return Err(format!("cannot squeeze axis {a} of size {}", s[a]));
                        }
                        d[a] = true;
                    }
                    d
                }
                None => s.iter().map(|&d| d == 1).collect(),
            };
            let shape: Vec<usize> = s
                .iter()
                .zip(&drop)
                .filter(|(_, d)| !**d)
                .map(|(x, _)| *x)
                .collect();
            one(reshape(x, &shape)?)
        }
        Op::Unsqueeze { axes } => {
            let x = input(ins, 0)?;
            let ax = axes.clone().map(Ok).unwrap_or_else(|| ints(ins, 1))?;
            let r = x.shape().len() + ax.len();
            let mut ins_at = vec![false; r];
            for a in ax {
                ins_at[axis(a, r)?] = true;
            }
            let mut it = x.shape().iter();
            let shape: Vec<usize> = ins_at
                .iter()
                .map(|&i| if i { 1 } else { *it.next().unwrap_or(&1) })
                .collect();
            one(reshape(x, &shape)?)
        }
        Op::Transpose { perm } => {
            let x = input(ins, 0)?;
            let r = x.shape().len();
            let p: Vec<usize> = match perm {
                Some(p) => p.iter().map(|&a| axis(a, r)).collect::<Result<_, _>>()?,
                None => (0..r).rev().collect(),
            };
            one(
                map_all!(x, v => v.clone().permuted_axes(IxDyn(&p)).as_standard_layout().into_owned()),
            )
        }
        Op::Expand {} => {
            let x = input(ins, 0)?;
            let target: Vec<usize> = ints(ins, 1)?
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| format!("negative dimension {v}")))
                .collect::<Result<_, _>>()?;
            let shape = super::util::broadcast_shape(x.shape(), &target)?;
            checked_len(&shape)?;
            one(map_all!(x, v => v.broadcast(IxDyn(&shape)).ok_or("cannot expand")?.to_owned()))
        }
        Op::Tile {} => {
            let x = input(ins, 0)?;
            let reps = ints(ins, 1)?;
            if reps.len() != x.shape().len() {
                return Err("repeats must have one entry per axis".into());
            }
            let mut out_shape = Vec::with_capacity(reps.len());
            for (&d, &r) in x.shape().iter().zip(&reps) {
                let r = usize::try_from(r).map_err(|_| format!("negative repeat {r}"))?;
                out_shape.push(d.checked_mul(r).ok_or("repeats overflow")?);
            }
            checked_len(&out_shape)?;
            let mut t = x.clone();
            for (a, &r) in reps.iter().enumerate() {
                let r = usize::try_from(r).map_err(|_| format!("negative repeat {r}"))?;
                let parts: Vec<&Tensor> = std::iter::repeat_n(&t, r).collect();
                t = if r == 0 {
                    let mut s = t.shape().to_vec();
                    s[a] = 0;
                    Tensor::zeros(t.dtype(), &s)
                } else {
                    concat(&parts, a)?
                };
            }
            one(t)
        }
        Op::ConstantOfShape { value } => {
            let shape: Vec<usize> = ints(ins, 0)?
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| format!("negative dimension {v}")))
                .collect::<Result<_, _>>()?;
            checked_len(&shape)?;
            let v = value.clone().unwrap_or_else(|| Tensor::scalar_f32(0.0));
            one(
                map_all!(&v, a => ArrayD::from_elem(IxDyn(&shape), *a.iter().next().ok_or("value is empty")?)),
            )
        }
        Op::Range {} => {
            let (s, l, d) = (input(ins, 0)?, input(ins, 1)?, input(ins, 2)?);
            let dt = s.dtype();
            let (s, l, d) = (s.to_f64_vec()[0], l.to_f64_vec()[0], d.to_f64_vec()[0]);
            if d == 0.0 {
                return Err("delta is 0".into());
            }
            let n = ((l - s) / d).ceil().max(0.0);
            if !n.is_finite() || n > (1u64 << 32) as f64 {
                return Err(format!("Range of {n} elements"));
            }
            let n = n as usize;
            checked_len(&[n])?;
            let t = if dt.is_int() {
                let (si, di) = (
                    input(ins, 0)?.as_i64_vec().ok_or("int")?[0],
                    input(ins, 2)?.as_i64_vec().ok_or("int")?[0],
                );
                let v: Vec<f64> = (0..n as i64).map(|i| (si + i * di) as f64).collect();
                Tensor::from_f64_vec(dt, &[n], &v)
            } else if dt == DType::F32 {
                // Accumulate in f32 as the reference does.
                let (s32, d32) = (s as f32, d as f32);
                let v: Vec<f64> = (0..n).map(|i| (s32 + i as f32 * d32) as f64).collect();
                Tensor::from_f64_vec(dt, &[n], &v)
            } else {
                let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
                Tensor::from_f64_vec(dt, &[n], &v)
            };
            one(t.map_err(|e| e.to_string())?)
        }
        other => Err(format!("{} has no shape kernel", other.name())),
    }
}

/// Reshapes (row-major) to `shape`.
pub fn reshape(x: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    if checked_len(shape)? != x.len() {
        return Err(format!("cannot reshape {:?} into {shape:?}", x.shape()));
    }
    Ok(
        map_all!(x, v => v.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).map_err(|e| e.to_string())?),
    )
}

/// Concatenates along axis `a`.
pub fn concat(ts: &[&Tensor], a: usize) -> Result<Tensor, String> {
    macro_rules! cat {
        ($v:ident) => {{
            let views: Vec<_> = ts
                .iter()
                .map(|t| match t {
                    Tensor::$v(x) => Ok(x.view()),
                    o => Err(format!("mixed dtypes {}", o.dtype())),
                })
                .collect::<Result<_, String>>()?;
            Tensor::$v(match concat_contiguous(&views, a) {
                Some(t) => t,
                None => concatenate(Axis(a), &views).map_err(|e| e.to_string())?,
            })
        }};
    }
    Ok(match ts.first().ok_or("nothing to concatenate")? {
        Tensor::F32(_) => cat!(F32),
        Tensor::F64(_) => cat!(F64),
        Tensor::F16(_) => cat!(F16),
        Tensor::BF16(_) => cat!(BF16),
        Tensor::I8(_) => cat!(I8),
        Tensor::I16(_) => cat!(I16),
        Tensor::I32(_) => cat!(I32),
        Tensor::I64(_) => cat!(I64),
        Tensor::U8(_) => cat!(U8),
        Tensor::U16(_) => cat!(U16),
        Tensor::U32(_) => cat!(U32),
        Tensor::U64(_) => cat!(U64),
        Tensor::Bool(_) => cat!(Bool),
    })
}

/// Concatenation of standard-layout arrays as block copies: for each index of the axes
/// before `a`, every input's contiguous run in turn. `None` (the caller falls back to
/// ndarray's general concatenation, which also reports shape errors) when an input is
/// not contiguous or the shapes disagree off the axis.
fn concat_contiguous<T: Clone>(
    views: &[ndarray::ArrayViewD<'_, T>],
    a: usize,
) -> Option<ArrayD<T>> {
    let first = views.first()?;
    let rank = first.ndim();
    if a >= rank
        || views.iter().any(|v| {
            v.ndim() != rank
                || !v.is_standard_layout()
                || (0..rank).any(|d| d != a && v.shape()[d] != first.shape()[d])
        })
    {
        return None;
    }
    let outer: usize = first.shape()[..a].iter().product();
    let inner: usize = first.shape()[a + 1..].iter().product();
    let runs: Vec<&[T]> = views.iter().map(|v| v.as_slice()).collect::<Option<_>>()?;
    let along: usize = views.iter().map(|v| v.shape()[a]).sum();
    let mut out = Vec::with_capacity(outer * along * inner);
    for o in 0..outer {
        for (v, run) in views.iter().zip(&runs) {
            let len = v.shape()[a] * inner;
            out.extend_from_slice(&run[o * len..(o + 1) * len]);
        }
    }
    let mut shape = first.shape().to_vec();
    shape[a] = along;
    ArrayD::from_shape_vec(IxDyn(&shape), out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_copy_concat_matches_ndarray_on_every_axis() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4]), (0..24).collect::<Vec<i32>>())
            .expect("shape");
        for ax in 0..3 {
            let mut shape = vec![2, 3, 4];
            shape[ax] = 5;
            let n: usize = shape.iter().product();
            let b = ArrayD::from_shape_vec(IxDyn(&shape), (100..100 + n as i32).collect())
                .expect("shape");
            let views = [a.view(), b.view(), a.view()];
            let fast = concat_contiguous(&views, ax).expect("contiguous inputs");
            assert_eq!(fast, concatenate(Axis(ax), &views).expect("concatenate"));
        }
        // A transposed view is not contiguous: the general path takes it.
        let t = a.view().reversed_axes();
        assert!(concat_contiguous(&[t.clone(), t], 0).is_none());
        // Shapes that disagree off the axis are left to the general path's error.
        let c = ArrayD::from_shape_vec(IxDyn(&[2, 4, 4]), vec![0; 32]).expect("shape");
        assert!(concat_contiguous(&[a.view(), c.view()], 0).is_none());
    }
}
