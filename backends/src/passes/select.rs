//! The backend selector: raise recurrent loops into fused ops, then place each fused op
//! as placement places any node — on the first backend of the list whose
//! [`Device::supports`] accepts it with its input types — or, when no backend runs it,
//! lower it back to its loop (whose nodes are then placed one by one), recording why
//! for every recurrent node. The fused/loop choice is one case of placement: the loop is
//! the fallback of a fused op every backend refuses.

use crate::device::Device;
use crate::error::Result;
use crate::passes::lower::lower_where;
use crate::passes::raise::{is_fused_recurrent, raise_recurrent};
use cellgraph_ir::{Graph, NodeId, Op, ValueType};
use std::fmt;
use std::sync::Arc;

/// Where one recurrent node runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the backend's fused kernel.
    Fused {
        /// The backend (`cpu`, `cuda`).
        backend: &'static str,
    },
    /// As a `Scan` loop over the cell's primitive ops.
    Loop {
        /// Why.
        reason: String,
    },
}

/// The selector's decision for one recurrent node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The node (a `Scan` or a recurrent op), `outer/inner` inside nested graphs.
    pub node: String,
    /// The fused op (`LSTM`, `GRUMasked`, ...), or `Scan` for a loop no rule raised.
    pub op: String,
    /// The raise rule that produced the op, if it came from a loop.
    pub rule: Option<&'static str>,
    /// Where it runs.
    pub placement: Placement,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.node)?;
        match &self.placement {
            Placement::Fused { backend } => {
                write!(f, "{} → fused {backend}", self.op)?;
                match self.rule {
                    Some("bidirectional") => {
                        write!(f, " (a forward/reverse pair merged by rule bidirectional)")?
                    }
                    Some(r) => write!(f, " (raised from a Scan by rule {r})")?,
                    None => {}
                }
                Ok(())
            }
            Placement::Loop { reason } => write!(f, "loop: {reason}"),
        }
    }
}

/// A graph ready for a backend, and the choices that made it.
#[derive(Clone, Debug)]
pub struct Selected {
    /// The graph: fused ops where the backend runs them, loops elsewhere.
    pub graph: Graph,
    /// One choice per recurrent node: the loops no rule raised, then the fused ops in
    /// graph order.
    pub choices: Vec<Choice>,
}

impl Selected {
    /// Whether every recurrent node runs fused.
    pub fn all_fused(&self) -> bool {
        self.choices
            .iter()
            .all(|c| matches!(c.placement, Placement::Fused { .. }))
    }
}

/// Raises recurrent loops (when `raise`), places every fused recurrent op on the first
/// backend of `devices` that runs it, and lowers those no backend runs to loops.
pub fn select(devices: &[Arc<dyn Device>], graph: &Graph, raise: bool) -> Result<Selected> {
    let mut choices = Vec::new();
    let mut rules = std::collections::HashMap::new();
    let graph = if raise {
        let raised = raise_recurrent(graph)?;
        for d in raised.decisions {
            match d.rule {
                Some(rule) => {
                    rules.insert(d.node, rule);
                }
                None => choices.push(Choice {
                    node: d.node,
                    op: "Scan".into(),
                    rule: None,
                    placement: Placement::Loop { reason: d.detail },
                }),
            }
        }
        raised.graph
    } else {
        list_scans(graph, &mut choices);
        graph.clone()
    };
    collect(devices, &graph, &rules, &mut choices);
    let graph = lower_refused(devices, &graph)?;
    Ok(Selected { graph, choices })
}

/// The first backend of `devices` that runs the fused recurrent node `n` of `g` with its
/// input types, or every backend's reason (`cpu: why; cuda: why`).
pub fn fused_on(
    devices: &[Arc<dyn Device>],
    g: &Graph,
    n: NodeId,
) -> std::result::Result<&'static str, String> {
    let Some(op) = g.node(n).op() else {
        return Err("not an op node".into());
    };
    let ins = g.node_inputs(n);
    let types: Vec<Option<&ValueType>> = ins.iter().map(|v| v.map(|v| &g.value(v).ty)).collect();
    let mut why = Vec::new();
    for d in devices {
        match d.supports(op, &types) {
            Ok(()) => return Ok(d.name()),
            Err(r) => why.push(format!("{}: {r}", d.name())),
        }
    }
    if why.is_empty() {
        why.push("no backend in the list".into());
    }
    Err(why.join("; "))
}

/// Lowers to loops the fused recurrent ops (also in nested bodies) that no backend of
/// `devices` runs; a placed plan does this before placing the nodes.
pub fn lower_refused(devices: &[Arc<dyn Device>], graph: &Graph) -> Result<Graph> {
    lower_where(graph, &|g, n, _| fused_on(devices, g, n).is_err())
}

/// Calls `f(name, graph, node, op)` for every op node of `g` and its nested graphs, in
/// order; names inside nested graphs are `path/body/node`.
fn walk(g: &Graph, path: &str, f: &mut dyn FnMut(String, &Graph, NodeId, &Op)) {
    let Ok(order) = g.topo_order() else { return };
    let within = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}/{name}")
        }
    };
    for n in order {
        let node = g.node(n);
        let Some(op) = node.op() else { continue };
        f(within(&node.display_name()), g, n, op);
        for (_, body) in op.subgraphs() {
            walk(body, &within(&body.name), f);
        }
    }
}

/// Without raising, every `Scan` stays a loop.
fn list_scans(g: &Graph, out: &mut Vec<Choice>) {
    walk(g, "", &mut |node, _, _, op| {
        if let Op::Scan { .. } = op {
            out.push(Choice {
                node,
                op: "Scan".into(),
                rule: None,
                placement: Placement::Loop {
                    reason: "raising is off (the loop path was asked for)".into(),
                },
            });
        }
    });
}

/// One choice per fused recurrent op: the backend that runs it, or a loop and why.
fn collect(
    devices: &[Arc<dyn Device>],
    g: &Graph,
    rules: &std::collections::HashMap<String, &'static str>,
    out: &mut Vec<Choice>,
) {
    walk(g, "", &mut |node, body, n, op| {
        if !is_fused_recurrent(op) {
            return;
        }
        let placement = match fused_on(devices, body, n) {
            Ok(backend) => Placement::Fused { backend },
            Err(reason) => Placement::Loop { reason },
        };
        out.push(Choice {
            rule: rules.get(&node).copied(),
            node,
            op: op.name().to_string(),
            placement,
        });
    });
}
