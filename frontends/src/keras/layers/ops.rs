//! The `keras.ops` nodes of functional models (Keras 3 writes mask computations as
//! them: `NotEqual`, `Any`, ...): not layers (no weights, not in `summary()`).

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::KerasError;
use cellgraph_ir::{DType, Op, Tensor, ValueRef};
use serde_json::{json, Value};

/// An operation from `keras.ops` recorded as a node of a functional model. Keras 3
/// serialises the mask computations this way (`Masking` → `NotEqual` + `Any`,
/// `Embedding(mask_zero)` → `NotEqual(ids, 0)`); these nodes are not layers of the model
/// (no weights, not in `summary()`).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorOp {
    /// The operation.
    pub kind: TensorOpKind,
    /// The constant second operand of a comparison (`NotEqual(x, 0.0)`), if not a tensor.
    pub scalar: Option<f64>,
    /// The reduction axis of `Any`/`All` (`None`: every axis).
    pub axis: Option<i64>,
    /// `keepdims` of `Any`/`All`.
    pub keepdims: bool,
    /// The node's name (`not_equal`).
    pub name: Option<String>,
}

/// The operations [`TensorOp`] supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorOpKind {
    /// `keras.ops.not_equal`.
    NotEqual,
    /// `keras.ops.equal`.
    Equal,
    /// `keras.ops.greater`.
    Greater,
    /// `keras.ops.less`.
    Less,
    /// `keras.ops.any` over an axis.
    Any,
    /// `keras.ops.all` over an axis.
    All,
    /// `keras.ops.logical_not`.
    LogicalNot,
    /// `keras.ops.logical_and`.
    LogicalAnd,
    /// `keras.ops.logical_or`.
    LogicalOr,
}

impl TensorOpKind {
    /// The Keras class name (`NotEqual`).
    pub fn class_name(self) -> &'static str {
        match self {
            TensorOpKind::NotEqual => "NotEqual",
            TensorOpKind::Equal => "Equal",
            TensorOpKind::Greater => "Greater",
            TensorOpKind::Less => "Less",
            TensorOpKind::Any => "Any",
            TensorOpKind::All => "All",
            TensorOpKind::LogicalNot => "LogicalNot",
            TensorOpKind::LogicalAnd => "LogicalAnd",
            TensorOpKind::LogicalOr => "LogicalOr",
        }
    }

    /// From a Keras class name.
    pub fn from_class(name: &str) -> Option<TensorOpKind> {
        Some(match name {
            "NotEqual" => TensorOpKind::NotEqual,
            "Equal" => TensorOpKind::Equal,
            "Greater" => TensorOpKind::Greater,
            "Less" => TensorOpKind::Less,
            "Any" => TensorOpKind::Any,
            "All" => TensorOpKind::All,
            "LogicalNot" => TensorOpKind::LogicalNot,
            "LogicalAnd" => TensorOpKind::LogicalAnd,
            "LogicalOr" => TensorOpKind::LogicalOr,
            _ => return None,
        })
    }

    /// How many tensor operands the op takes (a comparison with a scalar takes one).
    pub fn is_binary(self) -> bool {
        !matches!(
            self,
            TensorOpKind::Any | TensorOpKind::All | TensorOpKind::LogicalNot
        )
    }
}

impl TensorOpKind {
    /// Keras's automatic name stem (`not_equal`).
    pub fn stem(self) -> &'static str {
        match self {
            TensorOpKind::NotEqual => "not_equal",
            TensorOpKind::Equal => "equal",
            TensorOpKind::Greater => "greater",
            TensorOpKind::Less => "less",
            TensorOpKind::Any => "any",
            TensorOpKind::All => "all",
            TensorOpKind::LogicalNot => "logical_not",
            TensorOpKind::LogicalAnd => "logical_and",
            TensorOpKind::LogicalOr => "logical_or",
        }
    }
}

impl LayerKind for TensorOp {
    fn class(&self) -> &'static str {
        self.kind.class_name()
    }
    fn stem(&self) -> &'static str {
        self.kind.stem()
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn weight_specs(&self, _: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        Ok(Vec::new())
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        Ok(vec![op_shape(self, input)?])
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        Ok(vec![(lower_op(e, self, &[io.x])?, None)])
    }
    fn config(&self, name: &str) -> Value {
        let mut cfg = json!({"name": name});
        if let Some(a) = self.axis {
            cfg["axis"] = json!(a);
        }
        if matches!(self.kind, TensorOpKind::Any | TensorOpKind::All) {
            cfg["keepdims"] = json!(self.keepdims);
        }
        json!({"module": "keras.src.ops.numpy", "class_name": self.kind.class_name(),
               "config": cfg, "registered_name": null})
    }
}

impl TensorOp {
    /// From a `keras.src.ops` node of a functional config.
    pub(crate) fn from_config(cx: &Cx, kind: TensorOpKind, cfg: &Value, at: &str) -> R<TensorOp> {
        let axis = match cfg.get("axis") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("{} over axis {v}", kind.class_name()),
            })?),
        };
        Ok(TensorOp {
            kind,
            scalar: None,
            axis,
            keepdims: cx.bool(cfg, "keepdims", false, at)?,
            name: Some(at.to_string()),
        })
    }
}

/// The output shape of a `keras.ops` node.
pub(crate) fn op_shape(op: &TensorOp, input: &Shape) -> Result<Shape, String> {
    use TensorOpKind as K;
    Ok(match op.kind {
        K::Any | K::All => match op.axis {
            None if op.keepdims => vec![Some(1); input.len()],
            None => Vec::new(),
            Some(a) => {
                let r = input.len() as i64;
                let ax = if a < 0 { a + r } else { a };
                if !(0..r).contains(&ax) {
                    return Err(format!("axis {a} out of range for rank {r}"));
                }
                let mut s = input.clone();
                if op.keepdims {
                    s[ax as usize] = Some(1);
                } else {
                    s.remove(ax as usize);
                }
                s
            }
        },
        _ => input.clone(),
    })
}

/// Lowers a `keras.ops` node; comparisons and reductions give booleans.
pub(crate) fn lower_op(e: &mut Emit, op: &TensorOp, ins: &[ValueRef]) -> R<ValueRef> {
    use TensorOpKind as K;
    let as_bool = |e: &mut Emit, v: ValueRef| -> R<ValueRef> {
        if e.g.value(v).ty.dtype() == Some(DType::Bool) {
            Ok(v)
        } else {
            e.cast(v, DType::Bool)
        }
    };
    let second = |e: &mut Emit| -> R<ValueRef> {
        match op.scalar {
            Some(c) => {
                let dt = e.g.value(ins[0]).ty.dtype().unwrap_or(DType::F32);
                let t = Tensor::from_f64_vec(dt, &[], &[c])
                    .map_err(|err| KerasError::Internal(err.to_string()))?;
                e.constant(t, "operand")
            }
            None => ins
                .get(1)
                .copied()
                .ok_or_else(|| KerasError::Internal("missing operand".into())),
        }
    };
    match op.kind {
        K::NotEqual | K::Equal => {
            let b = second(e)?;
            let eq = e.op(Op::Equal {}, &[ins[0], b], "equal")?;
            if op.kind == K::Equal {
                Ok(eq)
            } else {
                e.op(Op::Not {}, &[eq], "not_equal")
            }
        }
        K::Greater => {
            let b = second(e)?;
            e.op(Op::Greater {}, &[ins[0], b], "greater")
        }
        K::Less => {
            let b = second(e)?;
            e.op(Op::Less {}, &[ins[0], b], "less")
        }
        K::LogicalNot => {
            let a = as_bool(e, ins[0])?;
            e.op(Op::Not {}, &[a], "not")
        }
        K::LogicalAnd | K::LogicalOr => {
            let a = as_bool(e, ins[0])?;
            let b = second(e)?;
            let b = as_bool(e, b)?;
            let o = if op.kind == K::LogicalAnd {
                Op::And {}
            } else {
                Op::Or {}
            };
            e.op(o, &[a, b], "logical")
        }
        K::Any | K::All => {
            let a = as_bool(e, ins[0])?;
            let f = e.cast(a, DType::F32)?;
            let axes: Vec<i64> = match op.axis {
                Some(a) => vec![a],
                None => (0..e.dims(f).len() as i64).collect(),
            };
            let ax = e.ints(&axes)?;
            let keepdims = i64::from(op.keepdims);
            let r = if op.kind == K::Any {
                e.op(
                    Op::ReduceMax {
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: 0,
                    },
                    &[f, ax],
                    "any",
                )?
            } else {
                e.op(
                    Op::ReduceMin {
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: 0,
                    },
                    &[f, ax],
                    "all",
                )?
            };
            let half = e.scalar(0.5)?;
            e.op(Op::Greater {}, &[r, half], "reduced")
        }
    }
}
