//! `ModelProto` → [`Model`]: decoding, limits, external data, nested graphs and outer
//! scopes, typed attributes, declared types.

use super::proto;
use super::{Model, MAX_ONNX_OPSET};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, ValueRef};
use crate::ops::{Attr, Op, OpKind};
use crate::tensor::Tensor;
use crate::types::{Dim, TensorType, ValueType};
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// Resource limits checked while reading, before anything large is allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single tensor, in bytes.
    pub max_tensor_bytes: u64,
    /// Largest total of all tensors, in bytes.
    pub max_total_bytes: u64,
    /// Deepest nesting of subgraphs.
    pub max_nesting: usize,
    /// Most nodes, counting nested graphs.
    pub max_nodes: usize,
    /// Largest model file, in bytes.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    /// Defaults no real recurrent model comes near: 4 GiB per tensor, 16 GiB in all,
    /// subgraphs 32 deep, a million nodes, 8 GiB files.
    fn default() -> Limits {
        Limits {
            max_tensor_bytes: 4 << 30,
            max_total_bytes: 16 << 30,
            max_nesting: 32,
            max_nodes: 1_000_000,
            max_file_bytes: 8 << 30,
        }
    }
}

/// How to read a model.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The model's folder: external data is read only from files inside it.
    pub base_dir: Option<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
    /// Rewrite batch-major (`layout=1`) `LSTM`/`GRU`/`RNN` nodes into time-major ones
    /// between `Transpose`s (on by default: ONNX Runtime's CPU kernels reject
    /// `layout=1`, so exported files stay runnable there).
    pub time_major: bool,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions {
            base_dir: None,
            limits: Limits::default(),
            time_major: true,
        }
    }
}

struct Importer<'a> {
    opts: &'a ImportOptions,
    opsets: BTreeMap<String, i64>,
    total_bytes: u64,
    nodes: usize,
    /// Every value name in the file, so generated names never collide.
    reserved: HashSet<String>,
}

fn malformed(what: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Malformed {
        what: what.into(),
        msg: msg.into(),
    }
}

/// Decodes and imports a serialized `ModelProto`.
pub fn import_model(bytes: &[u8], opts: &ImportOptions) -> Result<Model> {
    if bytes.len() as u64 > opts.limits.max_file_bytes {
        return Err(Error::Limit {
            what: format!(
                "model is {} bytes, more than {}",
                bytes.len(),
                opts.limits.max_file_bytes
            ),
        });
    }
    if bytes.is_empty() {
        return Err(malformed(
            "file",
            "is empty (0 bytes); an ONNX model is a serialized ModelProto",
        ));
    }
    let mp = proto::ModelProto::decode(bytes)?;
    let mut opsets = BTreeMap::new();
    for o in &mp.opset_import {
        let domain = normalize_domain(o.domain());
        let v = o.version();
        if domain.is_empty() && !(1..=MAX_ONNX_OPSET).contains(&v) {
            return Err(Error::UnsupportedOpset {
                domain,
                version: v,
                why: format!("cellgraph implements default-domain opsets 1 to {MAX_ONNX_OPSET}"),
            });
        }
        if opsets.insert(domain.clone(), v).is_some() {
            return Err(malformed(
                "ModelProto.opset_import",
                format!("domain {domain:?} is imported twice"),
            ));
        }
    }
    if mp.opset_import.is_empty() {
        return Err(malformed(
            "ModelProto.opset_import",
            "no opset is imported (every ONNX model declares the opsets it uses; is this an ONNX file?)",
        ));
    }
    let gp = mp
        .graph
        .as_ref()
        .ok_or_else(|| malformed("ModelProto", "has no graph"))?;
    let mut reserved = HashSet::new();
    all_names(gp, &mut reserved);
    let mut imp = Importer {
        opts,
        opsets,
        total_bytes: 0,
        nodes: 0,
        reserved,
    };
    let mut graph = imp.graph(gp, &[], 0)?;
    let mut metadata = Vec::new();
    for p in &mp.metadata_props {
        if p.key() != super::FROZEN_KEY {
            metadata.push((p.key().to_string(), p.value().to_string()));
            continue;
        }
        for name in p.value().lines().filter(|l| !l.is_empty()) {
            let node = graph
                .initializers()
                .iter()
                .copied()
                .find(|&n| graph.node(n).name == name);
            match node {
                Some(n) => {
                    graph.set_trainable(n, false);
                }
                None => {
                    return Err(malformed(
                        format!("metadata_props {:?}", super::FROZEN_KEY),
                        format!("names {name:?}, which is not an initializer of the main graph"),
                    ))
                }
            }
        }
    }
    Ok(Model {
        ir_version: mp.ir_version(),
        producer_name: mp.producer_name().to_string(),
        producer_version: mp.producer_version().to_string(),
        domain: mp.domain().to_string(),
        model_version: mp.model_version(),
        doc: mp.doc_string().to_string(),
        metadata,
        graph,
    })
}

fn normalize_domain(d: &str) -> String {
    if d == "ai.onnx" {
        String::new()
    } else {
        d.to_string()
    }
}

/// The names a graph reads from enclosing scopes (used by nodes or outputs, defined
/// nowhere inside, recursively through nested graphs).
fn free_names(gp: &proto::GraphProto, out: &mut HashSet<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    for v in &gp.input {
        defined.insert(v.name());
    }
    for t in &gp.initializer {
        defined.insert(t.name());
    }
    for n in &gp.node {
        for o in &n.output {
            defined.insert(o);
        }
    }
    let mut used: HashSet<String> = HashSet::new();
    for n in &gp.node {
        used.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                free_names(g, &mut used);
            }
        }
    }
    used.extend(gp.output.iter().map(|v| v.name().to_string()));
    out.extend(used.into_iter().filter(|u| !defined.contains(u.as_str())));
}

fn all_names(gp: &proto::GraphProto, out: &mut HashSet<String>) {
    out.extend(gp.input.iter().map(|v| v.name().to_string()));
    out.extend(gp.initializer.iter().map(|t| t.name().to_string()));
    for n in &gp.node {
        out.extend(n.output.iter().cloned());
        for a in &n.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                all_names(g, out);
            }
        }
    }
}

/// The `layout` of a recurrent op.
fn recurrent_layout(op: &Op) -> Option<i64> {
    match op {
        Op::LSTM { layout, .. } | Op::GRU { layout, .. } | Op::RNN { layout, .. } => Some(*layout),
        _ => None,
    }
}

/// Adds a batch-major recurrent node as `Transpose`s around its time-major form:
/// X `[N,T,I]` and the initial states `[N,D,H]` are transposed in, Y `[T,D,N,H]` and the
/// final states `[D,N,H]` are transposed back, so the outputs keep their names and shapes.
fn add_time_major(
    g: &mut Graph,
    name: &str,
    mut op: Op,
    inputs: Vec<Option<ValueRef>>,
    outs: &[&str],
    reserved: &HashSet<String>,
) -> Result<()> {
    if let Op::LSTM { layout, .. } | Op::GRU { layout, .. } | Op::RNN { layout, .. } = &mut op {
        *layout = 0;
    }
    let fresh = |g: &Graph, base: &str| -> String {
        let mut n = format!("{base}__time_major");
        let mut k = 1;
        while g.find(&n).is_some() || reserved.contains(&n) {
            n = format!("{base}__time_major{k}");
            k += 1;
        }
        n
    };
    let label = if name.is_empty() {
        outs.iter()
            .find(|o| !o.is_empty())
            .copied()
            .unwrap_or("rnn")
    } else {
        name
    };
    let perm = |p: &[i64]| Op::Transpose {
        perm: Some(p.to_vec()),
    };
    let mut new_inputs = inputs.clone();
    for slot in [0usize, 5, 6] {
        if let Some(Some(v)) = inputs.get(slot) {
            let base = g.value(*v).name.clone();
            let t = fresh(g, &base);
            let id = g.add_node(
                &format!("{label}/time_major_in{slot}"),
                perm(&[1, 0, 2]),
                &[Some(*v)],
                &[&t],
            )?;
            new_inputs[slot] = Some(ValueRef { node: id, slot: 0 });
        }
    }
    let inner: Vec<String> = outs
        .iter()
        .map(|o| {
            if o.is_empty() {
                String::new()
            } else {
                fresh(g, o)
            }
        })
        .collect();
    let inner_refs: Vec<&str> = inner.iter().map(String::as_str).collect();
    let id = g.add_node(name, op, &new_inputs, &inner_refs)?;
    for (slot, o) in outs.iter().enumerate() {
        if o.is_empty() {
            continue;
        }
        let p: &[i64] = if slot == 0 { &[2, 0, 1, 3] } else { &[1, 0, 2] };
        g.add_node(
            &format!("{label}/batch_major_out{slot}"),
            perm(p),
            &[Some(ValueRef { node: id, slot })],
            &[o],
        )?;
    }
    Ok(())
}

fn lookup(scopes: &[&Graph], name: &str) -> Option<ValueType> {
    scopes
        .iter()
        .rev()
        .find_map(|g| g.find(name).map(|v| g.value(v).ty.clone()))
}

impl Importer<'_> {
    fn graph(&mut self, gp: &proto::GraphProto, scopes: &[&Graph], depth: usize) -> Result<Graph> {
        let gname = gp.name().to_string();
        if depth > self.opts.limits.max_nesting {
            return Err(Error::Limit {
                what: format!(
                    "graph {gname:?} is nested {depth} deep, more than {}",
                    self.opts.limits.max_nesting
                ),
            });
        }
        if !gp.sparse_initializer.is_empty() {
            return Err(malformed(
                format!("graph {gname:?}"),
                "sparse initializers are not supported",
            ));
        }
        let mut g = Graph::with_opsets(gname.clone(), self.opsets.clone());
        g.doc = gp.doc_string().to_string();
        let mut inits: HashMap<&str, Tensor> = HashMap::new();
        let mut init_order = Vec::new();
        for t in &gp.initializer {
            let tensor = self.tensor(t, &format!("initializer {:?}", t.name()))?;
            if inits.insert(t.name(), tensor).is_some() {
                return Err(Error::DuplicateName {
                    graph: gname.clone(),
                    name: t.name().to_string(),
                });
            }
            init_order.push(t.name());
        }
        for (i, v) in gp.input.iter().enumerate() {
            let ty = value_type(v.r#type.as_ref())
                .map_err(|m| malformed(format!("graph {gname:?} input {i} ({:?})", v.name()), m))?;
            match inits.remove(v.name()) {
                Some(t) => g.add_input_with_default(v.name(), ty, t)?,
                None => g.add_input(v.name(), ty)?,
            };
        }
        for name in init_order {
            if let Some(t) = inits.remove(name) {
                let trainable = t.dtype().is_float();
                g.add_initializer(name, t, trainable)?;
            }
        }
        // Order the nodes: explicit inputs and names read by nested graphs are dependencies.
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, n) in gp.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o.as_str(), i).is_some() {
                    return Err(Error::DuplicateName {
                        graph: gname.clone(),
                        name: o.clone(),
                    });
                }
            }
        }
        let deps: Vec<Vec<usize>> = gp
            .node
            .iter()
            .map(|n| {
                let mut names: HashSet<String> =
                    n.input.iter().filter(|s| !s.is_empty()).cloned().collect();
                for a in &n.attribute {
                    for sg in a.g.iter().chain(a.graphs.iter()) {
                        free_names(sg, &mut names);
                    }
                }
                let mut d: Vec<usize> = names
                    .iter()
                    .filter_map(|s| producer.get(s.as_str()).copied())
                    .collect();
                d.sort_unstable();
                d.dedup();
                d
            })
            .collect();
        let order = stable_toposort(&deps).map_err(|left| Error::Cycle {
            graph: gname.clone(),
            nodes: left.iter().map(|&i| node_label(&gp.node[i])).collect(),
        })?;
        for i in order {
            self.node(&mut g, &gp.node[i], scopes, depth)?;
        }
        for vi in &gp.value_info {
            if let Some(v) = g.find(vi.name()) {
                let ty = value_type(vi.r#type.as_ref()).map_err(|m| {
                    malformed(format!("graph {gname:?} value_info {:?}", vi.name()), m)
                })?;
                g.declare_type(v, &ty)?;
            }
        }
        let mut outs = Vec::new();
        for (i, vi) in gp.output.iter().enumerate() {
            let v = self.resolve(&mut g, vi.name(), scopes, "graph output")?;
            let ty = value_type(vi.r#type.as_ref()).map_err(|m| {
                malformed(format!("graph {gname:?} output {i} ({:?})", vi.name()), m)
            })?;
            g.declare_type(v, &ty)?;
            outs.push(v);
        }
        g.set_outputs(outs)?;
        Ok(g)
    }

    /// The value named `name`: defined in `g`, or read from an enclosing scope.
    fn resolve(
        &mut self,
        g: &mut Graph,
        name: &str,
        scopes: &[&Graph],
        user: &str,
    ) -> Result<ValueRef> {
        if let Some(v) = g.find(name) {
            return Ok(v);
        }
        match lookup(scopes, name) {
            Some(ty) => g.add_outer(name, ty),
            None => Err(Error::Dangling {
                graph: g.name.clone(),
                name: name.to_string(),
                user: user.to_string(),
            }),
        }
    }

    fn node(
        &mut self,
        g: &mut Graph,
        np: &proto::NodeProto,
        scopes: &[&Graph],
        depth: usize,
    ) -> Result<()> {
        self.nodes += 1;
        if self.nodes > self.opts.limits.max_nodes {
            return Err(Error::Limit {
                what: format!("more than {} nodes", self.opts.limits.max_nodes),
            });
        }
        let label = node_label(np);
        let domain = normalize_domain(np.domain());
        let version = self.opsets.get(&domain).copied().unwrap_or(0);
        let unsupported = || Error::UnsupportedOp {
            op: np.op_type().to_string(),
            domain: domain.clone(),
            version,
            node: label.clone(),
        };
        let kind = OpKind::from_domain(&domain, np.op_type()).ok_or_else(unsupported)?;
        if !self.opsets.contains_key(&domain) || version < kind.info().since {
            return Err(unsupported());
        }
        let mut attrs = BTreeMap::new();
        {
            let mut chain: Vec<&Graph> = scopes.to_vec();
            chain.push(g);
            for a in &np.attribute {
                let at = format!("node {label:?} attribute {:?}", a.name());
                if !a.ref_attr_name().is_empty() {
                    return Err(malformed(
                        at,
                        "attribute references (ref_attr_name) are only valid in functions",
                    ));
                }
                let value = self.attr(a, &at, &chain, depth)?;
                if attrs.insert(a.name().to_string(), value).is_some() {
                    return Err(malformed(at, "given twice"));
                }
            }
        }
        let op = Op::from_attrs(kind, attrs).map_err(|source| Error::Attr {
            node: label.clone(),
            op: np.op_type().to_string(),
            source,
        })?;
        let mut inputs = Vec::with_capacity(np.input.len());
        for name in &np.input {
            inputs.push(if name.is_empty() {
                None
            } else {
                Some(self.resolve(g, name, scopes, &format!("node {label:?}"))?)
            });
        }
        let outs: Vec<&str> = np.output.iter().map(String::as_str).collect();
        if self.opts.time_major && recurrent_layout(&op) == Some(1) {
            return add_time_major(g, np.name(), op, inputs, &outs, &self.reserved);
        }
        g.add_node(np.name(), op, &inputs, &outs)?;
        Ok(())
    }

    fn attr(
        &mut self,
        a: &proto::AttributeProto,
        at: &str,
        scopes: &[&Graph],
        depth: usize,
    ) -> Result<Attr> {
        use proto::attribute_proto::AttributeType as T;
        let ty = match T::try_from(a.r#type.unwrap_or(0)) {
            Ok(T::Undefined) | Err(_) => {
                guess_attr_type(a).ok_or_else(|| malformed(at, "attribute has no type"))?
            }
            Ok(t) => t,
        };
        Ok(match ty {
            T::Int => Attr::Int(a.i()),
            T::Float => Attr::Float(a.f()),
            T::String => Attr::String(
                String::from_utf8(a.s().to_vec())
                    .map_err(|_| malformed(at, "string is not UTF-8"))?,
            ),
            T::Ints => Attr::Ints(a.ints.clone()),
            T::Floats => Attr::Floats(a.floats.clone()),
            T::Strings => Attr::Strings(
                a.strings
                    .iter()
                    .map(|s| {
                        String::from_utf8(s.clone())
                            .map_err(|_| malformed(at, "string is not UTF-8"))
                    })
                    .collect::<Result<_>>()?,
            ),
            T::Tensor => {
                let t =
                    a.t.as_ref()
                        .ok_or_else(|| malformed(at, "TENSOR attribute has no tensor"))?;
                Attr::Tensor(self.tensor(t, at)?)
            }
            T::Graph => {
                let gp =
                    a.g.as_ref()
                        .ok_or_else(|| malformed(at, "GRAPH attribute has no graph"))?;
                Attr::Graph(Box::new(self.graph(gp, scopes, depth + 1)?))
            }
            T::Tensors => Attr::Tensors(
                a.tensors
                    .iter()
                    .enumerate()
                    .map(|(i, t)| self.tensor(t, &format!("{at} tensor {i}")))
                    .collect::<Result<_>>()?,
            ),
            T::Graphs => Attr::Graphs(
                a.graphs
                    .iter()
                    .map(|g| self.graph(g, scopes, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            T::TypeProto => {
                let tp =
                    a.tp.as_ref()
                        .ok_or_else(|| malformed(at, "TYPE_PROTO attribute has no type"))?;
                Attr::TypeProto(value_type(Some(tp)).map_err(|m| malformed(at, m))?)
            }
            T::TypeProtos => Attr::TypeProtos(
                a.type_protos
                    .iter()
                    .map(|tp| value_type(Some(tp)).map_err(|m| malformed(at, m)))
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(malformed(
                    at,
                    format!("attribute type {other:?} is not supported"),
                ))
            }
        })
    }

    fn tensor(&mut self, t: &proto::TensorProto, what: &str) -> Result<Tensor> {
        let tensor = tensor_from_proto(t, what, self.opts.base_dir.as_deref(), &self.opts.limits)?;
        let bytes = (tensor.len() * tensor.dtype().size_of()) as u64;
        self.total_bytes = self.total_bytes.saturating_add(bytes);
        if self.total_bytes > self.opts.limits.max_total_bytes {
            return Err(Error::Limit {
                what: format!(
                    "tensors total more than {} bytes (at {what})",
                    self.opts.limits.max_total_bytes
                ),
            });
        }
        Ok(tensor)
    }
}

fn guess_attr_type(a: &proto::AttributeProto) -> Option<proto::attribute_proto::AttributeType> {
    use proto::attribute_proto::AttributeType as T;
    if a.g.is_some() {
        Some(T::Graph)
    } else if a.t.is_some() {
        Some(T::Tensor)
    } else if a.s.is_some() {
        Some(T::String)
    } else if a.f.is_some() {
        Some(T::Float)
    } else if a.i.is_some() {
        Some(T::Int)
    } else if !a.floats.is_empty() {
        Some(T::Floats)
    } else if !a.ints.is_empty() {
        Some(T::Ints)
    } else if !a.strings.is_empty() {
        Some(T::Strings)
    } else if !a.tensors.is_empty() {
        Some(T::Tensors)
    } else if !a.graphs.is_empty() {
        Some(T::Graphs)
    } else if a.tp.is_some() {
        Some(T::TypeProto)
    } else if !a.type_protos.is_empty() {
        Some(T::TypeProtos)
    } else {
        None
    }
}

fn node_label(n: &proto::NodeProto) -> String {
    if !n.name().is_empty() {
        n.name().to_string()
    } else {
        n.output
            .iter()
            .find(|o| !o.is_empty())
            .cloned()
            .unwrap_or_else(|| n.op_type().to_string())
    }
}

/// Kahn's algorithm keeping the file order where dependencies allow; `Err` lists the
/// nodes on or behind a cycle.
fn stable_toposort(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut indeg: Vec<usize> = deps.iter().map(|d| d.len()).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            users[j].push(i);
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| indeg[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.push(std::cmp::Reverse(u));
            }
        }
    }
    if order.len() == n {
        Ok(order)
    } else {
        Err((0..n).filter(|&i| indeg[i] > 0).collect())
    }
}

/// Converts an ONNX `TypeProto` (absent = unknown).
pub(crate) fn value_type(t: Option<&proto::TypeProto>) -> std::result::Result<ValueType, String> {
    use proto::type_proto::Value as V;
    let Some(t) = t else {
        return Ok(ValueType::Unknown);
    };
    Ok(match &t.value {
        None => ValueType::Unknown,
        Some(V::TensorType(tt)) => {
            let code = tt.elem_type();
            let dtype = if code == 0 {
                None
            } else {
                Some(
                    DType::from_onnx_code(code)
                        .ok_or_else(|| format!("unsupported element type code {code}"))?,
                )
            };
            let shape =
                match &tt.shape {
                    None => None,
                    Some(s) => {
                        Some(
                            s.dim
                                .iter()
                                .map(|d| match &d.value {
                                    Some(
                                        proto::tensor_shape_proto::dimension::Value::DimValue(v),
                                    ) if *v >= 0 => Ok(Dim::Known(*v as u64)),
                                    Some(
                                        proto::tensor_shape_proto::dimension::Value::DimValue(v),
                                    ) => Err(format!("negative dimension {v}")),
                                    Some(
                                        proto::tensor_shape_proto::dimension::Value::DimParam(p),
                                    ) if !p.is_empty() => Ok(Dim::Sym(p.clone())),
                                    _ => Ok(Dim::Unknown),
                                })
                                .collect::<std::result::Result<Vec<_>, String>>()?,
                        )
                    }
                };
            ValueType::Tensor(TensorType { dtype, shape })
        }
        Some(V::SequenceType(s)) => {
            ValueType::Sequence(Box::new(value_type(s.elem_type.as_deref())?))
        }
        Some(V::OptionalType(o)) => {
            ValueType::Optional(Box::new(value_type(o.elem_type.as_deref())?))
        }
        Some(V::MapType(_)) => return Err("map types are not supported".into()),
        Some(V::SparseTensorType(_)) => return Err("sparse tensor types are not supported".into()),
        Some(V::OpaqueType(_)) => return Err("opaque types are not supported".into()),
    })
}

/// Reads a `TensorProto` (raw or typed fields, or external data inside `base_dir`),
/// checking sizes against `limits` before allocating. `what` names the tensor in errors.
pub fn tensor_from_proto(
    t: &proto::TensorProto,
    what: &str,
    base_dir: Option<&Path>,
    limits: &Limits,
) -> Result<Tensor> {
    let err = |msg: String| Error::Tensor {
        name: what.to_string(),
        msg,
    };
    let code = t.data_type();
    let dtype = DType::from_onnx_code(code)
        .ok_or_else(|| err(format!("unsupported data type code {code}")))?;
    if t.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut count: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d} in {:?}", t.dims)));
        }
        count = count.checked_mul(d as u64).ok_or_else(|| Error::Limit {
            what: format!("{what}: shape {:?} overflows", t.dims),
        })?;
        shape.push(usize::try_from(d).map_err(|_| err(format!("dimension {d} is too large")))?);
    }
    let bytes = count
        .checked_mul(dtype.size_of() as u64)
        .ok_or_else(|| Error::Limit {
            what: format!("{what}: shape {:?} overflows", t.dims),
        })?;
    if bytes > limits.max_tensor_bytes {
        return Err(Error::Limit {
            what: format!(
                "{what}: shape {:?} of {dtype} needs {bytes} bytes, more than the limit of {}",
                t.dims, limits.max_tensor_bytes
            ),
        });
    }
    let count = count as usize;
    if t.data_location() == proto::tensor_proto::DataLocation::External {
        let raw = read_external(t, what, base_dir, bytes)?;
        return Tensor::from_le_bytes(dtype, &shape, &raw).map_err(|e| err(e.to_string()));
    }
    if let Some(raw) = &t.raw_data {
        if !raw.is_empty() || count == 0 {
            return Tensor::from_le_bytes(dtype, &shape, raw).map_err(|e| err(e.to_string()));
        }
    }
    let mismatch = |got: usize, field: &str| {
        err(format!(
            "{field} holds {got} values, the shape {:?} needs {count}",
            t.dims
        ))
    };
    let from_f64 =
        |v: Vec<f64>| Tensor::from_f64_vec(dtype, &shape, &v).map_err(|e| err(e.to_string()));
    match dtype {
        DType::F32 => {
            if t.float_data.len() != count {
                return Err(mismatch(t.float_data.len(), "float_data"));
            }
            Ok(Tensor::F32(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), t.float_data.clone())
                    .map_err(|e| err(e.to_string()))?,
            ))
        }
        DType::F64 => {
            if t.double_data.len() != count {
                return Err(mismatch(t.double_data.len(), "double_data"));
            }
            from_f64(t.double_data.clone())
        }
        DType::I64 => {
            if t.int64_data.len() != count {
                return Err(mismatch(t.int64_data.len(), "int64_data"));
            }
            Ok(Tensor::I64(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), t.int64_data.clone())
                    .map_err(|e| err(e.to_string()))?,
            ))
        }
        DType::U32 | DType::U64 => {
            if t.uint64_data.len() != count {
                return Err(mismatch(t.uint64_data.len(), "uint64_data"));
            }
            let mut raw = Vec::with_capacity(bytes as usize);
            for &x in &t.uint64_data {
                if dtype == DType::U32 {
                    raw.extend_from_slice(&(x as u32).to_le_bytes());
                } else {
                    raw.extend_from_slice(&x.to_le_bytes());
                }
            }
            Tensor::from_le_bytes(dtype, &shape, &raw).map_err(|e| err(e.to_string()))
        }
        DType::F16 | DType::BF16 => {
            if t.int32_data.len() != count {
                return Err(mismatch(t.int32_data.len(), "int32_data"));
            }
            let raw: Vec<u8> = t
                .int32_data
                .iter()
                .flat_map(|&x| (x as u16).to_le_bytes())
                .collect();
            Tensor::from_le_bytes(dtype, &shape, &raw).map_err(|e| err(e.to_string()))
        }
        DType::I32 | DType::I16 | DType::I8 | DType::U16 | DType::U8 | DType::Bool => {
            if t.int32_data.len() != count {
                return Err(mismatch(t.int32_data.len(), "int32_data"));
            }
            from_f64(t.int32_data.iter().map(|&x| x as f64).collect())
        }
    }
}

fn read_external(
    t: &proto::TensorProto,
    what: &str,
    base_dir: Option<&Path>,
    want: u64,
) -> Result<Vec<u8>> {
    let err = |msg: String| Error::Tensor {
        name: what.to_string(),
        msg: format!("external data: {msg}"),
    };
    let base = base_dir.ok_or_else(|| {
        err("the model was not read from a folder, so external data cannot be located".into())
    })?;
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for kv in &t.external_data {
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => {
                offset = kv
                    .value()
                    .parse()
                    .map_err(|_| err(format!("offset {:?} is not a number", kv.value())))?
            }
            "length" => {
                length = Some(
                    kv.value()
                        .parse()
                        .map_err(|_| err(format!("length {:?} is not a number", kv.value())))?,
                )
            }
            "checksum" => {}
            other => return Err(err(format!("unknown key {other:?}"))),
        }
    }
    let location = location.ok_or_else(|| err("no location".into()))?;
    let rel = Path::new(&location);
    if location.is_empty() || rel.is_absolute() || location.contains('\0') {
        return Err(err(format!(
            "location {location:?} must be a relative path inside the model's folder"
        )));
    }
    for c in rel.components() {
        if !matches!(c, Component::Normal(_) | Component::CurDir) {
            return Err(err(format!(
                "location {location:?} leaves the model's folder"
            )));
        }
    }
    let base_canon = base
        .canonicalize()
        .map_err(|e| err(format!("model folder {}: {e}", base.display())))?;
    let path = base.join(rel);
    let canon = path
        .canonicalize()
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !canon.starts_with(&base_canon) {
        return Err(err(format!(
            "location {location:?} resolves to {}, outside the model's folder",
            canon.display()
        )));
    }
    if let Some(l) = length {
        if l != want {
            return Err(err(format!("length {l} but the shape needs {want} bytes")));
        }
    }
    let mut f =
        std::fs::File::open(&canon).map_err(|e| err(format!("{}: {e}", canon.display())))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let end = offset
        .checked_add(want)
        .ok_or_else(|| err("offset + length overflows".into()))?;
    if end > size {
        return Err(err(format!(
            "bytes {offset}..{end} lie past the end of {} ({size} bytes)",
            canon.display()
        )));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; want as usize];
    f.read_exact(&mut buf).map_err(|e| err(e.to_string()))?;
    Ok(buf)
}

/// What a stored value file (an ONNX node test's `input_N.pb` / `output_N.pb`) holds: the
/// files carry no tag, so the reader says which message to decode (the graph's declared
/// type of that input or output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredKind {
    /// A `TensorProto`.
    Tensor,
    /// A `SequenceProto` of tensors.
    Sequence,
    /// An `OptionalProto` of a tensor or a sequence.
    Optional,
}

/// A value decoded from a stored value file.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredValue {
    /// A tensor.
    Tensor(Tensor),
    /// A sequence of tensors.
    Sequence(Vec<Tensor>),
    /// An optional value: `None`, a tensor or a sequence.
    Optional(Option<Box<StoredValue>>),
}

/// Decodes a stored value file's bytes as `kind`; `what` names the file in errors. The
/// tensors are checked against `limits` as a model's initializers are. This is how the
/// ONNX conformance runner reads the node tests' data without a protobuf dependency of
/// its own.
pub fn decode_stored_value(
    bytes: &[u8],
    kind: StoredKind,
    what: &str,
    limits: &Limits,
) -> Result<StoredValue> {
    let bad = |e: prost::DecodeError| Error::Tensor {
        name: what.to_string(),
        msg: format!(
            "not a valid {kind:?} protobuf: {}",
            crate::error::short_decode_error(&e)
        ),
    };
    let tensor = |t: &proto::TensorProto| tensor_from_proto(t, what, None, limits);
    let seq = |s: &proto::SequenceProto| -> Result<Vec<Tensor>> {
        s.tensor_values.iter().map(tensor).collect()
    };
    Ok(match kind {
        StoredKind::Tensor => {
            StoredValue::Tensor(tensor(&proto::TensorProto::decode(bytes).map_err(bad)?)?)
        }
        StoredKind::Sequence => {
            StoredValue::Sequence(seq(&proto::SequenceProto::decode(bytes).map_err(bad)?)?)
        }
        StoredKind::Optional => {
            let o = proto::OptionalProto::decode(bytes).map_err(bad)?;
            StoredValue::Optional(match (&o.tensor_value, &o.sequence_value) {
                (Some(t), _) => Some(Box::new(StoredValue::Tensor(tensor(t)?))),
                (None, Some(s)) => Some(Box::new(StoredValue::Sequence(seq(s)?))),
                (None, None) => None,
            })
        }
    })
}
