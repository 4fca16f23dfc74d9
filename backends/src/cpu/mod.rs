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
use crate::device::{Device, DevicePlan, Value};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::{Backend, Plan};
use cellgraph_ir::ops::rnn as rnn_ops;
use cellgraph_ir::{Graph, NodeId, NodeKind, Op, ValueRef, ValueType};
use std::collections::HashMap;

/// How ONNX `LSTM`/`GRU`/`RNN` nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recurrent {
    /// Fused kernels: one GEMM for all steps' input projections, then one recurrent GEMM
    /// and fused gate arithmetic per step.
    #[default]
    Fused,
    /// Lowered to `Scan` loops over the cell's primitive ops ([`crate::passes::lower`]).
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

    /// Compiles `graph` for a backend list: this CPU backend alone when `before` is
    /// empty (its own plan), else a [`crate::PlacedPlan`] over `before` (in order of
    /// preference) and then this backend, the fallback for every node they refuse.
    pub fn compile_after(
        self,
        graph: &Graph,
        before: &[std::sync::Arc<dyn Device>],
    ) -> Result<Box<dyn Plan>> {
        if before.is_empty() {
            return Ok(Box::new(Backend::compile(&self, graph)?));
        }
        Ok(Box::new(crate::PlacedPlan::compile(
            graph,
            self.after(before),
        )?))
    }

    /// The backend list `before`, then this CPU backend (the fallback): what
    /// [`CpuBackend::compile_after`] places on and the selector asks.
    pub fn after(self, before: &[std::sync::Arc<dyn Device>]) -> Vec<std::sync::Arc<dyn Device>> {
        let mut list = before.to_vec();
        list.push(std::sync::Arc::new(self));
        list
    }
}

/// Every op of the IR has a CPU kernel: the CPU accepts every node (the fused recurrent
/// ops unless loops were asked for), holds its values on the host and is the fallback
/// at the end of a placed plan's backend list.
impl Device for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    /// Every op, and every fused recurrent configuration (any mask, activation, clip,
    /// direction and both GRU reset forms) — unless `Recurrent::Loop` asked for loops,
    /// when the fused recurrent ops are refused and the selector lowers them.
    fn supports(&self, op: &Op, _inputs: &[Option<&ValueType>]) -> std::result::Result<(), String> {
        match self.recurrent {
            Recurrent::Loop if rnn_ops::is_fused(op) => {
                Err(format!("{} asked to run as a loop", op.name()))
            }
            _ => Ok(()),
        }
    }

    fn host_resident(&self) -> bool {
        true
    }

    fn compile_part(&self, graph: &Graph) -> Result<Box<dyn DevicePlan>> {
        Ok(Box::new(Backend::compile(self, graph)?))
    }

    fn upload(&self, data: Data) -> Result<Value> {
        Ok(Value::Host(data))
    }

    fn download(&self, value: &Value) -> Result<Data> {
        match value {
            Value::Host(d) => Ok(d.clone()),
            Value::Device(dv) => Err(Error::Compile(format!(
                "a value on backend {} was given to the cpu backend",
                dv.backend
            ))),
        }
    }
}

impl DevicePlan for CpuPlan {
    fn run(&mut self, inputs: Vec<Value>) -> Result<Vec<Value>> {
        let data = inputs
            .into_iter()
            .map(|v| match v {
                Value::Host(d) => Ok(d),
                Value::Device(dv) => Err(Error::Compile(format!(
                    "a value on backend {} was given to the cpu backend",
                    dv.backend
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan::run(self, data)?
            .into_iter()
            .map(Value::Host)
            .collect())
    }
}

impl Backend for CpuBackend {
    type Plan = CpuPlan;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn compile(&self, graph: &Graph) -> Result<CpuPlan> {
        let g = match self.recurrent {
            Recurrent::Fused => graph.clone(),
            Recurrent::Loop => crate::passes::lower::lower_recurrent(graph)?,
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

/// A graph prepared for execution on the CPU: the backend-neutral [`Schedule`] (node
/// order, value slots and lifetimes, folded constants, forward/backward pairs; reached
/// through `Deref`), the constants' values, the compiled bodies, and what only the CPU
/// uses (hoisted products, the budget's size predictions).
#[derive(Debug)]
pub(crate) struct Compiled {
    sched: Schedule,
    consts: Vec<(usize, Data)>,
    bodies: HashMap<NodeId, Vec<Compiled>>,
    /// `MatMul(graph input p, loop-invariant weight)` nodes: (order index, p, weight
    /// slot). A `Scan` over this body computes them for all steps in one product.
    pub(crate) hoistable: Vec<(usize, usize, usize)>,
    /// By order index: the output sizes in bytes when shape inference from the graph's
    /// inputs and constants alone fixes them (see [`Compiled::infer_static_sizes`]);
    /// `None` when a size is known only at run time, from the inputs.
    static_bytes: Vec<Option<Vec<u64>>>,
}

/// The schedule's fields (`order`, `inputs`, `uses`, `pair_of`, ...) read as the plan's
/// own.
impl std::ops::Deref for Compiled {
    type Target = Schedule;
    fn deref(&self) -> &Schedule {
        &self.sched
    }
}

impl Compiled {
    pub(crate) fn new(graph: Graph) -> Result<Compiled> {
        Compiled::from_schedule(Schedule::new(graph)?)
    }

    fn from_schedule(mut sched: Schedule) -> Result<Compiled> {
        let mut bodies = HashMap::new();
        for (n, scheds) in std::mem::take(&mut sched.bodies) {
            let compiled = scheds
                .into_iter()
                .map(Compiled::from_schedule)
                .collect::<Result<Vec<_>>>()?;
            bodies.insert(n, compiled);
        }
        let mut consts: Vec<(usize, Data)> = sched
            .initializers
            .iter()
            .filter_map(|&(s, n)| match &sched.graph.node(n).kind {
                NodeKind::Initializer { tensor, .. } => Some((s, Data::Tensor(tensor.clone()))),
                _ => None,
            })
            .collect();
        // `Constant` nodes run once, here: their values join the initializers. A value
        // that does not evaluate is reported when the node runs.
        consts.extend(sched.fold_constants(|op, types, opset| {
            eval(op, &[], types, opset)
                .ok()
                .and_then(|mut r| match r.len() {
                    1 => r.pop(),
                    _ => None,
                })
        }));
        let mut hoistable = Vec::new();
        let g = &sched.graph;
        for (k, &n) in sched.order.iter().enumerate() {
            if !matches!(g.node(n).op(), Some(Op::MatMul {})) {
                continue;
            }
            if let [Some(a), Some(b)] = g.node_inputs(n)[..] {
                let invariant = matches!(
                    g.node(b.node).kind,
                    NodeKind::Outer | NodeKind::Initializer { .. }
                );
                if let (Some(p), true) = (
                    sched
                        .input_slots
                        .iter()
                        .position(|&s| s == sched.slot_of[&a]),
                    invariant,
                ) {
                    hoistable.push((k, p, sched.slot_of[&b]));
                }
            }
        }
        let static_bytes = vec![None; sched.order.len()];
        Ok(Compiled {
            sched,
            consts,
            bodies,
            hoistable,
            static_bytes,
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
        let g = &self.sched.graph;
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
        for (k, &n) in self.sched.order.iter().enumerate() {
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
            if self.folded[k] && !overrides.iter().any(|(o, _)| *o == k) {
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
                        (None, None) if rnn_ops::is_grad(op) => {
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
        "rnn" if rnn_ops::is_grad(op) => rnn_grad::eval(op, ins, &vec![true; out_types.len()]),
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
