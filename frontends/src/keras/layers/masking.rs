//! `Masking(mask_value)`: masks the steps whose features all equal the value.

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use cellgraph_ir::{DType, Op};
use serde_json::{json, Value};

/// `Masking(mask_value)`: a step whose features all equal `mask_value` is masked, and
/// the output is the input times the mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Masking {
    /// The padding value (default 0).
    pub mask_value: f32,
    /// The layer's name.
    pub name: Option<String>,
}

impl Masking {
    /// A new masking layer.
    pub fn new(mask_value: f32) -> Masking {
        Masking {
            mask_value,
            name: None,
        }
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Masking {
        self.name = Some(name.to_string());
        self
    }
}

impl LayerKind for Masking {
    fn class(&self) -> &'static str {
        "Masking"
    }
    fn stem(&self) -> &'static str {
        "masking"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn weight_specs(&self, _: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        Ok(Vec::new())
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        Ok(vec![input.clone()])
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let x = io.x;
        let mv = e.scalar(self.mask_value)?;
        let eq = e.op(Op::Equal {}, &[x, mv], "eq")?;
        let ne = e.op(Op::Not {}, &[eq], "ne")?;
        let nf = e.cast(ne, DType::F32)?;
        let axes = e.ints(&[-1])?;
        let any = e.op(
            Op::ReduceMax {
                axes: None,
                keepdims: 0,
                noop_with_empty_axes: 0,
            },
            &[nf, axes],
            "any",
        )?;
        let zero = e.scalar(0.0)?;
        let keep = e.op(Op::Greater {}, &[any, zero], "mask")?;
        let kf = e.cast(keep, DType::F32)?;
        let k3 = e.unsqueeze(kf, &[-1])?;
        Ok(vec![(e.mul(x, k3)?, Some(keep))])
    }
    fn config(&self, name: &str) -> Value {
        layer_entry("Masking", name, json!({"mask_value": self.mask_value}))
    }
}

impl Masking {
    /// From a Keras `Masking` config.
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Masking> {
        Ok(Masking::new(cx.f32(cfg, "mask_value", 0.0, at)?).name(at))
    }
}
