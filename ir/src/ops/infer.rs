//! The context shape rules read, and helpers they share.

use crate::dtype::DType;
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType, ValueType};

/// What a shape rule knows about a node's inputs.
#[derive(Clone, Copy, Debug)]
pub struct InferCtx<'a> {
    /// One entry per input slot; `None` for an omitted optional input.
    pub inputs: &'a [Option<ValueType>],
    /// The constant value of each input, when it is an initializer or a `Constant`.
    pub consts: &'a [Option<&'a Tensor>],
    /// How many output slots the node has.
    pub num_outputs: usize,
    /// The opset version of the op's domain in this graph.
    pub opset: i64,
}

/// Shorthand for rule results.
pub type RuleResult = Result<Vec<ValueType>, String>;

impl<'a> InferCtx<'a> {
    /// Whether input `i` is present.
    pub fn has(&self, i: usize) -> bool {
        matches!(self.inputs.get(i), Some(Some(_)))
    }

    /// The type of input `i`; an error when it is absent.
    pub fn input(&self, i: usize) -> Result<&'a ValueType, String> {
        match self.inputs.get(i) {
            Some(Some(t)) => Ok(t),
            _ => Err(format!("input {i} is required")),
        }
    }

    /// The tensor type of input `i` (unknown types read as an unranked tensor).
    pub fn tensor(&self, i: usize) -> Result<TensorType, String> {
        match self.input(i)? {
            ValueType::Tensor(t) => Ok(t.clone()),
            ValueType::Unknown => Ok(TensorType::unranked(None)),
            other => Err(format!("input {i} must be a tensor, found {other}")),
        }
    }

    /// The constant value of input `i`, if known.
    pub fn constant(&self, i: usize) -> Option<&'a Tensor> {
        self.consts.get(i).copied().flatten()
    }

    /// The constant integer elements of input `i`, if known.
    pub fn const_ints(&self, i: usize) -> Option<Vec<i64>> {
        self.constant(i).and_then(|t| t.as_i64_vec())
    }

    /// The dtype of input `i`, checked to be in `allowed` when known.
    pub fn dtype_in(
        &self,
        i: usize,
        allowed: fn(DType) -> bool,
        what: &str,
    ) -> Result<Option<DType>, String> {
        let t = self.tensor(i)?;
        match t.dtype {
            Some(d) if !allowed(d) => Err(format!("input {i} has dtype {d}, expected {what}")),
            d => Ok(d),
        }
    }

    /// Checks that all the given present inputs agree on their dtype, returning it.
    pub fn same_dtype(&self, idx: &[usize]) -> Result<Option<DType>, String> {
        let mut seen: Option<(usize, DType)> = None;
        for &i in idx {
            if !self.has(i) {
                continue;
            }
            if let Some(d) = self.tensor(i)?.dtype {
                match seen {
                    Some((j, e)) if e != d => {
                        return Err(format!("input {i} has dtype {d} but input {j} has {e}"))
                    }
                    None => seen = Some((i, d)),
                    _ => {}
                }
            }
        }
        Ok(seen.map(|(_, d)| d))
    }
}

/// A tensor value type.
pub fn tensor(dtype: Option<DType>, shape: Option<Vec<Dim>>) -> ValueType {
    ValueType::Tensor(TensorType { dtype, shape })
}

/// Normalises a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    } else {
        Ok(a as usize)
    }
}

/// Normalises an axis for inserting into a result of rank `rank` (Unsqueeze, Concat).
pub fn norm_axis_incl(axis: i64, rank: usize) -> Result<usize, String> {
    norm_axis(axis, rank)
}

/// numpy broadcasting of several shapes; `None` when some rank is unknown.
pub fn broadcast(shapes: &[Option<Vec<Dim>>]) -> Result<Option<Vec<Dim>>, String> {
    let mut ranks = Vec::new();
    for s in shapes {
        match s {
            Some(s) => ranks.push(s.len()),
            None => return Ok(None),
        }
    }
    let rank = ranks.into_iter().max().unwrap_or(0);
    let mut out = vec![Dim::Known(1); rank];
    for s in shapes.iter().flatten() {
        let off = rank - s.len();
        for (i, d) in s.iter().enumerate() {
            let cur = &out[off + i];
            let new = match (cur, d) {
                (_, Dim::Known(1)) => cur.clone(),
                (Dim::Known(1), _) => d.clone(),
                (Dim::Known(a), Dim::Known(b)) if a != b => {
                    return Err(format!("cannot broadcast dimension {a} with {b}"))
                }
                (Dim::Known(a), _) | (_, Dim::Known(a)) => Dim::Known(*a),
                (Dim::Sym(a), Dim::Sym(b)) if a == b => Dim::Sym(a.clone()),
                _ => Dim::Unknown,
            };
            out[off + i] = new;
        }
    }
    Ok(Some(out))
}

/// A dimension from an integer, with negative or absurd values rejected.
pub fn dim_from_i64(v: i64) -> Result<Dim, String> {
    if v < 0 {
        Err(format!("negative dimension {v}"))
    } else {
        Ok(Dim::Known(v as u64))
    }
}

/// Checks the number of output slots against what the rule produces.
pub fn outputs(cx: &InferCtx<'_>, types: Vec<ValueType>) -> RuleResult {
    if cx.num_outputs > types.len() {
        return Err(format!(
            "node declares {} outputs, the op produces {}",
            cx.num_outputs,
            types.len()
        ));
    }
    Ok(types.into_iter().take(cx.num_outputs).collect())
}
