//! The stable text form of a graph (one line per node) and Graphviz DOT output.
//!
//! The text form is used by golden tests, error messages and `cellgraph inspect`; its
//! format only changes on purpose.

use crate::graph::{Graph, NodeKind, ValueRef};
use std::fmt::Write as _;

/// A value name as printed: `%name`, quoted when it has unusual characters.
pub fn value_name(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c))
    {
        format!("%{name}")
    } else {
        format!("%{name:?}")
    }
}

fn vref(g: &Graph, v: Option<ValueRef>) -> String {
    match v {
        Some(v) => value_name(&g.value(v).name),
        None => "_".to_string(),
    }
}

/// The text form of a graph and its nested graphs.
pub fn print_graph(g: &Graph) -> String {
    let mut out = String::new();
    print_into(g, 0, &mut out);
    out
}

fn print_into(g: &Graph, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let opsets: Vec<String> = g
        .opsets()
        .iter()
        .map(|(d, v)| format!("{d:?}: {v}"))
        .collect();
    let _ = writeln!(
        out,
        "{pad}graph {:?} opsets {{{}}} {{",
        g.name,
        opsets.join(", ")
    );
    for &n in g.inputs() {
        let node = g.node(n);
        let v = &node.outputs[0];
        let _ = write!(out, "{pad}  input {} : {}", value_name(&v.name), v.ty);
        if let NodeKind::Input { default: Some(t) } = &node.kind {
            let _ = write!(out, " = {}", t.summary());
        }
        out.push('\n');
    }
    for &n in g.outers() {
        let v = &g.node(n).outputs[0];
        let _ = writeln!(out, "{pad}  outer {} : {}", value_name(&v.name), v.ty);
    }
    for &n in g.initializers() {
        let node = g.node(n);
        if let NodeKind::Initializer { tensor, trainable } = &node.kind {
            let _ = writeln!(
                out,
                "{pad}  init {} = {}{}",
                value_name(&node.outputs[0].name),
                tensor.summary(),
                if *trainable { " trainable" } else { "" }
            );
        }
    }
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(_) => {
            let _ = writeln!(out, "{pad}  <cycle: nodes in index order>");
            g.node_ids()
                .into_iter()
                .filter(|&n| g.node(n).op().is_some())
                .collect()
        }
    };
    for n in order {
        let node = g.node(n);
        let Some(op) = node.op() else { continue };
        let outs: Vec<String> = node
            .outputs
            .iter()
            .map(|v| {
                if v.name.is_empty() {
                    "_".into()
                } else {
                    value_name(&v.name)
                }
            })
            .collect();
        let ins: Vec<String> = g.node_inputs(n).into_iter().map(|v| vref(g, v)).collect();
        let attrs: Vec<String> = op
            .attrs()
            .iter()
            .map(|(k, a)| format!("{k}={}", a.to_text()))
            .collect();
        let tys: Vec<String> = node.outputs.iter().map(|v| v.ty.to_string()).collect();
        let _ = write!(out, "{pad}  {} = {}", outs.join(", "), op.name());
        if !attrs.is_empty() {
            let _ = write!(out, "{{{}}}", attrs.join(", "));
        }
        let _ = write!(out, "({}) : {}", ins.join(", "), tys.join(", "));
        if !node.name.is_empty() {
            let _ = write!(out, " @{:?}", node.name);
        }
        out.push('\n');
        for (attr, body) in op.subgraphs() {
            let _ = writeln!(out, "{pad}    {attr}:");
            print_into(body, depth + 2, out);
        }
    }
    let outs: Vec<String> = g
        .outputs()
        .iter()
        .map(|&v| format!("{} : {}", value_name(&g.value(v).name), g.value(v).ty))
        .collect();
    let _ = writeln!(out, "{pad}  return {}", outs.join(", "));
    let _ = writeln!(out, "{pad}}}");
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph in Graphviz DOT: one box per op (with its name and node name), one ellipse
/// per input, initializer or outer value, edges labelled with value names and types.
pub fn to_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_escape(&g.name));
    let _ = writeln!(out, "  rankdir=TB;\n  node [fontname=\"monospace\"];");
    for n in g.node_ids() {
        let node = g.node(n);
        let (label, shape) = match &node.kind {
            NodeKind::Op(op) => {
                let mut l = op.name().to_string();
                if !node.name.is_empty() {
                    l.push_str(&format!("\\n{}", dot_escape(&node.name)));
                }
                for (attr, body) in op.subgraphs() {
                    l.push_str(&format!("\\n{attr}: {} ops", body.op_count()));
                }
                (l, "box")
            }
            NodeKind::Initializer { tensor, .. } => (
                format!(
                    "{}\\n{}",
                    dot_escape(&node.name),
                    dot_escape(&tensor.summary())
                ),
                "ellipse",
            ),
            other => (
                format!("{} {}", node.kind_name(), dot_escape(&node.name)),
                if matches!(other, NodeKind::Input { .. }) {
                    "invhouse"
                } else {
                    "ellipse"
                },
            ),
        };
        let _ = writeln!(
            out,
            "  n{} [label=\"{}\", shape={}];",
            n.index(),
            label,
            shape
        );
    }
    for n in g.node_ids() {
        for (slot, v) in g.node_inputs(n).into_iter().enumerate() {
            if let Some(v) = v {
                let val = g.value(v);
                let _ = writeln!(
                    out,
                    "  n{} -> n{} [label=\"{}:{} {}\"];",
                    v.node.index(),
                    n.index(),
                    slot,
                    dot_escape(&val.name),
                    val.ty
                );
            }
        }
    }
    for (i, &v) in g.outputs().iter().enumerate() {
        let _ = writeln!(
            out,
            "  out{i} [label=\"output {}\", shape=house];",
            dot_escape(&g.value(v).name)
        );
        let _ = writeln!(out, "  n{} -> out{i};", v.node.index());
    }
    out.push_str("}\n");
    out
}
