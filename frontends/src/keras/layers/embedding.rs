//! `Embedding(input_dim, output_dim, mask_zero)`.

use super::kind::*;
use crate::keras::activation::Shape;
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::init::Init;
use crate::keras::KerasError;
use cellgraph_ir::{DType, Op, Tensor};
use serde_json::{json, Value};

/// `Embedding(input_dim, output_dim)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Vocabulary size.
    pub input_dim: usize,
    /// Vector size.
    pub output_dim: usize,
    /// `mask_zero`: token 0 is padding and masks its step.
    pub mask_zero: bool,
    /// The layer's name.
    pub name: Option<String>,
}

impl Embedding {
    /// A new embedding table.
    pub fn new(input_dim: usize, output_dim: usize) -> Embedding {
        Embedding {
            input_dim,
            output_dim,
            mask_zero: false,
            name: None,
        }
    }
    /// Sets `mask_zero`.
    pub fn mask_zero(mut self, b: bool) -> Embedding {
        self.mask_zero = b;
        self
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Embedding {
        self.name = Some(name.to_string());
        self
    }
}

impl LayerKind for Embedding {
    fn class(&self) -> &'static str {
        "Embedding"
    }
    fn stem(&self) -> &'static str {
        "embedding"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        if self.input_dim == 0 || self.output_dim == 0 {
            return Err(KerasError::Unsupported {
                layer: name.to_string(),
                what: "an empty embedding table".into(),
            });
        }
        Ok(())
    }
    fn weight_specs(&self, name: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        Ok(vec![(
            format!("{name}/embeddings"),
            vec![self.input_dim, self.output_dim],
            true,
            Init::Uniform,
        )])
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        let mut s = input.clone();
        s.push(Some(self.output_dim));
        Ok(vec![s])
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let ids = e.cast(io.x, DType::I64)?;
        let y = e.op(Op::Gather { axis: 0 }, &[io.w[0], ids], "embedding")?;
        let m = if self.mask_zero {
            let zero = e.constant(
                Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), 0)),
                "zero_id",
            )?;
            let eq = e.op(Op::Equal {}, &[ids, zero], "is_pad")?;
            Some(e.op(Op::Not {}, &[eq], "mask")?)
        } else {
            io.mask
        };
        Ok(vec![(y, m)])
    }
    fn config(&self, name: &str) -> Value {
        layer_entry(
            "Embedding",
            name,
            json!({"input_dim": self.input_dim, "output_dim": self.output_dim,
                   "mask_zero": self.mask_zero}),
        )
    }
}

impl Embedding {
    /// From a Keras `Embedding` config; regularizers, constraints and LoRA are refused.
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Embedding> {
        cx.refuse(
            cfg,
            at,
            &[
                "embeddings_regularizer",
                "activity_regularizer",
                "embeddings_constraint",
                "lora_rank",
            ],
        )?;
        Ok(Embedding::new(
            cx.usize(cfg, "input_dim", at)?,
            cx.usize(cfg, "output_dim", at)?,
        )
        .mask_zero(cx.bool(cfg, "mask_zero", false, at)?)
        .name(at))
    }
}
