//! Shape rules of broadcast binary ops, unary maths and activations, casts and `Where`.

use super::infer::{broadcast, outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;

/// Output types of an elementwise op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    let present: Vec<usize> = (0..cx.inputs.len()).filter(|&i| cx.has(i)).collect();
    let shapes = |idx: &[usize]| -> Result<_, String> {
        let s: Result<Vec<_>, String> =
            idx.iter().map(|&i| cx.tensor(i).map(|t| t.shape)).collect();
        broadcast(&s?)
    };
    let out = match op {
        Op::Add {}
        | Op::Sub {}
        | Op::Mul {}
        | Op::Div {}
        | Op::Sum {}
        | Op::Mean {}
        | Op::Min {}
        | Op::Max {} => {
            let d = cx.same_dtype(&present)?;
            if d == Some(DType::Bool) {
                return Err(format!("{} does not take bool inputs", op.name()));
            }
            tensor(d, shapes(&present)?)
        }
        Op::Pow {} => {
            cx.dtype_in(1, DType::is_numeric, "a number")?;
            tensor(
                cx.dtype_in(0, DType::is_numeric, "a number")?,
                shapes(&[0, 1])?,
            )
        }
        Op::And {} | Op::Or {} | Op::Xor {} => {
            cx.dtype_in(0, |d| d == DType::Bool, "bool")?;
            cx.dtype_in(1, |d| d == DType::Bool, "bool")?;
            tensor(Some(DType::Bool), shapes(&[0, 1])?)
        }
        Op::Equal {}
        | Op::Less {}
        | Op::LessOrEqual {}
        | Op::Greater {}
        | Op::GreaterOrEqual {} => {
            cx.same_dtype(&[0, 1])?;
            tensor(Some(DType::Bool), shapes(&[0, 1])?)
        }
        Op::Where {} => {
            cx.dtype_in(0, |d| d == DType::Bool, "bool")?;
            tensor(cx.same_dtype(&[1, 2])?, shapes(&[0, 1, 2])?)
        }
        Op::Not {} => {
            let t = cx.tensor(0)?;
            cx.dtype_in(0, |d| d == DType::Bool, "bool")?;
            tensor(Some(DType::Bool), t.shape)
        }
        Op::Identity {} => cx.input(0)?.clone(),
        Op::Neg {} | Op::Abs {} | Op::Relu {} => {
            let t = cx.tensor(0)?;
            cx.dtype_in(0, DType::is_numeric, "a number")?;
            tensor(t.dtype, t.shape)
        }
        Op::Clip { .. } => {
            let t = cx.tensor(0)?;
            cx.dtype_in(0, DType::is_numeric, "a number")?;
            cx.same_dtype(&[0, 1, 2])?;
            for i in 1..3 {
                if cx.has(i) {
                    if let Some(r) = cx.tensor(i)?.rank() {
                        if r != 0 {
                            return Err(format!(
                                "input {i} (bound) must be a scalar, has rank {r}"
                            ));
                        }
                    }
                }
            }
            tensor(t.dtype, t.shape)
        }
        Op::Cast { to, .. } => {
            let d = i32::try_from(*to)
                .ok()
                .and_then(DType::from_onnx_code)
                .ok_or_else(|| format!("Cast to unsupported dtype code {to}"))?;
            tensor(Some(d), cx.tensor(0)?.shape)
        }
        Op::CastLike { .. } => tensor(cx.tensor(1)?.dtype, cx.tensor(0)?.shape),
        _ => {
            // Float unary maths and activations.
            let t = cx.tensor(0)?;
            cx.dtype_in(0, DType::is_float, "a float")?;
            tensor(t.dtype, t.shape)
        }
    };
    outputs(cx, vec![out])
}
