//! VJP rules of the `rnn` family (`OpKind::info().family`): the fused recurrent ops, whose backward is one fused `*Grad` op.

use super::{Grads, NodeCx};
use crate::emit::Emit;
use crate::{Error, Result};
use cellgraph_ir::ops::rnn::GradSlots;
use cellgraph_ir::{Op, ValueRef};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
    match cx.op {
        Op::LSTM { .. }
        | Op::GRU { .. }
        | Op::RNN { .. }
        | Op::LSTMMasked { .. }
        | Op::GRUMasked { .. }
        | Op::RNNMasked { .. } => fused_rnn(e, cx),
        _ => Err(no_rule()),
    }
}

/// The fused recurrent ops: their backward is one fused op of the cellgraph domain
/// (`LSTMGrad`/`GRUGrad`/`RNNGrad`, a CPU kernel that recomputes the forward and runs
/// backpropagation through time).
fn fused_rnn(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let op = cx
        .op
        .recurrent_pair()
        .ok_or_else(|| Error::Internal("not a recurrent op".into()))?;
    // Forward inputs, cotangent inputs and gradient outputs of the backward op.
    let slots =
        GradSlots::of_op(cx.op).ok_or_else(|| Error::Internal("not a recurrent op".into()))?;
    let (n_fwd, n_cot) = (slots.forward_inputs, slots.cotangents);
    // A masked op's mask (after its forward inputs) goes last, after the cotangents.
    let mask = match cx.op {
        Op::LSTMMasked { .. } | Op::GRUMasked { .. } | Op::RNNMasked { .. } => Some(
            cx.ins
                .get(n_fwd)
                .copied()
                .flatten()
                .ok_or_else(|| cx.unsupported("a masked recurrent op without its mask"))?,
        ),
        _ => None,
    };
    let layout = match &op {
        Op::LSTMGrad { layout, .. } | Op::GRUGrad { layout, .. } | Op::RNNGrad { layout, .. } => {
            *layout
        }
        _ => 0,
    };
    if layout != 0 {
        return Err(cx.unsupported("layout=1 (the importer canonicalises it to layout 0)"));
    }
    e.g.import_opset(cellgraph_ir::ops::CELLGRAPH_DOMAIN, 1);
    let mut ins: Vec<Option<ValueRef>> = cx.ins.to_vec();
    ins.resize(n_fwd, None);
    for k in 0..n_cot {
        ins.push(cx.cots.get(k).copied().flatten());
    }
    // Trailing omitted inputs are dropped (the op's arity allows it).
    while ins.last().is_some_and(Option::is_none) {
        ins.pop();
    }
    if let Some(m) = mask {
        ins.resize(n_fwd + n_cot, None);
        ins.push(Some(m));
    }
    let mut names = Vec::new();
    for &s in slots.outputs {
        names.push(
            if cx.need(s) && cx.ins.get(s).copied().flatten().is_some() {
                e.fresh("d_rnn")
            } else {
                String::new()
            },
        );
    }
    while names.last().is_some_and(String::is_empty) {
        names.pop();
    }
    if names.is_empty() {
        return Ok(Grads::default());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let id = e.g.add_node("", op, &ins, &refs)?;
    let mut inputs = vec![None; cx.ins.len()];
    for (k, name) in names.iter().enumerate() {
        if !name.is_empty() && slots.outputs[k] < inputs.len() {
            inputs[slots.outputs[k]] = Some(ValueRef { node: id, slot: k });
        }
    }
    Ok(Grads {
        inputs,
        outer: vec![],
    })
}
