//! Layers with Keras's names, options and defaults: one file per layer (or family),
//! each implementing one trait (`kind::LayerKind`) — checks, weights, output shapes, states,
//! lowering to IR nodes and the Keras config both ways — so one layer's meaning is in
//! one place. [`Layer`] holds any of them and dispatches.
//!
//! Each layer is a plain configuration value built with chained setters
//! (`LSTM::new(64).return_sequences(true)`); a [`Model`](super::Model) owns the layers,
//! creates their weights and lowers them to the IR. Recurrent layers share one
//! representation, [`Recurrent`]: `LSTM(n)` is `RNN(LSTMCell(n))` with a different class
//! name, exactly as in Keras.
//!
//! To add a layer: a file here with its struct, builder and `impl LayerKind`, a variant
//! of [`Layer`] (and its line in `dispatch!` and `Layer::from_config`), and an export
//! below.

#![allow(clippy::upper_case_acronyms)]

mod batch_norm;
mod dense;
mod dropout;
mod embedding;
mod input;
pub(crate) mod kind;
mod masking;
mod ops;
pub(crate) mod recurrent;

pub use super::activation::{shape_str, Activation, Shape};
pub use batch_norm::BatchNormalization;
pub use dense::Dense;
pub use dropout::Dropout;
pub use embedding::Embedding;
pub(crate) use input::dtype_of;
pub use input::Input;
pub use masking::Masking;
pub(crate) use ops::{lower_op, op_shape};
pub use ops::{TensorOp, TensorOpKind};
pub use recurrent::{
    Bidirectional, Cell, CellKind, GRUCell, LSTMCell, MergeMode, Recurrent, RnnClass, SimpleRNN,
    SimpleRNNCell, StackedRNNCells, GRU, LSTM, RNN,
};

use super::config::Cx;
use super::custom::CustomRnn;
use super::emit::Emit;
use super::KerasError;
use kind::*;
use serde_json::Value;

/// `TimeDistributed(layer)`: applies `layer` to every time step.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeDistributed {
    /// The inner layer.
    pub layer: Box<Layer>,
    /// The layer's name.
    pub name: Option<String>,
}

impl TimeDistributed {
    /// Wraps `layer`.
    pub fn new(layer: impl Into<Layer>) -> TimeDistributed {
        TimeDistributed {
            layer: Box::new(layer.into()),
            name: None,
        }
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> TimeDistributed {
        self.name = Some(name.to_string());
        self
    }
}

impl LayerKind for TimeDistributed {
    fn class(&self) -> &'static str {
        "TimeDistributed"
    }
    fn stem(&self) -> &'static str {
        "time_distributed"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        if !matches!(
            *self.layer,
            Layer::Dense(_) | Layer::Dropout(_) | Layer::BatchNormalization(_)
        ) {
            return Err(KerasError::Unsupported {
                layer: name.to_string(),
                what: format!(
                    "TimeDistributed({}) (Dense, Dropout and BatchNormalization are supported)",
                    self.layer.class_name()
                ),
            });
        }
        let inner_name = self.layer.default_stem().to_string();
        self.layer.check(&inner_name)
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        if input.len() < 3 {
            return Err(format!(
                "expects inputs of rank 3 or more (batch, time, ...), got {}",
                shape_str(input)
            ));
        }
        let mut inner = vec![None];
        inner.extend_from_slice(&input[2..]);
        let stem = self
            .layer
            .given_name()
            .unwrap_or(self.layer.default_stem())
            .to_string();
        self.layer.weight_specs(&format!("{name}/{stem}"), &inner)
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        let mut inner = vec![None];
        inner.extend_from_slice(input.get(2..).unwrap_or(&[]));
        let o = self.layer.shapes(&inner)?;
        let mut s = input[..2.min(input.len())].to_vec();
        s.extend_from_slice(o[0].get(1..).unwrap_or(&[]));
        Ok(vec![s])
    }
    /// The inner layer on the whole `(batch, time, ...)` input: Dense, Dropout and
    /// BatchNormalization act on the last axis alone, so no reshape is needed.
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        self.layer.lower_call(e, CallIo { init: None, ..io })
    }
    fn config(&self, name: &str) -> Value {
        let inner = self
            .layer
            .given_name()
            .unwrap_or(self.layer.default_stem())
            .to_string();
        layer_entry(
            "TimeDistributed",
            name,
            serde_json::json!({"layer": self.layer.config(&inner)}),
        )
    }
}

/// Any layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// `InputLayer`.
    Input(Input),
    /// `Embedding`.
    Embedding(Embedding),
    /// `Dense`.
    Dense(Dense),
    /// `LSTM`, `GRU`, `SimpleRNN`, `RNN`.
    Recurrent(Recurrent),
    /// `Bidirectional`.
    Bidirectional(Bidirectional),
    /// `BatchNormalization`.
    BatchNormalization(BatchNormalization),
    /// `Dropout`.
    Dropout(Dropout),
    /// `Masking`.
    Masking(Masking),
    /// `TimeDistributed`.
    TimeDistributed(TimeDistributed),
    /// A `keras.ops` node of a functional model (mask computations).
    Op(TensorOp),
    /// `RNN(cell)` around a cell of your own.
    Custom(CustomRnn),
}

macro_rules! into_layer {
    ($($ty:ident => $var:ident),*) => {$(
        impl From<$ty> for Layer {
            fn from(l: $ty) -> Layer {
                Layer::$var(l)
            }
        }
    )*};
}
into_layer!(Input => Input, Embedding => Embedding, Dense => Dense, Recurrent => Recurrent,
    Bidirectional => Bidirectional, BatchNormalization => BatchNormalization,
    Dropout => Dropout, Masking => Masking, TimeDistributed => TimeDistributed, TensorOp => Op);

impl From<CustomRnn> for Layer {
    fn from(l: CustomRnn) -> Layer {
        Layer::Custom(l)
    }
}

/// `dispatch!(layer, l => expr)`: `expr` with `l` bound to the variant's layer.
macro_rules! dispatch {
    ($layer:expr, $l:ident => $e:expr) => {
        match $layer {
            Layer::Input($l) => $e,
            Layer::Embedding($l) => $e,
            Layer::Dense($l) => $e,
            Layer::Recurrent($l) => $e,
            Layer::Bidirectional($l) => $e,
            Layer::BatchNormalization($l) => $e,
            Layer::Dropout($l) => $e,
            Layer::Masking($l) => $e,
            Layer::TimeDistributed($l) => $e,
            Layer::Op($l) => $e,
            Layer::Custom($l) => $e,
        }
    };
}

impl LayerKind for Layer {
    fn class(&self) -> &'static str {
        dispatch!(self, l => l.class())
    }
    fn stem(&self) -> &'static str {
        dispatch!(self, l => l.stem())
    }
    fn given(&self) -> Option<&str> {
        dispatch!(self, l => l.given())
    }
    fn check(&mut self, name: &str) -> R<()> {
        dispatch!(self, l => l.check(name))
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        dispatch!(self, l => l.weight_specs(name, input))
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        dispatch!(self, l => l.shapes(input))
    }
    fn is_stateful(&self) -> bool {
        dispatch!(self, l => l.is_stateful())
    }
    fn state_sizes(&self) -> Vec<usize> {
        dispatch!(self, l => LayerKind::state_sizes(l))
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        dispatch!(self, l => l.lower_call(e, io))
    }
    fn config(&self, name: &str) -> Value {
        dispatch!(self, l => l.config(name))
    }
}

impl Layer {
    /// Keras's class name (`LSTM`, `InputLayer`, ...).
    pub fn class_name(&self) -> &'static str {
        self.class()
    }

    /// The name the user gave, if any.
    pub fn given_name(&self) -> Option<&str> {
        self.given()
    }

    /// Keras's automatic name stem (`lstm`, `simple_rnn`, `batch_normalization`).
    pub fn default_stem(&self) -> &'static str {
        self.stem()
    }

    /// A layer from its entry in a Keras model config (`{"class_name", "config",
    /// "module"}`): each class's own `from_config`. An unknown class or option is
    /// [`KerasError::Unsupported`] naming the layer.
    pub(crate) fn from_config(cx: &Cx, entry: &Value) -> R<Layer> {
        let class = cx.str(entry, "class_name", "layer")?;
        let cfg = cx.get(entry, "config", class)?;
        let name = cfg
            .get("name")
            .and_then(Value::as_str)
            .or_else(|| entry.get("name").and_then(Value::as_str))
            .unwrap_or(class)
            .to_string();
        let at = name.as_str();
        let module = entry.get("module").and_then(Value::as_str).unwrap_or("");
        if let Some(kind) =
            TensorOpKind::from_class(class).filter(|_| module.starts_with("keras.src.ops"))
        {
            return Ok(TensorOp::from_config(cx, kind, cfg, at)?.into());
        }
        if class != "InputLayer" {
            cx.dtype_ok(cfg, at)?;
        }
        Ok(match class {
            "InputLayer" => Input::from_config(cx, cfg, at)?.into(),
            "Embedding" => Embedding::from_config(cx, cfg, at)?.into(),
            "Dense" => Dense::from_config(cx, cfg, at)?.into(),
            "RNN" if recurrent::custom_cell_class(cfg).is_some() => {
                CustomRnn::from_config(cx, cfg, at)?.into()
            }
            "LSTM" | "GRU" | "SimpleRNN" | "RNN" => {
                Recurrent::from_config(cx, class, cfg, at)?.into()
            }
            "Bidirectional" => Bidirectional::from_config(cx, cfg, at)?.into(),
            "BatchNormalization" => BatchNormalization::from_config(cx, cfg, at)?.into(),
            "Dropout" => Dropout::from_config(cx, cfg, at)?.into(),
            "Masking" => Masking::from_config(cx, cfg, at)?.into(),
            "TimeDistributed" => {
                let inner = Layer::from_config(cx, cx.get(cfg, "layer", at)?)?;
                TimeDistributed::new(inner).name(at).into()
            }
            other => {
                return Err(KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("layer class {other:?}"),
                })
            }
        })
    }
}
