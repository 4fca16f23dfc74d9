//! Shape rules of data-movement and shape-computation ops, and `Constant`.

use super::infer::{broadcast, dim_from_i64, norm_axis, outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::tensor::Tensor;
use crate::types::Dim;

fn is_index(d: DType) -> bool {
    matches!(d, DType::I32 | DType::I64)
}

fn product(dims: &[Dim]) -> Dim {
    let mut p: u64 = 1;
    for d in dims {
        match d {
            Dim::Known(n) => match p.checked_mul(*n) {
                Some(q) => p = q,
                None => return Dim::Unknown,
            },
            _ => return Dim::Unknown,
        }
    }
    Dim::Known(p)
}

/// The tensor a `Constant` node holds (`None` if it holds no supported value).
pub fn constant_value(op: &Op) -> Option<Tensor> {
    match op {
        Op::Constant {
            value,
            value_float,
            value_floats,
            value_int,
            value_ints,
        } => {
            if let Some(t) = value {
                Some(t.clone())
            } else if let Some(x) = value_float {
                Some(Tensor::scalar_f32(*x))
            } else if let Some(v) = value_floats {
                Some(Tensor::F32(
                    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.clone()).ok()?,
                ))
            } else if let Some(x) = value_int {
                Some(Tensor::I64(ndarray::ArrayD::from_elem(
                    ndarray::IxDyn(&[]),
                    *x,
                )))
            } else {
                value_ints.as_ref().map(|v| Tensor::vec_i64(v))
            }
        }
        _ => None,
    }
}

/// Output types of a shape op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    match op {
        Op::Constant { .. } => {
            let set = op.attrs().len();
            if set != 1 {
                return Err(format!(
                    "Constant needs exactly one value attribute, has {set}"
                ));
            }
            let t = constant_value(op).ok_or("Constant has no supported value")?;
            let dims = t.shape().iter().map(|&d| Dim::Known(d as u64)).collect();
            outputs(cx, vec![tensor(Some(t.dtype()), Some(dims))])
        }
        Op::Concat { axis } => {
            let n = cx.inputs.len();
            let d = cx.same_dtype(&(0..n).collect::<Vec<_>>())?;
            let mut out: Option<Vec<Dim>> = None;
            let mut axis_sum = Some(0u64);
            let mut ax = None;
            for i in 0..n {
                let Some(s) = cx.tensor(i)?.shape else {
                    axis_sum = None;
                    continue;
                };
                let a = norm_axis(*axis, s.len())?;
                ax = Some(a);
                axis_sum = match (axis_sum, &s[a]) {
                    (Some(x), Dim::Known(y)) => x.checked_add(*y),
                    _ => None,
                };
                match &mut out {
                    None => out = Some(s.clone()),
                    Some(o) => {
                        if o.len() != s.len() {
                            return Err(format!(
                                "input {i} has rank {}, input 0 has {}",
                                s.len(),
                                o.len()
                            ));
                        }
                        for (j, (p, q)) in o.iter_mut().zip(&s).enumerate() {
                            if j == a {
                                continue;
                            }
                            match (&*p, q) {
                                (Dim::Known(x), Dim::Known(y)) if x != y => {
                                    return Err(format!(
                                        "input {i} dimension {j} is {y}, expected {x}"
                                    ))
                                }
                                (Dim::Known(_), _) => {}
                                (_, Dim::Known(y)) => *p = Dim::Known(*y),
                                _ => {}
                            }
                        }
                    }
                }
            }
            if let (Some(o), Some(a)) = (&mut out, ax) {
                o[a] = axis_sum.map(Dim::Known).unwrap_or(Dim::Unknown);
            }
            outputs(cx, vec![tensor(d, out)])
        }
        Op::Split {
            axis,
            split,
            num_outputs,
        } => {
            let x = cx.tensor(0)?;
            let n = cx.num_outputs;
            if n == 0 {
                return Err("Split needs at least one output".into());
            }
            let sizes: Option<Vec<i64>> = split.clone().or_else(|| cx.const_ints(1));
            if let Some(s) = &sizes {
                if s.len() != n {
                    return Err(format!("split has {} sizes for {n} outputs", s.len()));
                }
                if s.iter().any(|&v| v < 0) {
                    return Err(format!("negative split size in {s:?}"));
                }
            }
            if let Some(k) = num_outputs {
                if *k as usize != n || *k < 1 {
                    return Err(format!("num_outputs={k} but the node has {n} outputs"));
                }
            }
            let Some(shape) = x.shape else {
                return outputs(cx, vec![tensor(x.dtype, None); n]);
            };
            let a = norm_axis(*axis, shape.len())?;
            let per: Vec<Dim> = match (&sizes, &shape[a]) {
                (Some(s), total) => {
                    let sum: i64 = s.iter().sum();
                    if let Dim::Known(t) = total {
                        if sum as u64 != *t {
                            return Err(format!("split sizes {s:?} sum to {sum}, axis has {t}"));
                        }
                    }
                    s.iter().map(|&v| Dim::Known(v as u64)).collect()
                }
                (None, _) if cx.has(1) => vec![Dim::Unknown; n],
                (None, Dim::Known(t)) => {
                    let n64 = n as u64;
                    if num_outputs.is_some() {
                        let chunk = t.div_ceil(n64);
                        (0..n64)
                            .map(|i| Dim::Known(chunk.min(t.saturating_sub(i * chunk))))
                            .collect()
                    } else {
                        if t % n64 != 0 {
                            return Err(format!("axis of size {t} does not split evenly into {n}"));
                        }
                        vec![Dim::Known(t / n64); n]
                    }
                }
                (None, _) => vec![Dim::Unknown; n],
            };
            let outs = per
                .into_iter()
                .map(|d| {
                    let mut s = shape.clone();
                    s[a] = d;
                    tensor(x.dtype, Some(s))
                })
                .collect();
            outputs(cx, outs)
        }
        Op::Slice {} => {
            let x = cx.tensor(0)?;
            for i in 1..5 {
                if cx.has(i) {
                    cx.dtype_in(i, is_index, "i32 or i64")?;
                }
            }
            let Some(mut shape) = x.shape else {
                return outputs(cx, vec![tensor(x.dtype, None)]);
            };
            let r = shape.len();
            let (starts, ends) = (cx.const_ints(1), cx.const_ints(2));
            let axes = if cx.has(3) {
                cx.const_ints(3)
            } else {
                starts.as_ref().map(|s| (0..s.len() as i64).collect())
            };
            let steps = if cx.has(4) {
                cx.const_ints(4)
            } else {
                starts.as_ref().map(|s| vec![1; s.len()])
            };
            match (starts, ends, axes, steps) {
                (Some(st), Some(en), Some(ax), Some(sp)) => {
                    if st.len() != en.len() || st.len() != ax.len() || st.len() != sp.len() {
                        return Err("starts, ends, axes and steps differ in length".into());
                    }
                    let mut seen = vec![false; r];
                    for k in 0..st.len() {
                        let a = norm_axis(ax[k], r)?;
                        if std::mem::replace(&mut seen[a], true) {
                            return Err(format!("axis {a} is sliced twice"));
                        }
                        if sp[k] == 0 {
                            return Err("slice step 0".into());
                        }
                        if let Dim::Known(n) = shape[a] {
                            shape[a] = Dim::Known(slice_len(n as i64, st[k], en[k], sp[k]));
                        }
                    }
                }
                (_, _, Some(ax), _) => {
                    for a in ax {
                        let a = norm_axis(a, r)?;
                        shape[a] = Dim::Unknown;
                    }
                }
                _ => shape = vec![Dim::Unknown; r],
            }
            outputs(cx, vec![tensor(x.dtype, Some(shape))])
        }
        Op::Gather { axis } => {
            let x = cx.tensor(0)?;
            let idx = cx.tensor(1)?;
            cx.dtype_in(1, is_index, "i32 or i64")?;
            let shape = match (x.shape, idx.shape) {
                (Some(s), Some(i)) => {
                    let a = norm_axis(*axis, s.len())?;
                    let mut out = s[..a].to_vec();
                    out.extend(i);
                    out.extend_from_slice(&s[a + 1..]);
                    Some(out)
                }
                _ => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Reshape { allowzero } => {
            let x = cx.tensor(0)?;
            cx.dtype_in(1, |d| d == DType::I64, "i64")?;
            let shape = match cx.const_ints(1) {
                Some(target) => Some(reshape_dims(x.shape.as_deref(), &target, *allowzero != 0)?),
                None => cx
                    .tensor(1)?
                    .known_dims()
                    .and_then(|d| unknown_dims(d.first().copied())),
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Transpose { perm } => {
            let x = cx.tensor(0)?;
            let shape = match x.shape {
                Some(s) => {
                    let r = s.len();
                    let p: Vec<i64> = perm
                        .clone()
                        .unwrap_or_else(|| (0..r as i64).rev().collect());
                    if p.len() != r {
                        return Err(format!("perm {p:?} has {} entries for rank {r}", p.len()));
                    }
                    let mut seen = vec![false; r];
                    let mut out = Vec::with_capacity(r);
                    for &q in &p {
                        let a = norm_axis(q, r)?;
                        if std::mem::replace(&mut seen[a], true) {
                            return Err(format!("perm {p:?} is not a permutation"));
                        }
                        out.push(s[a].clone());
                    }
                    Some(out)
                }
                None => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Squeeze { axes } => {
            let x = cx.tensor(0)?;
            let axes = axes.clone().or_else(|| cx.const_ints(1));
            let shape = match (x.shape, axes) {
                (Some(s), Some(ax)) => {
                    let mut drop = vec![false; s.len()];
                    for a in ax {
                        let a = norm_axis(a, s.len())?;
                        if let Dim::Known(n) = s[a] {
                            if n != 1 {
                                return Err(format!("cannot squeeze axis {a} of size {n}"));
                            }
                        }
                        drop[a] = true;
                    }
                    Some(
                        s.into_iter()
                            .zip(drop)
                            .filter(|(_, d)| !d)
                            .map(|(x, _)| x)
                            .collect(),
                    )
                }
                (Some(s), None) if !cx.has(1) => {
                    if s.iter().all(|d| d.known().is_some()) {
                        Some(s.into_iter().filter(|d| *d != Dim::Known(1)).collect())
                    } else {
                        None
                    }
                }
                _ => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Unsqueeze { axes } => {
            let x = cx.tensor(0)?;
            let axes = axes.clone().or_else(|| cx.const_ints(1));
            let shape = match (x.shape, axes) {
                (Some(s), Some(ax)) => {
                    let r = s.len() + ax.len();
                    let mut ins = vec![false; r];
                    for a in ax {
                        let a = norm_axis(a, r)?;
                        if std::mem::replace(&mut ins[a], true) {
                            return Err(format!("axis {a} is inserted twice"));
                        }
                    }
                    let mut it = s.into_iter();
                    Some(
                        ins.into_iter()
                            .map(|i| {
                                if i {
                                    Dim::Known(1)
                                } else {
                                    it.next().unwrap_or(Dim::Unknown)
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Flatten { axis } => {
            let x = cx.tensor(0)?;
            let shape = match x.shape {
                Some(s) => {
                    let r = s.len() as i64;
                    let a = if *axis < 0 { axis + r } else { *axis };
                    if a < 0 || a > r {
                        return Err(format!("axis {axis} is out of range for rank {r}"));
                    }
                    let a = a as usize;
                    Some(vec![product(&s[..a]), product(&s[a..])])
                }
                None => Some(vec![Dim::Unknown, Dim::Unknown]),
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Expand {} => {
            let x = cx.tensor(0)?;
            cx.dtype_in(1, |d| d == DType::I64, "i64")?;
            let shape = match cx.const_ints(1) {
                Some(t) => {
                    let dims: Vec<Dim> = t
                        .iter()
                        .map(|&v| dim_from_i64(v))
                        .collect::<Result<_, _>>()?;
                    broadcast(&[x.shape, Some(dims)])?
                }
                None => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Tile {} => {
            let x = cx.tensor(0)?;
            cx.dtype_in(1, |d| d == DType::I64, "i64")?;
            let shape = match (x.shape, cx.const_ints(1)) {
                (Some(s), Some(rep)) => {
                    if rep.len() != s.len() {
                        return Err(format!(
                            "repeats has {} entries for rank {}",
                            rep.len(),
                            s.len()
                        ));
                    }
                    let mut out = Vec::new();
                    for (d, r) in s.iter().zip(rep) {
                        if r < 0 {
                            return Err(format!("negative repeat {r}"));
                        }
                        out.push(match d {
                            Dim::Known(n) => n
                                .checked_mul(r as u64)
                                .map(Dim::Known)
                                .unwrap_or(Dim::Unknown),
                            _ if r == 1 => d.clone(),
                            _ => Dim::Unknown,
                        });
                    }
                    Some(out)
                }
                (Some(s), None) => Some(vec![Dim::Unknown; s.len()]),
                _ => None,
            };
            outputs(cx, vec![tensor(x.dtype, shape)])
        }
        Op::Shape { start, end } => {
            let x = cx.tensor(0)?;
            let len = x.rank().map(|r| {
                let r = r as i64;
                let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r);
                let s = clamp(start.unwrap_or(0));
                let e = clamp(end.unwrap_or(r));
                Dim::Known((e - s).max(0) as u64)
            });
            outputs(
                cx,
                vec![tensor(
                    Some(DType::I64),
                    Some(vec![len.unwrap_or(Dim::Unknown)]),
                )],
            )
        }
        Op::ConstantOfShape { value } => {
            cx.dtype_in(0, |d| d == DType::I64, "i64")?;
            let d = match value {
                Some(t) => {
                    if t.len() != 1 {
                        return Err(format!("value must hold one element, holds {}", t.len()));
                    }
                    t.dtype()
                }
                None => DType::F32,
            };
            let shape = match cx.const_ints(0) {
                Some(v) => Some(
                    v.iter()
                        .map(|&x| dim_from_i64(x))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => cx
                    .tensor(0)?
                    .known_dims()
                    .and_then(|k| unknown_dims(k.first().copied())),
            };
            outputs(cx, vec![tensor(Some(d), shape)])
        }
        Op::Range {} => {
            let d = cx.same_dtype(&[0, 1, 2])?;
            for i in 0..3 {
                if let Some(r) = cx.tensor(i)?.rank() {
                    if r != 0 {
                        return Err(format!("input {i} must be a scalar, has rank {r}"));
                    }
                }
            }
            let len = match (cx.constant(0), cx.constant(1), cx.constant(2)) {
                (Some(s), Some(l), Some(dl)) => {
                    let (s, l, dl) = (s.to_f64_vec()[0], l.to_f64_vec()[0], dl.to_f64_vec()[0]);
                    if dl == 0.0 {
                        return Err("Range delta is 0".into());
                    }
                    let n = ((l - s) / dl).ceil().max(0.0);
                    if n.is_finite() {
                        Dim::Known(n as u64)
                    } else {
                        Dim::Unknown
                    }
                }
                _ => Dim::Unknown,
            };
            outputs(cx, vec![tensor(d, Some(vec![len]))])
        }
        other => Err(format!("{} is not a shape op", other.name())),
    }
}

/// The number of elements a slice `start..end` by `step` selects from an axis of size `n`
/// (ONNX clamping rules).
pub fn slice_len(n: i64, start: i64, end: i64, step: i64) -> u64 {
    let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (s, e) = (norm(start), norm(end));
    if step > 0 {
        let (s, e) = (s.clamp(0, n), e.clamp(0, n));
        if e > s {
            ((e - s) as u64).div_ceil(step as u64)
        } else {
            0
        }
    } else {
        let (s, e) = (s.clamp(-1, n - 1), e.clamp(-1, n - 1));
        if s > e {
            ((s - e) as u64).div_ceil(step.unsigned_abs())
        } else {
            0
        }
    }
}

/// The output dims of Reshape for a constant target (ONNX 0 and -1 rules).
pub fn reshape_dims(
    input: Option<&[Dim]>,
    target: &[i64],
    allowzero: bool,
) -> Result<Vec<Dim>, String> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &t) in target.iter().enumerate() {
        out.push(match t {
            -1 => {
                if infer_at.replace(i).is_some() {
                    return Err("more than one -1 in the target shape".into());
                }
                Dim::Unknown
            }
            0 if !allowzero => match input {
                Some(s) => s.get(i).cloned().ok_or_else(|| {
                    format!("0 at position {i} copies a dimension the input lacks")
                })?,
                None => Dim::Unknown,
            },
            v => dim_from_i64(v)?,
        });
    }
    if let (Some(at), Some(s)) = (infer_at, input) {
        if let (Dim::Known(total), Dim::Known(known)) = (
            product(s),
            product(
                &out.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != at)
                    .map(|(_, d)| d.clone())
                    .collect::<Vec<_>>(),
            ),
        ) {
            if known == 0 || total % known != 0 {
                return Err(format!("cannot reshape {total} elements into {target:?}"));
            }
            out[at] = Dim::Known(total / known);
        }
    } else if let (None, Some(s)) = (infer_at, input) {
        if let (Dim::Known(a), Dim::Known(b)) = (product(s), product(&out)) {
            if a != b {
                return Err(format!(
                    "cannot reshape {a} elements into {target:?} ({b} elements)"
                ));
            }
        }
    }
    Ok(out)
}

/// The largest rank shape rules will materialise from a shape-vector length.
pub const MAX_RANK: u64 = 256;

/// `rank` unknown dimensions, or an unknown rank when `rank` is unknown or absurd.
fn unknown_dims(rank: Option<u64>) -> Option<Vec<Dim>> {
    rank.filter(|&r| r <= MAX_RANK)
        .map(|r| vec![Dim::Unknown; r as usize])
}
