//! Building graphs in Rust: [`Builder`] adds nodes to a [`Graph`] with generated unique
//! value names and typed methods per op family, in the ONNX form the graph's opset
//! expects (`Unsqueeze`, `ReduceSum`, `Split` take their axes or sizes as attributes
//! before opset 13, as inputs from 13 on). Every node's types are inferred when it is
//! added, so a shape error is reported by the call that caused it, naming the node and
//! the op.
//!
//! The passes that rewrite graphs (the autodiff pass, the recurrent lowering, the Keras
//! lowering) emit through it too.
//!
//! ```
//! use cellgraph_ir::builder::Builder;
//! use cellgraph_ir::{DType, Graph, Tensor, ValueType};
//! # fn main() -> cellgraph_ir::Result<()> {
//! let mut g = Graph::new("affine");
//! let mut b = Builder::new(&mut g, "affine");
//! let x = b.input("x", ValueType::tensor(DType::F32, &[2, 3]))?;
//! let w = b.initializer("w", Tensor::zeros(DType::F32, &[3, 4]), true)?;
//! let y = b.matmul(x, w)?;
//! let y = b.tanh(y)?;
//! b.outputs(&[y])?;
//! // The shape error names the op at the call that caused it.
//! let e = b.matmul(y, x).unwrap_err().to_string();
//! assert!(e.contains("MatMul"), "{e}");
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, ValueRef};
use crate::ops::Op;
use crate::tensor::Tensor;
use crate::types::{Dim, ValueType};
use crate::DType;

/// Adds nodes to one graph under a name prefix (see the module docs).
pub struct Builder<'g> {
    /// The graph being built.
    pub g: &'g mut Graph,
    prefix: String,
    k: usize,
}

impl<'g> Builder<'g> {
    /// A builder adding to `g`; generated value names are `prefix/hint_N`.
    pub fn new(g: &'g mut Graph, prefix: &str) -> Builder<'g> {
        Builder {
            g,
            prefix: prefix.to_string(),
            k: 0,
        }
    }

    /// The name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A value name not yet used in the graph: `prefix/hint_N`.
    pub fn fresh(&mut self, hint: &str) -> String {
        loop {
            self.k += 1;
            let name = format!("{}/{hint}_{}", self.prefix, self.k);
            if self.g.find(&name).is_none() {
                return name;
            }
        }
    }

    /// The graph's default-domain opset.
    pub fn opset(&self) -> i64 {
        self.g.opset("")
    }

    /// Adds a node named `node` (may be empty) with one output per hint; `None` inputs
    /// are omitted optional ones.
    pub fn node(
        &mut self,
        node: &str,
        op: Op,
        ins: &[Option<ValueRef>],
        hints: &[&str],
    ) -> Result<Vec<ValueRef>> {
        let names: Vec<String> = hints.iter().map(|h| self.fresh(h)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let id = self.g.add_node(node, op, ins, &refs)?;
        Ok(outputs_of(id, names.len()))
    }

    /// Adds an unnamed node with one output per hint.
    pub fn multi(&mut self, op: Op, ins: &[ValueRef], hints: &[&str]) -> Result<Vec<ValueRef>> {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        self.node("", op, &ins, hints)
    }

    /// Adds an unnamed single-output node.
    pub fn op(&mut self, op: Op, ins: &[ValueRef], hint: &str) -> Result<ValueRef> {
        Ok(self.multi(op, ins, &[hint])?[0])
    }

    /// A graph input.
    pub fn input(&mut self, name: &str, ty: ValueType) -> Result<ValueRef> {
        self.g.add_input(name, ty)
    }

    /// A weight (`trainable`: training updates it).
    pub fn initializer(&mut self, name: &str, t: Tensor, trainable: bool) -> Result<ValueRef> {
        self.g.add_initializer(name, t, trainable)
    }

    /// A value the graph reads by name from its enclosing graph (a loop body reading a
    /// weight).
    pub fn outer(&mut self, name: &str, ty: ValueType) -> Result<ValueRef> {
        self.g.add_outer(name, ty)
    }

    /// Sets the graph outputs.
    pub fn outputs(&mut self, outs: &[ValueRef]) -> Result<()> {
        self.g.set_outputs(outs.to_vec())
    }

    /// A `Constant` node holding `t`.
    pub fn constant(&mut self, t: Tensor, hint: &str) -> Result<ValueRef> {
        self.op(Op::constant(t), &[], hint)
    }

    /// A scalar constant of dtype `dt`.
    pub fn scalar(&mut self, dt: DType, v: f64) -> Result<ValueRef> {
        let t = Tensor::from_f64_vec(dt, &[], &[v]).map_err(|e| Error::Tensor {
            name: self.prefix.clone(),
            msg: e.to_string(),
        })?;
        self.constant(t, "c")
    }

    /// An `int64` vector constant (axes, shapes, sizes).
    pub fn ints(&mut self, v: &[i64]) -> Result<ValueRef> {
        self.constant(Tensor::vec_i64(v), "i")
    }

    /// The value's dtype (f32 when unknown).
    pub fn dtype(&self, v: ValueRef) -> DType {
        self.g.value(v).ty.dtype().unwrap_or(DType::F32)
    }

    /// The value's dimensions (empty when its rank is unknown).
    pub fn dims(&self, v: ValueRef) -> Vec<Dim> {
        self.g
            .value(v)
            .ty
            .dims()
            .map(<[Dim]>::to_vec)
            .unwrap_or_default()
    }

    /// The static shape of a value, if every dimension is known.
    pub fn shape_of(&self, v: ValueRef) -> Option<Vec<usize>> {
        self.g
            .value(v)
            .ty
            .dims()?
            .iter()
            .map(|d| match d {
                Dim::Known(n) => Some(*n as usize),
                _ => None,
            })
            .collect()
    }

    // ---- elementwise ----

    /// `a + b` (numpy broadcasting).
    pub fn add(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Add {}, &[a, b], "add")
    }
    /// `a − b`.
    pub fn sub(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Sub {}, &[a, b], "sub")
    }
    /// `a · b`, elementwise.
    pub fn mul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Mul {}, &[a, b], "mul")
    }
    /// `a / b`.
    pub fn div(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Div {}, &[a, b], "div")
    }
    /// `−a`.
    pub fn neg(&mut self, a: ValueRef) -> Result<ValueRef> {
        self.op(Op::Neg {}, &[a], "neg")
    }
    /// `σ(x)`.
    pub fn sigmoid(&mut self, x: ValueRef) -> Result<ValueRef> {
        self.op(Op::Sigmoid {}, &[x], "sigmoid")
    }
    /// `tanh(x)`.
    pub fn tanh(&mut self, x: ValueRef) -> Result<ValueRef> {
        self.op(Op::Tanh {}, &[x], "tanh")
    }
    /// `max(x, 0)`.
    pub fn relu(&mut self, x: ValueRef) -> Result<ValueRef> {
        self.op(Op::Relu {}, &[x], "relu")
    }
    /// `c ? a : b`.
    pub fn where_(&mut self, c: ValueRef, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Where {}, &[c, a, b], "where")
    }
    /// Converts to `to`.
    pub fn cast(&mut self, v: ValueRef, to: DType) -> Result<ValueRef> {
        self.op(
            Op::Cast {
                to: to.onnx_code() as i64,
                saturate: None,
                round_mode: None,
            },
            &[v],
            "cast",
        )
    }

    // ---- products ----

    /// The matrix product (numpy `matmul` broadcasting).
    pub fn matmul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::MatMul {}, &[a, b], "matmul")
    }

    // ---- shapes ----

    /// Permutes the axes.
    pub fn transpose(&mut self, v: ValueRef, perm: &[i64]) -> Result<ValueRef> {
        self.op(
            Op::Transpose {
                perm: Some(perm.to_vec()),
            },
            &[v],
            "transpose",
        )
    }

    /// Reshapes to a static shape.
    pub fn reshape(&mut self, v: ValueRef, shape: &[usize]) -> Result<ValueRef> {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.ints(&s)?;
        self.op(Op::Reshape { allowzero: 0 }, &[v, s], "reshape")
    }

    /// Broadcasts `v` to `shape` (numpy rules).
    pub fn expand(&mut self, v: ValueRef, shape: &[usize]) -> Result<ValueRef> {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.ints(&s)?;
        self.op(Op::Expand {}, &[v, s], "expand")
    }

    /// Inserts axes of size 1 (attribute form before opset 13, input form after).
    pub fn unsqueeze(&mut self, v: ValueRef, axes: &[i64]) -> Result<ValueRef> {
        if self.opset() >= 13 {
            let a = self.ints(axes)?;
            self.op(Op::Unsqueeze { axes: None }, &[v, a], "unsqueeze")
        } else {
            self.op(
                Op::Unsqueeze {
                    axes: Some(axes.to_vec()),
                },
                &[v],
                "unsqueeze",
            )
        }
    }

    /// Concatenates along `axis`.
    pub fn concat(&mut self, vs: &[ValueRef], axis: i64) -> Result<ValueRef> {
        self.op(Op::Concat { axis }, vs, "concat")
    }

    /// Splits `v` along `axis` into pieces of the given sizes (sizes as an attribute
    /// before opset 13, as an input after).
    pub fn split(&mut self, v: ValueRef, axis: i64, sizes: &[usize]) -> Result<Vec<ValueRef>> {
        let hints = vec!["split"; sizes.len()];
        let sz: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
        if self.opset() >= 13 {
            let s = self.ints(&sz)?;
            self.multi(
                Op::Split {
                    axis,
                    split: None,
                    num_outputs: None,
                },
                &[v, s],
                &hints,
            )
        } else {
            self.multi(
                Op::Split {
                    axis,
                    split: Some(sz),
                    num_outputs: None,
                },
                &[v],
                &hints,
            )
        }
    }

    // ---- reductions ----

    fn reduce(&mut self, sum: bool, v: ValueRef, axes: &[i64], keepdims: bool) -> Result<ValueRef> {
        let k = i64::from(keepdims);
        // ReduceSum takes its axes as an input from opset 13, the others from 18.
        let input_form = self.opset() >= if sum { 13 } else { 18 };
        let attr = (!input_form).then(|| axes.to_vec());
        let op = if sum {
            Op::ReduceSum {
                axes: attr,
                keepdims: k,
                noop_with_empty_axes: 0,
            }
        } else {
            Op::ReduceMean {
                axes: attr,
                keepdims: k,
                noop_with_empty_axes: 0,
            }
        };
        let hint = if sum { "sum" } else { "mean" };
        if input_form {
            let a = self.ints(axes)?;
            self.op(op, &[v, a], hint)
        } else {
            self.op(op, &[v], hint)
        }
    }

    /// Sums over `axes`.
    pub fn reduce_sum(&mut self, v: ValueRef, axes: &[i64], keepdims: bool) -> Result<ValueRef> {
        self.reduce(true, v, axes, keepdims)
    }

    /// Averages over `axes`.
    pub fn reduce_mean(&mut self, v: ValueRef, axes: &[i64], keepdims: bool) -> Result<ValueRef> {
        self.reduce(false, v, axes, keepdims)
    }

    // ---- control flow ----

    /// A `Scan` over `body` (built with its own [`Builder`]): `states` are the carried
    /// values (the body's first inputs and outputs), `scans` the sequences it steps
    /// through on axis 0 (one element per step as the body's next inputs); the body's
    /// outputs after the states are stacked on axis 0. Returns the final states, then the
    /// stacked outputs. `reverse` runs the steps from the last.
    pub fn scan(
        &mut self,
        body: Graph,
        states: &[ValueRef],
        scans: &[ValueRef],
        reverse: bool,
    ) -> Result<Vec<ValueRef>> {
        let n_out = body.outputs().len();
        if n_out < states.len() {
            return Err(Error::Malformed {
                what: format!("Scan body {:?}", body.name),
                msg: format!("{n_out} outputs, fewer than its {} states", states.len()),
            });
        }
        let hints: Vec<String> = (0..n_out)
            .map(|i| {
                if i < states.len() {
                    format!("state{i}")
                } else {
                    format!("seq{}", i - states.len())
                }
            })
            .collect();
        let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
        let ins: Vec<ValueRef> = states.iter().chain(scans).copied().collect();
        self.multi(
            Op::Scan {
                body: Box::new(body),
                num_scan_inputs: scans.len() as i64,
                scan_input_axes: None,
                scan_input_directions: reverse.then(|| vec![1; scans.len()]),
                scan_output_axes: None,
                scan_output_directions: None,
                directions: None,
            },
            &ins,
            &hint_refs,
        )
    }
}

fn outputs_of(id: NodeId, n: usize) -> Vec<ValueRef> {
    (0..n).map(|slot| ValueRef { node: id, slot }).collect()
}
