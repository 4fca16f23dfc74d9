//! Vector-Jacobian product rules, one per differentiable op, in one module per op family
//! (as the shape rules in `ir` and the CPU kernels are); `vjp` dispatches on
//! `OpKind::info().family`, and which ops have a rule is declared in the op list
//! (`define_ops!`: `vjp rule`).
//!
//! A rule reads the node (its op, the values of its inputs and outputs in the gradient
//! graph) and the cotangents of its outputs, and emits the cotangents of its inputs.
//! Broadcasting is undone with [`Emit::unbroadcast`]; values whose gradient nobody needs
//! (`need[i] == false`) are skipped.
//!
//! Conventions where a function has no derivative (each documented at its rule):
//! `Max`/`Min`/`ReduceMax`/`ReduceMin` split the cotangent evenly among tied extremes
//! (JAX's convention: the tied copies together get what one untied extreme would);
//! `Clip` gives the cotangent to x on the bounds (min ≤ x ≤ max, as TensorFlow and
//! PyTorch) and to a bound only strictly outside; `Relu` and `Abs` give 0 at 0.
//! Softmax/LogSoftmax below opset 13 follow ONNX's 2-D coercion at `axis` (default 1),
//! as the CPU kernel does.

mod control;
mod elementwise;
mod nn;
mod reduce;
mod rnn;
mod shape;

pub(crate) use control::{augment_loop, augment_scan};

use crate::emit::Emit;
use crate::{Error, Result};
use cellgraph_ir::{Graph, NodeId, Op, Tensor, ValueRef};

/// What a rule sees of one node.
pub(crate) struct NodeCx<'a> {
    /// The op.
    pub op: &'a Op,
    /// The node's display name (for errors).
    pub name: String,
    /// Input values in the gradient graph (`None`: an omitted optional input).
    pub ins: &'a [Option<ValueRef>],
    /// Output values in the gradient graph.
    pub outs: &'a [ValueRef],
    /// Cotangents of the outputs (`None`: nothing flows back through that output).
    pub cots: &'a [Option<ValueRef>],
    /// Whether each input's gradient is needed.
    pub need: &'a [bool],
    /// The extra per-step outputs of an augmented forward `Scan`.
    pub residuals: &'a [ValueRef],
    /// The source graph and node (for constant attributes held in inputs).
    pub src: &'a Graph,
    /// The node in `src`.
    pub node: NodeId,
}

/// The cotangents a rule produces.
#[derive(Default)]
pub(crate) struct Grads {
    /// One per input (`None`: no gradient).
    pub inputs: Vec<Option<ValueRef>>,
    /// Gradients of values the node's bodies read from outside, by name.
    pub outer: Vec<(String, ValueRef)>,
}

impl NodeCx<'_> {
    /// The error for an op this family has no rule for.
    fn no_rule(&self) -> Error {
        Error::NoRule {
            op: self.op.name().to_string(),
            node: self.name.clone(),
        }
    }

    fn unsupported(&self, why: impl Into<String>) -> Error {
        Error::Unsupported {
            op: self.op.name().to_string(),
            node: self.name.clone(),
            why: why.into(),
        }
    }

    fn input(&self, i: usize) -> Result<ValueRef> {
        self.ins
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| self.unsupported(format!("input {i} is missing")))
    }

    fn g(&self) -> Result<ValueRef> {
        self.cots
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| Error::Internal("no output cotangent".into()))
    }

    fn need(&self, i: usize) -> bool {
        self.need.get(i).copied().unwrap_or(false)
    }

    /// A constant input's tensor (`None`: omitted, or not a constant).
    fn const_tensor(&self, i: usize) -> Option<Tensor> {
        let v = self.src.node_inputs(self.node).get(i).copied().flatten()?;
        self.src.constant(v)
    }

    /// A constant input's integer values (axes, shapes, slice bounds).
    fn const_ints(&self, i: usize) -> Option<Vec<i64>> {
        self.const_tensor(i)?.as_i64_vec()
    }

    /// A constant input's values as f64 (bool tensors included: false 0, true 1).
    fn const_f64s(&self, i: usize) -> Option<Vec<f64>> {
        Some(self.const_tensor(i)?.to_f64_vec())
    }
}

fn one(g: Option<ValueRef>) -> Grads {
    Grads {
        inputs: vec![g],
        outer: Vec::new(),
    }
}

fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64).max(0) as usize
    } else {
        a as usize
    }
}

/// Runs the rule for `cx.op`: the family module's (`OpKind::info().family`).
pub(crate) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    if crate::is_non_differentiable(cx.op) {
        return Ok(Grads::default());
    }
    match cx.op.kind().info().family {
        "elementwise" => elementwise::vjp(e, cx),
        "nn" => nn::vjp(e, cx),
        "shape" => shape::vjp(e, cx),
        "reduce" => reduce::vjp(e, cx),
        "control" => control::vjp(e, cx),
        "rnn" => rnn::vjp(e, cx),
        _ => Err(cx.no_rule()),
    }
}
