//! What every layer answers: [`LayerKind`], the one trait each layer (or layer family)
//! implements in its own file, and what those files share.

use crate::keras::activation::{shape_str, Shape};
use crate::keras::emit::Emit;
use crate::keras::init::Init;
use crate::keras::KerasError;
use cellgraph_ir::ValueRef;
use serde_json::Value;

pub(crate) type R<T> = Result<T, KerasError>;

/// One weight a layer creates: its path (`lstm/lstm_cell/kernel`), shape, whether
/// training updates it, and its initializer.
pub(crate) type Spec = (String, Vec<usize>, bool, Init);

/// One call of a layer being lowered: its weights (in the order [`LayerKind::weight_specs`]
/// gives them), its input and mask, the initial states it was called with, and where a
/// layer pushes extra training outputs (BatchNormalization's batch mean and variance).
pub(crate) struct CallIo<'a> {
    /// The layer's weights as graph values.
    pub w: &'a [ValueRef],
    /// The input.
    pub x: ValueRef,
    /// The input's mask, if any.
    pub mask: Option<ValueRef>,
    /// `initial_state`, if given.
    pub init: Option<Vec<ValueRef>>,
    /// Extra outputs of a training graph.
    pub extra: &'a mut Vec<ValueRef>,
}

/// An output of a lowered call with its mask.
pub(crate) type Out = (ValueRef, Option<ValueRef>);

/// A Keras layer class: its names, checks, weights, output shapes, lowering to IR
/// nodes and its Keras config. Reading a config back is each layer's `from_config`
/// (dispatched on the class name by [`super::Layer::from_config`]).
pub(crate) trait LayerKind {
    /// Keras's class name (`LSTM`, `InputLayer`, ...).
    fn class(&self) -> &'static str;

    /// Keras's automatic name stem (`lstm`, `batch_normalization`).
    fn stem(&self) -> &'static str;

    /// The name the user gave, if any.
    fn given(&self) -> Option<&str>;

    /// Checks the options (`name`: the layer's name, for errors) and fills in what Keras
    /// derives from them.
    fn check(&mut self, name: &str) -> R<()> {
        let _ = name;
        Ok(())
    }

    /// The weights the layer creates for this input shape, under `name`.
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String>;

    /// The output shapes for this input shape.
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String>;

    /// Whether the layer keeps states between calls (`stateful`).
    fn is_stateful(&self) -> bool {
        false
    }

    /// The sizes of the states it keeps or takes as `initial_state`.
    fn state_sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Lowers one call to IR nodes: its outputs with their masks.
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>>;

    /// The layer's entry in a Keras model config (`{"module", "class_name", "config",
    /// ...}`), named `name`.
    fn config(&self, name: &str) -> Value;
}

/// The feature (last) dimension of an input of rank `rank`.
pub(crate) fn feature_dim(shape: &Shape, rank: usize, what: &str) -> Result<usize, String> {
    if shape.len() != rank {
        return Err(format!(
            "expects inputs of rank {rank} {what}, got shape {}",
            shape_str(shape)
        ));
    }
    last_dim(shape)
}

/// The last dimension, which must be known.
pub(crate) fn last_dim(shape: &Shape) -> Result<usize, String> {
    shape.last().copied().flatten().ok_or_else(|| {
        format!(
            "needs a known last dimension, got shape {}",
            shape_str(shape)
        )
    })
}

/// Keras's float32 dtype policy, as layer configs carry it.
pub(crate) fn dtype_policy() -> Value {
    serde_json::json!({"module": "keras", "class_name": "DTypePolicy",
                       "config": {"name": "float32"}, "registered_name": null})
}

/// A `keras.layers` entry of class `class` with the fields every layer config has.
pub(crate) fn layer_entry(class: &str, name: &str, mut cfg: Value) -> Value {
    cfg["name"] = serde_json::json!(name);
    cfg["trainable"] = serde_json::json!(true);
    cfg["dtype"] = dtype_policy();
    serde_json::json!({"module": "keras.layers", "class_name": class, "config": cfg,
                       "registered_name": null})
}

/// A shape as Keras writes it in JSON (`null` for an unknown dimension).
pub(crate) fn shape_json(s: &[Option<usize>]) -> Value {
    Value::Array(
        s.iter()
            .map(|d| d.map_or(Value::Null, |d| serde_json::json!(d)))
            .collect(),
    )
}
