//! The backend-neutral part of compiling a graph: what every backend's plan needs before
//! it picks a kernel. A [`Schedule`] holds:
//! - the node order;
//! - a slot per value and, per node, the slots it reads (explicitly and by name from its
//!   bodies) and writes;
//! - use counts, so a value is freed after its last reader ([`KEEP`] marks the values
//!   that live for the whole run);
//! - the graph's inputs, outputs and the names it reads from enclosing graphs;
//! - the nested bodies' schedules;
//! - constant folding, with an evaluator the backend passes in;
//! - the pairing of a fused recurrent forward op with its `*Grad` op, so a backend keeps
//!   the forward's work for the backward (the CPU's saved activations, cuDNN's reserve
//!   space).
//!
//! The CPU backend builds its plan on it (`cpu::Compiled`).

use crate::data::Data;
use crate::error::{Error, Result};
use cellgraph_ir::ops::rnn::{is_grad, GradSlots};
use cellgraph_ir::{Graph, NodeId, NodeKind, Op, ValueRef, ValueType};
use std::collections::HashMap;

/// The use count of a value that lives for the whole run (an initializer, a folded
/// constant, a value of an enclosing graph, a graph output): never counted down to 0.
pub const KEEP: usize = usize::MAX / 2;

/// A graph's execution order, value slots and lifetimes (see the module docs).
#[derive(Debug)]
pub struct Schedule {
    /// The graph.
    pub graph: Graph,
    /// The op and source nodes in a topological order.
    pub order: Vec<NodeId>,
    /// How many value slots (one per node output).
    pub nslots: usize,
    /// The slot of every value.
    pub slot_of: HashMap<ValueRef, usize>,
    /// By order index: the slots of the node's explicit inputs (`None`: omitted).
    pub inputs: Vec<Vec<Option<usize>>>,
    /// By order index: slots the node's bodies read by name (uses beyond the explicit
    /// inputs).
    pub implicit: Vec<Vec<usize>>,
    /// By order index: the slots of the node's outputs.
    pub outputs: Vec<Vec<usize>>,
    /// By slot: how many readers a value has ([`KEEP`]: it lives for the whole run).
    pub uses: Vec<usize>,
    /// The graph inputs' slots, in order.
    pub input_slots: Vec<usize>,
    /// The initializers: (slot, node).
    pub initializers: Vec<(usize, NodeId)>,
    /// Names this graph reads from enclosing graphs (its own outer values and those its
    /// bodies need), in the order callers pass them.
    pub outers: Vec<String>,
    /// For each name in `outers`: its slot in this graph, if it has one.
    pub outer_slots: Vec<Option<usize>>,
    /// The graph outputs' slots, in order.
    pub output_slots: Vec<usize>,
    /// The schedules of each control-flow node's bodies, in the op's subgraph order.
    pub bodies: HashMap<NodeId, Vec<Schedule>>,
    /// By order index: a node whose outputs [`Schedule::fold_constants`] computed.
    pub folded: Vec<bool>,
    /// Fused recurrent forward ops whose backward op reads the same inputs: forward
    /// order index → backward order index.
    pub pair_of: HashMap<usize, usize>,
    /// As a `Loop` body: its condition output is its condition input passed through (or
    /// a constant true), so a loop that starts runs until its trip count.
    pub cond_never_changes: bool,
}

impl Schedule {
    /// Orders `graph`, gives every value a slot and counts its readers, recursively for
    /// the bodies of control-flow nodes.
    pub fn new(graph: Graph) -> Result<Schedule> {
        let order = graph
            .topo_order()
            .map_err(|_| Error::Compile(format!("graph {:?} has a cycle", graph.name)))?;
        let mut slot_of = HashMap::new();
        for n in graph.node_ids() {
            for s in 0..graph.node(n).outputs.len() {
                let k = slot_of.len();
                slot_of.insert(ValueRef { node: n, slot: s }, k);
            }
        }
        let nslots = slot_of.len();
        let mut uses = vec![0usize; nslots];
        let mut inputs = Vec::with_capacity(order.len());
        let mut outputs: Vec<Vec<usize>> = Vec::with_capacity(order.len());
        let mut bodies = HashMap::new();
        let mut outers: Vec<String> = Vec::new();
        let mut implicit: Vec<Vec<usize>> = Vec::with_capacity(order.len());
        for &n in &order {
            let ins: Vec<Option<usize>> = graph
                .node_inputs(n)
                .into_iter()
                .map(|v| v.map(|v| slot_of[&v]))
                .collect();
            for s in ins.iter().flatten() {
                uses[*s] += 1;
            }
            inputs.push(ins);
            let mut reads = Vec::new();
            outputs.push(
                (0..graph.node(n).outputs.len())
                    .map(|s| slot_of[&ValueRef { node: n, slot: s }])
                    .collect(),
            );
            if let Some(op) = graph.node(n).op() {
                let subs = op.subgraphs();
                if !subs.is_empty() {
                    let mut scheduled = Vec::new();
                    for (_, body) in subs {
                        let b = Schedule::new(body.clone())?;
                        for name in &b.outers {
                            match graph.find(name) {
                                // Read by the body: a use by this node, freed after it runs.
                                Some(v) => {
                                    let s = slot_of[&v];
                                    uses[s] += 1;
                                    reads.push(s);
                                }
                                None if !outers.contains(name) => outers.push(name.clone()),
                                None => {}
                            }
                        }
                        scheduled.push(b);
                    }
                    bodies.insert(n, scheduled);
                }
            }
            implicit.push(reads);
        }
        let mut initializers = Vec::new();
        for n in graph.node_ids() {
            let node = graph.node(n);
            let s = slot_of[&ValueRef { node: n, slot: 0 }];
            match &node.kind {
                NodeKind::Initializer { .. } => {
                    initializers.push((s, n));
                    uses[s] = KEEP;
                }
                NodeKind::Outer => {
                    if !outers.contains(&node.name) {
                        outers.push(node.name.clone());
                    }
                    uses[s] = KEEP;
                }
                _ => {}
            }
        }
        let pair_of = forward_backward_pairs(&graph, &order, &inputs);
        let outer_slots = outers
            .iter()
            .map(|name| graph.find(name).map(|v| slot_of[&v]))
            .collect();
        let output_slots: Vec<usize> = graph.outputs().iter().map(|v| slot_of[v]).collect();
        for &s in &output_slots {
            uses[s] = KEEP;
        }
        let input_slots = graph.input_values().iter().map(|v| slot_of[v]).collect();
        let cond_never_changes = cond_never_changes(&graph);
        let folded = vec![false; order.len()];
        Ok(Schedule {
            graph,
            order,
            nslots,
            slot_of,
            inputs,
            implicit,
            outputs,
            uses,
            input_slots,
            initializers,
            outers,
            outer_slots,
            output_slots,
            bodies,
            folded,
            pair_of,
            cond_never_changes,
        })
    }

    /// Evaluates the `Constant` nodes once, with the backend's `eval` (op, output types,
    /// the graph's default-domain opset), and returns their (slot, value); those values
    /// then live for the whole run and their nodes are marked [`Schedule::folded`]. A
    /// node `eval` refuses stays in the plan (its error is reported when it runs).
    pub fn fold_constants(
        &mut self,
        mut eval: impl FnMut(&Op, &[&ValueType], i64) -> Option<Data>,
    ) -> Vec<(usize, Data)> {
        let mut out = Vec::new();
        let opset = self.graph.opset("");
        for (k, &n) in self.order.iter().enumerate() {
            let node = self.graph.node(n);
            if let Some(op @ Op::Constant { .. }) = node.op() {
                let types: Vec<&ValueType> = node.outputs.iter().map(|v| &v.ty).collect();
                if let (1, Some(d)) = (types.len(), eval(op, &types, opset)) {
                    let s = self.outputs[k][0];
                    out.push((s, d));
                    self.uses[s] = KEEP;
                    self.folded[k] = true;
                }
            }
        }
        out
    }
}

/// The (forward, backward) pairs of fused recurrent ops in `order` that can share the
/// forward's work: a plain `LSTM`/`GRU`/`RNN` and the `*Grad` op of the same attributes
/// reading the same X, W, R, B, initial states and P, with no sequence_lens and no mask
/// (every row runs every step, so the forward's Y is its h after each step).
fn forward_backward_pairs(
    graph: &Graph,
    order: &[NodeId],
    inputs: &[Vec<Option<usize>>],
) -> HashMap<usize, usize> {
    let mut pair_of = HashMap::new();
    let at = |k: usize, i: usize| inputs[k].get(i).copied().flatten();
    for (k2, &n2) in order.iter().enumerate() {
        let Some(grad) = graph.node(n2).op().filter(|op| is_grad(op)) else {
            continue;
        };
        let Some(slots) = GradSlots::of_op(grad) else {
            continue;
        };
        let shared = slots.forward_inputs;
        if at(k2, 4).is_some() || at(k2, slots.mask()).is_some() {
            continue;
        }
        let Some(forward) = grad.recurrent_pair() else {
            continue;
        };
        let found = (0..k2).find(|&k1| {
            !pair_of.contains_key(&k1)
                && graph.node(order[k1]).op() == Some(&forward)
                && inputs[k1].len() <= shared
                && (0..shared).all(|i| at(k1, i) == at(k2, i))
        });
        if let Some(k1) = found {
            pair_of.insert(k1, k2);
        }
    }
    pair_of
}

/// Whether, read as a `Loop` body, `graph` hands its condition input (input 1) straight
/// back as its condition output (output 0), through `Identity` nodes, or outputs a
/// constant true: a loop over it that starts stops only at its trip count.
fn cond_never_changes(graph: &Graph) -> bool {
    let (Some(&out), Some(&cond_in)) = (graph.outputs().first(), graph.input_values().get(1))
    else {
        return false;
    };
    let mut v = out;
    for _ in 0..64 {
        if v == cond_in {
            return true;
        }
        match &graph.node(v.node).kind {
            NodeKind::Initializer { tensor, .. } => {
                return tensor.len() == 1 && tensor.to_f64_vec().first() == Some(&1.0)
            }
            NodeKind::Op(Op::Identity {}) => match graph.node_inputs(v.node).first() {
                Some(Some(next)) => v = *next,
                _ => return false,
            },
            _ => return false,
        }
    }
    false
}
