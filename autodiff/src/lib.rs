//! Reverse-mode automatic differentiation over the cellgraph IR.
//!
//! [`grad`] is a graph-to-graph pass: it returns an ordinary IR graph (printable,
//! exportable, runnable on any backend) that computes the original outputs and the
//! gradient of a scalar loss with respect to chosen values. Each op's vector-Jacobian
//! product is a rule (`rules/`, one module per op family; [`differentiability`] says which ops have one), a pure function of the node and its output cotangents;
//! the pass sums fan-out and undoes broadcasting. A `Scan` is differentiated by a
//! backward `Scan` over its body's VJP: the forward Scan also emits the state at the start
//! of every step, and the backward one runs in the opposite direction, recomputing each
//! step from that state, carrying the state cotangents and accumulating the gradients of
//! the values the body reads from outside (the weights) in its carry.
//!
//! ```
//! use cellgraph_ir::{DType, Graph, Op, ValueType};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut g = Graph::new("square");
//! let x = g.add_input("x", ValueType::tensor(DType::F32, &[3]))?;
//! let y = g.add_node("", Op::Mul {}, &[Some(x), Some(x)], &["y"])?;
//! let y = cellgraph_ir::ValueRef { node: y, slot: 0 };
//! let s = g.add_node("", Op::ReduceSum { axes: None, keepdims: 0, noop_with_empty_axes: 0 },
//!                    &[Some(y)], &["loss"])?;
//! let loss = cellgraph_ir::ValueRef { node: s, slot: 0 };
//! g.set_outputs(vec![loss])?;
//! let dg = cellgraph_autodiff::grad(&g, loss, &[x])?;
//! assert_eq!(dg.outputs().len(), 2); // loss, dloss/dx (= 2x)
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod emit;
mod rules;

use cellgraph_ir::{DType, Graph, NodeId, NodeKind, Op, Tensor, ValueRef};
use emit::Emit;
use std::collections::{HashMap, HashSet};

/// Errors of the gradient pass; each names the op, node or value concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op on the path from the parameters to the loss has no VJP rule.
    #[error("no VJP rule for op {op} at node {node}")]
    NoRule {
        /// The op.
        op: String,
        /// The node (its name, or its first output's).
        node: String,
    },
    /// A rule cannot handle this use of its op.
    #[error("VJP of {op} at node {node}: {why}")]
    Unsupported {
        /// The op.
        op: String,
        /// The node.
        node: String,
        /// What is not supported.
        why: String,
    },
    /// A rule needs a static shape the graph does not know.
    #[error("value {value}: {why} (its shape is not fully known)")]
    Shape {
        /// The value.
        value: String,
        /// Why the shape is needed.
        why: String,
    },
    /// The loss or a parameter is not usable.
    #[error("{0}")]
    Usage(String),
    /// The IR rejected a generated node.
    #[error(transparent)]
    Ir(#[from] cellgraph_ir::Error),
    /// A bug in the pass.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns a graph computing `graph`'s outputs followed by `d loss / d w` for each `w`
/// in `wrt` (same shape as `w`; zeros where the loss does not depend on it). `loss` must
/// be a float value with one element; `wrt` are float values of `graph` (inputs,
/// initializers or op outputs).
pub fn grad(graph: &Graph, loss: ValueRef, wrt: &[ValueRef]) -> Result<Graph> {
    let lv = graph
        .value_opt(loss)
        .ok_or_else(|| Error::Usage("the loss is not a value of the graph".into()))?;
    if !lv.ty.dtype().is_some_and(DType::is_float) {
        return Err(Error::Usage(format!(
            "the loss {} is not a float value",
            lv.name
        )));
    }
    for &w in wrt {
        let v = graph
            .value_opt(w)
            .ok_or_else(|| Error::Usage("a parameter is not a value of the graph".into()))?;
        if !v.ty.dtype().is_some_and(DType::is_float) {
            return Err(Error::Usage(format!(
                "cannot differentiate with respect to {}: not a float value",
                v.name
            )));
        }
    }
    let mut dst = Graph::with_opsets(graph.name.clone(), graph.opsets().clone());
    dst.doc = graph.doc.clone();
    let active = active_nodes(graph, &[loss], wrt);
    let (map, residuals) = copy_graph(graph, &mut dst, &active, None)?;
    let seed = {
        let mut e = Emit::new(&mut dst, "grad");
        let l = map[&loss];
        let shape = e.static_shape(l, "the loss")?;
        if shape.iter().product::<usize>() != 1 {
            return Err(Error::Usage(format!(
                "the loss must have one element, it has shape {shape:?}"
            )));
        }
        let dt = e.dtype(l);
        let t =
            Tensor::from_f64_vec(dt, &shape, &[1.0]).map_err(|e| Error::Internal(e.to_string()))?;
        e.constant(t)?
    };
    let cots = backprop(
        &mut dst,
        graph,
        &map,
        &residuals,
        &active,
        vec![(loss, seed)],
        wrt,
    )?;
    let mut outs: Vec<ValueRef> = graph.outputs().iter().map(|v| map[v]).collect();
    for (&w, c) in wrt.iter().zip(cots) {
        let c = match c {
            Some(c) => c,
            None => {
                let mut e = Emit::new(&mut dst, "grad");
                e.zeros_like(map[&w], "a gradient that is zero")?
            }
        };
        let name = format!("grad/{}", graph.value(w).name);
        let id = if dst.find(&name).is_none() {
            dst.add_node("", Op::Identity {}, &[Some(c)], &[&name])?
        } else {
            let mut e = Emit::new(&mut dst, &name);
            e.op(Op::Identity {}, &[c], "grad")?.node
        };
        outs.push(ValueRef { node: id, slot: 0 });
    }
    dst.set_outputs(outs)?;
    Ok(dst)
}

/// The values a node's nested bodies read from the graph that holds it, by name.
pub fn implicit_reads(graph: &Graph, node: NodeId) -> Vec<ValueRef> {
    let Some(op) = graph.node(node).op() else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for (_, body) in op.subgraphs() {
        outer_names(body, &mut names);
    }
    names.sort();
    names.dedup();
    names.iter().filter_map(|n| graph.find(n)).collect()
}

fn outer_names(body: &Graph, out: &mut Vec<String>) {
    for &n in body.outers() {
        out.push(body.node(n).outputs[0].name.clone());
    }
    for id in body.node_ids() {
        if let Some(op) = body.node(id).op() {
            for (_, b) in op.subgraphs() {
                let mut inner = Vec::new();
                outer_names(b, &mut inner);
                // Names the body defines itself are not reads from outside.
                out.extend(inner.into_iter().filter(|n| {
                    body.find(n)
                        .is_none_or(|v| matches!(body.node(v.node).kind, NodeKind::Outer))
                }));
            }
        }
    }
}

/// Every input of a node: its edges and its bodies' reads from outside.
fn all_inputs(graph: &Graph, node: NodeId) -> Vec<ValueRef> {
    let mut v: Vec<ValueRef> = graph.node_inputs(node).into_iter().flatten().collect();
    v.extend(implicit_reads(graph, node));
    v
}

/// Op nodes on a path from a `wrt` value to a `loss` value.
fn active_nodes(graph: &Graph, loss: &[ValueRef], wrt: &[ValueRef]) -> HashSet<NodeId> {
    let order = graph.topo_order().unwrap_or_default();
    let mut fwd: HashSet<NodeId> = wrt.iter().map(|v| v.node).collect();
    for &n in &order {
        if all_inputs(graph, n).iter().any(|v| fwd.contains(&v.node)) {
            fwd.insert(n);
        }
    }
    let mut bwd: HashSet<NodeId> = loss.iter().map(|v| v.node).collect();
    for &n in order.iter().rev() {
        if bwd.contains(&n) {
            for v in all_inputs(graph, n) {
                bwd.insert(v.node);
            }
        }
    }
    order
        .into_iter()
        .filter(|n| fwd.contains(n) && bwd.contains(n))
        .collect()
}

/// Copies `src` into `dst` (same opsets). Its inputs become inputs of `dst`, or the
/// given `dst` values. Active `Scan`s are augmented to also emit, per step, the states
/// the step started from; those extra outputs are returned per Scan node.
#[allow(clippy::type_complexity)]
fn copy_graph(
    src: &Graph,
    dst: &mut Graph,
    active: &HashSet<NodeId>,
    inputs: Option<&[ValueRef]>,
) -> Result<(HashMap<ValueRef, ValueRef>, HashMap<NodeId, Vec<ValueRef>>)> {
    let mut map = src
        .copy_sources_into(dst, inputs, &cellgraph_ir::ValueType::clone, &|t| {
            Ok(t.clone())
        })
        .map_err(|e| Error::Internal(format!("copying the graph's sources: {e}")))?;
    let order = src
        .topo_order()
        .map_err(|_| Error::Usage(format!("graph {:?} has a cycle", src.name)))?;
    let mut residuals = HashMap::new();
    for n in order {
        let node = src.node(n);
        let Some(op) = node.op() else { continue };
        let ins: Vec<Option<ValueRef>> = src
            .node_inputs(n)
            .iter()
            .map(|v| v.map(|v| map[&v]))
            .collect();
        let names: Vec<String> = node.outputs.iter().map(|v| v.name.clone()).collect();
        let (op, extra) = match op {
            Op::Scan { .. } if active.contains(&n) => rules::augment_scan(op, &ins, src, n)?,
            Op::Loop { .. } if active.contains(&n) => rules::augment_loop(op, &ins)?,
            _ => (op.clone(), 0),
        };
        let mut all_names = names.clone();
        for k in 0..extra {
            let mut name = format!("{}/residual_state_{k}", node.display_name());
            let mut i = 0;
            while dst.find(&name).is_some() || src.find(&name).is_some() {
                i += 1;
                name = format!("{}/residual_state_{k}_{i}", node.display_name());
            }
            all_names.push(name);
        }
        let refs: Vec<&str> = all_names.iter().map(String::as_str).collect();
        let id = dst.add_node(&node.name, op, &ins, &refs)?;
        for (s, v) in node.outputs.iter().enumerate() {
            let nv = ValueRef { node: id, slot: s };
            if v.declared {
                dst.declare_type(nv, &v.ty)?;
            }
            map.insert(ValueRef { node: n, slot: s }, nv);
        }
        if extra > 0 {
            residuals.insert(
                n,
                (names.len()..names.len() + extra)
                    .map(|slot| ValueRef { node: id, slot })
                    .collect(),
            );
        }
    }
    Ok((map, residuals))
}

/// Propagates cotangents backwards through the active nodes of `src` (already copied
/// into `dst` by `map`), starting from `seeds`; returns the cotangent of each `wanted`
/// value (`None` when nothing flows there).
fn backprop(
    dst: &mut Graph,
    src: &Graph,
    map: &HashMap<ValueRef, ValueRef>,
    residuals: &HashMap<NodeId, Vec<ValueRef>>,
    active: &HashSet<NodeId>,
    seeds: Vec<(ValueRef, ValueRef)>,
    wanted: &[ValueRef],
) -> Result<Vec<Option<ValueRef>>> {
    let mut cot: HashMap<ValueRef, ValueRef> = HashMap::new();
    let mut e = Emit::new(dst, "grad");
    for (v, c) in seeds {
        accumulate(&mut e, &mut cot, v, c)?;
    }
    let order = src
        .topo_order()
        .map_err(|_| Error::Usage(format!("graph {:?} has a cycle", src.name)))?;
    let wanted_nodes: HashSet<NodeId> = wanted.iter().map(|v| v.node).collect();
    let relevant = |v: &Option<ValueRef>| {
        v.is_some_and(|v| active.contains(&v.node) || wanted_nodes.contains(&v.node))
    };
    for &n in order.iter().rev() {
        if !active.contains(&n) {
            continue;
        }
        let node = src.node(n);
        let Some(op) = node.op() else { continue };
        let outs: Vec<Option<ValueRef>> = (0..node.outputs.len())
            .map(|s| cot.get(&ValueRef { node: n, slot: s }).copied())
            .collect();
        if outs.iter().all(Option::is_none) {
            continue;
        }
        let ins_src = src.node_inputs(n);
        let ins: Vec<Option<ValueRef>> = ins_src.iter().map(|v| v.map(|v| map[&v])).collect();
        let outv: Vec<ValueRef> = (0..node.outputs.len())
            .map(|s| map[&ValueRef { node: n, slot: s }])
            .collect();
        let need: Vec<bool> = ins_src.iter().map(relevant).collect();
        let cx = rules::NodeCx {
            op,
            name: node.display_name(),
            ins: &ins,
            outs: &outv,
            cots: &outs,
            need: &need,
            residuals: residuals.get(&n).map(Vec::as_slice).unwrap_or(&[]),
            src,
            node: n,
        };
        let grads = rules::vjp(&mut e, &cx)?;
        for (slot, g) in grads.inputs.into_iter().enumerate() {
            if let (Some(g), Some(Some(v))) = (g, ins_src.get(slot)) {
                accumulate(&mut e, &mut cot, *v, g)?;
            }
        }
        for (name, g) in grads.outer {
            if let Some(v) = src.find(&name) {
                accumulate(&mut e, &mut cot, v, g)?;
            }
        }
    }
    Ok(wanted.iter().map(|w| cot.get(w).copied()).collect())
}

fn accumulate(
    e: &mut Emit,
    cot: &mut HashMap<ValueRef, ValueRef>,
    v: ValueRef,
    g: ValueRef,
) -> Result<()> {
    let new = match cot.get(&v) {
        Some(&old) => e.add(old, g)?,
        None => g,
    };
    cot.insert(v, new);
    Ok(())
}

/// The body of the backward `Scan` for a forward Scan body with `n` states:
/// inputs `[dS (n), dW (one per float outer value), s_t (n), x_t..., dy_t...]`, outputs
/// `[dS_prev (n), dW + dW_t, dx_t...]`; it recomputes the step from `(s_t, x_t)` and
/// runs its VJP. Returns the graph and the outer names of the `dW` carries, in order.
pub(crate) fn scan_body_vjp(body: &Graph, n: usize) -> Result<(Graph, Vec<String>)> {
    let mut dst = Graph::with_opsets(format!("{}_grad", body.name), body.opsets().clone());
    let outs = body.outputs().to_vec();
    let body_inputs = body.input_values();
    if outs.len() < n || body_inputs.len() < n {
        return Err(Error::Internal(
            "a Scan body with fewer states than declared".into(),
        ));
    }
    let float_outers: Vec<ValueRef> = body
        .outers()
        .iter()
        .map(|&o| ValueRef { node: o, slot: 0 })
        .filter(|&v| body.value(v).ty.dtype().is_some_and(DType::is_float))
        .collect();
    let mut ds = Vec::new();
    for (k, &o) in outs[..n].iter().enumerate() {
        ds.push(dst.add_input(&format!("bwd/dstate_{k}"), body.value(o).ty.clone())?);
    }
    let mut dw = Vec::new();
    for (k, &w) in float_outers.iter().enumerate() {
        dw.push(dst.add_input(&format!("bwd/dw_{k}"), body.value(w).ty.clone())?);
    }
    let mut given = Vec::new();
    for (k, &v) in body_inputs.iter().enumerate() {
        given.push(dst.add_input(&format!("bwd/in_{k}"), body.value(v).ty.clone())?);
    }
    let mut dy = Vec::new();
    for (k, &o) in outs[n..].iter().enumerate() {
        dy.push(dst.add_input(&format!("bwd/dy_{k}"), body.value(o).ty.clone())?);
    }
    let mut wrt = body_inputs.clone();
    wrt.extend(float_outers.iter().copied());
    let active = active_nodes(body, &outs, &wrt);
    let (map, residuals) = copy_graph(body, &mut dst, &active, Some(&given))?;
    let seeds: Vec<(ValueRef, ValueRef)> = outs
        .iter()
        .copied()
        .zip(ds.iter().chain(&dy).copied())
        .collect();
    let cots = backprop(&mut dst, body, &map, &residuals, &active, seeds, &wrt)?;
    let mut e = Emit::new(&mut dst, "bwd_out");
    let cot_or_zero = |e: &mut Emit, w: ValueRef, c: Option<ValueRef>| -> Result<ValueRef> {
        match c {
            Some(c) => Ok(c),
            None => e.zeros_like(map[&w], "a body gradient that is zero"),
        }
    };
    let mut results = Vec::new();
    // dS_prev: the cotangents of the state inputs.
    for k in 0..n {
        let c = cot_or_zero(&mut e, wrt[k], cots[k])?;
        results.push(e.op(Op::Identity {}, &[c], "dstate")?);
    }
    // dW carries: accumulated.
    let nin = body_inputs.len();
    for (k, acc) in dw.iter().enumerate() {
        let r = match cots[nin + k] {
            Some(c) => e.add(*acc, c)?,
            None => e.op(Op::Identity {}, &[*acc], "dw")?,
        };
        results.push(r);
    }
    // dx_t: the cotangents of the scanned inputs.
    for k in n..nin {
        let c = cot_or_zero(&mut e, wrt[k], cots[k])?;
        results.push(e.op(Op::Identity {}, &[c], "dx")?);
    }
    dst.set_outputs(results)?;
    let names = float_outers
        .iter()
        .map(|&v| body.value(v).name.clone())
        .collect();
    Ok((dst, names))
}

/// The VJP of a branch graph of `If` (no inputs; it reads values from outside by
/// name). The returned graph reads the same values plus the cotangents of the branch's
/// outputs (`cots`: the names of those values in the enclosing graph, `None` where no
/// cotangent flows) and outputs the cotangent of each name in `wrt` (zeros of the type
/// given where the branch does not depend on it).
pub(crate) fn branch_vjp(
    branch: &Graph,
    cots: &[Option<(String, cellgraph_ir::ValueType)>],
    wrt: &[(String, cellgraph_ir::ValueType)],
) -> Result<Graph> {
    let mut dst = Graph::with_opsets(format!("{}_grad", branch.name), branch.opsets().clone());
    let outs = branch.outputs().to_vec();
    let mut seeds_dst = Vec::new();
    for c in cots {
        seeds_dst.push(match c {
            Some((name, ty)) => Some(dst.add_outer(name, ty.clone())?),
            None => None,
        });
    }
    let float_outers: Vec<ValueRef> = branch
        .outers()
        .iter()
        .map(|&o| ValueRef { node: o, slot: 0 })
        .filter(|&v| branch.value(v).ty.dtype().is_some_and(DType::is_float))
        .collect();
    let active = active_nodes(branch, &outs, &float_outers);
    let (map, residuals) = copy_graph(branch, &mut dst, &active, Some(&[]))?;
    let seeds: Vec<(ValueRef, ValueRef)> = outs
        .iter()
        .zip(&seeds_dst)
        .filter_map(|(&o, s)| s.map(|s| (o, s)))
        .collect();
    let cots_out = backprop(
        &mut dst,
        branch,
        &map,
        &residuals,
        &active,
        seeds,
        &float_outers,
    )?;
    let mut results = Vec::new();
    for (name, ty) in wrt {
        let found = float_outers
            .iter()
            .position(|&v| &branch.value(v).name == name)
            .and_then(|k| cots_out[k]);
        let mut e = Emit::new(&mut dst, "branch_grad");
        let v = match found {
            Some(c) => c,
            None => {
                let shape: Option<Vec<usize>> = ty
                    .dims()
                    .and_then(|d| d.iter().map(|x| x.known().map(|n| n as usize)).collect());
                let shape = shape.ok_or_else(|| Error::Shape {
                    value: name.clone(),
                    why: "a zero gradient in an If branch".into(),
                })?;
                e.zeros(ty.dtype().unwrap_or(DType::F32), &shape)?
            }
        };
        results.push(e.op(Op::Identity {}, &[v], "d")?);
    }
    dst.set_outputs(results)?;
    Ok(dst)
}

/// The body of the backward `Scan` for a forward `Loop` body with `n` carried values:
/// inputs `[dv (n), dW..., v_t (n), iter_t, dscan_t...]`, outputs `[dv_prev (n),
/// dW + dW_t]`. The step is recomputed with the iteration number and a true condition
/// (every recorded iteration ran). Returns the graph and the outer names of the carries.
pub(crate) fn loop_body_vjp(body: &Graph, n: usize) -> Result<(Graph, Vec<String>)> {
    let mut dst = Graph::with_opsets(format!("{}_grad", body.name), body.opsets().clone());
    let outs = body.outputs().to_vec();
    let ins = body.input_values();
    if ins.len() != n + 2 || outs.len() < n + 1 {
        return Err(Error::Internal("a Loop body of unexpected arity".into()));
    }
    let float_outers: Vec<ValueRef> = body
        .outers()
        .iter()
        .map(|&o| ValueRef { node: o, slot: 0 })
        .filter(|&v| body.value(v).ty.dtype().is_some_and(DType::is_float))
        .collect();
    let mut dv = Vec::new();
    for (k, &o) in outs[1..=n].iter().enumerate() {
        dv.push(dst.add_input(&format!("bwd/dv_{k}"), body.value(o).ty.clone())?);
    }
    let mut dw = Vec::new();
    for (k, &w) in float_outers.iter().enumerate() {
        dw.push(dst.add_input(&format!("bwd/dw_{k}"), body.value(w).ty.clone())?);
    }
    let mut vt = Vec::new();
    for (k, &v) in ins[2..].iter().enumerate() {
        vt.push(dst.add_input(&format!("bwd/v_{k}"), body.value(v).ty.clone())?);
    }
    let it = dst.add_input("bwd/iter", body.value(ins[0]).ty.clone())?;
    let mut dy = Vec::new();
    for (k, &o) in outs[n + 1..].iter().enumerate() {
        dy.push(dst.add_input(&format!("bwd/dy_{k}"), body.value(o).ty.clone())?);
    }
    let cond = {
        let mut e = Emit::new(&mut dst, "bwd");
        e.constant(Tensor::Bool(ndarray::ArrayD::from_elem(
            ndarray::IxDyn(&[]),
            true,
        )))?
    };
    let mut given = vec![it, cond];
    given.extend(vt.iter().copied());
    let mut wrt: Vec<ValueRef> = ins[2..].to_vec();
    wrt.extend(float_outers.iter().copied());
    let active = active_nodes(body, &outs, &wrt);
    let (map, residuals) = copy_graph(body, &mut dst, &active, Some(&given))?;
    let seeds: Vec<(ValueRef, ValueRef)> = outs[1..]
        .iter()
        .copied()
        .zip(dv.iter().chain(&dy).copied())
        .collect();
    let cots = backprop(&mut dst, body, &map, &residuals, &active, seeds, &wrt)?;
    let mut e = Emit::new(&mut dst, "bwd_out");
    let mut results = Vec::new();
    for k in 0..n {
        let c = match cots[k] {
            Some(c) => c,
            None => e.zeros_like(map[&wrt[k]], "a Loop carry gradient that is zero")?,
        };
        results.push(e.op(Op::Identity {}, &[c], "dv")?);
    }
    for (k, acc) in dw.iter().enumerate() {
        results.push(match cots[n + k] {
            Some(c) => e.add(*acc, c)?,
            None => e.op(Op::Identity {}, &[*acc], "dw")?,
        });
    }
    dst.set_outputs(results)?;
    let names = float_outers
        .iter()
        .map(|&v| body.value(v).name.clone())
        .collect();
    Ok((dst, names))
}

pub use cellgraph_ir::ops::Differentiability;

/// How the pass treats the op `kind`.
pub fn differentiability(kind: cellgraph_ir::OpKind) -> Differentiability {
    kind.info().vjp
}

/// Ops whose outputs carry no gradient (integer, boolean and shape results, constants).
pub fn is_non_differentiable(op: &Op) -> bool {
    op.kind().info().vjp == Differentiability::NonDifferentiable
}
