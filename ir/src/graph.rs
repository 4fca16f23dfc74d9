//! `Graph`: ops on a petgraph `StableDiGraph`, with named inputs, initializers, outputs
//! and nested body graphs.
//!
//! A node is an op instance (or a graph input, an initializer, or a value read from the
//! enclosing graph); an edge carries one value from an output slot to an input slot.
//! Every value has a unique name. Types are inferred once, when a node is added.

use crate::error::{Error, Result};
use crate::ops::{InferCtx, Op, OpKind, ONNX_DOMAIN};
use crate::tensor::Tensor;
use crate::types::ValueType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// A node's index in its graph.
pub type NodeId = NodeIndex<u32>;

/// One output slot of one node: a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ValueRef {
    /// The producing node.
    pub node: NodeId,
    /// The output slot.
    pub slot: usize,
}

/// A value: its name, type, and whether the type was declared (by a file or the user)
/// rather than only inferred.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Value {
    /// The unique name; empty for an omitted optional output.
    pub name: String,
    /// The type.
    pub ty: ValueType,
    /// True when the type came from a declaration (ONNX `value_info`, graph I/O).
    pub declared: bool,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum NodeKind {
    /// A graph input (with a default value when an initializer of the same name exists).
    Input {
        /// The default value.
        default: Option<Tensor>,
    },
    /// A constant weight.
    Initializer {
        /// The value.
        tensor: Tensor,
        /// Whether training updates it.
        trainable: bool,
    },
    /// A value of an enclosing graph, read by name (Scan/Loop bodies reading weights).
    Outer,
    /// An op.
    Op(Op),
}

/// A node of the graph.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Node {
    /// The node's name (may be empty for ops; the value name for inputs and initializers).
    pub name: String,
    /// What the node is.
    pub kind: NodeKind,
    /// The number of input slots (some may be unconnected: omitted optional inputs).
    pub num_inputs: usize,
    /// The output values.
    pub outputs: Vec<Value>,
}

impl Node {
    /// The op, for op nodes.
    pub fn op(&self) -> Option<&Op> {
        match &self.kind {
            NodeKind::Op(op) => Some(op),
            _ => None,
        }
    }

    /// A short description of the node's kind: the op name, `input`, `initializer` or `outer`.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Input { .. } => "input",
            NodeKind::Initializer { .. } => "initializer",
            NodeKind::Outer => "outer",
            NodeKind::Op(op) => op.name(),
        }
    }

    /// A name for messages: the node name, or its first output's name.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            self.name.clone()
        } else {
            self.outputs
                .iter()
                .find(|v| !v.name.is_empty())
                .map(|v| v.name.clone())
                .unwrap_or_default()
        }
    }
}

/// An edge: the value from `src_slot` of the source node feeds `dst_slot` of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Edge {
    /// Output slot of the producer.
    pub src_slot: usize,
    /// Input slot of the consumer.
    pub dst_slot: usize,
}

/// A dataflow graph of ops.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Graph {
    /// The graph's name.
    pub name: String,
    /// Free-form documentation (ONNX `doc_string`).
    pub doc: String,
    graph: StableDiGraph<Node, Edge>,
    inputs: Vec<NodeId>,
    initializers: Vec<NodeId>,
    outers: Vec<NodeId>,
    outputs: Vec<ValueRef>,
    opsets: BTreeMap<String, i64>,
    #[cfg_attr(feature = "serde", serde(skip))]
    names: HashMap<String, ValueRef>,
}

/// The default-domain opset version of graphs built through the API.
pub const DEFAULT_OPSET: i64 = 21;

impl PartialEq for Graph {
    /// Graphs are equal when their printed forms are equal (same names, ops, attributes,
    /// types, constants by fingerprint, and order).
    fn eq(&self, other: &Graph) -> bool {
        crate::print::print_graph(self) == crate::print::print_graph(other)
    }
}

impl Graph {
    /// An empty graph importing the default ONNX opset.
    pub fn new(name: impl Into<String>) -> Graph {
        let mut opsets = BTreeMap::new();
        opsets.insert(ONNX_DOMAIN.to_string(), DEFAULT_OPSET);
        Graph::with_opsets(name, opsets)
    }

    /// An empty graph with the given opset imports (domain → version).
    pub fn with_opsets(name: impl Into<String>, opsets: BTreeMap<String, i64>) -> Graph {
        Graph {
            name: name.into(),
            doc: String::new(),
            graph: StableDiGraph::default(),
            inputs: Vec::new(),
            initializers: Vec::new(),
            outers: Vec::new(),
            outputs: Vec::new(),
            opsets,
            names: HashMap::new(),
        }
    }

    /// Imports `domain` at `version` unless the graph already imports it.
    pub fn import_opset(&mut self, domain: &str, version: i64) {
        self.opsets.entry(domain.to_string()).or_insert(version);
    }

    /// The opset imports (domain → version).
    pub fn opsets(&self) -> &BTreeMap<String, i64> {
        &self.opsets
    }

    /// The version of `domain` this graph imports (0 when it does not).
    pub fn opset(&self, domain: &str) -> i64 {
        self.opsets.get(domain).copied().unwrap_or(0)
    }

    fn claim(&mut self, name: &str, v: ValueRef) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        if self.names.contains_key(name) {
            return Err(Error::DuplicateName {
                graph: self.name.clone(),
                name: name.to_string(),
            });
        }
        self.names.insert(name.to_string(), v);
        Ok(())
    }

    fn add_source(
        &mut self,
        name: &str,
        kind: NodeKind,
        ty: ValueType,
        declared: bool,
    ) -> Result<ValueRef> {
        if name.is_empty() {
            return Err(Error::Malformed {
                what: format!("graph {:?}", self.name),
                msg: "a graph input or initializer has an empty name".into(),
            });
        }
        if self.names.contains_key(name) {
            return Err(Error::DuplicateName {
                graph: self.name.clone(),
                name: name.to_string(),
            });
        }
        let id = self.graph.add_node(Node {
            name: name.to_string(),
            kind,
            num_inputs: 0,
            outputs: vec![Value {
                name: name.to_string(),
                ty,
                declared,
            }],
        });
        let v = ValueRef { node: id, slot: 0 };
        self.claim(name, v)?;
        Ok(v)
    }

    /// Adds a graph input of the given type.
    pub fn add_input(&mut self, name: &str, ty: ValueType) -> Result<ValueRef> {
        let v = self.add_source(name, NodeKind::Input { default: None }, ty, true)?;
        self.inputs.push(v.node);
        Ok(v)
    }

    /// Adds a graph input that has a default value (an ONNX initializer of the same name).
    pub fn add_input_with_default(
        &mut self,
        name: &str,
        ty: ValueType,
        default: Tensor,
    ) -> Result<ValueRef> {
        let t = tensor_type(&default);
        let ty = ty.merge(&t).map_err(|msg| Error::Tensor {
            name: name.to_string(),
            msg: format!("default value does not match the declared type: {msg}"),
        })?;
        let v = self.add_source(
            name,
            NodeKind::Input {
                default: Some(default),
            },
            ty,
            true,
        )?;
        self.inputs.push(v.node);
        Ok(v)
    }

    /// Adds a constant weight.
    pub fn add_initializer(
        &mut self,
        name: &str,
        tensor: Tensor,
        trainable: bool,
    ) -> Result<ValueRef> {
        let ty = tensor_type(&tensor);
        let v = self.add_source(name, NodeKind::Initializer { tensor, trainable }, ty, false)?;
        self.initializers.push(v.node);
        Ok(v)
    }

    /// Adds a value read by name from an enclosing graph (for Scan/Loop/If bodies).
    pub fn add_outer(&mut self, name: &str, ty: ValueType) -> Result<ValueRef> {
        let v = self.add_source(name, NodeKind::Outer, ty, false)?;
        self.outers.push(v.node);
        Ok(v)
    }

    /// Adds an op node reading `inputs` (`None` = omitted optional input) and producing
    /// values named `outputs` (`""` = omitted optional output). Checks arity and runs the
    /// op's shape and type rule; returns the node.
    pub fn add_node(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[Option<ValueRef>],
        outputs: &[&str],
    ) -> Result<NodeId> {
        let info = op.kind().info();
        let node_err = |msg: String| Error::Infer {
            node: if name.is_empty() {
                outputs.first().copied().unwrap_or("").to_string()
            } else {
                name.to_string()
            },
            op: info.name.to_string(),
            msg,
        };
        if inputs.len() < info.inputs.0 || inputs.len() > info.inputs.1 {
            return Err(node_err(format!(
                "has {} inputs, the op takes {}",
                inputs.len(),
                arity(info.inputs)
            )));
        }
        if outputs.len() < info.outputs.0 || outputs.len() > info.outputs.1 {
            return Err(node_err(format!(
                "has {} outputs, the op gives {}",
                outputs.len(),
                arity(info.outputs)
            )));
        }
        for v in inputs.iter().flatten() {
            if self.value_opt(*v).is_none() {
                return Err(node_err(format!("input {v:?} does not exist")));
            }
        }
        let types = self
            .infer_types(&op, inputs, outputs.len())
            .map_err(node_err)?;
        let id = self.graph.add_node(Node {
            name: name.to_string(),
            kind: NodeKind::Op(op),
            num_inputs: inputs.len(),
            outputs: outputs
                .iter()
                .zip(types)
                .map(|(n, ty)| Value {
                    name: n.to_string(),
                    ty,
                    declared: false,
                })
                .collect(),
        });
        for (slot, out) in outputs.iter().enumerate() {
            if let Err(e) = self.claim(out, ValueRef { node: id, slot }) {
                for o in &outputs[..slot] {
                    self.names.remove(*o);
                }
                self.graph.remove_node(id);
                return Err(e);
            }
        }
        for (slot, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                self.graph.add_edge(
                    v.node,
                    id,
                    Edge {
                        src_slot: v.slot,
                        dst_slot: slot,
                    },
                );
            }
        }
        Ok(id)
    }

    /// Runs `op`'s shape rule on the given inputs of this graph.
    pub fn infer_types(
        &self,
        op: &Op,
        inputs: &[Option<ValueRef>],
        num_outputs: usize,
    ) -> std::result::Result<Vec<ValueType>, String> {
        let tys: Vec<Option<ValueType>> = inputs
            .iter()
            .map(|v| v.map(|v| self.value(v).ty.clone()))
            .collect();
        let owned: Vec<Option<Tensor>> = inputs
            .iter()
            .map(|v| v.and_then(|v| self.constant(v)))
            .collect();
        let consts: Vec<Option<&Tensor>> = owned.iter().map(|t| t.as_ref()).collect();
        let cx = InferCtx {
            inputs: &tys,
            consts: &consts,
            num_outputs,
            opset: self.opset(op.kind().info().domain),
        };
        op.infer(&cx)
    }

    /// Sets the graph outputs.
    pub fn set_outputs(&mut self, outputs: Vec<ValueRef>) -> Result<()> {
        for v in &outputs {
            if self.value_opt(*v).is_none() {
                return Err(Error::Dangling {
                    graph: self.name.clone(),
                    name: format!("{v:?}"),
                    user: "graph output".into(),
                });
            }
        }
        self.outputs = outputs;
        Ok(())
    }

    /// Merges a declared type into a value's type (the more specific facts win); an error
    /// when the declaration contradicts what is known.
    pub fn declare_type(&mut self, v: ValueRef, ty: &ValueType) -> Result<()> {
        let gname = self.name.clone();
        let node = self
            .graph
            .node_weight_mut(v.node)
            .ok_or_else(|| Error::Dangling {
                graph: gname.clone(),
                name: format!("{v:?}"),
                user: "type declaration".into(),
            })?;
        let op = node.kind_name().to_string();
        let node_name = node.display_name();
        let val = node
            .outputs
            .get_mut(v.slot)
            .ok_or_else(|| Error::Dangling {
                graph: gname.clone(),
                name: format!("{v:?}"),
                user: "type declaration".into(),
            })?;
        let merged = val.ty.merge(ty).map_err(|e| Error::Verify {
            graph: gname,
            node: node_name,
            op,
            rule: format!(
                "declared type {ty} of value {:?} conflicts with the inferred {}: {e}",
                val.name, val.ty
            ),
        })?;
        val.ty = merged;
        val.declared = true;
        Ok(())
    }

    /// Replaces (or removes, with `None`) the value feeding input `slot` of `node`.
    /// This can break invariants (cycles, types): run the verifier after rewrites.
    pub fn set_input(&mut self, node: NodeId, slot: usize, value: Option<ValueRef>) {
        let old: Vec<_> = self
            .graph
            .edges_directed(node, Direction::Incoming)
            .filter(|e| e.weight().dst_slot == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.graph.remove_edge(e);
        }
        if let Some(v) = value {
            self.graph.add_edge(
                v.node,
                node,
                Edge {
                    src_slot: v.slot,
                    dst_slot: slot,
                },
            );
        }
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    /// The node with this id, if it exists.
    pub fn node_opt(&self, id: NodeId) -> Option<&Node> {
        self.graph.node_weight(id)
    }

    /// The value behind a reference.
    pub fn value(&self, v: ValueRef) -> &Value {
        &self.graph[v.node].outputs[v.slot]
    }

    /// The value behind a reference, if it exists.
    pub fn value_opt(&self, v: ValueRef) -> Option<&Value> {
        self.graph
            .node_weight(v.node)
            .and_then(|n| n.outputs.get(v.slot))
    }

    /// The value with this name.
    pub fn find(&self, name: &str) -> Option<ValueRef> {
        self.names.get(name).copied()
    }

    /// The constant value of `v`: an initializer, or the output of a `Constant` node.
    pub fn constant(&self, v: ValueRef) -> Option<Tensor> {
        match &self.graph.node_weight(v.node)?.kind {
            NodeKind::Initializer { tensor, .. } => Some(tensor.clone()),
            NodeKind::Op(op @ Op::Constant { .. }) => crate::ops::shape::constant_value(op),
            _ => None,
        }
    }

    /// The graph inputs, in order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// The graph inputs as values, in order.
    pub fn input_values(&self) -> Vec<ValueRef> {
        self.inputs
            .iter()
            .map(|&n| ValueRef { node: n, slot: 0 })
            .collect()
    }

    /// The initializers, in insertion order.
    pub fn initializers(&self) -> &[NodeId] {
        &self.initializers
    }

    /// Marks the initializer `node` trainable or not (whether training updates it);
    /// `false` when `node` is not an initializer of this graph.
    pub fn set_trainable(&mut self, node: NodeId, trainable: bool) -> bool {
        match self.graph.node_weight_mut(node).map(|n| &mut n.kind) {
            Some(NodeKind::Initializer { trainable: t, .. }) => {
                *t = trainable;
                true
            }
            _ => false,
        }
    }

    /// The values read from enclosing graphs.
    pub fn outers(&self) -> &[NodeId] {
        &self.outers
    }

    /// Adds this graph's sources to `dst` — its inputs (with their defaults), its
    /// initializers and its outer values, under the same names — and returns the map
    /// from each source value here to its copy in `dst`: the first step of every pass
    /// that rebuilds a graph node by node. `retype` and `convert` pass each declared
    /// type and each tensor (an input's default, an initializer) through on the way;
    /// `given` stands for the inputs instead (a body copied inline), in input order.
    pub fn copy_sources_into(
        &self,
        dst: &mut Graph,
        given: Option<&[ValueRef]>,
        retype: &dyn Fn(&ValueType) -> ValueType,
        convert: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<HashMap<ValueRef, ValueRef>> {
        let mut map = HashMap::new();
        let src = |id| ValueRef { node: id, slot: 0 };
        for (i, &id) in self.inputs.iter().enumerate() {
            let node = self.node(id);
            let val = &node.outputs[0];
            let v = match (given, &node.kind) {
                (Some(given), _) => *given.get(i).ok_or_else(|| Error::Malformed {
                    what: format!("graph {:?}", self.name),
                    msg: format!(
                        "{} values given for {} inputs",
                        given.len(),
                        self.inputs.len()
                    ),
                })?,
                (None, NodeKind::Input { default: Some(t) }) => {
                    dst.add_input_with_default(&val.name, retype(&val.ty), convert(t)?)?
                }
                (None, _) => dst.add_input(&val.name, retype(&val.ty))?,
            };
            map.insert(src(id), v);
        }
        for &id in &self.initializers {
            let node = self.node(id);
            if let NodeKind::Initializer { tensor, trainable } = &node.kind {
                let v = dst.add_initializer(&node.outputs[0].name, convert(tensor)?, *trainable)?;
                map.insert(src(id), v);
            }
        }
        for &id in &self.outers {
            let val = &self.node(id).outputs[0];
            map.insert(src(id), dst.add_outer(&val.name, retype(&val.ty))?);
        }
        Ok(map)
    }

    /// [`Graph::copy_sources_into`] with types and tensors as they are.
    pub fn copy_sources(&self, dst: &mut Graph) -> Result<HashMap<ValueRef, ValueRef>> {
        self.copy_sources_into(dst, None, &ValueType::clone, &|t| Ok(t.clone()))
    }

    /// The graph outputs, in order.
    pub fn outputs(&self) -> &[ValueRef] {
        &self.outputs
    }

    /// The types of the graph inputs, in order.
    pub fn input_types(&self) -> Vec<ValueType> {
        self.inputs
            .iter()
            .map(|&n| self.graph[n].outputs[0].ty.clone())
            .collect()
    }

    /// The types of the graph outputs, in order.
    pub fn output_types(&self) -> Vec<ValueType> {
        self.outputs
            .iter()
            .map(|&v| self.value(v).ty.clone())
            .collect()
    }

    /// The values feeding each input slot of `node` (`None` for unconnected slots).
    pub fn node_inputs(&self, node: NodeId) -> Vec<Option<ValueRef>> {
        let mut out = vec![None; self.graph[node].num_inputs];
        for e in self.graph.edges_directed(node, Direction::Incoming) {
            if let Some(s) = out.get_mut(e.weight().dst_slot) {
                *s = Some(ValueRef {
                    node: e.source(),
                    slot: e.weight().src_slot,
                });
            }
        }
        out
    }

    /// The consumers of `v`: (node, input slot) pairs.
    pub fn users(&self, v: ValueRef) -> Vec<(NodeId, usize)> {
        let mut out: Vec<_> = self
            .graph
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == v.slot)
            .map(|e| (e.target(), e.weight().dst_slot))
            .collect();
        out.sort();
        out
    }

    /// All node ids, in index order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.graph.node_indices().collect()
    }

    /// The op nodes in a stable topological order (ties broken by insertion order), or
    /// the nodes left on or behind a cycle.
    pub fn topo_order(&self) -> std::result::Result<Vec<NodeId>, Vec<NodeId>> {
        let mut indeg: HashMap<NodeId, usize> = HashMap::new();
        for n in self.graph.node_indices() {
            let mut preds: Vec<NodeId> = self
                .graph
                .neighbors_directed(n, Direction::Incoming)
                .collect();
            preds.sort();
            preds.dedup();
            indeg.insert(n, preds.len());
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeId>> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| std::cmp::Reverse(n))
            .collect();
        let mut order = Vec::new();
        while let Some(std::cmp::Reverse(n)) = ready.pop() {
            order.push(n);
            let mut succ: Vec<NodeId> = self
                .graph
                .neighbors_directed(n, Direction::Outgoing)
                .collect();
            succ.sort();
            succ.dedup();
            for s in succ {
                let d = indeg.get_mut(&s).expect("every node has an in-degree");
                *d -= 1;
                if *d == 0 {
                    ready.push(std::cmp::Reverse(s));
                }
            }
        }
        if order.len() != self.graph.node_count() {
            let done: std::collections::HashSet<_> = order.iter().copied().collect();
            let mut left: Vec<NodeId> = self
                .graph
                .node_indices()
                .filter(|n| !done.contains(n))
                .collect();
            left.sort();
            return Err(left);
        }
        Ok(order
            .into_iter()
            .filter(|&n| matches!(self.graph[n].kind, NodeKind::Op(_)))
            .collect())
    }

    /// The number of op nodes, including those in nested graphs.
    pub fn op_count(&self) -> usize {
        self.graph
            .node_weights()
            .filter_map(|n| n.op())
            .map(|op| {
                1 + op
                    .subgraphs()
                    .iter()
                    .map(|(_, g)| g.op_count())
                    .sum::<usize>()
            })
            .sum()
    }

    /// The number of elements in all initializers (trainable or not), including nested graphs.
    pub fn parameter_count(&self) -> u64 {
        let own: u64 = self
            .initializers
            .iter()
            .map(|&n| match &self.graph[n].kind {
                NodeKind::Initializer { tensor, .. } => tensor.len() as u64,
                _ => 0,
            })
            .sum();
        let nested: u64 = self
            .graph
            .node_weights()
            .filter_map(|n| n.op())
            .flat_map(|op| op.subgraphs().into_iter().map(|(_, g)| g.parameter_count()))
            .sum();
        own + nested
    }

    /// The underlying petgraph graph (read-only), for algorithms and DOT output.
    pub fn petgraph(&self) -> &StableDiGraph<Node, Edge> {
        &self.graph
    }

    /// Whether an op kind's domain is imported at a version where the IR implements it.
    pub fn supports(&self, kind: OpKind) -> bool {
        let info = kind.info();
        self.opset(info.domain) >= info.since
    }

    /// Rebuilds the name index of this graph and its nested graphs (after deserialisation).
    pub fn reindex(&mut self) {
        for w in self.graph.node_weights_mut() {
            if let NodeKind::Op(op) = &mut w.kind {
                for body in op.subgraphs_mut() {
                    body.reindex();
                }
            }
        }
        self.names.clear();
        for n in self.graph.node_indices() {
            for (slot, v) in self.graph[n].outputs.iter().enumerate() {
                if !v.name.is_empty() {
                    self.names
                        .insert(v.name.clone(), ValueRef { node: n, slot });
                }
            }
        }
    }
}

fn arity((lo, hi): (usize, usize)) -> String {
    if lo == hi {
        lo.to_string()
    } else if hi == crate::ops::MANY {
        format!("{lo} or more")
    } else {
        format!("{lo} to {hi}")
    }
}

/// The exact tensor type of a constant.
pub fn tensor_type(t: &Tensor) -> ValueType {
    ValueType::Tensor(crate::types::TensorType::new(
        t.dtype(),
        &t.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
    ))
}
