//! The verifier: structural and type rules every graph must satisfy. Errors name the
//! graph, the node, the op and the rule.

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, NodeKind};
use crate::types::ValueType;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::HashMap;

/// Checks `g` and its nested graphs. Outer values of nested graphs must name values of
/// an enclosing graph.
pub fn verify(g: &Graph) -> Result<()> {
    verify_scoped(g, &[])
}

fn fail(g: &Graph, n: NodeId, rule: String) -> Error {
    let node = g.node(n);
    Error::Verify {
        graph: g.name.clone(),
        node: node.display_name(),
        op: node.kind_name().to_string(),
        rule,
    }
}

fn verify_scoped(g: &Graph, scopes: &[&HashMap<String, ValueType>]) -> Result<()> {
    let pg = g.petgraph();
    // Edges: slots in range, one producer per input slot.
    for n in g.node_ids() {
        let node = g.node(n);
        let mut seen = vec![false; node.num_inputs];
        for e in pg.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            let src = g.node(e.source());
            if w.src_slot >= src.outputs.len() {
                return Err(fail(
                    g,
                    n,
                    format!(
                        "edge from {:?} reads output slot {} of {}",
                        src.display_name(),
                        w.src_slot,
                        src.outputs.len()
                    ),
                ));
            }
            if src.outputs[w.src_slot].name.is_empty() {
                return Err(fail(
                    g,
                    n,
                    format!("reads an omitted output of {:?}", src.display_name()),
                ));
            }
            match seen.get_mut(w.dst_slot) {
                None => {
                    return Err(fail(
                        g,
                        n,
                        format!(
                            "edge into input slot {} of {} (dangling edge)",
                            w.dst_slot, node.num_inputs
                        ),
                    ))
                }
                Some(s) if *s => {
                    return Err(fail(
                        g,
                        n,
                        format!("input slot {} has two producers", w.dst_slot),
                    ))
                }
                Some(s) => *s = true,
            }
        }
        if !matches!(node.kind, NodeKind::Op(_)) && node.num_inputs != 0 {
            return Err(fail(g, n, "a source node has inputs".into()));
        }
    }
    // Acyclic.
    if let Err(left) = g.topo_order() {
        return Err(Error::Cycle {
            graph: g.name.clone(),
            nodes: left.iter().map(|&n| g.node(n).display_name()).collect(),
        });
    }
    // Unique names.
    let mut names: HashMap<&str, NodeId> = HashMap::new();
    for n in g.node_ids() {
        for v in &g.node(n).outputs {
            if !v.name.is_empty() && names.insert(&v.name, n).is_some() {
                return Err(Error::DuplicateName {
                    graph: g.name.clone(),
                    name: v.name.clone(),
                });
            }
        }
    }
    // Outer values resolve in an enclosing scope with a compatible type.
    for &n in g.outers() {
        let v = &g.node(n).outputs[0];
        let found = scopes.iter().rev().find_map(|s| s.get(&v.name));
        match found {
            None if !scopes.is_empty() => {
                return Err(fail(
                    g,
                    n,
                    format!(
                        "outer value {:?} is not defined in an enclosing graph",
                        v.name
                    ),
                ))
            }
            Some(t) => {
                t.merge(&v.ty).map_err(|e| {
                    fail(
                        g,
                        n,
                        format!(
                            "outer value {:?} has type {t} outside, {} inside: {e}",
                            v.name, v.ty
                        ),
                    )
                })?;
            }
            None => {}
        }
    }
    // Ops: arity, inputs present where required, types agree with the rule.
    for n in g.node_ids() {
        let node = g.node(n);
        let NodeKind::Op(op) = &node.kind else {
            continue;
        };
        let info = op.kind().info();
        if node.num_inputs < info.inputs.0 || node.num_inputs > info.inputs.1 {
            return Err(fail(
                g,
                n,
                format!(
                    "wrong arity: {} inputs, the op takes {}..={}",
                    node.num_inputs, info.inputs.0, info.inputs.1
                ),
            ));
        }
        if node.outputs.len() < info.outputs.0 || node.outputs.len() > info.outputs.1 {
            return Err(fail(
                g,
                n,
                format!("wrong arity: {} outputs", node.outputs.len()),
            ));
        }
        let inputs = g.node_inputs(n);
        let inferred = g
            .infer_types(op, &inputs, node.outputs.len())
            .map_err(|e| fail(g, n, format!("type rule: {e}")))?;
        for (v, t) in node.outputs.iter().zip(&inferred) {
            v.ty.merge(t).map_err(|e| {
                fail(
                    g,
                    n,
                    format!(
                        "output {:?} has type {} but the rule gives {t}: {e}",
                        v.name, v.ty
                    ),
                )
            })?;
        }
        // Nested graphs see this graph's values.
        let subs = op.subgraphs();
        if !subs.is_empty() {
            let mut here: HashMap<String, ValueType> = HashMap::new();
            for m in g.node_ids() {
                for v in &g.node(m).outputs {
                    if !v.name.is_empty() {
                        here.insert(v.name.clone(), v.ty.clone());
                    }
                }
            }
            let mut chain: Vec<&HashMap<String, ValueType>> = scopes.to_vec();
            chain.push(&here);
            for (_, body) in subs {
                verify_scoped(body, &chain)?;
            }
        }
    }
    // Graph outputs exist and are not omitted outputs.
    for (i, &v) in g.outputs().iter().enumerate() {
        match g.value_opt(v) {
            Some(val) if !val.name.is_empty() => {}
            found => {
                let name = match found {
                    Some(_) => format!("the omitted output {} of node #{}", v.slot, v.node.index()),
                    None => format!(
                        "output {} of node #{} (the graph has {} nodes)",
                        v.slot,
                        v.node.index(),
                        g.node_ids().len()
                    ),
                };
                return Err(Error::Dangling {
                    graph: g.name.clone(),
                    name,
                    user: format!("graph output {i}"),
                });
            }
        }
    }
    Ok(())
}
