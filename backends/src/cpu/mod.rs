//! The CPU backend: an interpreter over a compiled node order, with buffers freed as soon
//! as their last reader has run, kernels with ONNX semantics for every op, fused
//! recurrent kernels, and `Scan`/`Loop`/`If` run as loops over compiled bodies.

mod control;
mod elementwise;
pub mod fastmath;
mod nn;
pub mod paths;
mod reduce;
pub mod rnn;
pub mod rnn_grad;
mod sequence;
mod shape;
mod steal;
pub(crate) mod util;

use crate::budget::{Budget, Meter, Overrun};
use crate::data::Data;
use crate::error::{Error, Result};
use crate::{Backend, Plan};
use cellgraph_ir::{Graph, NodeId, NodeKind, Op, ValueRef, ValueType};
use std::collections::HashMap;

/// How ONNX `LSTM`/`GRU`/`RNN` nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recurrent {
    /// Fused kernels: one GEMM for all steps' input projections, then one recurrent GEMM
    /// and fused gate arithmetic per step.
    #[default]
    Fused,
    /// Lowered to `Scan` loops over the cell's primitive ops ([`crate::lower`]).
    Loop,
}

/// The CPU backend.
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    /// How recurrent ops run.
    pub recurrent: Recurrent,
    /// The run-time budget of the plans it compiles: memory per value and alive at
    /// once, `Loop` iterations, time.
    pub budget: Budget,
}

impl Default for CpuBackend {
    fn default() -> CpuBackend {
        CpuBackend::new(Recurrent::Fused)
    }
}

impl CpuBackend {
    /// A CPU backend running recurrent ops as `recurrent` says, within the process's
    /// default budget ([`Budget::process_default`]).
    pub fn new(recurrent: Recurrent) -> CpuBackend {
        CpuBackend {
            recurrent,
            budget: Budget::process_default(),
        }
    }
}

impl Backend for CpuBackend {
    type Plan = CpuPlan;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The CPU kernels run every recurrent configuration: any mask, activation, clip,
    /// direction and both GRU reset forms. Only `Recurrent::Loop` refuses.
    fn fused_recurrent(&self, op: &Op) -> std::result::Result<(), String> {
        match self.recurrent {
            Recurrent::Fused => Ok(()),
            Recurrent::Loop => Err(format!("{} asked to run as a loop", op.name())),
        }
    }

    fn compile(&self, graph: &Graph) -> Result<CpuPlan> {
        let g = match self.recurrent {
            Recurrent::Fused => graph.clone(),
            Recurrent::Loop => crate::lower::lower_recurrent(graph)?,
        };
        Ok(CpuPlan {
            inner: {
                let mut c = Compiled::new(g)?;
                c.infer_static_sizes();
                c
            },
            budget: self.budget,
            peak: 0,
        })
    }
}

/// A graph compiled for the CPU.
#[derive(Debug)]
pub struct CpuPlan {
    inner: Compiled,
    budget: Budget,
    peak: u64,
}

impl CpuPlan {
    /// The graph the plan runs (after lowering, when recurrent ops run as loops).
    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// The budget each run stays within.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Changes the budget of the runs to come.
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// The most bytes of values alive at once during the last run (its inputs, the
    /// intermediates, loops' scan outputs; not the model's weights).
    pub fn peak_bytes(&self) -> u64 {
        self.peak
    }
}

impl CpuPlan {
    /// How many per-step products of a scanned input with a loop-invariant weight the
    /// plan's `Scan` loops compute as one product over all steps.
    pub fn hoisted_products(&self) -> usize {
        fn count(c: &Compiled) -> usize {
            c.bodies
                .iter()
                .map(|(&n, bodies)| {
                    let own = match c.graph.node(n).op() {
                        Some(Op::Scan {
                            num_scan_inputs, ..
                        }) => {
                            let states = c
                                .graph
                                .node(n)
                                .num_inputs
                                .saturating_sub(*num_scan_inputs as usize);
                            bodies
                                .iter()
                                .map(|b| b.hoistable.iter().filter(|h| h.1 >= states).count())
                                .sum()
                        }
                        _ => 0,
                    };
                    own + bodies.iter().map(count).sum::<usize>()
                })
                .sum()
        }
        count(&self.inner)
    }
}

impl Plan for CpuPlan {
    fn run(&mut self, inputs: Vec<Data>) -> Result<Vec<Data>> {
        let g = &self.inner.graph;
        let types = g.input_types();
        if inputs.len() != types.len() {
            return Err(Error::Input {
                name: String::new(),
                msg: format!(
                    "{} inputs given, the graph has {}",
                    inputs.len(),
                    types.len()
                ),
            });
        }
        let mut syms = HashMap::new();
        for ((d, t), v) in inputs.iter().zip(&types).zip(g.input_values()) {
            d.check_type(t, &mut syms).map_err(|msg| Error::Input {
                name: g.value(v).name.clone(),
                msg,
            })?;
        }
        let meter = Meter::new(self.budget);
        let out = self.inner.run(inputs, &[], &meter);
        self.peak = meter.peak();
        out
    }
}

enum Slot<'a> {
    Empty,
    Owned(Data),
    Borrowed(&'a Data),
}

impl Slot<'_> {
    fn get(&self) -> Option<&Data> {
        match self {
            Slot::Empty => None,
            Slot::Owned(d) => Some(d),
            Slot::Borrowed(d) => Some(d),
        }
    }
}

/// A graph prepared for execution: node order, value slots, use counts, constants, and
/// compiled nested graphs.
#[derive(Debug)]
pub(crate) struct Compiled {
    graph: Graph,
    order: Vec<NodeId>,
    nslots: usize,
    slot_of: HashMap<ValueRef, usize>,
    inputs: Vec<Vec<Option<usize>>>,
    /// Slots each node's bodies read by name (uses beyond the explicit inputs).
    implicit: Vec<Vec<usize>>,
    outputs: Vec<Vec<usize>>,
    uses: Vec<usize>,
    input_slots: Vec<usize>,
    consts: Vec<(usize, Data)>,
    /// Names this graph reads from enclosing graphs (its own outer values and those its
    /// bodies need), in the order callers pass them.
    pub(crate) outers: Vec<String>,
    outer_slots: Vec<Option<usize>>,
    output_slots: Vec<usize>,
    bodies: HashMap<NodeId, Vec<Compiled>>,
    /// `MatMul(graph input p, loop-invariant weight)` nodes: (order index, p, weight
    /// slot). A `Scan` over this body computes them for all steps in one product.
    pub(crate) hoistable: Vec<(usize, usize, usize)>,
    /// By order index: a `Constant` evaluated at compile time (its value is in `consts`).
    precomputed: Vec<bool>,
    /// By order index: the output sizes in bytes when shape inference from the graph's
    /// inputs and constants alone fixes them (see [`Compiled::infer_static_sizes`]);
    /// `None` when a size is known only at run time, from the inputs.
    static_bytes: Vec<Option<Vec<u64>>>,
    /// As a `Loop` body: its condition output is its condition input passed through (or
    /// a constant true), so a loop that starts runs until its trip count.
    pub(crate) cond_never_changes: bool,
    /// Fused recurrent forward ops whose backward op reads the same inputs: forward
    /// order index → backward order index. The forward keeps what the backward would
    /// recompute (`rnn_grad::forward_saving`).
    pair_of: HashMap<usize, usize>,
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
        let Some(grad) = graph.node(n2).op() else {
            continue;
        };
        let (shared, mask_at) = match grad {
            Op::LSTMGrad { .. } => (8, 11),
            Op::GRUGrad { .. } | Op::RNNGrad { .. } => (6, 8),
            _ => continue,
        };
        if at(k2, 4).is_some() || at(k2, mask_at).is_some() {
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

const KEEP: usize = usize::MAX / 2;

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

impl Compiled {
    pub(crate) fn new(graph: Graph) -> Result<Compiled> {
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
            implicit.push(Vec::new());
            outputs.push(
                (0..graph.node(n).outputs.len())
                    .map(|s| slot_of[&ValueRef { node: n, slot: s }])
                    .collect(),
            );
            if let Some(op) = graph.node(n).op() {
                let subs = op.subgraphs();
                if !subs.is_empty() {
                    let mut compiled = Vec::new();
                    for (_, body) in subs {
                        let c = Compiled::new(body.clone())?;
                        for name in &c.outers {
                            match graph.find(name) {
                                // Read by the body: a use by this node, freed after it runs.
                                Some(v) => {
                                    let s = slot_of[&v];
                                    uses[s] += 1;
                                    implicit.last_mut().expect("pushed for this node").push(s);
                                }
                                None if !outers.contains(name) => outers.push(name.clone()),
                                None => {}
                            }
                        }
                        compiled.push(c);
                    }
                    bodies.insert(n, compiled);
                }
            }
        }
        let mut consts = Vec::new();
        let mut outer_slots = Vec::new();
        for n in graph.node_ids() {
            let node = graph.node(n);
            let s = slot_of[&ValueRef { node: n, slot: 0 }];
            match &node.kind {
                NodeKind::Initializer { tensor, .. } => {
                    consts.push((s, Data::Tensor(tensor.clone())));
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
        // `Constant` nodes run once, here: their values join the initializers.
        let mut precomputed = vec![false; order.len()];
        for (k, &n) in order.iter().enumerate() {
            let node = graph.node(n);
            if let Some(op @ Op::Constant { .. }) = node.op() {
                let out_types: Vec<&ValueType> = node.outputs.iter().map(|v| &v.ty).collect();
                // A value that does not evaluate is reported when the node runs.
                if let Ok(mut r) = eval(op, &[], &out_types, graph.opset("")) {
                    if let (1, Some(d)) = (r.len(), r.pop()) {
                        let s = outputs[k][0];
                        consts.push((s, d));
                        uses[s] = KEEP;
                        precomputed[k] = true;
                    }
                }
            }
        }
        let pair_of = forward_backward_pairs(&graph, &order, &inputs);
        for name in &outers {
            outer_slots.push(graph.find(name).map(|v| slot_of[&v]));
        }
        let output_slots: Vec<usize> = graph.outputs().iter().map(|v| slot_of[v]).collect();
        for &s in &output_slots {
            uses[s] = KEEP;
        }
        let input_slots: Vec<usize> = graph.input_values().iter().map(|v| slot_of[v]).collect();
        let mut hoistable = Vec::new();
        for (k, &n) in order.iter().enumerate() {
            if !matches!(graph.node(n).op(), Some(Op::MatMul {})) {
                continue;
            }
            if let [Some(a), Some(b)] = graph.node_inputs(n)[..] {
                let invariant = matches!(
                    graph.node(b.node).kind,
                    NodeKind::Outer | NodeKind::Initializer { .. }
                );
                if let (Some(p), true) = (
                    input_slots.iter().position(|&s| s == slot_of[&a]),
                    invariant,
                ) {
                    hoistable.push((k, p, slot_of[&b]));
                }
            }
        }
        let never_stops = cond_never_changes(&graph);
        let static_bytes = vec![None; order.len()];
        Ok(Compiled {
            graph,
            order,
            nslots,
            slot_of,
            inputs,
            implicit,
            outputs,
            uses,
            input_slots,
            consts,
            outers,
            outer_slots,
            output_slots,
            bodies,
            cond_never_changes: never_stops,
            static_bytes,
            hoistable,
            precomputed,
            pair_of,
        })
    }

    /// Fills `static_bytes` for a top-level graph, whose inputs every run checks against
    /// their declared types: shape inference again from those types and the graph's
    /// constants, ignoring the types the file declares for intermediate values (a hostile
    /// file could declare a small shape for a large value). By induction over the node
    /// order, a size inferred this way is the size the kernel makes. Bodies of loops are
    /// not filled: the values passed to them are not checked against their declarations.
    fn infer_static_sizes(&mut self) {
        use cellgraph_ir::ops::InferCtx;
        let g = &self.graph;
        let small_int = |v: ValueRef| -> Option<cellgraph_ir::Tensor> {
            match &g.node(v.node).kind {
                NodeKind::Initializer { tensor, .. }
                    if tensor.dtype().is_int() && tensor.len() <= 64 =>
                {
                    Some(tensor.clone())
                }
                NodeKind::Op(Op::Constant { .. }) => g.constant(v),
                _ => None,
            }
        };
        let mut known: HashMap<ValueRef, ValueType> = HashMap::new();
        for v in g.input_values() {
            known.insert(v, g.value(v).ty.clone());
        }
        for &n in g.initializers() {
            if let NodeKind::Initializer { tensor, .. } = &g.node(n).kind {
                known.insert(
                    ValueRef { node: n, slot: 0 },
                    cellgraph_ir::graph::tensor_type(tensor),
                );
            }
        }
        for (k, &n) in self.order.iter().enumerate() {
            let node = g.node(n);
            let Some(op) = node.op() else { continue };
            let ins = g.node_inputs(n);
            let types: Vec<Option<ValueType>> = ins
                .iter()
                .map(|v| v.map(|v| known.get(&v).cloned().unwrap_or(ValueType::Unknown)))
                .collect();
            let consts: Vec<Option<cellgraph_ir::Tensor>> =
                ins.iter().map(|v| v.and_then(small_int)).collect();
            let const_refs: Vec<Option<&cellgraph_ir::Tensor>> =
                consts.iter().map(Option::as_ref).collect();
            let cx = InferCtx {
                inputs: &types,
                consts: &const_refs,
                num_outputs: node.outputs.len(),
                opset: g.opset(op.kind().info().domain),
            };
            let Ok(outs) = op.infer(&cx) else { continue };
            for (slot, t) in outs.iter().enumerate() {
                known.insert(ValueRef { node: n, slot }, t.clone());
            }
            if outs.len() == node.outputs.len() && op.subgraphs().is_empty() {
                self.static_bytes[k] = outs.iter().map(type_bytes).collect();
            }
        }
    }

    /// Runs the graph: `inputs` for the graph inputs, `outer` for the names in `outers`,
    /// counting values and time on `meter`.
    pub(crate) fn run(
        &self,
        inputs: Vec<Data>,
        outer: &[&Data],
        meter: &Meter,
    ) -> Result<Vec<Data>> {
        self.run_with(inputs, outer, Vec::new(), meter)
    }

    /// The value of a constant or outer slot, before running.
    pub(crate) fn static_value<'a>(&'a self, slot: usize, outer: &[&'a Data]) -> Option<&'a Data> {
        if let Some((_, d)) = self.consts.iter().find(|(s, _)| *s == slot) {
            return Some(d);
        }
        let i = self.outer_slots.iter().position(|s| *s == Some(slot))?;
        outer.get(i).copied()
    }

    /// Runs the graph with the outputs of some nodes given instead of computed:
    /// `overrides` holds (order index, the node's single output).
    pub(crate) fn run_with(
        &self,
        inputs: Vec<Data>,
        outer: &[&Data],
        mut overrides: Vec<(usize, Data)>,
        meter: &Meter,
    ) -> Result<Vec<Data>> {
        let mut slots: Vec<Slot<'_>> = (0..self.nslots).map(|_| Slot::Empty).collect();
        for (s, d) in &self.consts {
            slots[*s] = Slot::Borrowed(d);
        }
        for (i, s) in self.outer_slots.iter().enumerate() {
            if let (Some(s), Some(d)) = (s, outer.get(i)) {
                slots[*s] = Slot::Borrowed(d);
            }
        }
        // Inputs move in: the run owns (and counts) them until they are freed or
        // handed out as outputs.
        for (d, &s) in inputs.into_iter().zip(&self.input_slots) {
            meter.hold(data_bytes(&d));
            slots[s] = Slot::Owned(d);
        }
        let mut uses = self.uses.clone();
        // What paired forward ops kept for their backward ops: (backward index, state).
        let mut saved: Vec<(usize, rnn_grad::Saved)> = Vec::new();
        for (k, &n) in self.order.iter().enumerate() {
            if self.precomputed[k] && !overrides.iter().any(|(o, _)| *o == k) {
                continue;
            }
            let node = self.graph.node(n);
            let Some(op) = node.op() else { continue };
            let fail = |msg: String| Error::Kernel {
                node: node.display_name(),
                op: op.name().to_string(),
                msg,
            };
            let over = |overrun: Overrun| Error::Budget {
                node: node.display_name(),
                op: op.name().to_string(),
                overrun,
            };
            meter.time().map_err(over)?;
            let ins: Vec<Option<&Data>> = self.inputs[k]
                .iter()
                .map(|s| match s {
                    Some(s) => slots[*s]
                        .get()
                        .map(Some)
                        .ok_or_else(|| fail(format!("input slot {s} is empty"))),
                    None => Ok(None),
                })
                .collect::<Result<_>>()?;
            let out_types: Vec<&ValueType> = node.outputs.iter().map(|v| &v.ty).collect();
            if !self.bodies.contains_key(&n) {
                match &self.static_bytes[k] {
                    Some(sizes) => meter.ask(sizes).map_err(over)?,
                    None => {
                        if let Some(sizes) = predict_bytes(op, &ins, &out_types, &self.graph) {
                            meter.ask(&sizes).map_err(over)?;
                        }
                    }
                }
            }
            // Outputs something reads (a later node, or the graph's outputs): the
            // recurrent backward ops skip the others' work.
            let wanted = || -> Vec<bool> { self.outputs[k].iter().map(|&s| uses[s] > 0).collect() };
            let given = overrides
                .iter()
                .position(|(o, _)| *o == k)
                .map(|i| overrides.swap_remove(i).1);
            let results = match (given, self.bodies.get(&n)) {
                (Some(d), _) => vec![d],
                (None, None) => {
                    let kept = saved.iter().position(|(g, _)| *g == k);
                    match (self.pair_of.get(&k), kept) {
                        (Some(&back), _) => match rnn_grad::forward_saving(op, &ins, &wanted()) {
                            Ok((outs, state)) => {
                                saved.push((back, state));
                                outs
                            }
                            // Whatever it refuses (a layout, a dtype) the plain kernel
                            // runs or reports; the backward then recomputes.
                            Err(_) => {
                                eval(op, &ins, &out_types, self.graph.opset("")).map_err(fail)?
                            }
                        },
                        (None, Some(i)) => {
                            let state = saved.swap_remove(i).1;
                            rnn_grad::eval_saved(op, &ins, &wanted(), state).map_err(fail)?
                        }
                        (None, None) if crate::lower::is_grad(op) => {
                            rnn_grad::eval(op, &ins, &wanted()).map_err(fail)?
                        }
                        (None, None) => {
                            eval(op, &ins, &out_types, self.graph.opset("")).map_err(fail)?
                        }
                    }
                }
                (None, Some(bodies)) => {
                    let resolve = |name: &str| -> Result<&Data> {
                        if let Some(v) = self.graph.find(name) {
                            return slots[self.slot_of[&v]].get().ok_or_else(|| {
                                fail(format!("outer value {name:?} is not computed yet"))
                            });
                        }
                        let i = self.outers.iter().position(|o| o == name).ok_or_else(|| {
                            fail(format!("outer value {name:?} is not available"))
                        })?;
                        outer
                            .get(i)
                            .copied()
                            .ok_or_else(|| fail(format!("outer value {name:?} was not passed")))
                    };
                    let outer_refs: Vec<Vec<&Data>> = bodies
                        .iter()
                        .map(|b| {
                            b.outers
                                .iter()
                                .map(|name| resolve(name))
                                .collect::<Result<Vec<_>>>()
                        })
                        .collect::<Result<_>>()?;
                    control::eval(
                        op,
                        &ins,
                        node.outputs.len(),
                        bodies,
                        &outer_refs,
                        self.graph.opset(""),
                        meter,
                    )
                    .map_err(|e| match e {
                        ControlError::Msg(m) => fail(m),
                        ControlError::Over(o) => over(o),
                        ControlError::Inner(e) => e,
                    })?
                }
            };
            if results.len() < node.outputs.len() {
                return Err(fail(format!(
                    "kernel produced {} outputs, the node has {}",
                    results.len(),
                    node.outputs.len()
                )));
            }
            drop(ins);
            for s in self.inputs[k].iter().flatten().chain(&self.implicit[k]) {
                uses[*s] -= 1;
                if uses[*s] == 0 {
                    if let Slot::Owned(d) = std::mem::replace(&mut slots[*s], Slot::Empty) {
                        meter.release(data_bytes(&d));
                    }
                }
            }
            let mut largest = 0;
            for (d, &s) in results.into_iter().zip(&self.outputs[k]) {
                if uses[s] > 0 {
                    let b = data_bytes(&d);
                    largest = largest.max(b);
                    meter.hold(b);
                    slots[s] = Slot::Owned(d);
                }
            }
            // What no prediction covered (a kernel's output whose size its shape rule
            // could not tell) is checked once it exists.
            if largest > meter.budget().max_tensor_bytes {
                meter.ask(&[largest]).map_err(over)?;
            }
            meter.check_live().map_err(over)?;
        }
        let mut out = Vec::with_capacity(self.output_slots.len());
        for (i, &s) in self.output_slots.iter().enumerate() {
            let again = self.output_slots[i + 1..].contains(&s);
            let d = match std::mem::replace(&mut slots[s], Slot::Empty) {
                Slot::Owned(d) if again => {
                    let c = d.clone();
                    slots[s] = Slot::Owned(d);
                    c
                }
                Slot::Owned(d) => {
                    meter.release(data_bytes(&d));
                    d
                }
                Slot::Borrowed(d) => {
                    slots[s] = Slot::Borrowed(d);
                    d.clone()
                }
                Slot::Empty => {
                    return Err(Error::Compile(format!(
                        "graph {:?}: an output was not computed",
                        self.graph.name
                    )))
                }
            };
            out.push(d);
        }
        Ok(out)
    }
}

/// Errors from control-flow kernels: a message for this node, a budget this node
/// exceeded, or an error from a body.
pub(crate) enum ControlError {
    Msg(String),
    Over(Overrun),
    Inner(Error),
}

impl From<Overrun> for ControlError {
    fn from(o: Overrun) -> ControlError {
        ControlError::Over(o)
    }
}

/// The bytes a value's elements take.
pub(crate) fn data_bytes(d: &Data) -> u64 {
    match d {
        Data::Tensor(t) => tensor_bytes(t),
        Data::Sequence(ts) => ts.iter().map(tensor_bytes).sum(),
        Data::Optional(Some(d)) => data_bytes(d),
        Data::Optional(None) => 0,
    }
}

/// The bytes a tensor's elements take.
pub(crate) fn tensor_bytes(t: &cellgraph_ir::Tensor) -> u64 {
    (t.len() as u64).saturating_mul(t.dtype().size_of() as u64)
}

/// The element count of the numpy broadcast of `shapes`; `None` when they do not
/// broadcast (the kernel then says why).
fn broadcast_elems(shapes: &[&[usize]]) -> Option<u128> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut elems: u128 = 1;
    for axis in 0..rank {
        let mut dim = 1usize;
        for s in shapes {
            let Some(&d) = (s.len() + axis).checked_sub(rank).and_then(|i| s.get(i)) else {
                continue;
            };
            match (dim, d) {
                (_, 1) => {}
                (1, d) => dim = d,
                (a, d) if a == d => {}
                _ => return None,
            }
        }
        elems = elems.saturating_mul(dim as u128);
    }
    Some(elems)
}

/// The bytes of a tensor type whose dtype and dims are all known.
fn type_bytes(ty: &ValueType) -> Option<u64> {
    let t = ty.as_tensor()?;
    let elems = t
        .known_dims()?
        .iter()
        .fold(1u128, |a, &d| a.saturating_mul(d as u128));
    let b = elems.saturating_mul(t.dtype?.size_of() as u128);
    Some(u64::try_from(b).unwrap_or(u64::MAX))
}

/// The sizes in bytes of the outputs `op` will make from `ins`, by its shape rule given
/// every input's actual shape (and the values of small integer inputs: shapes, repeats,
/// ranges); `None` when the rule cannot tell (then the outputs are checked once made).
fn predict_bytes(
    op: &Op,
    ins: &[Option<&Data>],
    out_types: &[&ValueType],
    graph: &Graph,
) -> Option<Vec<u64>> {
    use cellgraph_ir::ops::InferCtx;
    // The elementwise ops (most of a loop body's nodes) make the broadcast of their
    // inputs: computed here without the shape rule's allocations. (`CastLike` takes
    // its shape from input 0 alone.)
    if op.kind().info().family == "elementwise" {
        let take = if matches!(op, Op::CastLike { .. }) {
            1
        } else {
            ins.len()
        };
        let mut shapes = Vec::with_capacity(take);
        for d in ins.iter().take(take).flatten() {
            match d {
                Data::Tensor(t) => shapes.push(t.shape()),
                _ => return None,
            }
        }
        let elems = broadcast_elems(&shapes)?;
        let item = out_types
            .first()
            .and_then(|t| t.as_tensor())
            .and_then(|t| t.dtype)
            .map(|d| d.size_of())
            .or_else(|| match ins.iter().flatten().next() {
                Some(Data::Tensor(t)) => Some(t.dtype().size_of()),
                _ => None,
            })?;
        let b = elems.saturating_mul(item as u128);
        return Some(vec![u64::try_from(b).unwrap_or(u64::MAX)]);
    }
    let nout = out_types.len();
    let types: Vec<Option<ValueType>> = ins
        .iter()
        .map(|d| {
            d.map(|d| match d {
                Data::Tensor(t) => ValueType::tensor(
                    t.dtype(),
                    &t.shape().iter().map(|&x| x as u64).collect::<Vec<_>>(),
                ),
                _ => ValueType::Unknown,
            })
        })
        .collect();
    let consts: Vec<Option<&cellgraph_ir::Tensor>> = ins
        .iter()
        .map(|d| match d {
            Some(Data::Tensor(t)) if t.dtype().is_int() && t.len() <= 64 => Some(t),
            _ => None,
        })
        .collect();
    let cx = InferCtx {
        inputs: &types,
        consts: &consts,
        num_outputs: nout,
        opset: graph.opset(op.kind().info().domain),
    };
    let outs = op.infer(&cx).ok()?;
    Some(outs.iter().filter_map(type_bytes).collect())
}

impl From<String> for ControlError {
    fn from(s: String) -> ControlError {
        ControlError::Msg(s)
    }
}

impl From<&str> for ControlError {
    fn from(s: &str) -> ControlError {
        ControlError::Msg(s.to_string())
    }
}

impl From<Error> for ControlError {
    fn from(e: Error) -> ControlError {
        ControlError::Inner(e)
    }
}

/// Runs one op that has no body.
pub(crate) fn eval(
    op: &Op,
    ins: &[Option<&Data>],
    out_types: &[&ValueType],
    opset: i64,
) -> Result<Vec<Data>, String> {
    match op.kind().info().family {
        "elementwise" => elementwise::eval(op, ins, out_types),
        "nn" => nn::eval(op, ins, out_types, opset),
        "shape" => shape::eval(op, ins, out_types),
        "reduce" => reduce::eval(op, ins),
        "rnn" if crate::lower::is_grad(op) => rnn_grad::eval(op, ins, &vec![true; out_types.len()]),
        "rnn" => rnn::eval(op, ins, out_types.len()),
        "sequence" => sequence::eval(op, ins, out_types),
        other => Err(format!("no CPU kernel family {other}")),
    }
}

#[cfg(test)]
mod budget_tests {
    use super::broadcast_elems;

    #[test]
    fn broadcast_counts_follow_numpy() {
        assert_eq!(
            broadcast_elems(&[&[50_000, 1], &[1, 50_000]]),
            Some(2_500_000_000)
        );
        assert_eq!(broadcast_elems(&[&[3, 1, 5], &[4, 1], &[]]), Some(60));
        assert_eq!(broadcast_elems(&[&[0, 1], &[1, 7]]), Some(0));
        assert_eq!(broadcast_elems(&[&[2, 3], &[4, 3]]), None);
        assert_eq!(broadcast_elems(&[]), Some(1));
    }
}
