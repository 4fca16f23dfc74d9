//! Runtime values: tensors, sequences and optionals.

use cellgraph_ir::{Tensor, ValueType};

/// A value at run time.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// A tensor.
    Tensor(Tensor),
    /// An ONNX sequence.
    Sequence(Vec<Tensor>),
    /// An ONNX optional (`None` = empty).
    Optional(Option<Box<Data>>),
}

impl Data {
    /// The tensor, or an error naming what this is instead.
    pub fn tensor(&self) -> Result<&Tensor, String> {
        match self {
            Data::Tensor(t) => Ok(t),
            Data::Sequence(_) => Err("expected a tensor, got a sequence".into()),
            Data::Optional(_) => Err("expected a tensor, got an optional".into()),
        }
    }

    /// Takes the tensor out.
    pub fn into_tensor(self) -> Result<Tensor, String> {
        match self {
            Data::Tensor(t) => Ok(t),
            other => Err(format!("expected a tensor, got {}", other.kind())),
        }
    }

    /// `tensor`, `sequence` or `optional`.
    pub fn kind(&self) -> &'static str {
        match self {
            Data::Tensor(_) => "tensor",
            Data::Sequence(_) => "sequence",
            Data::Optional(_) => "optional",
        }
    }

    /// Checks this value against a declared type: dtype and every known dimension.
    /// Symbolic dimensions are bound in `syms` and must agree across inputs.
    pub fn check_type(
        &self,
        ty: &ValueType,
        syms: &mut std::collections::HashMap<String, usize>,
    ) -> Result<(), String> {
        match (self, ty) {
            (_, ValueType::Unknown) => Ok(()),
            (Data::Tensor(t), ValueType::Tensor(tt)) => {
                if let Some(d) = tt.dtype {
                    if d != t.dtype() {
                        return Err(format!("dtype {} but the graph expects {d}", t.dtype()));
                    }
                }
                if let Some(dims) = &tt.shape {
                    if dims.len() != t.shape().len() {
                        return Err(format!(
                            "shape {:?} has rank {}, the graph expects rank {} ({tt})",
                            t.shape(),
                            t.shape().len(),
                            dims.len()
                        ));
                    }
                    for (i, (d, &n)) in dims.iter().zip(t.shape()).enumerate() {
                        match d {
                            cellgraph_ir::Dim::Known(k) if *k as usize != n => {
                                return Err(format!(
                                    "dimension {i} is {n}, the graph expects {k} ({tt})"
                                ));
                            }
                            cellgraph_ir::Dim::Sym(s) => {
                                let bound = *syms.entry(s.clone()).or_insert(n);
                                if bound != n {
                                    return Err(format!("dimension {i} ({s}) is {n}, but {s} is {bound} in another input"));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Ok(())
            }
            (Data::Sequence(_), ValueType::Sequence(_))
            | (Data::Optional(_), ValueType::Optional(_)) => Ok(()),
            (d, t) => Err(format!(
                "a {} was given where the graph expects {t}",
                d.kind()
            )),
        }
    }
}

impl From<Tensor> for Data {
    fn from(t: Tensor) -> Data {
        Data::Tensor(t)
    }
}
