//! `Dense(units, activation, use_bias)` on the last axis.

use super::kind::*;
use crate::keras::activation::{Activation, Shape};
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::init::Init;
use crate::keras::KerasError;
use serde_json::{json, Value};

/// `Dense(units, activation)`, applied to the last axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Output width.
    pub units: usize,
    /// Activation (default linear).
    pub activation: Activation,
    /// `use_bias`.
    pub use_bias: bool,
    /// The layer's name.
    pub name: Option<String>,
}

impl Dense {
    /// A new dense layer without activation.
    pub fn new(units: usize) -> Dense {
        Dense {
            units,
            activation: Activation::Linear,
            use_bias: true,
            name: None,
        }
    }
    /// Sets the activation.
    pub fn activation(mut self, a: Activation) -> Dense {
        self.activation = a;
        self
    }
    /// Sets `use_bias`.
    pub fn use_bias(mut self, b: bool) -> Dense {
        self.use_bias = b;
        self
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Dense {
        self.name = Some(name.to_string());
        self
    }
}

impl LayerKind for Dense {
    fn class(&self) -> &'static str {
        "Dense"
    }
    fn stem(&self) -> &'static str {
        "dense"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        if self.units == 0 {
            return Err(KerasError::Unsupported {
                layer: name.to_string(),
                what: "units = 0".into(),
            });
        }
        Ok(())
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        let d = last_dim(input)?;
        let mut v = vec![(
            format!("{name}/kernel"),
            vec![d, self.units],
            true,
            Init::GlorotUniform,
        )];
        if self.use_bias {
            v.push((format!("{name}/bias"), vec![self.units], true, Init::Zeros));
        }
        Ok(v)
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        let mut s = input.clone();
        if s.len() < 2 {
            return Err(format!(
                "expects inputs of rank 2 or more, got {}",
                crate::keras::activation::shape_str(input)
            ));
        }
        *s.last_mut().unwrap_or(&mut None) = Some(self.units);
        Ok(vec![s])
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let mut y = e.matmul(io.x, io.w[0])?;
        if self.use_bias {
            y = e.add(y, io.w[1])?;
        }
        Ok(vec![(e.activation(self.activation, y)?, io.mask)])
    }
    fn config(&self, name: &str) -> Value {
        layer_entry(
            "Dense",
            name,
            json!({"units": self.units, "activation": self.activation.name(),
                   "use_bias": self.use_bias}),
        )
    }
}

impl Dense {
    /// From a Keras `Dense` config; regularizers, constraints, LoRA and quantization are
    /// refused.
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Dense> {
        cx.refuse(
            cfg,
            at,
            &[
                "kernel_regularizer",
                "bias_regularizer",
                "activity_regularizer",
                "kernel_constraint",
                "bias_constraint",
                "lora_rank",
                "quantization_config",
            ],
        )?;
        Ok(Dense::new(cx.usize(cfg, "units", at)?)
            .activation(cx.activation(cfg, "activation", Activation::Linear, at)?)
            .use_bias(cx.bool(cfg, "use_bias", true, at)?)
            .name(at))
    }
}
