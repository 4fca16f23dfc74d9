//! Kernels of matrix products, Einsum, BatchNormalization, Softmax and Dropout.

use super::util::{axis, broadcast_shape, checked_len, input, map_float, one, opt_input};
use crate::data::Data;
use crate::gemm::{dgemm, sgemm};
use crate::num::Num;
use cellgraph_ir::ops::nn::parse_einsum;
use cellgraph_ir::{Op, Tensor, ValueType};
use ndarray::{ArrayD, Axis, IxDyn};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Multiplies row-major `a` (m×k) by `b` (k×n) into `c` (m×n, overwritten).
trait MatMulElem: Num {
    fn mm(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], c: &mut [Self]);
}

impl MatMulElem for f32 {
    fn mm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        sgemm(
            m, k, n, 1.0, a, k as isize, 1, b, n as isize, 1, 0.0, c, n as isize, 1,
        );
    }
}

impl MatMulElem for f64 {
    fn mm(m: usize, k: usize, n: usize, a: &[f64], b: &[f64], c: &mut [f64]) {
        dgemm(
            m, k, n, 1.0, a, k as isize, 1, b, n as isize, 1, 0.0, c, n as isize, 1,
        );
    }
}

macro_rules! naive_mm {
    ($($t:ty),*) => { $(
        impl MatMulElem for $t {
            fn mm(m: usize, k: usize, n: usize, a: &[$t], b: &[$t], c: &mut [$t]) {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = <$t as Num>::ZERO;
                        for p in 0..k {
                            acc = acc.add(a[i * k + p].mul(b[p * n + j]));
                        }
                        c[i * n + j] = acc;
                    }
                }
            }
        }
    )* };
}
naive_mm!(half::f16, half::bf16, i8, i16, i32, i64, u8, u16, u32, u64);

fn matmul<T: MatMulElem>(a: &ArrayD<T>, b: &ArrayD<T>) -> Result<ArrayD<T>, String> {
    let (a1, b1) = (a.ndim() == 1, b.ndim() == 1);
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err("MatMul inputs must have rank ≥ 1".into());
    }
    let a = if a1 {
        a.clone().insert_axis(Axis(0))
    } else {
        a.clone()
    };
    let b = if b1 {
        b.clone().insert_axis(Axis(1))
    } else {
        b.clone()
    };
    let (m, k) = (a.shape()[a.ndim() - 2], a.shape()[a.ndim() - 1]);
    let (k2, n) = (b.shape()[b.ndim() - 2], b.shape()[b.ndim() - 1]);
    if k != k2 {
        return Err(format!(
            "inner dimensions differ: {:?} · {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let batch = broadcast_shape(&a.shape()[..a.ndim() - 2], &b.shape()[..b.ndim() - 2])?;
    let nb: usize = batch.iter().product();
    let mut ash = batch.clone();
    ash.extend([m, k]);
    let mut bsh = batch.clone();
    bsh.extend([k, n]);
    let mut osh = batch.clone();
    osh.extend([m, n]);
    checked_len(&osh)?;
    let av = a
        .broadcast(IxDyn(&ash))
        .ok_or("batch dims do not broadcast")?
        .as_standard_layout()
        .into_owned();
    let bv = b
        .broadcast(IxDyn(&bsh))
        .ok_or("batch dims do not broadcast")?
        .as_standard_layout()
        .into_owned();
    let (ad, bd) = (
        av.as_slice().ok_or("layout")?,
        bv.as_slice().ok_or("layout")?,
    );
    let mut out = vec![T::ZERO; nb * m * n];
    for i in 0..nb {
        T::mm(
            m,
            k,
            n,
            &ad[i * m * k..(i + 1) * m * k],
            &bd[i * k * n..(i + 1) * k * n],
            &mut out[i * m * n..(i + 1) * m * n],
        );
    }
    let mut res = ArrayD::from_shape_vec(IxDyn(&osh), out).map_err(|e| e.to_string())?;
    if b1 {
        let last = res.ndim() - 1;
        res = res.remove_axis(Axis(last));
    }
    if a1 {
        let at = res.ndim() - if b1 { 1 } else { 2 };
        res = res.remove_axis(Axis(at));
    }
    Ok(res)
}

fn gemm_op<T: MatMulElem>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    c: Option<&ArrayD<T>>,
    ta: bool,
    tb: bool,
    alpha: f64,
    beta: f64,
) -> Result<ArrayD<T>, String> {
    if a.ndim() != 2 || b.ndim() != 2 {
        return Err("Gemm takes 2-D A and B".into());
    }
    let a = if ta { a.t().to_owned() } else { a.clone() };
    let b = if tb { b.t().to_owned() } else { b.clone() };
    let mut y = matmul(&a.into_dyn(), &b.into_dyn())?;
    if alpha != 1.0 {
        let al = T::from_f64(alpha);
        y.mapv_inplace(|v| v.mul(al));
    }
    if let Some(c) = c {
        let be = T::from_f64(beta);
        let cb = c
            .broadcast(y.raw_dim())
            .ok_or("C does not broadcast to the result")?;
        y.zip_mut_with(&cb, |v, &cv| *v = v.add(cv.mul(be)));
    }
    Ok(y)
}

fn softmax<T: Num>(x: &ArrayD<T>, ax: usize, log: bool) -> ArrayD<T> {
    let mut out = x.mapv(|v| v.to_f64());
    for mut lane in out.lanes_mut(Axis(ax)) {
        let max = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = lane.iter().map(|v| (v - max).exp()).sum();
        lane.mapv_inplace(|v| {
            if log {
                v - max - sum.ln()
            } else {
                (v - max).exp() / sum
            }
        });
    }
    out.mapv(T::from_f64)
}

fn einsum(eq: &str, ts: &[&Tensor]) -> Result<Tensor, String> {
    einsum_with(eq, ts, true)
}

/// Einsum; `fast` lets two-operand float equations run as batched GEMMs.
fn einsum_with(eq: &str, ts: &[&Tensor], fast: bool) -> Result<Tensor, String> {
    let spec = parse_einsum(eq)?;
    if spec.inputs.len() != ts.len() {
        return Err(format!(
            "equation has {} terms for {} inputs",
            spec.inputs.len(),
            ts.len()
        ));
    }
    // Expand the ellipsis into labels '0', '1', ... aligned from the right.
    let mut ell_rank = 0;
    for (term, t) in spec.inputs.iter().zip(ts) {
        if term.contains(&'.') {
            ell_rank = ell_rank.max(t.shape().len() + 1 - term.len());
        }
    }
    let ell: Vec<char> = (0..ell_rank).map(|i| char::from(b'0' + i as u8)).collect();
    let expand = |term: &[char], rank: usize| -> Vec<char> {
        let mut out = Vec::new();
        for &c in term {
            if c == '.' {
                let n = rank + 1 - term.len();
                out.extend_from_slice(&ell[ell_rank - n..]);
            } else {
                out.push(c);
            }
        }
        out
    };
    let terms: Vec<Vec<char>> = spec
        .inputs
        .iter()
        .zip(ts)
        .map(|(t, x)| expand(t, x.shape().len()))
        .collect();
    let out_labels: Vec<char> = spec
        .output
        .iter()
        .flat_map(|&c| if c == '.' { ell.clone() } else { vec![c] })
        .collect();
    let mut size: BTreeMap<char, usize> = BTreeMap::new();
    for (term, t) in terms.iter().zip(ts) {
        if term.len() != t.shape().len() {
            return Err(format!(
                "term {term:?} does not match shape {:?}",
                t.shape()
            ));
        }
        for (&c, &d) in term.iter().zip(t.shape()) {
            let e = size.entry(c).or_insert(d);
            if *e == 1 {
                *e = d;
            } else if d != 1 && *e != d {
                return Err(format!("label {c:?} has sizes {e} and {d}"));
            }
        }
    }
    let labels: Vec<char> = size.keys().copied().collect();
    let dims: Vec<usize> = labels.iter().map(|c| size[c]).collect();
    let pos = |c: char| labels.iter().position(|&l| l == c).unwrap_or(0);
    if let ([a, b], true) = (ts, fast) {
        let out = match (a, b) {
            (Tensor::F32(x), Tensor::F32(y)) => {
                einsum2(&terms[0], &terms[1], &out_labels, x, y).map(|r| r.map(Tensor::F32))
            }
            (Tensor::F64(x), Tensor::F64(y)) => {
                einsum2(&terms[0], &terms[1], &out_labels, x, y).map(|r| r.map(Tensor::F64))
            }
            _ => None,
        };
        if let Some(out) = out {
            return out;
        }
    }
    let total = checked_len(&dims)?;
    if total > 1 << 30 {
        return Err(format!(
            "einsum iteration space of {total} is too large for the reference kernel"
        ));
    }
    let data: Vec<Vec<f64>> = ts.iter().map(|t| t.to_f64_vec()).collect();
    let strides: Vec<Vec<(usize, usize)>> = terms
        .iter()
        .zip(ts)
        .map(|(term, t)| {
            let mut s = vec![0usize; term.len()];
            let mut acc = 1;
            for i in (0..term.len()).rev() {
                s[i] = if t.shape()[i] == 1 { 0 } else { acc };
                acc *= t.shape()[i];
            }
            term.iter()
                .enumerate()
                .map(|(i, &c)| (pos(c), s[i]))
                .collect()
        })
        .collect();
    let oshape: Vec<usize> = out_labels.iter().map(|c| size[c]).collect();
    let mut ostr = vec![0usize; out_labels.len()];
    let mut acc = 1;
    for i in (0..out_labels.len()).rev() {
        ostr[i] = acc;
        acc *= oshape[i];
    }
    let opos: Vec<(usize, usize)> = out_labels
        .iter()
        .enumerate()
        .map(|(i, &c)| (pos(c), ostr[i]))
        .collect();
    let mut out = vec![0.0f64; checked_len(&oshape)?];
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..total {
        let mut prod = 1.0;
        for (d, st) in data.iter().zip(&strides) {
            let off: usize = st.iter().map(|&(p, s)| idx[p] * s).sum();
            prod *= d[off];
        }
        let o: usize = opos.iter().map(|&(p, s)| idx[p] * s).sum();
        out[o] += prod;
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Tensor::from_f64_vec(ts[0].dtype(), &oshape, &out).map_err(|e| e.to_string())
}

/// Two-operand Einsum as batched GEMMs: labels in both inputs and the output are batch
/// axes, labels in both inputs only are contracted, the others are rows (first input) or
/// columns (second input); labels in one input only and not in the output are summed
/// first. `None` when the equation needs the general kernel (a label repeated within a
/// term, or a size-1 axis broadcast against a larger one).
fn einsum2<T: MatMulElem>(
    ta: &[char],
    tb: &[char],
    out: &[char],
    a: &ArrayD<T>,
    b: &ArrayD<T>,
) -> Option<Result<ArrayD<T>, String>> {
    let unique = |t: &[char]| (1..t.len()).all(|i| !t[..i].contains(&t[i]));
    if !unique(ta) || !unique(tb) || !unique(out) {
        return None;
    }
    for (i, c) in ta.iter().enumerate() {
        if let Some(j) = tb.iter().position(|d| d == c) {
            if a.shape()[i] != b.shape()[j] {
                return None;
            }
        }
    }
    // Sum away labels that appear in one input only and not in the output.
    let reduce = |x: &ArrayD<T>, t: &[char], other: &[char]| -> (Option<ArrayD<T>>, Vec<char>) {
        let mut summed: Option<ArrayD<T>> = None;
        let mut kept = t.to_vec();
        for i in (0..t.len()).rev() {
            if !other.contains(&t[i]) && !out.contains(&t[i]) {
                let src = summed.as_ref().unwrap_or(x);
                summed = Some(src.map_axis(Axis(i), |lane| {
                    lane.iter().fold(<T as Num>::ZERO, |acc, v| acc.add(*v))
                }));
                kept.remove(i);
            }
        }
        (summed, kept)
    };
    let (a_sum, ta) = reduce(a, ta, tb);
    let (b_sum, tb) = reduce(b, tb, &ta);
    let a = a_sum.as_ref().unwrap_or(a);
    let b = b_sum.as_ref().unwrap_or(b);
    // Swap the operands when that puts the product's axes in the output's order (the
    // gradient of a kernel, `bkl,bij->ijkl`), so the result needs no permuting copy.
    let only = |t: &[char], other: &[char]| -> Vec<char> {
        t.iter().copied().filter(|c| !other.contains(c)).collect()
    };
    let free: Vec<char> = out
        .iter()
        .copied()
        .filter(|c| !(ta.contains(c) && tb.contains(c)))
        .collect();
    let (rows_a, cols_b) = (only(&ta, &tb), only(&tb, &ta));
    let swap =
        free != [rows_a.clone(), cols_b.clone()].concat() && free == [cols_b, rows_a].concat();
    let (a, b, ta, tb) = if swap { (b, a, tb, ta) } else { (a, b, ta, tb) };
    let batch: Vec<char> = out
        .iter()
        .copied()
        .filter(|c| ta.contains(c) && tb.contains(c))
        .collect();
    let rows: Vec<char> = ta.iter().copied().filter(|c| !tb.contains(c)).collect();
    let cols: Vec<char> = tb.iter().copied().filter(|c| !ta.contains(c)).collect();
    let inner: Vec<char> = ta
        .iter()
        .copied()
        .filter(|c| tb.contains(c) && !out.contains(c))
        .collect();
    if out.len() != batch.len() + rows.len() + cols.len() {
        return None;
    }
    let size_of = |t: &[char], x: &ArrayD<T>, c: char| {
        t.iter().position(|&d| d == c).map_or(1, |i| x.shape()[i])
    };
    let prod = |labels: &[char], t: &[char], x: &ArrayD<T>| -> usize {
        labels.iter().map(|&c| size_of(t, x, c)).product()
    };
    let (nb, m, k, n) = (
        prod(&batch, &ta, a),
        prod(&rows, &ta, a),
        prod(&inner, &ta, a),
        prod(&cols, &tb, b),
    );
    // Each operand as a row-major [batch, rows, inner] / [batch, inner, cols] buffer:
    // borrowed when its axes are already in that order, else permuted into a copy.
    fn arrange<'x, T: Clone>(x: &'x ArrayD<T>, t: &[char], order: &[char]) -> Cow<'x, [T]> {
        let perm: Vec<usize> = order
            .iter()
            .filter_map(|c| t.iter().position(|d| d == c))
            .collect();
        let identity = perm.iter().enumerate().all(|(i, &p)| i == p);
        match (identity, x.as_slice()) {
            (true, Some(s)) => Cow::Borrowed(s),
            _ => Cow::Owned(
                x.view()
                    .permuted_axes(IxDyn(&perm))
                    .as_standard_layout()
                    .iter()
                    .cloned()
                    .collect(),
            ),
        }
    }
    let mut a_order = batch.clone();
    a_order.extend(&rows);
    a_order.extend(&inner);
    let mut b_order = batch.clone();
    b_order.extend(&inner);
    b_order.extend(&cols);
    let av = arrange(a, &ta, &a_order);
    let bv = arrange(b, &tb, &b_order);
    let mut cv = vec![<T as Num>::ZERO; nb * m * n];
    if m * n > 0 {
        for q in 0..nb {
            T::mm(
                m,
                k,
                n,
                &av[q * m * k..(q + 1) * m * k],
                &bv[q * k * n..(q + 1) * k * n],
                &mut cv[q * m * n..(q + 1) * m * n],
            );
        }
    }
    let mut c_labels = batch.clone();
    c_labels.extend(&rows);
    c_labels.extend(&cols);
    let c_shape: Vec<usize> = c_labels
        .iter()
        .map(|&c| {
            if ta.contains(&c) {
                size_of(&ta, a, c)
            } else {
                size_of(&tb, b, c)
            }
        })
        .collect();
    let c = match ArrayD::from_shape_vec(IxDyn(&c_shape), cv) {
        Ok(c) => c,
        Err(e) => return Some(Err(e.to_string())),
    };
    let perm: Vec<usize> = out
        .iter()
        .filter_map(|o| c_labels.iter().position(|d| d == o))
        .collect();
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Some(Ok(c));
    }
    Some(Ok(c
        .permuted_axes(IxDyn(&perm))
        .as_standard_layout()
        .into_owned()))
}

/// Runs an nn op.
pub fn eval(
    op: &Op,
    ins: &[Option<&Data>],
    out_types: &[&ValueType],
    opset: i64,
) -> Result<Vec<Data>, String> {
    match op {
        Op::MatMul {} => {
            let (a, b) = (input(ins, 0)?, input(ins, 1)?);
            one(matmul_tensor(a, b)?)
        }
        Op::Gemm {
            alpha,
            beta,
            transA,
            transB,
        } => {
            let (a, b) = (input(ins, 0)?, input(ins, 1)?);
            let c = opt_input(ins, 2)?;
            let (ta, tb, al, be) = (*transA != 0, *transB != 0, *alpha as f64, *beta as f64);
            one(match (a, b, c) {
                (Tensor::F32(x), Tensor::F32(y), c) => Tensor::F32(gemm_op(
                    x,
                    y,
                    c.map(|c| match c {
                        Tensor::F32(c) => Ok(c),
                        _ => Err("C dtype"),
                    })
                    .transpose()?,
                    ta,
                    tb,
                    al,
                    be,
                )?),
                _ => {
                    // f64 and every other dtype: compute in f64 and convert back.
                    let f = |t: &Tensor| -> Result<ArrayD<f64>, String> {
                        ArrayD::from_shape_vec(t.shape(), t.to_f64_vec()).map_err(|e| e.to_string())
                    };
                    let c64 = c.map(f).transpose()?;
                    let y = gemm_op(&f(a)?, &f(b)?, c64.as_ref(), ta, tb, al, be)?;
                    Tensor::from_f64_vec(
                        a.dtype(),
                        y.shape(),
                        &y.iter().copied().collect::<Vec<_>>(),
                    )
                    .map_err(|e| e.to_string())?
                }
            })
        }
        Op::Einsum { equation } => {
            let ts: Vec<&Tensor> = (0..ins.len())
                .map(|i| input(ins, i))
                .collect::<Result<_, _>>()?;
            one(einsum(equation, &ts)?)
        }
        Op::Softmax { axis: ax } | Op::LogSoftmax { axis: ax } => {
            let x = input(ins, 0)?;
            let log = matches!(op, Op::LogSoftmax { .. });
            let r = x.shape().len();
            if opset < 13 {
                let a = axis(ax.unwrap_or(1), r.max(1))?;
                let rows: usize = x.shape()[..a].iter().product();
                let cols: usize = x.shape()[a..].iter().product();
                let flat = super::shape::reshape(x, &[rows, cols])?;
                let y = map_float!(&flat, v => softmax(v, 1, log));
                return one(super::shape::reshape(&y, x.shape())?);
            }
            if r == 0 {
                return one(map_float!(x, v => v.mapv(|_| if log { <_>::ZERO } else { <_>::ONE })));
            }
            let a = axis(ax.unwrap_or(-1), r)?;
            one(map_float!(x, v => softmax(v, a, log)))
        }
        Op::Dropout { ratio, .. } => {
            let x = input(ins, 0)?;
            let training = match opt_input(ins, 2)? {
                Some(Tensor::Bool(t)) => t.iter().next().copied().unwrap_or(false),
                _ => false,
            };
            let r = match opt_input(ins, 1)? {
                Some(t) => t.to_f64_vec().first().copied().unwrap_or(0.5),
                None => ratio.map(|r| r as f64).unwrap_or(0.5),
            };
            if training && r > 0.0 {
                return Err("training-mode Dropout with ratio > 0 is random; the CPU inference kernel does not run it".into());
            }
            let mut out = vec![Data::Tensor(x.clone())];
            if out_types.len() > 1 {
                out.push(Data::Tensor(Tensor::Bool(ArrayD::from_elem(
                    IxDyn(x.shape()),
                    true,
                ))));
            }
            Ok(out)
        }
        Op::BatchNormalization {
            epsilon,
            momentum,
            training_mode,
        } => {
            let x = input(ins, 0)?;
            let p: Vec<Vec<f64>> = (1..5)
                .map(|i| input(ins, i).map(|t| t.to_f64_vec()))
                .collect::<Result<_, _>>()?;
            let s = x.shape();
            if s.len() < 2 {
                return Err("X must have rank ≥ 2".into());
            }
            let c = s[1];
            if p.iter().any(|v| v.len() != c) {
                return Err(format!("scale, bias, mean and var must have {c} elements"));
            }
            let inner: usize = s[2..].iter().product();
            let xv = x.to_f64_vec();
            let (mean, var) = if *training_mode != 0 {
                let n = (s[0] * inner) as f64;
                let mut m = vec![0.0; c];
                let mut v = vec![0.0; c];
                for (i, val) in xv.iter().enumerate() {
                    m[(i / inner) % c] += val;
                }
                m.iter_mut().for_each(|x| *x /= n);
                for (i, val) in xv.iter().enumerate() {
                    let ch = (i / inner) % c;
                    v[ch] += (val - m[ch]).powi(2);
                }
                v.iter_mut().for_each(|x| *x /= n);
                (m, v)
            } else {
                (p[2].clone(), p[3].clone())
            };
            let eps = *epsilon as f64;
            let y: Vec<f64> = xv
                .iter()
                .enumerate()
                .map(|(i, val)| {
                    let ch = (i / inner) % c;
                    (val - mean[ch]) / (var[ch] + eps).sqrt() * p[0][ch] + p[1][ch]
                })
                .collect();
            let dt = x.dtype();
            let mut out = vec![Data::Tensor(
                Tensor::from_f64_vec(dt, s, &y).map_err(|e| e.to_string())?,
            )];
            if *training_mode != 0 {
                let mo = *momentum as f64;
                let rm: Vec<f64> = p[2]
                    .iter()
                    .zip(&mean)
                    .map(|(r, m)| r * mo + m * (1.0 - mo))
                    .collect();
                let rv: Vec<f64> = p[3]
                    .iter()
                    .zip(&var)
                    .map(|(r, v)| r * mo + v * (1.0 - mo))
                    .collect();
                let sd = input(ins, 3)?.dtype();
                out.push(Data::Tensor(
                    Tensor::from_f64_vec(sd, &[c], &rm).map_err(|e| e.to_string())?,
                ));
                out.push(Data::Tensor(
                    Tensor::from_f64_vec(sd, &[c], &rv).map_err(|e| e.to_string())?,
                ));
            }
            out.truncate(out_types.len().max(1));
            Ok(out)
        }
        other => Err(format!("{} has no nn kernel", other.name())),
    }
}

/// numpy matmul of two tensors of the same dtype.
pub fn matmul_tensor(a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    macro_rules! arms {
        ($($v:ident),*) => {
            match (a, b) {
                $( (Tensor::$v(x), Tensor::$v(y)) => Ok(Tensor::$v(matmul(x, y)?)), )*
                (p, q) => Err(format!("MatMul of {} and {}", p.dtype(), q.dtype())),
            }
        };
    }
    arms!(F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect();
        Tensor::from_f64_vec(cellgraph_ir::DType::F64, shape, &v).unwrap()
    }

    #[test]
    fn gemm_einsum_matches_the_reference_kernel() {
        let cases: &[(&str, &[usize], &[usize])] = &[
            ("bij,ijkl->bkl", &[3, 4, 5], &[4, 5, 2, 3]),
            ("bkl,bij->ijkl", &[3, 2, 3], &[3, 4, 5]),
            ("ij,jk->ik", &[4, 5], &[5, 6]),
            ("bij,bjk->bik", &[2, 3, 4], &[2, 4, 5]),
            ("ij,kj->ik", &[3, 4], &[5, 4]),
            ("ij,ij->", &[3, 4], &[3, 4]),
            ("i,j->ji", &[3], &[4]),
            ("ijk,jl->li", &[2, 3, 4], &[3, 5]),
            ("bij,ijkl->blk", &[2, 3, 4], &[3, 4, 2, 5]),
            ("...ij,...jk->...ik", &[2, 3, 4], &[2, 4, 5]),
        ];
        for (k, (eq, sa, sb)) in cases.iter().enumerate() {
            let a = tensor(sa, 2 * k as u64 + 1);
            let b = tensor(sb, 2 * k as u64 + 2);
            let fast = einsum_with(eq, &[&a, &b], true).unwrap();
            let slow = einsum_with(eq, &[&a, &b], false).unwrap();
            assert_eq!(fast.shape(), slow.shape(), "{eq}");
            for (x, y) in fast.to_f64_vec().iter().zip(slow.to_f64_vec()) {
                assert!((x - y).abs() < 1e-12, "{eq}: {x} vs {y}");
            }
        }
    }
}
