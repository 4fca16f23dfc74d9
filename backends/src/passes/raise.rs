//! Raise: recognise `Scan` loops whose body computes an LSTM, a GRU (both reset forms) or
//! a simple RNN cell, and replace them with the fused op — the inverse of [`crate::passes::lower`].
//!
//! The body is first read in a canonical form: every gate pre-activation becomes an
//! affine sum of projections `src · W[:, lo..hi]` and bias slices, whatever mix of
//! `MatMul`/`Gemm`, `Add` (operands in any order), `Split`/`Slice` (before or after the
//! product), one concatenated matrix or one matrix per gate produced it. `Identity` is
//! looked through. The rules ([`RULES`], tried by priority) then match the cell equations
//! on top of that form, with commutative `Add`/`Mul` matched both ways:
//!
//! - `lstm`: two states; `c' = f⊙c + i⊙g`, `h' = o⊙act(c')`.
//! - `gru`: one state; `h' = z⊙h + (1 − z)⊙ĥ` with the reset applied after the recurrent
//!   product (`linear_before_reset=1`, Keras's default) or before it.
//! - `rnn`: one state; `h' = act(x·W + h·R + b)`.
//!
//! A body holding several cells in a row (Keras `StackedRNNCells`) becomes one fused op
//! per cell, each reading the previous one's output sequence.
//!
//! Keras masks (`Where(mask_t, new, old)` on every state) raise to the `*Masked` ops of the
//! cellgraph domain, any mask pattern; the step output may be zero or the held state at
//! masked steps. A reversed scan becomes `direction="reverse"` with the output sequence
//! flipped back into processing order. Whatever a rule cannot prove it refuses, with the
//! reason recorded in a [`Decision`]; the Scan then stays a loop.

use crate::error::{Error, Result};
use crate::passes::lower::{rewrite, Builder};
use cellgraph_ir::ops::rnn::{Act, Cell};
use cellgraph_ir::{DType, Dim, Graph, NodeId, NodeKind, Op, Tensor, ValueRef};
use std::cell::RefCell;

/// A raise rule: its name, its priority (lower first) and the number of states it needs.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The rule's name, as decisions report it.
    pub name: &'static str,
    /// Rules are tried in increasing priority.
    pub priority: u8,
    /// The Scan must carry exactly this many states (the first capability guard).
    pub states: usize,
    matcher: fn(&Body<'_>) -> std::result::Result<CellMatch, String>,
}

/// The raise rules, by priority.
pub const RULES: [Rule; 3] = [
    Rule {
        name: "lstm",
        priority: 0,
        states: 2,
        matcher: match_lstm,
    },
    Rule {
        name: "gru",
        priority: 1,
        states: 1,
        matcher: match_gru,
    },
    Rule {
        name: "rnn",
        priority: 2,
        states: 1,
        matcher: match_rnn,
    },
];

/// What the raise pass decided for one `Scan`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The Scan node's name (`outer/inner` inside nested graphs).
    pub node: String,
    /// The rule that fired, if one did.
    pub rule: Option<&'static str>,
    /// The fused op it became (`LSTM`, `GRUMasked`, ...), or why it stays a loop.
    pub detail: String,
}

/// A graph after raising, with one decision per `Scan` looked at.
#[derive(Clone, Debug)]
pub struct Raised {
    /// The rewritten graph.
    pub graph: Graph,
    /// One decision per `Scan`, in graph order.
    pub decisions: Vec<Decision>,
}

/// Replaces every `Scan` whose body is a recognised cell with the fused op (in nested
/// graphs too); the others stay as they are, with the reason in their decision.
pub fn raise_recurrent(graph: &Graph) -> Result<Raised> {
    let decisions = RefCell::new(Vec::new());
    let graph = raise_in(graph, "", &decisions)?;
    Ok(Raised {
        graph,
        decisions: decisions.into_inner(),
    })
}

fn raise_in(graph: &Graph, path: &str, decisions: &RefCell<Vec<Decision>>) -> Result<Graph> {
    let prefix = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}/{name}")
        }
    };
    let raised = rewrite(
        graph,
        &mut |dst, src, n, ins, names| {
            let node = src.node(n);
            let Some(Op::Scan { .. }) = node.op() else {
                return Ok(None);
            };
            let label = prefix(&node.display_name());
            match try_raise(dst, src, n, ins, names) {
                Ok(Some((cells, outs))) => {
                    for (name, rule, op) in cells {
                        decisions.borrow_mut().push(Decision {
                            node: prefix(&name),
                            rule: Some(rule),
                            detail: op,
                        });
                    }
                    Ok(Some(outs))
                }
                Ok(None) => Ok(None),
                Err(Refusal(why)) => {
                    decisions.borrow_mut().push(Decision {
                        node: label,
                        rule: None,
                        detail: why,
                    });
                    Ok(None)
                }
            }
        },
        &mut |body| raise_in(body, &prefix(&body.name), decisions),
    )?;
    merge_bidirectional(raised, path, decisions)
}

/// The `bidirectional` rule: a forward and a reverse fused op of the same kind and
/// attributes over the same input (and mask, lengths) become one bidirectional op, its
/// `Y`/`Y_h`/`Y_c` sliced per direction for the consumers (Keras `Bidirectional` with any
/// merge mode, or any pair of loops that read one sequence both ways). Pairs where one
/// op depends on the other are left apart.
fn merge_bidirectional(
    mut g: Graph,
    path: &str,
    decisions: &RefCell<Vec<Decision>>,
) -> Result<Graph> {
    let Ok(order) = g.topo_order() else {
        return Ok(g);
    };
    // Candidates: (node, attributes with direction "forward", reverse?)
    let mut cands: Vec<(NodeId, Op, bool)> = Vec::new();
    for &n in &order {
        let Some(op) = g.node(n).op() else { continue };
        if !is_fused_recurrent(op) {
            continue;
        }
        if let Some((key, rev)) = direction_key(op) {
            cands.push((n, key, rev));
        }
    }
    let mut outer_names = std::collections::HashSet::new();
    for &n in &order {
        if let Some(op) = g.node(n).op() {
            for (_, body) in op.subgraphs() {
                collect_outer_names(body, &mut outer_names);
            }
        }
    }
    let mut used = std::collections::HashSet::new();
    let mut pairs = Vec::new();
    for (f, fk, frev) in &cands {
        if *frev || used.contains(f) {
            continue;
        }
        for (b, bk, brev) in &cands {
            if !*brev || used.contains(b) || bk != fk {
                continue;
            }
            let (fi, bi) = (g.node_inputs(*f), g.node_inputs(*b));
            let mask_slot = if matches!(fk, Op::LSTM { .. } | Op::LSTMMasked { .. }) {
                8
            } else {
                6
            };
            let same = |k: usize| match (fi.get(k).copied().flatten(), bi.get(k).copied().flatten())
            {
                (Some(a), Some(c)) => same_value(&g, a, c, 8),
                (None, None) => true,
                _ => false,
            };
            let both = |k: usize| {
                fi.get(k).copied().flatten().is_some() == bi.get(k).copied().flatten().is_some()
            };
            let p_slot = if mask_slot == 8 { Some(7) } else { None };
            let read_by_name = |n: NodeId| {
                g.node(n)
                    .outputs
                    .iter()
                    .any(|v| !v.name.is_empty() && outer_names.contains(&v.name))
            };
            if !(same(0) && same(4) && same(mask_slot) && both(3) && both(5) && both(6))
                || read_by_name(*f)
                || read_by_name(*b)
                || p_slot.is_some_and(|k| {
                    fi.get(k).copied().flatten().is_some() || bi.get(k).copied().flatten().is_some()
                })
                || reaches(&g, *f, *b)
                || reaches(&g, *b, *f)
            {
                continue;
            }
            used.insert(*f);
            used.insert(*b);
            pairs.push((*f, *b, fk.clone()));
            break;
        }
    }
    if pairs.is_empty() {
        return Ok(g);
    }
    let mut dead = std::collections::HashSet::new();
    for (f, b, key) in pairs {
        let name = format!("{}+{}", g.node(f).display_name(), g.node(b).display_name());
        let (fi, bi) = (g.node_inputs(f), g.node_inputs(b));
        let mut bld = Builder::new(&mut g, &format!("{name}/bidirectional"));
        let cat = |bld: &mut Builder<'_>, k: usize| -> Result<Option<ValueRef>> {
            match (fi.get(k).copied().flatten(), bi.get(k).copied().flatten()) {
                (Some(a), Some(c)) => Ok(Some(bld.op(
                    Op::Concat { axis: 0 },
                    &[Some(a), Some(c)],
                    "both",
                )?)),
                _ => Ok(None),
            }
        };
        let mut ins = vec![fi.first().copied().flatten()];
        for k in 1..fi.len().max(bi.len()) {
            let is_mask = matches!(key, Op::LSTMMasked { .. }) && k == 8
                || matches!(key, Op::GRUMasked { .. } | Op::RNNMasked { .. }) && k == 6;
            ins.push(if k == 4 || is_mask {
                fi.get(k).copied().flatten()
            } else {
                cat(&mut bld, k)?
            });
        }
        let op = bidirectional_op(&key);
        let n_out = bld.g.node(f).outputs.len();
        let hints = ["Y", "Y_h", "Y_c"];
        let out_names: Vec<String> = hints[..n_out].iter().map(|h| bld.fresh(h)).collect();
        let refs: Vec<&str> = out_names.iter().map(String::as_str).collect();
        let id = bld.g.add_node(&name, op, &ins, &refs)?;
        for (dir, old) in [(0i64, f), (1, b)] {
            for slot in 0..n_out {
                let v = ValueRef { node: old, slot };
                let users = bld.g.users(v);
                let is_out = bld.g.outputs().contains(&v);
                if users.is_empty() && !is_out {
                    continue;
                }
                let axis = if slot == 0 { 1 } else { 0 };
                let (s0, e0, ax) = (bld.ints(&[dir])?, bld.ints(&[dir + 1])?, bld.ints(&[axis])?);
                let part = bld.op(
                    Op::Slice {},
                    &[
                        Some(ValueRef { node: id, slot }),
                        Some(s0),
                        Some(e0),
                        Some(ax),
                    ],
                    if dir == 0 { "forward" } else { "backward" },
                )?;
                for (user, k) in users {
                    bld.g.set_input(user, k, Some(part));
                }
                if is_out {
                    let outs: Vec<ValueRef> = bld
                        .g
                        .outputs()
                        .iter()
                        .map(|&o| if o == v { part } else { o })
                        .collect();
                    bld.g.set_outputs(outs)?;
                }
            }
        }
        dead.insert(f);
        dead.insert(b);
        decisions.borrow_mut().push(Decision {
            node: if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            },
            rule: Some("bidirectional"),
            detail: key.name().to_string(),
        });
    }
    // Copy without the merged ops (nothing reads them any more).
    rewrite(
        &g,
        &mut |_, src, n, _, names| {
            if dead.contains(&n) {
                let _ = src;
                Ok(Some(vec![None; names.len()]))
            } else {
                Ok(None)
            }
        },
        &mut |body| Ok(body.clone()),
    )
}

/// A fused op's attributes with `direction` set to forward, and whether it was reverse;
/// `None` for bidirectional ops and layout 1.
fn direction_key(op: &Op) -> Option<(Op, bool)> {
    let mut k = op.clone();
    let (dir, layout) = match &mut k {
        Op::LSTM {
            direction, layout, ..
        }
        | Op::GRU {
            direction, layout, ..
        }
        | Op::RNN {
            direction, layout, ..
        }
        | Op::LSTMMasked {
            direction, layout, ..
        }
        | Op::GRUMasked {
            direction, layout, ..
        }
        | Op::RNNMasked {
            direction, layout, ..
        } => (direction, *layout),
        _ => return None,
    };
    let rev = match dir.as_str() {
        "forward" => false,
        "reverse" => true,
        _ => return None,
    };
    if layout != 0 {
        return None;
    }
    *dir = "forward".into();
    Some((k, rev))
}

/// The bidirectional op for a pair with these (forward-keyed) attributes: activation
/// lists and their parameters repeated for the second direction.
fn bidirectional_op(key: &Op) -> Op {
    let mut op = key.clone();
    if let Op::LSTM {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    }
    | Op::GRU {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    }
    | Op::RNN {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    }
    | Op::LSTMMasked {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    }
    | Op::GRUMasked {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    }
    | Op::RNNMasked {
        direction,
        activations,
        activation_alpha,
        activation_beta,
        ..
    } = &mut op
    {
        *direction = "bidirectional".into();
        for v in [activation_alpha, activation_beta].into_iter().flatten() {
            let twice = [v.clone(), v.clone()].concat();
            *v = twice;
        }
        if let Some(v) = activations {
            let twice = [v.clone(), v.clone()].concat();
            *v = twice;
        }
    }
    op
}

/// The names every nested graph reads from outside, recursively.
fn collect_outer_names(g: &Graph, out: &mut std::collections::HashSet<String>) {
    for &n in g.outers() {
        out.insert(g.node(n).name.clone());
    }
    for n in g.node_ids() {
        if let Some(op) = g.node(n).op() {
            for (_, body) in op.subgraphs() {
                collect_outer_names(body, out);
            }
        }
    }
}

/// Whether `a` and `b` hold the same value: the same value, or the same output of equal
/// ops (no nested graphs, no randomness) over inputs that hold the same values, looked
/// at up to `depth` ops deep. Each direction of a Keras `Bidirectional` transposes the
/// input (and mask) itself; this sees through that.
fn same_value(g: &Graph, a: ValueRef, b: ValueRef, depth: usize) -> bool {
    if a == b {
        return true;
    }
    if depth == 0 || a.slot != b.slot {
        return false;
    }
    let (na, nb) = (g.node(a.node), g.node(b.node));
    let (Some(oa), Some(ob)) = (na.op(), nb.op()) else {
        return false;
    };
    if oa != ob || !oa.subgraphs().is_empty() || oa.name().starts_with("Random") {
        return false;
    }
    let (ia, ib) = (g.node_inputs(a.node), g.node_inputs(b.node));
    ia.len() == ib.len()
        && ia.iter().zip(&ib).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => same_value(g, *x, *y, depth - 1),
            (None, None) => true,
            _ => false,
        })
}

/// Whether `to` depends on `from` (a path of edges from `from` to `to`).
fn reaches(g: &Graph, from: NodeId, to: NodeId) -> bool {
    let mut stack = vec![from];
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if !seen.insert(n) {
            continue;
        }
        let outs = g.node(n).outputs.len();
        for slot in 0..outs {
            for (u, _) in g.users(ValueRef { node: n, slot }) {
                stack.push(u);
            }
        }
    }
    false
}

/// Why a Scan was not raised (or an internal error building the replacement).
struct Refusal(String);

impl From<String> for Refusal {
    fn from(s: String) -> Refusal {
        Refusal(s)
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal(format!("building the fused op failed: {e}"))
    }
}

type Try<T> = std::result::Result<T, Refusal>;

/// A loop-invariant value the body reads: an outer value by name, or a constant.
#[derive(Clone, Debug, PartialEq)]
enum Param {
    Outer(String, Vec<usize>),
    Const(Tensor),
}

impl Param {
    fn dims(&self) -> Vec<usize> {
        match self {
            Param::Outer(_, d) => d.clone(),
            Param::Const(t) => t.shape().to_vec(),
        }
    }
}

/// `src · W[:, lo..hi]` (`W` stored `[K, M]`, or `[M, K]` when `trans`).
#[derive(Clone, Debug)]
struct Term {
    src: ValueRef,
    w: Param,
    trans: bool,
    lo: usize,
    hi: usize,
    /// For step-input terms: a loop-invariant factor the input is multiplied by first
    /// (Keras's training-mode input dropout mask), applied to the whole sequence
    /// outside the fused op.
    scale: Option<Param>,
}

/// `b[lo..hi]` (`b` stored `[M]` or `[1, M]`).
#[derive(Clone, Debug)]
struct BiasT {
    b: Param,
    lo: usize,
    hi: usize,
}

/// A canonical gate pre-activation: projections plus biases (plus, where the caller
/// allows it, summands that are not affine, left for the rule to read).
#[derive(Clone, Debug, Default)]
struct Affine {
    width: Option<usize>,
    terms: Vec<Term>,
    biases: Vec<BiasT>,
    extras: Vec<ValueRef>,
}

/// The Scan body as the rules see it.
pub struct Body<'a> {
    g: &'a Graph,
    states: Vec<ValueRef>,
    x: ValueRef,
    mask: Option<ValueRef>,
    /// The new state values, `Where(mask, ·, old)` stripped.
    new_states: Vec<ValueRef>,
}

/// A gate: activation over a (clipped) pre-activation.
#[derive(Clone, Debug)]
struct Gate {
    value: ValueRef,
    act: Act,
    clip: Option<f32>,
    pre: Affine,
}

/// One gate's weights, read off its pre-activation.
#[derive(Clone, Debug, Default)]
struct GateW {
    x: Vec<Term>,
    h: Vec<Term>,
    wb: Vec<BiasT>,
    rb: Vec<BiasT>,
}

/// What a rule found.
#[derive(Clone, Debug)]
struct CellMatch {
    cell: Cell,
    acts: Vec<Act>,
    clip: Option<f32>,
    lbr: bool,
    /// In ONNX gate order (LSTM i, o, f, c; GRU z, r, h).
    gates: Vec<GateW>,
    /// State index of `h` (and `c`).
    h_state: usize,
    c_state: Option<usize>,
    /// The unmasked new `h`.
    h_new: ValueRef,
}

impl Body<'_> {
    fn strip(&self, mut v: ValueRef) -> ValueRef {
        while let Some(Op::Identity {}) = self.g.node(v.node).op() {
            match self.g.node_inputs(v.node).first().copied().flatten() {
                Some(i) => v = i,
                None => break,
            }
        }
        v
    }

    /// The producing op of `v` (Identity looked through) and its inputs.
    fn op(&self, v: ValueRef) -> Option<(&Op, Vec<Option<ValueRef>>, usize)> {
        let v = self.strip(v);
        let op = self.g.node(v.node).op()?;
        Some((op, self.g.node_inputs(v.node), v.slot))
    }

    fn input(ins: &[Option<ValueRef>], i: usize) -> std::result::Result<ValueRef, String> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("input {i} is missing"))
    }

    fn name(&self, v: ValueRef) -> String {
        let v = self.strip(v);
        let val = self.g.value(v);
        match self.g.node(v.node).op() {
            Some(op) => format!("{} ({})", val.name, op.name()),
            None => val.name.clone(),
        }
    }

    fn param(&self, v: ValueRef) -> Option<Param> {
        let v = self.strip(v);
        let node = self.g.node(v.node);
        match &node.kind {
            NodeKind::Outer => {
                let dims = node.outputs[0]
                    .ty
                    .dims()?
                    .iter()
                    .map(|d| d.known().map(|k| k as usize))
                    .collect::<Option<Vec<_>>>()?;
                Some(Param::Outer(node.name.clone(), dims))
            }
            _ => self.g.constant(v).map(Param::Const),
        }
    }

    fn const_ints(&self, v: Option<ValueRef>) -> Option<Vec<i64>> {
        self.g.constant(self.strip(v?))?.as_i64_vec()
    }

    fn scalar(&self, v: ValueRef) -> Option<f64> {
        let t = self.g.constant(self.strip(v))?;
        let vals = t.to_f64_vec();
        (vals.len() == 1).then(|| vals[0])
    }

    /// The canonical affine form of `v`.
    fn affine(&self, v: ValueRef, extras: bool) -> std::result::Result<Affine, String> {
        let v = self.strip(v);
        let not_affine = || {
            if extras {
                Ok(Affine {
                    extras: vec![v],
                    ..Affine::default()
                })
            } else {
                Err(format!(
                    "{} is not a linear function of the step's input and state",
                    self.name(v)
                ))
            }
        };
        if let Some(p) = self.param(v) {
            let d = p.dims();
            let m = match d.as_slice() {
                [m] | [1, m] => *m,
                _ => return Err(format!("{} is not a bias vector", self.name(v))),
            };
            return Ok(Affine {
                width: Some(m),
                biases: vec![BiasT { b: p, lo: 0, hi: m }],
                ..Affine::default()
            });
        }
        let Some((op, ins, slot)) = self.op(v) else {
            return not_affine();
        };
        match op {
            Op::MatMul {} => {
                let (a, b) = (Self::input(&ins, 0)?, Self::input(&ins, 1)?);
                match self.param(b) {
                    Some(w) if w.dims().len() == 2 && self.param(a).is_none() => {
                        let m = w.dims()[1];
                        Ok(Affine {
                            width: Some(m),
                            terms: vec![Term {
                                src: self.strip(a),
                                w,
                                trans: false,
                                lo: 0,
                                hi: m,
                                scale: None,
                            }],
                            ..Affine::default()
                        })
                    }
                    _ => not_affine(),
                }
            }
            Op::Gemm {
                alpha,
                beta,
                transA,
                transB,
            } if *alpha == 1.0 && *beta == 1.0 && *transA == 0 => {
                let (a, b) = (Self::input(&ins, 0)?, Self::input(&ins, 1)?);
                let Some(w) = self.param(b).filter(|w| w.dims().len() == 2) else {
                    return not_affine();
                };
                let m = if *transB != 0 {
                    w.dims()[0]
                } else {
                    w.dims()[1]
                };
                let mut aff = Affine {
                    width: Some(m),
                    terms: vec![Term {
                        src: self.strip(a),
                        w,
                        trans: *transB != 0,
                        lo: 0,
                        hi: m,
                        scale: None,
                    }],
                    ..Affine::default()
                };
                if let Some(c) = ins.get(2).copied().flatten() {
                    let cb = self.affine(c, false)?;
                    if !cb.terms.is_empty() {
                        return not_affine();
                    }
                    aff = sum(aff, cb).map_err(|e| format!("{}: {e}", self.name(v)))?;
                }
                Ok(aff)
            }
            Op::Add {} => {
                let a = self.affine(Self::input(&ins, 0)?, extras)?;
                let b = self.affine(Self::input(&ins, 1)?, extras)?;
                sum(a, b).map_err(|e| format!("{}: {e}", self.name(v)))
            }
            Op::Slice {} => {
                let starts = self.const_ints(ins.get(1).copied().flatten());
                let ends = self.const_ints(ins.get(2).copied().flatten());
                let axes = match ins.get(3).copied().flatten() {
                    Some(a) => self.const_ints(Some(a)),
                    None => Some(vec![0]),
                };
                let steps = match ins.get(4).copied().flatten() {
                    Some(s) => self.const_ints(Some(s)),
                    None => Some(vec![1]),
                };
                let (Some([s]), Some([e]), Some([ax]), Some([1])) = (
                    starts.as_deref(),
                    ends.as_deref(),
                    axes.as_deref(),
                    steps.as_deref(),
                ) else {
                    return not_affine();
                };
                let inner = self.affine(Self::input(&ins, 0)?, false)?;
                if !self.last_axis(Self::input(&ins, 0)?, *ax) {
                    return not_affine();
                }
                let w = inner.width.ok_or("a slice of unknown width")?;
                let clamp = |i: i64| -> usize {
                    let i = if i < 0 { i + w as i64 } else { i };
                    i.clamp(0, w as i64) as usize
                };
                restrict(inner, clamp(*s), clamp(*e)).map_err(|e| format!("{}: {e}", self.name(v)))
            }
            Op::Split {
                axis,
                split,
                num_outputs,
            } => {
                let data = Self::input(&ins, 0)?;
                if !self.last_axis(data, *axis) {
                    return not_affine();
                }
                let inner = self.affine(data, false)?;
                let w = inner.width.ok_or("a split of unknown width")?;
                let parts = self.g.node(self.strip(v).node).outputs.len();
                let sizes: Vec<usize> = match (split, ins.get(1).copied().flatten()) {
                    (Some(s), _) => s.iter().map(|&k| k.max(0) as usize).collect(),
                    (None, Some(s)) => self
                        .const_ints(Some(s))
                        .ok_or("split sizes are not constant")?
                        .iter()
                        .map(|&k| k.max(0) as usize)
                        .collect(),
                    (None, None) => {
                        let n = num_outputs.map_or(parts, |n| n.max(1) as usize);
                        if w % n != 0 {
                            return not_affine();
                        }
                        vec![w / n; n]
                    }
                };
                let lo: usize = sizes.iter().take(slot).sum();
                let size = *sizes.get(slot).ok_or("split output out of range")?;
                restrict(inner, lo, lo + size).map_err(|e| format!("{}: {e}", self.name(v)))
            }
            _ => not_affine(),
        }
    }

    /// Whether `axis` is the last axis of the rank-2 value `v`.
    fn last_axis(&self, v: ValueRef, axis: i64) -> bool {
        axis == -1
            || (axis == 1 && self.g.value(self.strip(v)).ty.dims().map(<[_]>::len) == Some(2))
    }

    /// A gate: an activation of a (possibly clipped) affine pre-activation. A value that
    /// is not an activation is the identity (`Affine(1, 0)`) of its own affine form.
    fn gate(&self, v: ValueRef, extras: bool) -> std::result::Result<Gate, String> {
        let v = self.strip(v);
        let (act, mut inner) = match self.op(v) {
            Some((op, ins, _)) => match act_of(op) {
                Some(a) => (a, Self::input(&ins, 0)?),
                None => (Act::Affine(1.0, 0.0), v),
            },
            None => (Act::Affine(1.0, 0.0), v),
        };
        let mut clip = None;
        if let Some((Op::Clip { min, max }, ins, _)) = self.op(inner) {
            let lo = min
                .map(f64::from)
                .or_else(|| self.scalar(ins.get(1).copied().flatten()?));
            let hi = max
                .map(f64::from)
                .or_else(|| self.scalar(ins.get(2).copied().flatten()?));
            match (lo, hi) {
                (Some(lo), Some(hi)) if lo == -hi && hi >= 0.0 => {
                    clip = Some(hi as f32);
                    inner = Self::input(&ins, 0)?;
                }
                _ => return Err(format!("{} is not a symmetric clip", self.name(inner))),
            }
        }
        Ok(Gate {
            value: v,
            act,
            clip,
            pre: self.affine(inner, extras)?,
        })
    }

    /// Splits a gate's affine form into its step-input and state parts.
    fn weights(&self, a: &Affine, h: ValueRef, units: usize) -> std::result::Result<GateW, String> {
        if a.width != Some(units) {
            return Err(format!(
                "a gate is {} wide, the state {units}",
                a.width.map_or("?".into(), |w| w.to_string())
            ));
        }
        if let Some(&e) = a.extras.first() {
            return Err(format!("{} is not part of a known cell", self.name(e)));
        }
        let mut w = GateW {
            wb: a.biases.clone(),
            ..GateW::default()
        };
        for t in &a.terms {
            if let Some(scale) = self.x_term(t.src) {
                w.x.push(Term { scale, ..t.clone() });
            } else if t.src == h {
                w.h.push(t.clone());
            } else {
                return Err(format!(
                    "a gate multiplies {}, neither the step input nor the state",
                    self.name(t.src)
                ));
            }
        }
        Ok(w)
    }

    /// Whether `src` is the step input (`Some(None)`) or the step input times a
    /// loop-invariant factor (`Some(Some(factor))`).
    fn x_term(&self, src: ValueRef) -> Option<Option<Param>> {
        if src == self.x {
            return Some(None);
        }
        for (a, f) in self.mul_pairs(src) {
            if a == self.x {
                if let Some(p) = self.param(f) {
                    return Some(Some(p));
                }
            }
        }
        None
    }

    /// `Mul(a, b)` as its two operands, in both orders.
    fn mul_pairs(&self, v: ValueRef) -> Vec<(ValueRef, ValueRef)> {
        self.operand_pairs(v, |op| matches!(op, Op::Mul {}))
    }

    /// `Add(a, b)` as its two operands, in both orders.
    fn add_pairs(&self, v: ValueRef) -> Vec<(ValueRef, ValueRef)> {
        self.operand_pairs(v, |op| matches!(op, Op::Add {}))
    }

    /// The two operands of a commutative binary op `is_op` accepts, in both orders.
    fn operand_pairs(&self, v: ValueRef, is_op: fn(&Op) -> bool) -> Vec<(ValueRef, ValueRef)> {
        match self.op(v) {
            Some((op, ins, _)) if is_op(op) => {
                match (
                    ins.first().copied().flatten(),
                    ins.get(1).copied().flatten(),
                ) {
                    (Some(a), Some(b)) => {
                        let (a, b) = (self.strip(a), self.strip(b));
                        vec![(a, b), (b, a)]
                    }
                    _ => vec![],
                }
            }
            _ => vec![],
        }
    }

    fn units(&self, state: usize) -> std::result::Result<usize, String> {
        let s = self.states[state];
        match self.g.value(s).ty.dims() {
            Some([_, Dim::Known(u)]) => Ok(*u as usize),
            _ => Err(format!(
                "state {} is not [batch, units] with known units",
                self.name(s)
            )),
        }
    }
}

/// The sum of two affine forms.
fn sum(mut a: Affine, b: Affine) -> std::result::Result<Affine, String> {
    a.width = match (a.width, b.width) {
        (Some(x), Some(y)) if x != y => return Err(format!("adds widths {x} and {y}")),
        (x, y) => x.or(y),
    };
    a.terms.extend(b.terms);
    a.biases.extend(b.biases);
    a.extras.extend(b.extras);
    Ok(a)
}

/// Columns `lo..hi` of an affine form.
fn restrict(a: Affine, lo: usize, hi: usize) -> std::result::Result<Affine, String> {
    if !a.extras.is_empty() {
        return Err("slices a value that is not affine".into());
    }
    if hi < lo {
        return Err("an empty slice".into());
    }
    // Columns lo..hi of a block that starts at column `at` of its stored matrix.
    let cols = |at: usize| (at + lo, at + hi);
    Ok(Affine {
        width: Some(hi - lo),
        terms: a
            .terms
            .into_iter()
            .map(|t| {
                let (lo, hi) = cols(t.lo);
                Term { lo, hi, ..t }
            })
            .collect(),
        biases: a
            .biases
            .into_iter()
            .map(|b| {
                let (lo, hi) = cols(b.lo);
                BiasT { lo, hi, ..b }
            })
            .collect(),
        extras: vec![],
    })
}

/// The recurrent activation an op computes, if it is one.
fn act_of(op: &Op) -> Option<Act> {
    Some(match op {
        Op::Sigmoid {} => Act::Sigmoid,
        Op::Tanh {} => Act::Tanh,
        Op::Relu {} => Act::Relu,
        Op::Softsign {} => Act::Softsign,
        Op::Softplus {} => Act::Softplus,
        Op::HardSigmoid { alpha, beta } => Act::HardSigmoid(*alpha, *beta),
        Op::LeakyRelu { alpha } => Act::LeakyRelu(*alpha),
        Op::ThresholdedRelu { alpha } => Act::ThresholdedRelu(*alpha),
        Op::Elu { alpha } => Act::Elu(*alpha),
        _ => return None,
    })
}

/// One activation and clip for all the gates that share them.
fn same(gates: &[&Gate]) -> std::result::Result<(Act, Option<f32>), String> {
    let first = gates[0];
    for g in gates {
        if g.act != first.act {
            return Err(format!(
                "gates use different activations ({:?} and {:?})",
                first.act, g.act
            ));
        }
        if g.clip != first.clip {
            return Err("gates are clipped differently".into());
        }
    }
    Ok((first.act, first.clip))
}

fn match_lstm(b: &Body<'_>) -> std::result::Result<CellMatch, String> {
    let mut why = String::from("no state is c' = f⊙c + i⊙g");
    for (hs, cs) in [(0usize, 1usize), (1, 0)] {
        match lstm_with(b, hs, cs) {
            Ok(m) => return Ok(m),
            Err(e) => why = e,
        }
    }
    Err(why)
}

fn lstm_with(b: &Body<'_>, hs: usize, cs: usize) -> std::result::Result<CellMatch, String> {
    let (h, c) = (b.states[hs], b.states[cs]);
    let (h_new, c_new) = (b.new_states[hs], b.new_states[cs]);
    let units = b.units(hs)?;
    if b.units(cs)? != units {
        return Err("h and c have different widths".into());
    }
    // c' = f⊙c + i⊙g
    let mut found = None;
    'outer: for (keep, write) in b.add_pairs(c_new) {
        for (f, cc) in b.mul_pairs(keep) {
            if cc != c {
                continue;
            }
            if let Some(&(i, g)) = b.mul_pairs(write).first() {
                found = Some((f, i, g));
                break 'outer;
            }
        }
    }
    let (f, i, g) = found.ok_or_else(|| format!("the new {} is not f⊙c + i⊙g", b.name(c_new)))?;
    // h' = o⊙act(c')
    let mut found = None;
    for (o, t) in b.mul_pairs(h_new) {
        if t == c_new {
            found = Some((o, Act::Affine(1.0, 0.0)));
            break;
        }
        if let Some((op, ins, _)) = b.op(t) {
            let arg = ins.first().copied().flatten().map(|a| b.strip(a));
            if let (Some(a), Some(act)) = (arg, act_of(op)) {
                if a == c_new {
                    found = Some((o, act));
                    break;
                }
            }
        }
    }
    let (o, act_h) = found.ok_or_else(|| format!("the new {} is not o⊙act(c')", b.name(h_new)))?;
    let gf = b.gate(f, false)?;
    let (mut gi, mut gg) = (b.gate(i, false)?, b.gate(g, false)?);
    let go = b.gate(o, false)?;
    // i and g commute in i⊙g: i is the one sharing f's activation.
    if gi.act != gf.act && gg.act == gf.act {
        std::mem::swap(&mut gi, &mut gg);
    }
    let (act_f, clip) = same(&[&gi, &go, &gf])?;
    if gg.clip != clip {
        return Err("gates are clipped differently".into());
    }
    let gates = [&gi, &go, &gf, &gg]
        .iter()
        .map(|gt| b.weights(&gt.pre, h, units))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(CellMatch {
        cell: Cell::Lstm,
        acts: vec![act_f, gg.act, act_h],
        clip,
        lbr: false,
        gates,
        h_state: hs,
        c_state: Some(cs),
        h_new,
    })
}

fn match_gru(b: &Body<'_>) -> std::result::Result<CellMatch, String> {
    let h = b.states[0];
    let h_new = b.new_states[0];
    let units = b.units(0)?;
    // h' = z⊙h + (1 − z)⊙ĥ
    let mut found = None;
    'outer: for (keep, write) in b.add_pairs(h_new) {
        for (z, hh) in b.mul_pairs(keep) {
            if hh != h {
                continue;
            }
            for (omz, cand) in b.mul_pairs(write) {
                if let Some((Op::Sub {}, ins, _)) = b.op(omz) {
                    let one = ins.first().copied().flatten().and_then(|v| b.scalar(v));
                    let z2 = ins.get(1).copied().flatten().map(|v| b.strip(v));
                    if one == Some(1.0) && z2 == Some(z) {
                        found = Some((z, cand));
                        break 'outer;
                    }
                }
            }
        }
    }
    let (z, cand) =
        found.ok_or_else(|| format!("the new {} is not z⊙h + (1 − z)⊙ĥ", b.name(h_new)))?;
    let gz = b.gate(z, false)?;
    let gc = b.gate(cand, true)?;
    let wz = b.weights(&gz.pre, h, units)?;
    // The candidate: x-side terms and biases, plus either r⊙(h·R_h + b_rh) (reset after)
    // or (r⊙h)·R_h (reset before).
    let mut cand_aff = gc.pre.clone();
    let extras = std::mem::take(&mut cand_aff.extras);
    let (lbr, r, wh) = match extras.as_slice() {
        [prod] => {
            // reset after: r ⊙ (h·R_h + b_rh)
            let mut hit = None;
            for (r, lin) in b.mul_pairs(*prod) {
                let Ok(gr) = b.gate(r, false) else { continue };
                let Ok(la) = b.affine(lin, false) else {
                    continue;
                };
                let Ok(lw) = b.weights(&la, h, units) else {
                    continue;
                };
                if lw.x.is_empty() && !lw.h.is_empty() {
                    hit = Some((gr, lw));
                    break;
                }
            }
            let (gr, lw) = hit.ok_or_else(|| format!("{} is not r⊙(h·R + b)", b.name(*prod)))?;
            let mut w = GateW::default();
            for t in &cand_aff.terms {
                match b.x_term(t.src) {
                    Some(scale) => w.x.push(Term { scale, ..t.clone() }),
                    None => {
                        return Err(format!(
                            "the candidate multiplies {} outside the reset product",
                            b.name(t.src)
                        ))
                    }
                }
            }
            w.wb = cand_aff.biases.clone();
            w.h = lw.h;
            w.rb = lw.wb;
            if cand_aff.width.is_some_and(|wd| wd != units) {
                return Err("the candidate's width differs from the state's".into());
            }
            (true, gr, w)
        }
        [] => {
            // reset before: a projection of r⊙h
            let mut w = GateW {
                wb: cand_aff.biases.clone(),
                ..GateW::default()
            };
            let mut r_gate = None;
            for t in &cand_aff.terms {
                if let Some(scale) = b.x_term(t.src) {
                    w.x.push(Term { scale, ..t.clone() });
                    continue;
                }
                let mut ok = false;
                for (r, hh) in b.mul_pairs(t.src) {
                    if hh != h {
                        continue;
                    }
                    if let Ok(gr) = b.gate(r, false) {
                        if r_gate.as_ref().is_none_or(|g: &Gate| g.value == gr.value) {
                            r_gate = Some(gr);
                            ok = true;
                            break;
                        }
                    }
                }
                if !ok {
                    return Err(format!(
                        "the candidate multiplies {}, not the step input or r⊙h",
                        b.name(t.src)
                    ));
                }
                w.h.push(t.clone());
            }
            let gr = r_gate.ok_or("the candidate does not read the state")?;
            if cand_aff.width != Some(units) {
                return Err("the candidate's width differs from the state's".into());
            }
            (false, gr, w)
        }
        _ => return Err("the candidate has more than one reset product".into()),
    };
    let wr = b.weights(&r.pre, h, units)?;
    let (act_f, clip) = same(&[&gz, &r])?;
    if gc.clip != clip {
        return Err("gates are clipped differently".into());
    }
    Ok(CellMatch {
        cell: Cell::Gru,
        acts: vec![act_f, gc.act],
        clip,
        lbr,
        gates: vec![wz, wr, wh],
        h_state: 0,
        c_state: None,
        h_new,
    })
}

fn match_rnn(b: &Body<'_>) -> std::result::Result<CellMatch, String> {
    let h = b.states[0];
    let h_new = b.new_states[0];
    let units = b.units(0)?;
    let g = b.gate(h_new, false)?;
    let w = b.weights(&g.pre, h, units)?;
    if w.h.is_empty() {
        return Err(format!("the new {} does not read the state", b.name(h_new)));
    }
    Ok(CellMatch {
        cell: Cell::Rnn,
        acts: vec![g.act],
        clip: g.clip,
        lbr: false,
        gates: vec![w],
        h_state: 0,
        c_state: None,
        h_new,
    })
}

/// The ONNX name of an activation and the alpha/beta it consumes.
fn act_attr(a: Act) -> (&'static str, Option<f32>, Option<f32>) {
    match a {
        Act::Relu => ("Relu", None, None),
        Act::Tanh => ("Tanh", None, None),
        Act::Sigmoid => ("Sigmoid", None, None),
        Act::Affine(x, y) => ("Affine", Some(x), Some(y)),
        Act::LeakyRelu(x) => ("LeakyRelu", Some(x), None),
        Act::ThresholdedRelu(x) => ("ThresholdedRelu", Some(x), None),
        Act::ScaledTanh(x, y) => ("ScaledTanh", Some(x), Some(y)),
        Act::HardSigmoid(x, y) => ("HardSigmoid", Some(x), Some(y)),
        Act::Elu(x) => ("Elu", Some(x), None),
        Act::Softsign => ("Softsign", None, None),
        Act::Softplus => ("Softplus", None, None),
    }
}

/// A raised Scan: per fused op (one per cell) its node name, rule and op name; the
/// values for the Scan's outputs.
type RaisedScan = (Vec<(String, &'static str, String)>, Vec<Option<ValueRef>>);

/// Tries to raise one Scan: `Ok(None)` when it is not a candidate at all.
fn try_raise(
    dst: &mut Graph,
    src: &Graph,
    n: NodeId,
    ins: &[Option<ValueRef>],
    names: &[&str],
) -> Try<Option<RaisedScan>> {
    let node = src.node(n);
    let Some(Op::Scan {
        body,
        num_scan_inputs,
        scan_input_axes,
        scan_input_directions,
        scan_output_axes,
        scan_output_directions,
        ..
    }) = node.op()
    else {
        return Ok(None);
    };
    if src.opset("") < 9 {
        return Err(Refusal("Scan-8 (batch axis) is not raised".into()));
    }
    let n_scan = *num_scan_inputs as usize;
    let n_in = body.inputs().len();
    if n_scan == 0 || n_scan > 2 || n_in < n_scan {
        return Err(Refusal(format!(
            "{n_scan} scanned inputs (a cell scans its input and perhaps a mask)"
        )));
    }
    let n_states = n_in - n_scan;
    let n_outs = body.outputs().len();
    if n_outs < n_states || n_outs > n_states + 1 {
        return Err(Refusal(format!(
            "{} scan outputs (a cell emits at most its output sequence)",
            n_outs - n_states.min(n_outs)
        )));
    }
    if scan_input_axes
        .as_ref()
        .is_some_and(|a| a.iter().any(|&x| x != 0))
    {
        return Err(Refusal("a scan input axis other than 0".into()));
    }
    let dirs = scan_input_directions.clone().unwrap_or_default();
    let in_rev = dirs.first().copied().unwrap_or(0) != 0;
    if dirs.iter().any(|&d| (d != 0) != in_rev) {
        return Err(Refusal(
            "the input and mask scan in different directions".into(),
        ));
    }
    let out_axis = scan_output_axes
        .as_ref()
        .and_then(|a| a.first().copied())
        .unwrap_or(0);
    let out_rev = scan_output_directions
        .as_ref()
        .and_then(|d| d.first().copied())
        .unwrap_or(0)
        != 0;
    if out_axis != 0 && out_axis != 1 && out_axis != -2 {
        return Err(Refusal(format!("scan output axis {out_axis}")));
    }
    let bin = body.input_values();
    for (i, &s) in bin[..n_states].iter().enumerate() {
        if let Some(d) = body.value(s).ty.dims() {
            if d.len() != 2 {
                let shown: Vec<String> = d.iter().map(|x| x.to_string()).collect();
                return Err(Refusal(format!(
                    "state {i} has shape [{}]; the fused LSTM/GRU/RNN kernels keep \
                     [batch, hidden] states",
                    shown.join(", ")
                )));
            }
        }
    }
    let x = bin[n_states];
    let xdt = body.value(x).ty.dtype();
    let dt = match xdt {
        Some(d @ (DType::F32 | DType::F64)) => d,
        other => {
            return Err(Refusal(format!(
                "the step input is {}, the fused kernels run f32 and f64",
                other.map_or("of unknown dtype".to_string(), |d| d.to_string())
            )))
        }
    };
    let isz = match body.value(x).ty.dims() {
        Some([_, Dim::Known(i)]) => *i as usize,
        _ => {
            return Err(Refusal(
                "the step input is not [batch, features] with known features".into(),
            ))
        }
    };
    let mask = (n_scan == 2).then(|| bin[n_states + 1]);
    if let Some(m) = mask {
        let ty = &body.value(m).ty;
        if ty.dtype() != Some(DType::Bool) || !matches!(ty.dims(), Some([_, Dim::Known(1)])) {
            return Err(Refusal(
                "the second scanned input is not a [batch, 1] bool mask (the fused \
                 LSTM/GRU/RNN ops read one input sequence and an optional mask)"
                    .into(),
            ));
        }
    }
    let mut b = Body {
        g: body,
        states: bin[..n_states].to_vec(),
        x,
        mask,
        new_states: vec![],
    };
    // States: `Where(mask, new, old)` when masked.
    let outs = body.outputs().to_vec();
    for (s, &o) in outs[..n_states].iter().enumerate() {
        let o = b.strip(o);
        let new = match b.mask {
            Some(m) => match b.op(o) {
                Some((Op::Where {}, wi, _))
                    if wi.first().copied().flatten().map(|v| b.strip(v)) == Some(m)
                        && wi.get(2).copied().flatten().map(|v| b.strip(v))
                            == Some(b.states[s]) =>
                {
                    b.strip(wi[1].ok_or_else(|| Refusal("Where without a value".into()))?)
                }
                _ => {
                    return Err(Refusal(format!(
                        "state {s} is not kept at masked steps (Where(mask, new, old))"
                    )))
                }
            },
            None => o,
        };
        b.new_states.push(new);
    }
    let mut why = Vec::new();
    let mut matched = None;
    let mut rules = RULES;
    rules.sort_by_key(|r| r.priority);
    for rule in rules {
        if rule.states != n_states {
            continue;
        }
        match (rule.matcher)(&b) {
            Ok(m) => {
                matched = Some((rule.name, m));
                break;
            }
            Err(e) => why.push(format!("{}: {e}", rule.name)),
        }
    }
    let cells: Vec<(&'static str, CellMatch)> = match matched {
        Some(one) => vec![one],
        None => match match_stack(&b, &rules) {
            Ok(cells) => cells,
            Err(stack_why) => {
                if why.is_empty() {
                    return Err(Refusal(format!(
                        "{n_states} states and no stack of cells: {stack_why}"
                    )));
                }
                return Err(Refusal(why.join("; ")));
            }
        },
    };
    let (rule, m) = cells
        .last()
        .cloned()
        .ok_or_else(|| Refusal("no cell".into()))?;
    // The output sequence: h', or at masked steps zero or the held h.
    let mut hold = 0;
    if n_outs == n_states + 1 {
        let y = b.strip(outs[n_states]);
        let new_h_out = b.strip(outs[m.h_state]);
        let ok = match b.mask {
            None => y == m.h_new,
            Some(mk) => {
                if y == new_h_out {
                    hold = 1;
                    true
                } else if let Some((Op::Where {}, wi, _)) = b.op(y) {
                    let c = wi.first().copied().flatten().map(|v| b.strip(v));
                    let a = wi.get(1).copied().flatten().map(|v| b.strip(v));
                    let o = wi.get(2).copied().flatten();
                    let other_zero = o.and_then(|v| b.scalar(v)) == Some(0.0);
                    let other_h = o.map(|v| b.strip(v)) == Some(b.states[m.h_state]);
                    if other_h {
                        hold = 1;
                    }
                    c == Some(mk) && a == Some(m.h_new) && (other_zero || other_h)
                } else {
                    false
                }
            }
        };
        if !ok {
            return Err(Refusal(format!(
                "{rule}: the step output {} is not the new h",
                b.name(y)
            )));
        }
    }
    // One fused op per cell; a stacked cell's sequence feeds the next one.
    let _ = rule;
    let mut outs: Vec<Option<ValueRef>> = vec![None; names.len()];
    let mut report = Vec::new();
    let mut x_seq = None;
    let mut in_size = isz;
    let single = cells.len() == 1;
    for (j, (rule, cm)) in cells.iter().enumerate() {
        let last = j + 1 == cells.len();
        let label = if single {
            node.display_name()
        } else {
            format!("{}#{j}", node.display_name())
        };
        let units = b.units(cm.h_state)?;
        let (op, cell_outs, seq) = emit(
            dst,
            &label,
            cm,
            Emitted {
                ins,
                names,
                n_states,
                dt,
                isz: in_size,
                units,
                reverse: in_rev,
                flip: in_rev != out_rev,
                out_axis1: out_axis != 0,
                hold: if last { hold } else { 0 },
                masked: mask.is_some(),
                has_y: last && n_outs == n_states + 1,
                x: x_seq,
                want_seq: !last,
            },
        )?;
        for (o, c) in outs.iter_mut().zip(cell_outs) {
            if c.is_some() {
                *o = c;
            }
        }
        report.push((label, *rule, op));
        x_seq = seq;
        in_size = units;
    }
    Ok(Some((report, outs)))
}

/// A stack of cells in one body (Keras `StackedRNNCells`): the states split into
/// consecutive cells, each matched by a rule, each cell's input the previous cell's new
/// `h` (the first one's the step input).
fn match_stack(
    b: &Body<'_>,
    rules: &[Rule],
) -> std::result::Result<Vec<(&'static str, CellMatch)>, String> {
    let mut cells = Vec::new();
    let mut off = 0;
    let mut x = b.x;
    while off < b.states.len() {
        let mut why = Vec::new();
        let mut got = None;
        for rule in rules {
            let end = off + rule.states;
            if end > b.states.len() {
                continue;
            }
            let sub = Body {
                g: b.g,
                states: b.states[off..end].to_vec(),
                x,
                mask: b.mask,
                new_states: b.new_states[off..end].to_vec(),
            };
            match (rule.matcher)(&sub) {
                Ok(mut m) => {
                    m.h_state += off;
                    m.c_state = m.c_state.map(|c| c + off);
                    got = Some((rule.name, rule.states, m));
                    break;
                }
                Err(e) => why.push(format!("{}: {e}", rule.name)),
            }
        }
        let Some((name, n, m)) = got else {
            return Err(format!(
                "cell {} (state {off}): {}",
                cells.len(),
                why.join("; ")
            ));
        };
        x = m.h_new;
        cells.push((name, m));
        off += n;
    }
    if cells.len() < 2 {
        return Err("a single cell".into());
    }
    Ok(cells)
}

/// What [`emit`] built: the op's name, values for the Scan's outputs this cell owns, and
/// (when asked) its output sequence.
type EmittedCell = (String, Vec<Option<ValueRef>>, Option<ValueRef>);

/// The facts the emitter needs beyond the match.
struct Emitted<'a> {
    ins: &'a [Option<ValueRef>],
    names: &'a [&'a str],
    n_states: usize,
    dt: DType,
    isz: usize,
    units: usize,
    reverse: bool,
    flip: bool,
    out_axis1: bool,
    hold: i64,
    masked: bool,
    has_y: bool,
    /// The input sequence `[T, N, K]` when it is not the Scan's (a stacked cell).
    x: Option<ValueRef>,
    /// Also return `Y` as a `[T, N, H]` time-major sequence (for the next cell).
    want_seq: bool,
}

/// Builds the fused op and the values standing for the Scan's outputs.
fn emit(dst: &mut Graph, label: &str, m: &CellMatch, e: Emitted<'_>) -> Try<EmittedCell> {
    let mut b = Builder::new(dst, &format!("{label}/raise"));
    let (h, k, dt) = (e.units, e.isz, e.dt);
    let zeros = |b: &mut Builder<'_>, shape: &[usize]| -> Try<ValueRef> {
        let n: usize = shape.iter().product();
        let t =
            Tensor::from_f64_vec(dt, shape, &vec![0.0; n]).map_err(|er| Refusal(er.to_string()))?;
        Ok(b.constant(t, "zeros")?)
    };
    let param = |b: &mut Builder<'_>, p: &Param| -> Try<ValueRef> {
        match p {
            Param::Const(t) => Ok(b.constant(t.clone(), "w")?),
            Param::Outer(name, _) => match b.g.find(name) {
                Some(v) => Ok(v),
                None => Err(Refusal(format!(
                    "weight {name:?} is not visible outside the loop"
                ))),
            },
        }
    };
    // [rows, cols] block of a projection, as ONNX wants it: [H, K].
    let block = |b: &mut Builder<'_>, t: &Term| -> Try<ValueRef> {
        let w = param(b, &t.w)?;
        let d = t.w.dims();
        let (axis, full) = if t.trans { (0, d[0]) } else { (1, d[1]) };
        let w = if t.lo == 0 && t.hi == full {
            w
        } else {
            let (s, en, ax) = (
                b.ints(&[t.lo as i64])?,
                b.ints(&[t.hi as i64])?,
                b.ints(&[axis])?,
            );
            b.op(
                Op::Slice {},
                &[Some(w), Some(s), Some(en), Some(ax)],
                "gate_w",
            )?
        };
        if t.trans {
            Ok(w)
        } else {
            Ok(b.op(
                Op::Transpose {
                    perm: Some(vec![1, 0]),
                },
                &[Some(w)],
                "gate_wt",
            )?)
        }
    };
    let sum_blocks = |b: &mut Builder<'_>, terms: &[Term], cols: usize| -> Try<ValueRef> {
        let mut acc: Option<ValueRef> = None;
        for t in terms {
            let v = block(b, t)?;
            acc = Some(match acc {
                Some(a) => b.add(a, v)?,
                None => v,
            });
        }
        match acc {
            Some(a) => Ok(a),
            None => zeros(b, &[h, cols]),
        }
    };
    let bias = |b: &mut Builder<'_>, parts: &[BiasT]| -> Try<ValueRef> {
        let mut acc: Option<ValueRef> = None;
        for p in parts {
            let mut v = param(b, &p.b)?;
            let d = p.b.dims();
            let full = *d.last().unwrap_or(&0);
            if d.len() == 2 {
                let shape = b.ints(&[full as i64])?;
                v = b.op(
                    Op::Reshape { allowzero: 0 },
                    &[Some(v), Some(shape)],
                    "bias_flat",
                )?;
            }
            if p.lo != 0 || p.hi != full {
                let (s, en, ax) = (
                    b.ints(&[p.lo as i64])?,
                    b.ints(&[p.hi as i64])?,
                    b.ints(&[0])?,
                );
                v = b.op(
                    Op::Slice {},
                    &[Some(v), Some(s), Some(en), Some(ax)],
                    "gate_b",
                )?;
            }
            acc = Some(match acc {
                Some(a) => b.add(a, v)?,
                None => v,
            });
        }
        match acc {
            Some(a) => Ok(a),
            None => zeros(b, &[h]),
        }
    };
    let mut ws = Vec::new();
    let mut rs = Vec::new();
    let mut wbs = Vec::new();
    let mut rbs = Vec::new();
    for g in &m.gates {
        ws.push(Some(sum_blocks(&mut b, &g.x, k)?));
        rs.push(Some(sum_blocks(&mut b, &g.h, h)?));
        wbs.push(Some(bias(&mut b, &g.wb)?));
        rbs.push(Some(bias(&mut b, &g.rb)?));
    }
    let stack = |b: &mut Builder<'_>, parts: &[Option<ValueRef>], hint: &str| -> Try<ValueRef> {
        let cat = b.op(Op::Concat { axis: 0 }, parts, hint)?;
        let ax = b.ints(&[0])?;
        Ok(b.op(Op::Unsqueeze { axes: None }, &[Some(cat), Some(ax)], hint)?)
    };
    let w = stack(&mut b, &ws, "W")?;
    let r = stack(&mut b, &rs, "R")?;
    let mut all_b = wbs;
    all_b.extend(rbs);
    let bb = stack(&mut b, &all_b, "B")?;
    let unsq0 = |b: &mut Builder<'_>, v: Option<ValueRef>| -> Try<Option<ValueRef>> {
        match v {
            Some(v) => {
                let ax = b.ints(&[0])?;
                Ok(Some(b.op(
                    Op::Unsqueeze { axes: None },
                    &[Some(v), Some(ax)],
                    "init",
                )?))
            }
            None => Ok(None),
        }
    };
    let h0 = unsq0(&mut b, e.ins.get(m.h_state).copied().flatten())?;
    let c0 = match m.c_state {
        Some(c) => unsq0(&mut b, e.ins.get(c).copied().flatten())?,
        None => None,
    };
    let mut x = match e.x {
        Some(x) => x,
        None => e
            .ins
            .get(e.n_states)
            .copied()
            .flatten()
            .ok_or_else(|| Refusal("the Scan has no input sequence".into()))?,
    };
    // One input factor for every gate (or none): X·factor for the whole sequence.
    let scales: Vec<&Option<Param>> = m
        .gates
        .iter()
        .flat_map(|g| g.x.iter().map(|t| &t.scale))
        .collect();
    if let Some(first) = scales.first() {
        if scales.iter().any(|s| s != first) {
            return Err(Refusal(
                "the gates scale the step input differently (per-gate dropout masks)".into(),
            ));
        }
        if let Some(p) = first {
            let f = param(&mut b, p)?;
            x = b.op(Op::Mul {}, &[Some(x), Some(f)], "scaled_input")?;
        }
    }
    let mask = if e.masked {
        let mv = e
            .ins
            .get(e.n_states + 1)
            .copied()
            .flatten()
            .ok_or_else(|| Refusal("the Scan has no mask sequence".into()))?;
        match b.g.value(mv).ty.dims().map(<[_]>::len) {
            Some(3) => {
                let ax = b.ints(&[2])?;
                Some(b.op(Op::Squeeze { axes: None }, &[Some(mv), Some(ax)], "mask")?)
            }
            _ => return Err(Refusal("the mask sequence is not [T, batch, 1]".into())),
        }
    } else {
        None
    };
    let mut acts = Vec::new();
    let (mut alpha, mut beta) = (Vec::new(), Vec::new());
    for &a in &m.acts {
        let (name, al, be) = act_attr(a);
        acts.push(name.to_string());
        alpha.extend(al);
        beta.extend(be);
    }
    let default_acts: &[&str] = match m.cell {
        Cell::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        Cell::Gru => &["Sigmoid", "Tanh"],
        Cell::Rnn => &["Tanh"],
    };
    let is_default = acts
        .iter()
        .map(String::as_str)
        .eq(default_acts.iter().copied());
    let activations = (!is_default).then_some(acts);
    let activation_alpha = (!alpha.is_empty()).then_some(alpha);
    let activation_beta = (!beta.is_empty()).then_some(beta);
    let direction = if e.reverse { "reverse" } else { "forward" }.to_string();
    let hidden_size = Some(h as i64);
    let op = match m.cell {
        Cell::Lstm => Op::LSTM {
            activation_alpha,
            activation_beta,
            activations,
            clip: m.clip,
            direction,
            hidden_size,
            input_forget: 0,
            layout: 0,
        },
        Cell::Gru => Op::GRU {
            activation_alpha,
            activation_beta,
            activations,
            clip: m.clip,
            direction,
            hidden_size,
            layout: 0,
            linear_before_reset: i64::from(m.lbr),
        },
        Cell::Rnn => Op::RNN {
            activation_alpha,
            activation_beta,
            activations,
            clip: m.clip,
            direction,
            hidden_size,
            layout: 0,
        },
    };
    let mut op_ins = vec![Some(x), Some(w), Some(r), Some(bb), None, h0];
    if m.cell == Cell::Lstm {
        op_ins.push(c0);
        op_ins.push(None);
    }
    let op = match mask {
        Some(mk) => {
            op_ins.push(Some(mk));
            b.g.import_opset(cellgraph_ir::ops::CELLGRAPH_DOMAIN, 1);
            op.masked_recurrent(e.hold)
                .ok_or_else(|| Refusal("no masked form".into()))?
        }
        None => op,
    };
    let op_name = op.name().to_string();
    let hints: &[&str] = if m.cell == Cell::Lstm {
        &["Y", "Y_h", "Y_c"]
    } else {
        &["Y", "Y_h"]
    };
    let out_names: Vec<String> = hints.iter().map(|h| b.fresh(h)).collect();
    let refs: Vec<&str> = out_names.iter().map(String::as_str).collect();
    let id =
        b.g.add_node(label, op, &op_ins, &refs)
            .map_err(|er| Refusal(format!("the fused op does not type-check: {er}")))?;
    let fused: Vec<ValueRef> = (0..refs.len())
        .map(|slot| ValueRef { node: id, slot })
        .collect();
    // Scan outputs: final states (in the Scan's state order), then the sequence.
    let mut outs: Vec<Option<ValueRef>> = vec![None; e.names.len()];
    for (s, out) in outs.iter_mut().enumerate().take(e.n_states) {
        let mine = s == m.h_state || Some(s) == m.c_state;
        if !mine || e.names.get(s).is_none_or(|n| n.is_empty()) {
            continue;
        }
        let src = if s == m.h_state { fused[1] } else { fused[2] };
        let ax = b.ints(&[0])?;
        *out = Some(b.op(
            Op::Squeeze { axes: None },
            &[Some(src), Some(ax)],
            "final_state",
        )?);
    }
    let mut seq = None;
    if e.want_seq {
        let ax = b.ints(&[1])?;
        seq = Some(b.op(
            Op::Squeeze { axes: None },
            &[Some(fused[0]), Some(ax)],
            "cell_sequence",
        )?);
    }
    if e.has_y && e.names.get(e.n_states).is_some_and(|n| !n.is_empty()) {
        let ax = b.ints(&[1])?;
        let mut y = b.op(
            Op::Squeeze { axes: None },
            &[Some(fused[0]), Some(ax)],
            "sequence",
        )?;
        if e.flip {
            let (s, en, ax, st) = (
                b.ints(&[-1])?,
                b.ints(&[i64::MIN])?,
                b.ints(&[0])?,
                b.ints(&[-1])?,
            );
            y = b.op(
                Op::Slice {},
                &[Some(y), Some(s), Some(en), Some(ax), Some(st)],
                "processing_order",
            )?;
        }
        if e.out_axis1 {
            y = b.op(
                Op::Transpose {
                    perm: Some(vec![1, 0, 2]),
                },
                &[Some(y)],
                "batch_major",
            )?;
        }
        outs[e.n_states] = Some(y);
    }
    Ok((op_name, outs, seq))
}

/// The fused recurrent ops of the forward (see [`cellgraph_ir::ops::rnn::is_fused`]).
pub use cellgraph_ir::ops::rnn::is_fused as is_fused_recurrent;
