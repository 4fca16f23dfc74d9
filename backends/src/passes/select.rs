//! The backend selector: raise recurrent loops into fused ops, then keep each fused op
//! on the backend's fused kernel when the backend supports its configuration, or lower
//! it back to a loop, recording why for every recurrent node.

use crate::error::Result;
use crate::passes::lower::lower_where;
use crate::passes::raise::{is_fused_recurrent, raise_recurrent};
use crate::Backend;
use cellgraph_ir::{Graph, Op};
use std::fmt;

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

/// Raises recurrent loops (when `raise`), asks `backend` about every fused recurrent op,
/// and lowers those it refuses to loops.
pub fn select<B: Backend + ?Sized>(backend: &B, graph: &Graph, raise: bool) -> Result<Selected> {
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
    collect(backend, &graph, &rules, &mut choices);
    let graph = lower_where(&graph, &|op| backend.fused_recurrent(op).is_err())?;
    Ok(Selected { graph, choices })
}

/// Calls `f(name, op)` for every op node of `g` and its nested graphs, in order; names
/// inside nested graphs are `path/body/node`.
fn walk(g: &Graph, path: &str, f: &mut dyn FnMut(String, &Op)) {
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
        f(within(&node.display_name()), op);
        for (_, body) in op.subgraphs() {
            walk(body, &within(&body.name), f);
        }
    }
}

/// Without raising, every `Scan` stays a loop.
fn list_scans(g: &Graph, out: &mut Vec<Choice>) {
    walk(g, "", &mut |node, op| {
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

/// One choice per fused recurrent op: the backend's kernel or a loop, and why.
fn collect<B: Backend + ?Sized>(
    backend: &B,
    g: &Graph,
    rules: &std::collections::HashMap<String, &'static str>,
    out: &mut Vec<Choice>,
) {
    walk(g, "", &mut |node, op| {
        if !is_fused_recurrent(op) {
            return;
        }
        let placement = match backend.fused_recurrent(op) {
            Ok(()) => Placement::Fused {
                backend: backend.name(),
            },
            Err(reason) => Placement::Loop {
                reason: format!("{reason} (the {} kernel)", backend.name()),
            },
        };
        out.push(Choice {
            rule: rules.get(&node).copied(),
            node,
            op: op.name().to_string(),
            placement,
        });
    });
}
