//! Keras activation functions by name, and shapes as Keras prints them: the small
//! vocabulary the layers, the lowering and custom cells share.

use super::KerasError;
use std::fmt;
use std::str::FromStr;

/// A shape with the batch axis first; `None` is an unknown size (Keras's `None`).
pub type Shape = Vec<Option<usize>>;

/// Formats a shape as Keras prints it: `(None, 5, 64)`.
pub fn shape_str(s: &[Option<usize>]) -> String {
    let parts: Vec<String> = s
        .iter()
        .map(|d| d.map_or("None".to_string(), |d| d.to_string()))
        .collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// An activation function, by its Keras name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `linear` (identity).
    Linear,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// Keras 3 `hard_sigmoid`: `clip(x/6 + 0.5, 0, 1)`.
    HardSigmoid,
    /// `relu`.
    Relu,
    /// `relu6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `leaky_relu` with Keras's default slope 0.2.
    LeakyRelu,
    /// `elu` with alpha 1.
    Elu,
    /// `selu`.
    Selu,
    /// `softplus`.
    Softplus,
    /// `softsign`.
    Softsign,
    /// `exponential`.
    Exponential,
    /// `swish` / `silu`: `x · sigmoid(x)`.
    Swish,
    /// `softmax` over the last axis.
    Softmax,
    /// `log_softmax` over the last axis.
    LogSoftmax,
}

impl Activation {
    /// The Keras name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::HardSigmoid => "hard_sigmoid",
            Activation::Relu => "relu",
            Activation::Relu6 => "relu6",
            Activation::LeakyRelu => "leaky_relu",
            Activation::Elu => "elu",
            Activation::Selu => "selu",
            Activation::Softplus => "softplus",
            Activation::Softsign => "softsign",
            Activation::Exponential => "exponential",
            Activation::Swish => "swish",
            Activation::Softmax => "softmax",
            Activation::LogSoftmax => "log_softmax",
        }
    }
}

impl FromStr for Activation {
    type Err = KerasError;
    fn from_str(s: &str) -> Result<Activation, KerasError> {
        Ok(match s {
            "linear" | "None" => Activation::Linear,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "hard_sigmoid" => Activation::HardSigmoid,
            "relu" => Activation::Relu,
            "relu6" => Activation::Relu6,
            "leaky_relu" => Activation::LeakyRelu,
            "elu" => Activation::Elu,
            "selu" => Activation::Selu,
            "softplus" => Activation::Softplus,
            "softsign" => Activation::Softsign,
            "exponential" => Activation::Exponential,
            "swish" | "silu" => Activation::Swish,
            "softmax" => Activation::Softmax,
            "log_softmax" => Activation::LogSoftmax,
            other => {
                return Err(KerasError::Unsupported {
                    layer: String::new(),
                    what: format!(
                        "activation {other:?} (known: linear, tanh, sigmoid, hard_sigmoid, relu, \
                         relu6, leaky_relu, elu, selu, softplus, softsign, exponential, swish, \
                         silu, softmax, log_softmax)"
                    ),
                })
            }
        })
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
