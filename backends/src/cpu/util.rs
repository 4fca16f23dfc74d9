//! Shared kernel helpers: broadcasting, input access, dtype dispatch macros.

use crate::data::Data;
use cellgraph_ir::Tensor;
use ndarray::{ArrayD, IxDyn, Zip};

/// numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    let mut out = vec![1; r];
    for i in 0..r {
        let x = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let y = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => {
                return Err(format!(
                    "shapes {a:?} and {b:?} do not broadcast ({x} vs {y})"
                ))
            }
        };
    }
    Ok(out)
}

/// Applies `f` elementwise to two broadcast arrays.
pub fn zip2<A: Clone, B: Clone, U>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(&A, &B) -> U,
) -> Result<ArrayD<U>, String> {
    if a.shape() == b.shape() {
        return Ok(Zip::from(a).and(b).map_collect(&f));
    }
    let sh = broadcast_shape(a.shape(), b.shape())?;
    let av = a.broadcast(IxDyn(&sh)).ok_or("broadcast failed")?;
    let bv = b.broadcast(IxDyn(&sh)).ok_or("broadcast failed")?;
    Ok(Zip::from(&av).and(&bv).map_collect(&f))
}

/// Applies `f` elementwise to three broadcast arrays.
pub fn zip3<A: Clone, B: Clone, C: Clone, U>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    c: &ArrayD<C>,
    f: impl Fn(&A, &B, &C) -> U,
) -> Result<ArrayD<U>, String> {
    let sh = broadcast_shape(&broadcast_shape(a.shape(), b.shape())?, c.shape())?;
    let av = a.broadcast(IxDyn(&sh)).ok_or("broadcast failed")?;
    let bv = b.broadcast(IxDyn(&sh)).ok_or("broadcast failed")?;
    let cv = c.broadcast(IxDyn(&sh)).ok_or("broadcast failed")?;
    Ok(Zip::from(&av).and(&bv).and(&cv).map_collect(&f))
}

/// Input `i` as a tensor (an error when absent or not a tensor).
pub fn input<'a>(ins: &[Option<&'a Data>], i: usize) -> Result<&'a Tensor, String> {
    match ins.get(i).copied().flatten() {
        Some(d) => d.tensor().map_err(|e| format!("input {i}: {e}")),
        None => Err(format!("input {i} is required")),
    }
}

/// Input `i` as a tensor, if present.
pub fn opt_input<'a>(ins: &[Option<&'a Data>], i: usize) -> Result<Option<&'a Tensor>, String> {
    match ins.get(i).copied().flatten() {
        Some(d) => d.tensor().map(Some).map_err(|e| format!("input {i}: {e}")),
        None => Ok(None),
    }
}

/// Input `i` as integers (for shape-like inputs).
pub fn ints(ins: &[Option<&Data>], i: usize) -> Result<Vec<i64>, String> {
    input(ins, i)?
        .as_i64_vec()
        .ok_or_else(|| format!("input {i} must be an integer tensor"))
}

/// Input `i` as integers, if present.
pub fn opt_ints(ins: &[Option<&Data>], i: usize) -> Result<Option<Vec<i64>>, String> {
    match opt_input(ins, i)? {
        Some(t) => t
            .as_i64_vec()
            .map(Some)
            .ok_or_else(|| format!("input {i} must be an integer tensor")),
        None => Ok(None),
    }
}

/// Normalises an axis against a rank.
pub fn axis(a: i64, rank: usize) -> Result<usize, String> {
    cellgraph_ir::ops::infer::norm_axis(a, rank)
}

/// One tensor result.
pub fn one(t: Tensor) -> Result<Vec<Data>, String> {
    Ok(vec![Data::Tensor(t)])
}

/// The most elements a kernel creates in one tensor (4 GiB of f32, as the importer's
/// default per-tensor limit).
pub const MAX_ELEMENTS: usize = 1 << 30;

/// The element count of a shape, refusing absurd sizes before allocating.
pub fn checked_len(shape: &[usize]) -> Result<usize, String> {
    const MAX: usize = MAX_ELEMENTS;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if n > MAX {
        return Err(format!(
            "shape {shape:?} has {n} elements, more than the kernel limit of {MAX}"
        ));
    }
    Ok(n)
}

/// Dispatches on every dtype: binds the array as `$a` and wraps `$body` in the same variant.
macro_rules! map_all {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::BF16($a) => Tensor::BF16($body),
            Tensor::I8($a) => Tensor::I8($body),
            Tensor::I16($a) => Tensor::I16($body),
            Tensor::I32($a) => Tensor::I32($body),
            Tensor::I64($a) => Tensor::I64($body),
            Tensor::U8($a) => Tensor::U8($body),
            Tensor::U16($a) => Tensor::U16($body),
            Tensor::U32($a) => Tensor::U32($body),
            Tensor::U64($a) => Tensor::U64($body),
            Tensor::Bool($a) => Tensor::Bool($body),
        }
    };
}

/// Dispatches on numeric dtypes (not bool).
macro_rules! map_num {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::BF16($a) => Tensor::BF16($body),
            Tensor::I8($a) => Tensor::I8($body),
            Tensor::I16($a) => Tensor::I16($body),
            Tensor::I32($a) => Tensor::I32($body),
            Tensor::I64($a) => Tensor::I64($body),
            Tensor::U8($a) => Tensor::U8($body),
            Tensor::U16($a) => Tensor::U16($body),
            Tensor::U32($a) => Tensor::U32($body),
            Tensor::U64($a) => Tensor::U64($body),
            Tensor::Bool(_) => return Err("bool tensors are not supported here".to_string()),
        }
    };
}

/// Dispatches on float dtypes.
macro_rules! map_float {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::BF16($a) => Tensor::BF16($body),
            other => {
                return Err(format!(
                    "{} tensors are not supported here (float only)",
                    other.dtype()
                ))
            }
        }
    };
}

/// Dispatches on two tensors of the same numeric dtype; `$wrap` picks the result variant
/// (`same` keeps the dtype, `bool` gives a bool tensor).
macro_rules! zip_num {
    ($x:expr, $y:expr, same, |$a:ident, $b:ident| $body:expr) => {
        zip_num!(@arms $x, $y, |$a, $b| $body, F32 F32, F64 F64, F16 F16, BF16 BF16, I8 I8, I16 I16, I32 I32, I64 I64, U8 U8, U16 U16, U32 U32, U64 U64)
    };
    ($x:expr, $y:expr, bool, |$a:ident, $b:ident| $body:expr) => {
        zip_num!(@arms $x, $y, |$a, $b| $body, F32 Bool, F64 Bool, F16 Bool, BF16 Bool, I8 Bool, I16 Bool, I32 Bool, I64 Bool, U8 Bool, U16 Bool, U32 Bool, U64 Bool)
    };
    (@arms $x:expr, $y:expr, |$a:ident, $b:ident| $body:expr, $($v:ident $r:ident),*) => {
        match ($x, $y) {
            $( (Tensor::$v($a), Tensor::$v($b)) => Tensor::$r($body), )*
            (p, q) => return Err(format!("dtypes {} and {} are not supported together here", p.dtype(), q.dtype())),
        }
    };
}

pub(crate) use {map_all, map_float, map_num, zip_num};
