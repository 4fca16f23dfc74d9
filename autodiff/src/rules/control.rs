//! VJP rules of the `control` family (`OpKind::info().family`): `Scan`, `Loop` and `If`, each through a backward body.

use super::{Grads, NodeCx};
use crate::emit::Emit;
use crate::{branch_vjp, loop_body_vjp, scan_body_vjp, Error, Result};
use cellgraph_ir::{DType, Graph, NodeId, Op, ValueRef};

/// The rule for `cx.op`, an op of this family.
pub(super) fn vjp(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let no_rule = || cx.no_rule();
    match cx.op {
        Op::Scan { .. } => scan(e, cx),
        Op::If { .. } => if_rule(e, cx),
        Op::Loop { .. } => loop_rule(e, cx),
        _ => Err(no_rule()),
    }
}

/// Scan attributes (opset 9+ form) with defaults filled in.
struct ScanAttrs {
    n_scan: usize,
    in_axes: Vec<i64>,
    in_dirs: Vec<i64>,
    out_axes: Vec<i64>,
    out_dirs: Vec<i64>,
}

fn scan_attrs(op: &Op, n_in: usize, n_out: usize, opset: i64, cx_name: &str) -> Result<ScanAttrs> {
    let Op::Scan {
        num_scan_inputs,
        scan_input_axes,
        scan_input_directions,
        scan_output_axes,
        scan_output_directions,
        ..
    } = op
    else {
        return Err(Error::Internal("not a Scan".into()));
    };
    if opset < 9 {
        return Err(Error::Unsupported {
            op: "Scan".into(),
            node: cx_name.to_string(),
            why: "the opset 8 form (batched, sequence_lens)".into(),
        });
    }
    let m = usize::try_from(*num_scan_inputs).unwrap_or(0).min(n_in);
    let n = n_in - m;
    let k = n_out.saturating_sub(n);
    let fill = |v: &Option<Vec<i64>>, len: usize| {
        let mut v = v.clone().unwrap_or_default();
        v.resize(len, 0);
        v
    };
    Ok(ScanAttrs {
        n_scan: m,
        in_axes: fill(scan_input_axes, m),
        in_dirs: fill(scan_input_directions, m),
        out_axes: fill(scan_output_axes, k),
        out_dirs: fill(scan_output_directions, k),
    })
}

/// The forward Scan with one more scan output per state: the state each step starts
/// from, stacked on axis 0 in iteration order. Returns the new op and the number of
/// extra outputs.
pub(crate) fn augment_scan(
    op: &Op,
    ins: &[Option<ValueRef>],
    src: &Graph,
    node: NodeId,
) -> Result<(Op, usize)> {
    let n_out = src.node(node).outputs.len();
    let name = src.node(node).display_name();
    let a = scan_attrs(op, ins.len(), n_out, src.opset(""), &name)?;
    let n = ins.len() - a.n_scan;
    let Op::Scan { body, .. } = op else {
        return Err(Error::Internal("not a Scan".into()));
    };
    let mut body = (**body).clone();
    let mut outs = body.outputs().to_vec();
    let states: Vec<ValueRef> = body.input_values()[..n].to_vec();
    for (k, s) in states.into_iter().enumerate() {
        let mut e = Emit::new(&mut body, &format!("residual_{k}"));
        outs.push(e.op(Op::Identity {}, &[s], "state")?);
    }
    body.set_outputs(outs)?;
    let mut out_axes = a.out_axes.clone();
    out_axes.resize(a.out_axes.len() + n, 0);
    let mut out_dirs = a.out_dirs.clone();
    out_dirs.resize(a.out_dirs.len() + n, 0);
    Ok((
        Op::Scan {
            body: Box::new(body),
            num_scan_inputs: a.n_scan as i64,
            scan_input_axes: Some(a.in_axes),
            scan_input_directions: Some(a.in_dirs),
            scan_output_axes: Some(out_axes),
            scan_output_directions: Some(out_dirs),
            directions: None,
        },
        n,
    ))
}

/// The VJP of a Scan: a backward Scan over the body's VJP, in the opposite direction.
fn scan(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::Scan { body, .. } = cx.op else {
        return Err(Error::Internal("not a Scan".into()));
    };
    let a = scan_attrs(
        cx.op,
        cx.ins.len(),
        cx.outs.len(),
        cx.src.opset(""),
        &cx.name,
    )?;
    let m = a.n_scan;
    let n = cx.ins.len() - m;
    let k = cx.outs.len() - n;
    if cx.residuals.len() != n {
        return Err(Error::Internal(format!(
            "Scan {}: {} residual outputs for {n} states",
            cx.name,
            cx.residuals.len()
        )));
    }
    let (bwd_body, outer_names) = scan_body_vjp(body, n)?;
    let mut ins = Vec::new();
    // Carries: dS (the cotangents of the final states), then zero dW accumulators.
    for s in 0..n {
        ins.push(match cx.cots[s] {
            Some(c) => c,
            None => e.zeros_like(cx.outs[s], "a Scan state")?,
        });
    }
    for name in &outer_names {
        let w =
            e.g.find(name)
                .ok_or_else(|| cx.unsupported(format!("outer value {name} not found")))?;
        ins.push(e.zeros_like(w, "a value a Scan body reads")?);
    }
    // Scanned, in the opposite direction: residual states, the scanned inputs, dy.
    let mut axes = Vec::new();
    let mut dirs = Vec::new();
    for &r in cx.residuals {
        ins.push(r);
        axes.push(0);
        dirs.push(1);
    }
    for j in 0..m {
        ins.push(cx.input(n + j)?);
        axes.push(a.in_axes[j]);
        dirs.push(1 - a.in_dirs[j]);
    }
    for o in 0..k {
        ins.push(match cx.cots[n + o] {
            Some(c) => c,
            None => e.zeros_like(cx.outs[n + o], "a Scan output")?,
        });
        axes.push(a.out_axes[o]);
        dirs.push(1 - a.out_dirs[o]);
    }
    let n_carry = n + outer_names.len();
    let mut hints: Vec<String> = (0..n).map(|s| format!("dinit_{s}")).collect();
    hints.extend((0..outer_names.len()).map(|w| format!("douter_{w}")));
    hints.extend((0..m).map(|j| format!("dxs_{j}")));
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let ins_opt: Vec<Option<ValueRef>> = ins.into_iter().map(Some).collect();
    let id = e.node(
        Op::Scan {
            body: Box::new(bwd_body),
            num_scan_inputs: (n + m + k) as i64,
            scan_input_axes: Some(axes),
            scan_input_directions: Some(dirs),
            scan_output_axes: Some(a.in_axes.clone()),
            scan_output_directions: Some(a.in_dirs.iter().map(|d| 1 - d).collect()),
            directions: None,
        },
        &ins_opt,
        &hint_refs,
    )?;
    let at = |slot| ValueRef { node: id, slot };
    let mut inputs: Vec<Option<ValueRef>> = (0..n).map(|s| cx.need(s).then(|| at(s))).collect();
    for j in 0..m {
        inputs.push(cx.need(n + j).then(|| at(n_carry + j)));
    }
    let outer = outer_names
        .into_iter()
        .enumerate()
        .map(|(w, name)| (name, at(n + w)))
        .collect();
    Ok(Grads { inputs, outer })
}

/// `If`: an `If` on the same condition whose branches are the branches' VJPs; it outputs
/// the gradient of every float value either branch reads from outside.
fn if_rule(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::If {
        then_branch,
        else_branch,
    } = cx.op
    else {
        return Err(Error::Internal("not an If".into()));
    };
    let cond = cx.input(0)?;
    let cots: Vec<Option<(String, cellgraph_ir::ValueType)>> = cx
        .cots
        .iter()
        .map(|c| c.map(|c| (e.g.value(c).name.clone(), e.g.value(c).ty.clone())))
        .collect();
    let mut names: Vec<String> = Vec::new();
    for b in [then_branch, else_branch] {
        for &o in b.outers() {
            let v = ValueRef { node: o, slot: 0 };
            let val = b.value(v);
            if val.ty.dtype().is_some_and(DType::is_float) && !names.contains(&val.name) {
                names.push(val.name.clone());
            }
        }
    }
    let wrt: Vec<(String, cellgraph_ir::ValueType)> = names
        .iter()
        .filter_map(|n| e.g.find(n).map(|v| (n.clone(), e.g.value(v).ty.clone())))
        .collect();
    if wrt.is_empty() {
        return Ok(Grads::default());
    }
    let then_g = branch_vjp(then_branch, &cots, &wrt)?;
    let else_g = branch_vjp(else_branch, &cots, &wrt)?;
    let hints: Vec<String> = (0..wrt.len()).map(|k| format!("dif_{k}")).collect();
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let id = e.node(
        Op::If {
            then_branch: Box::new(then_g),
            else_branch: Box::new(else_g),
        },
        &[Some(cond)],
        &hint_refs,
    )?;
    Ok(Grads {
        inputs: vec![None; cx.ins.len()],
        outer: wrt
            .into_iter()
            .enumerate()
            .map(|(k, (name, _))| (name, ValueRef { node: id, slot: k }))
            .collect(),
    })
}

/// The forward Loop with more scan outputs: each carried value at the start of every
/// iteration, then the iteration number.
pub(crate) fn augment_loop(op: &Op, ins: &[Option<ValueRef>]) -> Result<(Op, usize)> {
    let Op::Loop { body } = op else {
        return Err(Error::Internal("not a Loop".into()));
    };
    let n = ins.len().saturating_sub(2);
    let mut body = (**body).clone();
    let mut outs = body.outputs().to_vec();
    let bins = body.input_values();
    for (k, v) in bins[2..].iter().enumerate() {
        let mut e = Emit::new(&mut body, &format!("residual_{k}"));
        outs.push(e.op(Op::Identity {}, &[*v], "carried")?);
    }
    let mut e = Emit::new(&mut body, "residual_iter");
    outs.push(e.op(Op::Identity {}, &[bins[0]], "iter")?);
    body.set_outputs(outs)?;
    Ok((
        Op::Loop {
            body: Box::new(body),
        },
        n + 1,
    ))
}

/// `Loop`: a backward `Scan` over the recorded iterations (carried values and iteration
/// numbers), in reverse, whose body recomputes each iteration and runs its VJP.
fn loop_rule(e: &mut Emit, cx: &NodeCx) -> Result<Grads> {
    let Op::Loop { body } = cx.op else {
        return Err(Error::Internal("not a Loop".into()));
    };
    let n = cx.ins.len().saturating_sub(2);
    let k = cx.outs.len() - n;
    if cx.residuals.len() != n + 1 {
        return Err(Error::Internal(format!(
            "Loop {}: {} residual outputs for {n} carried values",
            cx.name,
            cx.residuals.len()
        )));
    }
    let (bwd, outer_names) = loop_body_vjp(body, n)?;
    let mut ins = Vec::new();
    for s in 0..n {
        ins.push(match cx.cots[s] {
            Some(c) => c,
            None => e.zeros_dyn(cx.outs[s])?,
        });
    }
    for name in &outer_names {
        let w =
            e.g.find(name)
                .ok_or_else(|| cx.unsupported(format!("outer value {name} not found")))?;
        ins.push(e.zeros_like(w, "a value a Loop body reads")?);
    }
    for &r in cx.residuals {
        ins.push(r);
    }
    for o in 0..k {
        ins.push(match cx.cots[n + o] {
            Some(c) => c,
            None => e.zeros_dyn(cx.outs[n + o])?,
        });
    }
    let n_scan = n + 1 + k;
    let mut hints: Vec<String> = (0..n).map(|s| format!("dloop_init_{s}")).collect();
    hints.extend((0..outer_names.len()).map(|w| format!("dloop_outer_{w}")));
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let ins_opt: Vec<Option<ValueRef>> = ins.into_iter().map(Some).collect();
    let id = e.node(
        Op::Scan {
            body: Box::new(bwd),
            num_scan_inputs: n_scan as i64,
            scan_input_axes: None,
            scan_input_directions: Some(vec![1; n_scan]),
            scan_output_axes: None,
            scan_output_directions: None,
            directions: None,
        },
        &ins_opt,
        &hint_refs,
    )?;
    let at = |slot| ValueRef { node: id, slot };
    let mut inputs = vec![None, None];
    for s in 0..n {
        inputs.push(cx.need(2 + s).then(|| at(s)));
    }
    inputs.truncate(cx.ins.len());
    Ok(Grads {
        inputs,
        outer: outer_names
            .into_iter()
            .enumerate()
            .map(|(w, name)| (name, at(n + w)))
            .collect(),
    })
}
