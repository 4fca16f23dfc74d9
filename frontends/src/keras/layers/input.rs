//! `InputLayer`: a model input of a declared shape and dtype.

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::KerasError;
use cellgraph_ir::DType;
use serde_json::{json, Value};

/// `Input(shape)`: declares a model input; the batch axis is added in front.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// The full shape, batch first (`batch_shape`).
    pub batch_shape: Shape,
    /// The dtype name (`float32`, `int32`, ...).
    pub dtype: String,
    /// The input's name.
    pub name: Option<String>,
}

impl Input {
    /// `Input(shape=...)`: a batch axis of unknown size goes in front.
    pub fn new(shape: &[Option<usize>]) -> Input {
        let mut batch_shape = vec![None];
        batch_shape.extend_from_slice(shape);
        Input {
            batch_shape,
            dtype: "float32".into(),
            name: None,
        }
    }
    /// `Input(batch_shape=...)`: the full shape, batch included (stateful models).
    pub fn batch_shape(shape: &[Option<usize>]) -> Input {
        Input {
            batch_shape: shape.to_vec(),
            dtype: "float32".into(),
            name: None,
        }
    }
    /// Names the input.
    pub fn name(mut self, name: &str) -> Input {
        self.name = Some(name.to_string());
        self
    }
    /// Sets the dtype (`float32`, `int32`, `int64`).
    pub fn dtype(mut self, dtype: &str) -> Input {
        self.dtype = dtype.to_string();
        self
    }
}

impl LayerKind for Input {
    fn class(&self) -> &'static str {
        "InputLayer"
    }
    fn stem(&self) -> &'static str {
        "input_layer"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        let bad = |what: String| {
            Err(KerasError::Unsupported {
                layer: name.to_string(),
                what,
            })
        };
        if dtype_of(&self.dtype).is_none() {
            return bad(format!("dtype {:?} (float32, int32, int64)", self.dtype));
        }
        if self.batch_shape.is_empty() {
            return bad("an Input of rank 0".into());
        }
        Ok(())
    }
    fn weight_specs(&self, _: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        Ok(Vec::new())
    }
    fn shapes(&self, _: &Shape) -> Result<Vec<Shape>, String> {
        Ok(vec![self.batch_shape.clone()])
    }
    fn lower_call(&self, _: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        Ok(vec![(io.x, io.mask)])
    }
    fn config(&self, name: &str) -> Value {
        json!({
            "module": "keras.layers", "class_name": "InputLayer",
            "config": {"batch_shape": shape_json(&self.batch_shape), "dtype": self.dtype,
                       "sparse": false, "ragged": false, "name": name, "optional": false},
            "registered_name": null})
    }
}

impl Input {
    /// From a Keras `InputLayer` config (`batch_shape` or the older `batch_input_shape`).
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Input> {
        let shape = cfg
            .get("batch_shape")
            .or_else(|| cfg.get("batch_input_shape"))
            .and_then(Value::as_array)
            .ok_or_else(|| cx.err(at, "InputLayer without batch_shape".into()))?;
        let dims = shape
            .iter()
            .map(|d| match d {
                Value::Null => Ok(None),
                d => d
                    .as_u64()
                    .filter(|&n| n <= (1 << 31))
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| cx.err(at, format!("batch_shape entry {d}"))),
            })
            .collect::<R<Vec<_>>>()?;
        cx.refuse(cfg, at, &["sparse", "ragged", "optional"])?;
        let dtype = match cfg.get("dtype") {
            Some(Value::String(s)) => s.clone(),
            _ => "float32".into(),
        };
        Ok(Input::batch_shape(&dims).name(at).dtype(&dtype))
    }
}

/// The IR dtype of a Keras dtype name (`float32`, `int32`, `int64`).
pub(crate) fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "int32" => DType::I32,
        "int64" => DType::I64,
        _ => return None,
    })
}
