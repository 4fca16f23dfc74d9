//! The Keras lowering's emitter: the shared graph builder with this frontend's error
//! type, dropout masks and the pieces the layers and custom cells lower with.

use super::activation::Activation;
use super::KerasError;
use cellgraph_ir::builder::Builder as IrBuilder;
use cellgraph_ir::{DType, Dim, Graph, Op, Tensor, ValueRef, ValueType};

type R<T> = Result<T, KerasError>;

/// Adds nodes to one graph with generated unique value names: the shared
/// [`cellgraph_ir::builder::Builder`] (reached through `Deref`) with this frontend's
/// error type, dropout masks and the Keras-specific pieces.
pub(crate) struct Emit<'g> {
    b: IrBuilder<'g>,
    /// The layer prefix of every generated name (the layer's name, in errors too).
    pub prefix: String,
    /// Training mode: dropout is on.
    pub training: bool,
    /// The dropout masks this emitter added as graph inputs, in order: (shape, rate).
    pub randoms: Vec<(Vec<usize>, f32)>,
}

impl<'g> std::ops::Deref for Emit<'g> {
    type Target = IrBuilder<'g>;
    fn deref(&self) -> &IrBuilder<'g> {
        &self.b
    }
}

impl std::ops::DerefMut for Emit<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.b
    }
}

impl<'g> Emit<'g> {
    pub fn new(g: &'g mut Graph, prefix: &str) -> Emit<'g> {
        Emit {
            b: IrBuilder::new(g, prefix),
            prefix: prefix.to_string(),
            training: false,
            randoms: Vec::new(),
        }
    }

    /// A dropout mask fed at run time: a graph input of `shape` holding
    /// `bernoulli(1 − rate) / (1 − rate)`.
    pub fn random_mask(&mut self, shape: &[Dim], rate: f32) -> R<ValueRef> {
        let dims: Vec<usize> = shape
            .iter()
            .map(|d| match d {
                Dim::Known(n) => Ok(*n as usize),
                _ => Err(KerasError::Layer {
                    layer: self.prefix.clone(),
                    msg: "dropout in training mode needs known shapes".into(),
                }),
            })
            .collect::<R<_>>()?;
        let name = self.fresh("dropout_mask");
        let d64: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        let v = self
            .g
            .add_input(&name, ValueType::tensor(DType::F32, &d64))?;
        self.randoms.push((dims, rate));
        Ok(v)
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.b.fresh(hint)
    }

    pub fn op(&mut self, op: Op, ins: &[ValueRef], hint: &str) -> R<ValueRef> {
        Ok(self.multi(op, ins, &[hint])?[0])
    }

    pub fn multi(&mut self, op: Op, ins: &[ValueRef], hints: &[&str]) -> R<Vec<ValueRef>> {
        self.node("", op, ins, hints)
    }

    /// Adds a node with a name of its own (reports name recurrent loops by it).
    pub fn node(
        &mut self,
        node: &str,
        op: Op,
        ins: &[ValueRef],
        hints: &[&str],
    ) -> R<Vec<ValueRef>> {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        Ok(self.b.node(node, op, &ins, hints)?)
    }
    pub fn constant(&mut self, t: Tensor, hint: &str) -> R<ValueRef> {
        self.op(Op::constant(t), &[], hint)
    }

    pub fn scalar(&mut self, v: f32) -> R<ValueRef> {
        self.constant(Tensor::scalar_f32(v), "c")
    }

    pub fn ints(&mut self, v: &[i64]) -> R<ValueRef> {
        self.constant(Tensor::vec_i64(v), "i")
    }

    pub fn add(&mut self, a: ValueRef, b: ValueRef) -> R<ValueRef> {
        self.op(Op::Add {}, &[a, b], "add")
    }
    pub fn mul(&mut self, a: ValueRef, b: ValueRef) -> R<ValueRef> {
        self.op(Op::Mul {}, &[a, b], "mul")
    }
    pub fn matmul(&mut self, a: ValueRef, b: ValueRef) -> R<ValueRef> {
        self.op(Op::MatMul {}, &[a, b], "matmul")
    }

    pub fn unsqueeze(&mut self, x: ValueRef, axes: &[i64]) -> R<ValueRef> {
        let a = self.ints(axes)?;
        self.op(Op::Unsqueeze { axes: None }, &[x, a], "unsqueeze")
    }

    pub fn transpose(&mut self, x: ValueRef, perm: &[i64]) -> R<ValueRef> {
        self.op(
            Op::Transpose {
                perm: Some(perm.to_vec()),
            },
            &[x],
            "transpose",
        )
    }

    pub fn cast(&mut self, x: ValueRef, to: DType) -> R<ValueRef> {
        self.op(
            Op::Cast {
                to: to.onnx_code() as i64,
                saturate: None,
                round_mode: None,
            },
            &[x],
            "cast",
        )
    }

    /// Splits the last axis into `n` equal parts.
    pub fn split(&mut self, x: ValueRef, n: usize) -> R<Vec<ValueRef>> {
        let hints = vec!["split"; n];
        self.multi(
            Op::Split {
                axis: -1,
                split: None,
                num_outputs: Some(n as i64),
            },
            &[x],
            &hints,
        )
    }

    /// `x[.., start..end]` on `axis`.
    pub fn slice(
        &mut self,
        x: ValueRef,
        axis: i64,
        start: i64,
        end: i64,
        step: i64,
    ) -> R<ValueRef> {
        let s = self.ints(&[start])?;
        let e = self.ints(&[end])?;
        let a = self.ints(&[axis])?;
        let st = self.ints(&[step])?;
        self.op(Op::Slice {}, &[x, s, e, a, st], "slice")
    }

    /// `Gather(x, index, axis)` with a scalar index: drops the axis.
    pub fn pick(&mut self, x: ValueRef, index: i64, axis: i64) -> R<ValueRef> {
        let i = self.constant(
            Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), index)),
            "idx",
        )?;
        self.op(Op::Gather { axis }, &[x, i], "pick")
    }

    pub fn dims(&self, v: ValueRef) -> Vec<Dim> {
        self.b.dims(v)
    }

    /// Zeros of shape `(batch of x, width)`, where x's first axis is the batch.
    pub fn batch_zeros(&mut self, x: ValueRef, width: usize) -> R<ValueRef> {
        self.batch_zeros_of(x, &[width])
    }

    /// Zeros of shape `(batch of x, *dims)`, where x's first axis is the batch.
    pub fn batch_zeros_of(&mut self, x: ValueRef, dims: &[usize]) -> R<ValueRef> {
        if let Some(Dim::Known(b)) = self.dims(x).first() {
            // A static batch: a constant, so every later shape is known.
            let mut shape = vec![*b as usize];
            shape.extend_from_slice(dims);
            let t = Tensor::zeros(DType::F32, &shape);
            return self.constant(t, "zeros");
        }
        let shape = self.op(
            Op::Shape {
                start: None,
                end: None,
            },
            &[x],
            "shape",
        )?;
        let b = self.slice(shape, 0, 0, 1, 1)?;
        let rest: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let w = self.ints(&rest)?;
        let full = self.op(Op::Concat { axis: 0 }, &[b, w], "zeros_shape")?;
        self.op(
            Op::ConstantOfShape {
                value: Some(Tensor::F32(ndarray::ArrayD::from_elem(
                    ndarray::IxDyn(&[1]),
                    0.0,
                ))),
            },
            &[full],
            "zeros",
        )
    }

    pub fn activation(&mut self, a: Activation, x: ValueRef) -> R<ValueRef> {
        let unary = |op: Op, e: &mut Self, hint: &str| e.op(op, &[x], hint);
        match a {
            Activation::Linear => Ok(x),
            Activation::Tanh => unary(Op::Tanh {}, self, "tanh"),
            Activation::Sigmoid => unary(Op::Sigmoid {}, self, "sigmoid"),
            Activation::HardSigmoid => unary(
                Op::HardSigmoid {
                    alpha: 1.0 / 6.0,
                    beta: 0.5,
                },
                self,
                "hard_sigmoid",
            ),
            Activation::Relu => unary(Op::Relu {}, self, "relu"),
            Activation::Relu6 => {
                let lo = self.scalar(0.0)?;
                let hi = self.scalar(6.0)?;
                self.op(
                    Op::Clip {
                        min: None,
                        max: None,
                    },
                    &[x, lo, hi],
                    "relu6",
                )
            }
            Activation::LeakyRelu => unary(Op::LeakyRelu { alpha: 0.2 }, self, "leaky_relu"),
            Activation::Elu => unary(Op::Elu { alpha: 1.0 }, self, "elu"),
            Activation::Selu => {
                // selu(x) = scale · elu(x, alpha)
                let e = self.op(Op::Elu { alpha: 1.673_263_2 }, &[x], "selu_elu")?;
                let s = self.scalar(1.050_701)?;
                self.mul(e, s)
            }
            Activation::Softplus => unary(Op::Softplus {}, self, "softplus"),
            Activation::Softsign => unary(Op::Softsign {}, self, "softsign"),
            Activation::Exponential => unary(Op::Exp {}, self, "exp"),
            Activation::Swish => {
                let s = self.op(Op::Sigmoid {}, &[x], "sigmoid")?;
                self.mul(x, s)
            }
            Activation::Softmax => unary(Op::Softmax { axis: Some(-1) }, self, "softmax"),
            Activation::LogSoftmax => unary(Op::LogSoftmax { axis: Some(-1) }, self, "log_softmax"),
        }
    }
}
