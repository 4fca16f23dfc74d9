//! Shape rules of ONNX sequence and optional ops.

use super::infer::{outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::types::{TensorType, ValueType};

fn lenient(a: &ValueType, b: &ValueType) -> ValueType {
    a.merge(b).unwrap_or_else(|_| match (a.dtype(), b.dtype()) {
        (Some(x), Some(y)) if x == y => ValueType::Tensor(TensorType::unranked(Some(x))),
        _ => ValueType::Unknown,
    })
}

/// Output types of a sequence op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    let elem = |i: usize| -> Result<ValueType, String> {
        match cx.input(i)? {
            ValueType::Sequence(e) => Ok((**e).clone()),
            ValueType::Unknown => Ok(ValueType::Unknown),
            other => Err(format!("input {i} must be a sequence, found {other}")),
        }
    };
    let out = match op {
        Op::SequenceConstruct {} => {
            let n = cx.inputs.len();
            cx.same_dtype(&(0..n).collect::<Vec<_>>())?;
            let mut e = cx.input(0)?.clone();
            for i in 1..n {
                e = lenient(&e, cx.input(i)?);
            }
            ValueType::Sequence(Box::new(e))
        }
        Op::SequenceEmpty { dtype } => {
            let d = match dtype {
                Some(c) => i32::try_from(*c)
                    .ok()
                    .and_then(DType::from_onnx_code)
                    .ok_or_else(|| format!("unsupported dtype code {c}"))?,
                None => DType::F32,
            };
            ValueType::Sequence(Box::new(tensor(Some(d), None)))
        }
        Op::SequenceInsert {} => {
            let e = elem(0)?;
            let t = cx.input(1)?;
            if let (Some(a), Some(b)) = (e.dtype(), t.dtype()) {
                if a != b {
                    return Err(format!("inserting {b} into a sequence of {a}"));
                }
            }
            ValueType::Sequence(Box::new(lenient(&e, t)))
        }
        Op::SequenceAt {} => elem(0)?,
        Op::SequenceLength {} => tensor(Some(DType::I64), Some(vec![])),
        Op::ConcatFromSequence { .. } => tensor(elem(0)?.dtype(), None),
        Op::OptionalHasElement {} => tensor(Some(DType::Bool), Some(vec![])),
        Op::OptionalGetElement {} => match cx.input(0)? {
            ValueType::Optional(e) => (**e).clone(),
            other => other.clone(),
        },
        other => return Err(format!("{} is not a sequence op", other.name())),
    };
    outputs(cx, vec![out])
}
