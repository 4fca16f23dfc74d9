//! `BatchNormalization()` over the last axis: batch statistics in training, moving
//! statistics at inference.

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::init::Init;
use crate::keras::KerasError;
use cellgraph_ir::{DType, Op, ValueRef};
use serde_json::{json, Value};

/// `BatchNormalization()` over the last axis.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormalization {
    /// `epsilon` (default 1e-3).
    pub epsilon: f32,
    /// `momentum` of the moving statistics (default 0.99).
    pub momentum: f32,
    /// `center`: learn beta.
    pub center: bool,
    /// `scale`: learn gamma.
    pub scale: bool,
    /// The layer's name.
    pub name: Option<String>,
}

impl BatchNormalization {
    /// Keras's defaults.
    pub fn new() -> BatchNormalization {
        BatchNormalization {
            epsilon: 1e-3,
            momentum: 0.99,
            center: true,
            scale: true,
            name: None,
        }
    }
    /// Sets `epsilon`.
    pub fn epsilon(mut self, e: f32) -> BatchNormalization {
        self.epsilon = e;
        self
    }
    /// Sets `center`.
    pub fn center(mut self, b: bool) -> BatchNormalization {
        self.center = b;
        self
    }
    /// Sets `scale`.
    pub fn scale(mut self, b: bool) -> BatchNormalization {
        self.scale = b;
        self
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> BatchNormalization {
        self.name = Some(name.to_string());
        self
    }
}

impl Default for BatchNormalization {
    fn default() -> Self {
        BatchNormalization::new()
    }
}

impl LayerKind for BatchNormalization {
    fn class(&self) -> &'static str {
        "BatchNormalization"
    }
    fn stem(&self) -> &'static str {
        "batch_normalization"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        let c = last_dim(input)?;
        let mut v = Vec::new();
        if self.scale {
            v.push((format!("{name}/gamma"), vec![c], true, Init::Ones));
        }
        if self.center {
            v.push((format!("{name}/beta"), vec![c], true, Init::Zeros));
        }
        v.push((format!("{name}/moving_mean"), vec![c], false, Init::Zeros));
        v.push((
            format!("{name}/moving_variance"),
            vec![c],
            false,
            Init::Ones,
        ));
        Ok(v)
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        Ok(vec![input.clone()])
    }
    /// In training mode the batch mean and variance normalise and are pushed onto
    /// `extra` (the model moves its statistics with them); otherwise the moving ones.
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let (w, x, mask) = (io.w, io.x, io.mask);
        let mut k = 0;
        let gamma = self.scale.then(|| {
            k += 1;
            w[k - 1]
        });
        let beta = self.center.then(|| {
            k += 1;
            w[k - 1]
        });
        let (mean, var) = if e.training {
            let (m, v) = batch_moments(e, x, mask)?;
            io.extra.push(m);
            io.extra.push(v);
            (m, v)
        } else {
            (w[k], w[k + 1])
        };
        // Keras: inv = rsqrt(var + eps) · gamma; y = x · inv + (beta − mean · inv)
        let eps = e.scalar(self.epsilon)?;
        let ve = e.add(var, eps)?;
        let sd = e.op(Op::Sqrt {}, &[ve], "sqrt")?;
        let mut inv = e.op(Op::Reciprocal {}, &[sd], "rsqrt")?;
        if let Some(g) = gamma {
            inv = e.mul(inv, g)?;
        }
        let mi = e.mul(mean, inv)?;
        let mut off = e.op(Op::Neg {}, &[mi], "neg")?;
        if let Some(b) = beta {
            off = e.add(off, b)?;
        }
        let xi = e.mul(x, inv)?;
        Ok(vec![(e.add(xi, off)?, mask)])
    }
    fn config(&self, name: &str) -> Value {
        layer_entry(
            "BatchNormalization",
            name,
            json!({"axis": -1, "momentum": self.momentum, "epsilon": self.epsilon,
                   "center": self.center, "scale": self.scale}),
        )
    }
}

impl BatchNormalization {
    /// From a Keras `BatchNormalization` config: the last axis only; renorm,
    /// regularizers and constraints are refused.
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<BatchNormalization> {
        let axis_ok = match cfg.get("axis") {
            None => true,
            Some(Value::Number(n)) => n.as_i64() == Some(-1),
            Some(Value::Array(a)) => a.len() == 1 && a[0].as_i64() == Some(-1),
            _ => false,
        };
        if !axis_ok {
            return Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("axis = {} (the last axis, -1, is supported)", cfg["axis"]),
            });
        }
        cx.refuse(
            cfg,
            at,
            &[
                "renorm",
                "beta_regularizer",
                "gamma_regularizer",
                "beta_constraint",
                "gamma_constraint",
            ],
        )?;
        let mut bn = BatchNormalization::new()
            .epsilon(cx.f32(cfg, "epsilon", 1e-3, at)?)
            .center(cx.bool(cfg, "center", true, at)?)
            .scale(cx.bool(cfg, "scale", true, at)?)
            .name(at);
        bn.momentum = cx.f32(cfg, "momentum", 0.99, at)?;
        Ok(bn)
    }
}

/// Keras's BatchNormalization moments over every axis but the last, as `(channels,)`
/// vectors: plain (biased variance), or with a `(batch, time)` mask only the valid steps.
pub(crate) fn batch_moments(
    e: &mut Emit,
    x: ValueRef,
    mask: Option<ValueRef>,
) -> R<(ValueRef, ValueRef)> {
    let rank = e.dims(x).len();
    let axes: Vec<i64> = (0..rank as i64 - 1).collect();
    let ax = e.ints(&axes)?;
    let mean_op = || Op::ReduceMean {
        axes: None,
        keepdims: 1,
        noop_with_empty_axes: 0,
    };
    let sum_op = || Op::ReduceSum {
        axes: None,
        keepdims: 1,
        noop_with_empty_axes: 0,
    };
    let (mean, var) = match mask {
        None => {
            let mean = e.op(mean_op(), &[x, ax], "batch_mean")?;
            let d = e.op(Op::Sub {}, &[x, mean], "centered")?;
            let sq = e.mul(d, d)?;
            let var = e.op(mean_op(), &[sq, ax], "batch_var")?;
            (mean, var)
        }
        Some(m) => {
            // Keras: sums over the valid steps divided by (count + 1e-7).
            let mf = e.cast(m, DType::F32)?;
            let mf = e.unsqueeze(mf, &[-1])?;
            let xm = e.mul(x, mf)?;
            let sx = e.op(sum_op(), &[xm, ax], "masked_sum")?;
            // The mask broadcast to x counts the valid steps once per channel.
            let sw = e.op(sum_op(), &[mf, ax], "valid_count")?;
            let eps = e.scalar(1e-7)?;
            let den = e.add(sw, eps)?;
            let mean = e.op(Op::Div {}, &[sx, den], "batch_mean")?;
            let d = e.op(Op::Sub {}, &[x, mean], "centered")?;
            let dm = e.mul(d, mf)?;
            let sq = e.mul(dm, dm)?;
            let ss = e.op(sum_op(), &[sq, ax], "masked_sq_sum")?;
            let var = e.op(Op::Div {}, &[ss, den], "batch_var")?;
            (mean, var)
        }
    };
    let flat = e.ints(&[-1])?;
    let mean = e.op(Op::Reshape { allowzero: 0 }, &[mean, flat], "mean")?;
    let var = e.op(Op::Reshape { allowzero: 0 }, &[var, flat], "var")?;
    Ok((mean, var))
}
