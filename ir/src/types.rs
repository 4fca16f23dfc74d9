//! Value types: tensor types with symbolic shapes, sequences and optionals.

use crate::dtype::DType;
use std::fmt;

/// One dimension of a shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Dim {
    /// A known size.
    Known(u64),
    /// A named symbolic size (`batch`, `time`), equal wherever the name appears.
    Sym(String),
    /// Unknown.
    Unknown,
}

impl Dim {
    /// The size, when known.
    pub fn known(&self) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A tensor's dtype (when known) and shape (when its rank is known).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TensorType {
    /// Element type; `None` when not known.
    pub dtype: Option<DType>,
    /// Dimensions; `None` when even the rank is unknown.
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    /// A tensor type with known dtype and known dimensions.
    pub fn new(dtype: DType, dims: &[u64]) -> TensorType {
        TensorType {
            dtype: Some(dtype),
            shape: Some(dims.iter().map(|&d| Dim::Known(d)).collect()),
        }
    }

    /// A tensor type with a known dtype and the given dimensions.
    pub fn with_dims(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType {
            dtype: Some(dtype),
            shape: Some(dims),
        }
    }

    /// A tensor type with a known dtype and unknown shape.
    pub fn unranked(dtype: Option<DType>) -> TensorType {
        TensorType { dtype, shape: None }
    }

    /// The rank, when known.
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// All dimensions as numbers, when every one is known.
    pub fn known_dims(&self) -> Option<Vec<u64>> {
        self.shape.as_ref()?.iter().map(|d| d.known()).collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dtype {
            Some(d) => write!(f, "{d}")?,
            None => f.write_str("?")?,
        }
        match &self.shape {
            Some(dims) => {
                let s: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                write!(f, "[{}]", s.join(","))
            }
            None => f.write_str("[*]"),
        }
    }
}

/// The type of a value flowing along an edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ValueType {
    /// A dense tensor.
    Tensor(TensorType),
    /// An ONNX sequence of values of the element type.
    Sequence(Box<ValueType>),
    /// An ONNX optional of the element type.
    Optional(Box<ValueType>),
    /// Nothing is known.
    Unknown,
}

impl ValueType {
    /// A tensor type with known dtype and dims.
    pub fn tensor(dtype: DType, dims: &[u64]) -> ValueType {
        ValueType::Tensor(TensorType::new(dtype, dims))
    }

    /// The tensor type, when this is a tensor.
    pub fn as_tensor(&self) -> Option<&TensorType> {
        match self {
            ValueType::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The dtype, when this is a tensor of known dtype.
    pub fn dtype(&self) -> Option<DType> {
        self.as_tensor().and_then(|t| t.dtype)
    }

    /// The dims, when this is a tensor of known rank.
    pub fn dims(&self) -> Option<&[Dim]> {
        self.as_tensor().and_then(|t| t.shape.as_deref())
    }

    /// Merges a declared type with an inferred one: the more specific fact wins per
    /// component. Returns `Err` with a description when they contradict each other.
    /// Sequences and optionals merge leniently (their element shapes may vary).
    pub fn merge(&self, other: &ValueType) -> Result<ValueType, String> {
        use ValueType as V;
        match (self, other) {
            (V::Unknown, t) | (t, V::Unknown) => Ok(t.clone()),
            (V::Tensor(a), V::Tensor(b)) => merge_tensor(a, b).map(V::Tensor),
            (V::Sequence(a), V::Sequence(b)) => Ok(V::Sequence(Box::new(merge_lenient(a, b)))),
            (V::Optional(a), V::Optional(b)) => Ok(V::Optional(Box::new(merge_lenient(a, b)))),
            (a, b) => Err(format!("{a} is not compatible with {b}")),
        }
    }
}

fn merge_lenient(a: &ValueType, b: &ValueType) -> ValueType {
    match a.merge(b) {
        Ok(t) => t,
        Err(_) => match (a, b) {
            (ValueType::Tensor(x), ValueType::Tensor(y)) if x.dtype == y.dtype => {
                ValueType::Tensor(TensorType::unranked(x.dtype))
            }
            _ => ValueType::Unknown,
        },
    }
}

fn merge_tensor(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    let dtype = match (a.dtype, b.dtype) {
        (Some(x), Some(y)) if x != y => return Err(format!("dtype {x} is not {y}")),
        (x, y) => x.or(y),
    };
    let shape = match (&a.shape, &b.shape) {
        (None, s) | (s, None) => s.clone(),
        (Some(x), Some(y)) => {
            if x.len() != y.len() {
                return Err(format!("rank {} is not {} ({a} vs {b})", x.len(), y.len()));
            }
            let mut dims = Vec::with_capacity(x.len());
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                dims.push(match (p, q) {
                    (Dim::Known(m), Dim::Known(n)) if m != n => {
                        return Err(format!(
                            "dimension {i} is {m} in one and {n} in the other ({a} vs {b})"
                        ))
                    }
                    (Dim::Known(m), _) | (_, Dim::Known(m)) => Dim::Known(*m),
                    (Dim::Sym(s), _) | (_, Dim::Sym(s)) => Dim::Sym(s.clone()),
                    _ => Dim::Unknown,
                });
            }
            Some(dims)
        }
    };
    Ok(TensorType { dtype, shape })
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Tensor(t) => write!(f, "{t}"),
            ValueType::Sequence(t) => write!(f, "seq<{t}>"),
            ValueType::Optional(t) => write!(f, "opt<{t}>"),
            ValueType::Unknown => f.write_str("?"),
        }
    }
}
