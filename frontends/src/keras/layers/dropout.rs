//! `Dropout(rate)`: a fresh mask per training call, identity at inference.

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::KerasError;
use serde_json::{json, Value};

/// `Dropout(rate)`: identity at inference.
#[derive(Clone, Debug, PartialEq)]
pub struct Dropout {
    /// The drop rate.
    pub rate: f32,
    /// The layer's name.
    pub name: Option<String>,
}

impl Dropout {
    /// A new dropout layer.
    pub fn new(rate: f32) -> Dropout {
        Dropout { rate, name: None }
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Dropout {
        self.name = Some(name.to_string());
        self
    }
}

impl LayerKind for Dropout {
    fn class(&self) -> &'static str {
        "Dropout"
    }
    fn stem(&self) -> &'static str {
        "dropout"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(KerasError::Unsupported {
                layer: name.to_string(),
                what: format!("rate = {} (must be in [0, 1))", self.rate),
            });
        }
        Ok(())
    }
    fn weight_specs(&self, _: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        Ok(Vec::new())
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        Ok(vec![input.clone()])
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        if e.training && self.rate > 0.0 {
            let shape = e.dims(io.x);
            let m = e.random_mask(&shape, self.rate)?;
            return Ok(vec![(e.mul(io.x, m)?, io.mask)]);
        }
        Ok(vec![(io.x, io.mask)])
    }
    fn config(&self, name: &str) -> Value {
        layer_entry("Dropout", name, json!({"rate": self.rate}))
    }
}

impl Dropout {
    /// From a Keras `Dropout` config (`noise_shape` is refused).
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Dropout> {
        cx.refuse(cfg, at, &["noise_shape"])?;
        Ok(Dropout::new(cx.f32(cfg, "rate", 0.0, at)?).name(at))
    }
}
