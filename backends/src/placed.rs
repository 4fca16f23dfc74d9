//! Plans that span backends: each top-level node runs on the first backend of a list
//! that accepts it ([`crate::device::Device::supports`]); the rest fall back to the last
//! one (the CPU, which runs every op). Runs of nodes on one backend become one part,
//! compiled by that backend; values are copied only at the edges between parts on
//! different backends and where the caller asks for host data — as onnxruntime's
//! execution providers do.
//!
//! A control-flow node (`Scan`, `Loop`, `If`) is placed as a whole, with its bodies: a
//! backend that accepts it runs them.

use crate::data::Data;
use crate::device::{Device, DevicePlan, Value};
use crate::error::{Error, Result};
use crate::Plan;
use cellgraph_ir::{Graph, NodeId, NodeKind, ValueRef, ValueType};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Where one node runs, and why not on the backends before it in the list.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePlace {
    /// The node's name.
    pub node: String,
    /// The op's name.
    pub op: String,
    /// The backend that runs it.
    pub backend: &'static str,
    /// Each backend before it that refused the node, with its reason.
    pub refused: Vec<(&'static str, String)>,
}

impl fmt::Display for NodePlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) → {}", self.node, self.op, self.backend)?;
        for (b, why) in &self.refused {
            write!(f, "; not {b}: {why}")?;
        }
        Ok(())
    }
}

/// The placement of every top-level op node, in execution order.
pub fn place(graph: &Graph, devices: &[Arc<dyn Device>]) -> Result<Vec<NodePlace>> {
    let order = graph
        .topo_order()
        .map_err(|_| Error::Compile(format!("graph {:?} has a cycle", graph.name)))?;
    let mut out = Vec::new();
    for n in order {
        let node = graph.node(n);
        let Some(op) = node.op() else { continue };
        let ins = graph.node_inputs(n);
        let types: Vec<Option<&ValueType>> =
            ins.iter().map(|v| v.map(|v| &graph.value(v).ty)).collect();
        let mut refused = Vec::new();
        let mut chosen = None;
        for d in devices {
            match d.supports(op, &types) {
                Ok(()) => {
                    chosen = Some(d.name());
                    break;
                }
                Err(why) => refused.push((d.name(), why)),
            }
        }
        let Some(backend) = chosen else {
            let why: Vec<String> = refused.iter().map(|(b, w)| format!("{b}: {w}")).collect();
            return Err(Error::Compile(format!(
                "node {:?} ({}) runs on no backend of the list ({})",
                node.display_name(),
                op.name(),
                why.join("; ")
            )));
        };
        out.push(NodePlace {
            node: node.display_name(),
            op: op.name().to_string(),
            backend,
            refused,
        });
    }
    Ok(out)
}

/// How many values crossed between the host and a backend's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host → backend copies.
    pub uploads: usize,
    /// Backend → host copies.
    pub downloads: usize,
}

/// One part: consecutive nodes (in execution order) on one backend.
struct Part {
    device: usize,
    plan: Box<dyn DevicePlan>,
    /// The original graph's values the part reads, in its input order.
    inputs: Vec<ValueRef>,
    /// The original graph's values the part computes and others read, in its output
    /// order.
    outputs: Vec<ValueRef>,
}

/// A plan over several backends (see the module docs).
pub struct PlacedPlan {
    graph: Graph,
    devices: Vec<Arc<dyn Device>>,
    placement: Vec<NodePlace>,
    parts: Vec<Part>,
    graph_inputs: Vec<ValueRef>,
    graph_outputs: Vec<ValueRef>,
    input_types: Vec<ValueType>,
    /// Initializers the graph outputs or several parts read: host copies.
    consts: HashMap<ValueRef, Data>,
    /// By value: how many parts (and graph outputs) read it.
    uses: HashMap<ValueRef, usize>,
    transfers: Transfers,
}

impl fmt::Debug for PlacedPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.devices.iter().map(|d| d.name()).collect();
        f.debug_struct("PlacedPlan")
            .field("devices", &names)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl PlacedPlan {
    /// Places `graph`'s nodes on `devices` (in order of preference; the last should run
    /// every op) and compiles each part on its backend.
    pub fn compile(graph: &Graph, devices: Vec<Arc<dyn Device>>) -> Result<PlacedPlan> {
        if devices.is_empty() {
            return Err(Error::Compile("no backend to place the graph on".into()));
        }
        // Fused recurrent ops no backend runs become loops first (the selector's
        // fallback), so every node left has a backend.
        let lowered = crate::passes::select::lower_refused(&devices, graph)?;
        let graph = &lowered;
        let placement = place(graph, &devices)?;
        let order: Vec<NodeId> = graph
            .topo_order()
            .map_err(|_| Error::Compile(format!("graph {:?} has a cycle", graph.name)))?
            .into_iter()
            .filter(|&n| graph.node(n).op().is_some())
            .collect();
        let dev_of = |name: &str| devices.iter().position(|d| d.name() == name);
        // Runs of consecutive nodes on one backend.
        let mut runs: Vec<(usize, Vec<NodeId>)> = Vec::new();
        for (&n, p) in order.iter().zip(&placement) {
            let d = dev_of(p.backend).expect("placed on a listed backend");
            match runs.last_mut() {
                Some((last, nodes)) if *last == d => nodes.push(n),
                _ => runs.push((d, vec![n])),
            }
        }
        let part_of: HashMap<NodeId, usize> = runs
            .iter()
            .enumerate()
            .flat_map(|(i, (_, ns))| ns.iter().map(move |&n| (n, i)))
            .collect();
        let graph_outputs: Vec<ValueRef> = graph.outputs().to_vec();
        // Which parts read each value computed by another part (or a source).
        let mut readers: HashMap<ValueRef, Vec<usize>> = HashMap::new();
        for (i, (_, nodes)) in runs.iter().enumerate() {
            for &n in nodes {
                for v in reads(graph, n) {
                    if part_of.get(&v.node) != Some(&i) {
                        let r = readers.entry(v).or_default();
                        if !r.contains(&i) {
                            r.push(i);
                        }
                    }
                }
            }
        }
        let mut parts = Vec::new();
        let mut consts = HashMap::new();
        let mut uses: HashMap<ValueRef, usize> = HashMap::new();
        for (i, (d, nodes)) in runs.iter().enumerate() {
            // The original's opset imports: version-dependent semantics (Scan-8's batch
            // axis, Softmax's axis default) stay what they were.
            let mut sub =
                Graph::with_opsets(format!("{}/part{i}", graph.name), graph.opsets().clone());
            let mut map: HashMap<ValueRef, ValueRef> = HashMap::new();
            let mut inputs = Vec::new();
            // The part's sources: what it reads from outside, in first-read order.
            let mut outside: Vec<ValueRef> = Vec::new();
            for &n in nodes {
                for v in reads(graph, n) {
                    if part_of.get(&v.node) != Some(&i) && !outside.contains(&v) {
                        outside.push(v);
                    }
                }
            }
            for v in outside {
                let val = graph.value(v);
                let mapped = match &graph.node(v.node).kind {
                    // A weight travels with the part: its backend holds it from compile
                    // time on.
                    NodeKind::Initializer { tensor, trainable } => {
                        sub.add_initializer(&val.name, tensor.clone(), *trainable)?
                    }
                    _ => {
                        inputs.push(v);
                        *uses.entry(v).or_default() += 1;
                        sub.add_input(&val.name, val.ty.clone())?
                    }
                };
                map.insert(v, mapped);
            }
            for &n in nodes {
                let node = graph.node(n);
                let op = node.op().expect("op nodes only").clone();
                let ins: Vec<Option<ValueRef>> = graph
                    .node_inputs(n)
                    .into_iter()
                    .map(|v| v.map(|v| map[&v]))
                    .collect();
                let names: Vec<&str> = node.outputs.iter().map(|o| o.name.as_str()).collect();
                let id = sub
                    .add_node(&node.name, op, &ins, &names)
                    .map_err(|e| Error::Compile(format!("part {i}: {e}")))?;
                for s in 0..node.outputs.len() {
                    map.insert(
                        ValueRef { node: n, slot: s },
                        ValueRef { node: id, slot: s },
                    );
                }
            }
            // Outputs: values of this part that later parts or the caller read.
            let mut outputs = Vec::new();
            for &n in nodes {
                for s in 0..graph.node(n).outputs.len() {
                    let v = ValueRef { node: n, slot: s };
                    if readers.get(&v).is_some_and(|r| !r.is_empty()) || graph_outputs.contains(&v)
                    {
                        outputs.push(v);
                    }
                }
            }
            sub.set_outputs(outputs.iter().map(|v| map[v]).collect())
                .map_err(|e| Error::Compile(format!("part {i}: {e}")))?;
            let plan = devices[*d].compile_part(&sub)?;
            parts.push(Part {
                device: *d,
                plan,
                inputs,
                outputs,
            });
        }
        for &v in &graph_outputs {
            *uses.entry(v).or_default() += 1;
            if let NodeKind::Initializer { tensor, .. } = &graph.node(v.node).kind {
                consts.insert(v, Data::Tensor(tensor.clone()));
            }
        }
        Ok(PlacedPlan {
            graph: graph.clone(),
            devices,
            placement,
            parts,
            graph_inputs: graph.input_values(),
            graph_outputs,
            input_types: graph.input_types(),
            consts,
            uses,
            transfers: Transfers::default(),
        })
    }

    /// The graph this plan runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Where each node runs, in execution order.
    pub fn placement(&self) -> &[NodePlace] {
        &self.placement
    }

    /// The backends of the parts, in execution order (consecutive nodes on one backend
    /// form one part).
    pub fn parts(&self) -> Vec<&'static str> {
        self.parts
            .iter()
            .map(|p| self.devices[p.device].name())
            .collect()
    }

    /// The copies between the host and the backends' memory so far.
    pub fn transfers(&self) -> Transfers {
        self.transfers
    }

    /// Runs on values wherever they are; returns the graph outputs where they were
    /// computed (a backend's output stays in its memory).
    pub fn run_values(&mut self, inputs: Vec<Value>) -> Result<Vec<Value>> {
        if inputs.len() != self.graph_inputs.len() {
            return Err(Error::Compile(format!(
                "{} inputs given, the graph has {}",
                inputs.len(),
                self.graph_inputs.len()
            )));
        }
        // Each value, with copies of it on other backends made on the way (by device
        // index; `usize::MAX`: the host).
        let mut held: HashMap<ValueRef, Vec<(usize, Value)>> = HashMap::new();
        let mut uses = self.uses.clone();
        let home = |v: &Value, devices: &[Arc<dyn Device>]| match v.device() {
            None => usize::MAX,
            Some(name) => devices
                .iter()
                .position(|d| d.name() == name)
                .unwrap_or(usize::MAX - 1),
        };
        for (&r, v) in self.graph_inputs.iter().zip(inputs) {
            let h = home(&v, &self.devices);
            held.insert(r, vec![(h, v)]);
        }
        for (&r, d) in &self.consts {
            held.entry(r)
                .or_insert_with(|| vec![(usize::MAX, Value::Host(d.clone()))]);
        }
        let devices = &self.devices;
        let transfers = &mut self.transfers;
        for part in &mut self.parts {
            let dev = &devices[part.device];
            let want = if dev.host_resident() {
                usize::MAX
            } else {
                part.device
            };
            let mut ins = Vec::with_capacity(part.inputs.len());
            for r in &part.inputs {
                let copies = held
                    .get_mut(r)
                    .ok_or_else(|| Error::Compile(format!("value {r:?} was not computed")))?;
                let v = match copies.iter().find(|(h, _)| *h == want) {
                    Some((_, v)) => v.clone(),
                    None => {
                        let v = move_to(&copies[0].1, dev, devices, transfers)?;
                        copies.push((want, v.clone()));
                        v
                    }
                };
                ins.push(v);
                let u = uses.get_mut(r).expect("counted");
                *u -= 1;
                if *u == 0 {
                    held.remove(r);
                }
            }
            let outs = part.plan.run(ins)?;
            if outs.len() != part.outputs.len() {
                return Err(Error::Compile(format!(
                    "a part on {} returned {} values, expected {}",
                    dev.name(),
                    outs.len(),
                    part.outputs.len()
                )));
            }
            for (&r, v) in part.outputs.iter().zip(outs) {
                held.insert(r, vec![(want, v)]);
            }
        }
        self.graph_outputs
            .iter()
            .map(|r| {
                held.get(r)
                    .and_then(|c| c.first())
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| Error::Compile(format!("graph output {r:?} was not computed")))
            })
            .collect()
    }

    /// The graph inputs' declared types, in order.
    pub fn input_types(&self) -> &[ValueType] {
        &self.input_types
    }

    /// Brings a value to the host (a download when it is on a backend).
    pub fn to_host(&mut self, v: Value) -> Result<Data> {
        match v {
            Value::Host(d) => Ok(d),
            Value::Device(ref dv) => {
                let d = self
                    .devices
                    .iter()
                    .find(|d| d.name() == dv.backend)
                    .ok_or_else(|| {
                        Error::Compile(format!("no backend {} in this plan", dv.backend))
                    })?;
                self.transfers.downloads += 1;
                d.download(&v)
            }
        }
    }
}

/// Moves `v` to `dev`: through the host when it is on another backend.
fn move_to(
    v: &Value,
    dev: &Arc<dyn Device>,
    devices: &[Arc<dyn Device>],
    transfers: &mut Transfers,
) -> Result<Value> {
    let host = match v {
        Value::Host(d) => d.clone(),
        Value::Device(dv) if dv.backend == dev.name() => return Ok(v.clone()),
        Value::Device(dv) => {
            let owner = devices
                .iter()
                .find(|d| d.name() == dv.backend)
                .ok_or_else(|| Error::Compile(format!("no backend {} in this plan", dv.backend)))?;
            transfers.downloads += 1;
            owner.download(v)?
        }
    };
    if dev.host_resident() {
        return Ok(Value::Host(host));
    }
    transfers.uploads += 1;
    dev.upload(host)
}

/// Every value node `n` reads: its explicit inputs, then what its bodies read by name.
fn reads(graph: &Graph, n: NodeId) -> Vec<ValueRef> {
    let mut read: Vec<ValueRef> = graph.node_inputs(n).into_iter().flatten().collect();
    read.extend(outer_reads(graph, n));
    read
}

/// Values of the graph a node's bodies read by name (`NodeKind::Outer` in a body is
/// resolved in the enclosing graph).
fn outer_reads(graph: &Graph, n: NodeId) -> Vec<ValueRef> {
    let mut out = Vec::new();
    if let Some(op) = graph.node(n).op() {
        for (_, body) in op.subgraphs() {
            for name in body_outer_names(body) {
                if let Some(v) = graph.find(&name) {
                    if !out.contains(&v) {
                        out.push(v);
                    }
                }
            }
        }
    }
    out
}

/// The names a body (and the bodies nested in it) read from enclosing graphs.
fn body_outer_names(body: &Graph) -> Vec<String> {
    let mut names: Vec<String> = body
        .outers()
        .iter()
        .map(|&n| body.node(n).name.clone())
        .collect();
    for n in body.node_ids() {
        if let Some(op) = body.node(n).op() {
            for (_, inner) in op.subgraphs() {
                for name in body_outer_names(inner) {
                    if body.find(&name).is_none() && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
    }
    names
}

impl Plan for PlacedPlan {
    fn run(&mut self, inputs: Vec<Data>) -> Result<Vec<Data>> {
        let outs = self.run_values(inputs.into_iter().map(Value::Host).collect())?;
        outs.into_iter().map(|v| self.to_host(v)).collect()
    }
}
