//! Lowering layers to IR nodes.
//!
//! Every recurrent layer becomes a `Scan` (or, with `unroll`, the unrolled steps) whose
//! body is the cell written with primitive ops: `MatMul`, `Add`, `Mul`, `Sub`, `Split`,
//! activations. Masks are `Where(mask, new, old)` in the body, `go_backwards` is the scan
//! direction, and the sequence output is stacked in processing order. The input is
//! transposed to time-major first, so the CPU backend hoists `x_t · K` out of the loop.

use super::config::{Bidirectional, Cell, CellKind, MergeMode, Recurrent};
use crate::keras::emit::Emit;
use crate::keras::KerasError;
use cellgraph_ir::{DType, Dim, Graph, Op, TensorType, ValueRef, ValueType};
use std::collections::HashMap;

type R<T> = Result<T, KerasError>;

/// The weights of one cell, as values of the graph that computes the step.
#[derive(Clone, Debug)]
pub(crate) struct CellW {
    /// Input kernel `[in, g·u]`.
    pub k: ValueRef,
    /// Recurrent kernel `[u, g·u]` (GRU reset-before: the z and r blocks only).
    pub u: ValueRef,
    /// Input-side bias (LSTM/SimpleRNN/GRU reset-before: the whole bias).
    pub b: Option<ValueRef>,
    /// GRU reset-after: the recurrent bias row.
    pub b_rec: Option<ValueRef>,
    /// GRU reset-before: the candidate block of the recurrent kernel.
    pub u_h: Option<ValueRef>,
    /// Training-mode input dropout masks `(batch, in)`: one, or one per gate.
    pub dm: Vec<ValueRef>,
    /// Training-mode recurrent dropout masks `(batch, units)`: one, or one per gate.
    pub rm: Vec<ValueRef>,
    /// Per-gate mode (Keras's `implementation=1`, used with recurrent dropout): the
    /// kernel, recurrent kernel, input bias and (GRU reset-after) recurrent bias per gate.
    pub kg: Vec<ValueRef>,
    pub ug: Vec<ValueRef>,
    pub bg: Vec<ValueRef>,
    pub brg: Vec<ValueRef>,
}

impl CellW {
    fn map(&self, f: &mut impl FnMut(ValueRef) -> R<ValueRef>) -> R<CellW> {
        let all = |v: &[ValueRef], f: &mut dyn FnMut(ValueRef) -> R<ValueRef>| {
            v.iter().map(|&x| f(x)).collect::<R<Vec<_>>>()
        };
        Ok(CellW {
            k: f(self.k)?,
            u: f(self.u)?,
            b: self.b.map(&mut *f).transpose()?,
            b_rec: self.b_rec.map(&mut *f).transpose()?,
            u_h: self.u_h.map(&mut *f).transpose()?,
            dm: all(&self.dm, f)?,
            rm: all(&self.rm, f)?,
            kg: all(&self.kg, f)?,
            ug: all(&self.ug, f)?,
            bg: all(&self.bg, f)?,
            brg: all(&self.brg, f)?,
        })
    }
}

/// Splits `v` into `n` blocks of `size` along `axis`.
fn blocks(e: &mut Emit, v: ValueRef, n: usize, size: usize, axis: i64) -> R<Vec<ValueRef>> {
    (0..n)
        .map(|g| e.slice(v, axis, (g * size) as i64, ((g + 1) * size) as i64, 1))
        .collect()
}

/// Splits a cell's Keras weights `[kernel, recurrent_kernel, (bias)]` into what the step
/// reads (in the graph that owns the weights, outside any loop).
///
/// In training mode with `dropout`/`recurrent_dropout`, the masks are drawn once per
/// call (Keras caches them for the whole sequence): one input mask, or with recurrent
/// dropout (Keras's `implementation=1`) one mask per gate for the input and the state.
pub(crate) fn prep_cell(
    e: &mut Emit,
    cell: &Cell,
    w: &[ValueRef],
    batch: &Dim,
    in_dim: &Dim,
) -> R<CellW> {
    let (k, u) = (w[0], w[1]);
    let bias = w.get(2).copied();
    let units = cell.units as i64;
    // (recurrent kernel, input-side bias, GRU reset-after recurrent bias, GRU candidate block)
    let (u_main, b, b_rec, u_h) = match cell.kind {
        CellKind::GRU if cell.reset_after => (
            u,
            bias.map(|b| e.pick(b, 0, 0)).transpose()?,
            bias.map(|b| e.pick(b, 1, 0)).transpose()?,
            None,
        ),
        CellKind::GRU => (
            e.slice(u, 1, 0, 2 * units, 1)?,
            bias,
            None,
            Some(e.slice(u, 1, 2 * units, 3 * units, 1)?),
        ),
        _ => (u, bias, None, None),
    };
    let mut cw = CellW {
        k,
        u: u_main,
        b,
        b_rec,
        u_h,
        dm: vec![],
        rm: vec![],
        kg: vec![],
        ug: vec![],
        bg: vec![],
        brg: vec![],
    };
    let drop = cell.dropout > 0.0;
    let rdrop = cell.recurrent_dropout > 0.0;
    if !e.training || !(drop || rdrop) {
        return Ok(cw);
    }
    let gates = cell.kind.gates();
    let per_gate = rdrop && cell.kind != CellKind::SimpleRNN;
    let count = if per_gate { gates } else { 1 };
    if drop {
        for _ in 0..count {
            let m = e.random_mask(&[batch.clone(), in_dim.clone()], cell.dropout)?;
            cw.dm.push(m);
        }
    }
    if rdrop {
        for _ in 0..count {
            let m = e.random_mask(
                &[batch.clone(), Dim::Known(cell.units as u64)],
                cell.recurrent_dropout,
            )?;
            cw.rm.push(m);
        }
    }
    if per_gate {
        let n = cell.units;
        cw.kg = blocks(e, k, gates, n, 1)?;
        cw.ug = blocks(e, u, gates, n, 1)?;
        if let Some(b) = bias {
            if cell.kind == CellKind::GRU && cell.reset_after {
                let (bi, br) = (e.pick(b, 0, 0)?, e.pick(b, 1, 0)?);
                cw.bg = blocks(e, bi, gates, n, 0)?;
                cw.brg = blocks(e, br, gates, n, 0)?;
            } else {
                cw.bg = blocks(e, b, gates, n, 0)?;
            }
        }
    }
    Ok(cw)
}

/// Keras's `implementation=1` step (recurrent dropout): per-gate products with per-gate
/// dropout masks on the input and on the state.
fn per_gate_step(
    e: &mut Emit,
    cell: &Cell,
    w: &CellW,
    x: ValueRef,
    st: &[ValueRef],
) -> R<(ValueRef, Vec<ValueRef>)> {
    let (act, ra) = (cell.activation, cell.recurrent_activation);
    let h0 = st[0];
    let mut xs = Vec::new();
    let mut hs = Vec::new();
    for g in 0..cell.kind.gates() {
        let xg = match w.dm.get(g) {
            Some(&m) => e.mul(x, m)?,
            None => x,
        };
        let mut xk = e.matmul(xg, w.kg[g])?;
        if let Some(&b) = w.bg.get(g) {
            xk = e.add(xk, b)?;
        }
        xs.push(xk);
        hs.push(match w.rm.get(g) {
            Some(&m) => e.mul(h0, m)?,
            None => h0,
        });
    }
    match cell.kind {
        CellKind::LSTM => {
            let mut z = Vec::new();
            for g in 0..4 {
                let hu = e.matmul(hs[g], w.ug[g])?;
                z.push(e.add(xs[g], hu)?);
            }
            lstm_gates(e, cell, &z, st[1])
        }
        CellKind::GRU => {
            let mut rec = Vec::new();
            for (g, (&h, &u)) in hs.iter().zip(&w.ug).take(2).enumerate() {
                let mut r = e.matmul(h, u)?;
                if let Some(&b) = w.brg.get(g) {
                    r = e.add(r, b)?;
                }
                rec.push(r);
            }
            let zs = e.add(xs[0], rec[0])?;
            let z = e.activation(ra, zs)?;
            let rs = e.add(xs[1], rec[1])?;
            let r = e.activation(ra, rs)?;
            let rh = if cell.reset_after {
                let mut hu = e.matmul(hs[2], w.ug[2])?;
                if let Some(&b) = w.brg.get(2) {
                    hu = e.add(hu, b)?;
                }
                e.mul(r, hu)?
            } else {
                let rh = e.mul(r, hs[2])?;
                e.matmul(rh, w.ug[2])?
            };
            let pre = e.add(xs[2], rh)?;
            let hh = e.activation(act, pre)?;
            mix(e, z, h0, hh)
        }
        CellKind::SimpleRNN => Err(KerasError::Internal(
            "SimpleRNN has no per-gate form".into(),
        )),
    }
}

/// LSTM from its gate pre-activations (blocks i, f, c, o) and the previous cell state:
/// `c' = f⊙c + i⊙act(z_c)`, `h' = o⊙act(c')`.
fn lstm_gates(
    e: &mut Emit,
    cell: &Cell,
    z: &[ValueRef],
    c_prev: ValueRef,
) -> R<(ValueRef, Vec<ValueRef>)> {
    let (act, ra) = (cell.activation, cell.recurrent_activation);
    let i = e.activation(ra, z[0])?;
    let f = e.activation(ra, z[1])?;
    let cc = e.activation(act, z[2])?;
    let o = e.activation(ra, z[3])?;
    let fc = e.mul(f, c_prev)?;
    let ic = e.mul(i, cc)?;
    let c = e.add(fc, ic)?;
    let ac = e.activation(act, c)?;
    let h = e.mul(o, ac)?;
    Ok((h, vec![h, c]))
}

/// GRU's `h' = z⊙h + (1 − z)⊙ĥ`.
fn mix(e: &mut Emit, z: ValueRef, h0: ValueRef, hh: ValueRef) -> R<(ValueRef, Vec<ValueRef>)> {
    let one = e.scalar(1.0)?;
    let omz = e.op(Op::Sub {}, &[one, z], "one_minus_z")?;
    let a = e.mul(z, h0)?;
    let b = e.mul(omz, hh)?;
    let h = e.add(a, b)?;
    Ok((h, vec![h]))
}

/// One step of one cell: `(output, new_states)`.
pub(crate) fn cell_step(
    e: &mut Emit,
    cell: &Cell,
    w: &CellW,
    x: ValueRef,
    st: &[ValueRef],
) -> R<(ValueRef, Vec<ValueRef>)> {
    if !w.kg.is_empty() {
        return per_gate_step(e, cell, w, x, st);
    }
    let (act, ra) = (cell.activation, cell.recurrent_activation);
    let x = match w.dm.first() {
        Some(&m) => e.mul(x, m)?,
        None => x,
    };
    // SimpleRNN's recurrent dropout multiplies the previous output before its product.
    let h_rec = match w.rm.first() {
        Some(&m) => e.mul(st[0], m)?,
        None => st[0],
    };
    let xk = e.matmul(x, w.k)?;
    let xz = match w.b {
        Some(b) => e.add(xk, b)?,
        None => xk,
    };
    match cell.kind {
        CellKind::SimpleRNN => {
            let hu = e.matmul(h_rec, w.u)?;
            let z = e.add(xz, hu)?;
            let h = e.activation(act, z)?;
            Ok((h, vec![h]))
        }
        CellKind::LSTM => {
            let hu = e.matmul(st[0], w.u)?;
            let z = e.add(xz, hu)?;
            let g = e.split(z, 4)?;
            lstm_gates(e, cell, &g, st[1])
        }
        CellKind::GRU => {
            let h0 = st[0];
            let xs = e.split(xz, 3)?;
            let (z, hh) = if cell.reset_after {
                let hu = e.matmul(h0, w.u)?;
                let hz = match w.b_rec {
                    Some(b) => e.add(hu, b)?,
                    None => hu,
                };
                let hs = e.split(hz, 3)?;
                let zs = e.add(xs[0], hs[0])?;
                let z = e.activation(ra, zs)?;
                let rs = e.add(xs[1], hs[1])?;
                let r = e.activation(ra, rs)?;
                let rh = e.mul(r, hs[2])?;
                let pre = e.add(xs[2], rh)?;
                (z, e.activation(act, pre)?)
            } else {
                let hu = e.matmul(h0, w.u)?;
                let hs = e.split(hu, 2)?;
                let zs = e.add(xs[0], hs[0])?;
                let z = e.activation(ra, zs)?;
                let rs = e.add(xs[1], hs[1])?;
                let r = e.activation(ra, rs)?;
                let rh = e.mul(r, h0)?;
                let u_h = w
                    .u_h
                    .ok_or_else(|| KerasError::Internal("GRU without U_h".into()))?;
                let rhu = e.matmul(rh, u_h)?;
                let pre = e.add(xs[2], rhu)?;
                (z, e.activation(act, pre)?)
            };
            mix(e, z, h0, hh)
        }
    }
}

/// One step of the whole (possibly stacked) cell with the mask applied.
fn layer_step(
    e: &mut Emit,
    rec: &Recurrent,
    ws: &[CellW],
    x: ValueRef,
    st: &[ValueRef],
    mask: Option<ValueRef>,
) -> R<(ValueRef, Vec<ValueRef>)> {
    let mut inp = x;
    let mut new_states = Vec::with_capacity(st.len());
    let mut offset = 0;
    let mut last_offset = 0;
    for (cell, w) in rec.cells.iter().zip(ws) {
        let n = cell.state_sizes().len();
        let (out, ns) = cell_step(e, cell, w, inp, &st[offset..offset + n])?;
        inp = out;
        new_states.extend(ns);
        last_offset = offset;
        offset += n;
    }
    let Some(m) = mask else {
        return Ok((inp, new_states));
    };
    let kept: Vec<ValueRef> = new_states
        .iter()
        .zip(st)
        .map(|(&n, &o)| e.op(Op::Where {}, &[m, n, o], "masked_state"))
        .collect::<R<_>>()?;
    let other = if rec.zero_output_for_mask {
        e.scalar(0.0)?
    } else {
        // Keras: the previous output is the first state of the last cell.
        st[last_offset]
    };
    let out = e.op(Op::Where {}, &[m, inp, other], "masked_output")?;
    Ok((out, kept))
}

/// What a recurrent layer produced.
pub(crate) struct RecOut {
    /// `(batch, time, units)` in processing order, when `return_sequences`.
    pub seq: Option<ValueRef>,
    /// The last output `(batch, units)`, when not `return_sequences`.
    pub last: Option<ValueRef>,
    /// The final states, cell after cell.
    pub states: Vec<ValueRef>,
}

/// Lowers a recurrent layer reading `x` `(batch, time, features)`.
pub(crate) fn recurrent(
    e: &mut Emit,
    rec: &Recurrent,
    weights: &[ValueRef],
    x: ValueRef,
    mask: Option<ValueRef>,
    init: Option<Vec<ValueRef>>,
) -> R<RecOut> {
    // Per-cell weights (and training-mode dropout masks), prepared outside the loop.
    let xdims = e.dims(x);
    let batch = xdims.first().cloned().unwrap_or(Dim::Unknown);
    let mut in_dim = xdims.get(2).cloned().unwrap_or(Dim::Unknown);
    let mut ws = Vec::new();
    let mut at = 0;
    for cell in &rec.cells {
        let n = cell.weight_shapes(0).len();
        let w = weights
            .get(at..at + n)
            .ok_or_else(|| KerasError::Internal("too few weights for the cells".into()))?;
        ws.push(prep_cell(e, cell, w, &batch, &in_dim)?);
        in_dim = Dim::Known(cell.units as u64);
        at += n;
    }
    let sizes = rec.state_sizes();
    let init: Vec<ValueRef> = match init {
        Some(v) => v,
        None => sizes
            .iter()
            .map(|&s| e.batch_zeros(x, s))
            .collect::<R<_>>()?,
    };
    // Masks as (batch, time, 1) booleans.
    let mask3 = mask.map(|m| e.unsqueeze(m, &[2])).transpose()?;
    let carry_last = mask.is_some() && rec.zero_output_for_mask && !rec.return_sequences;
    if rec.unroll {
        return unrolled(e, rec, &ws, x, mask3, init, carry_last);
    }
    let x_tm = e.transpose(x, &[1, 0, 2])?;
    let m_tm = mask3.map(|m| e.transpose(m, &[1, 0, 2])).transpose()?;

    // The body: states, then x_t (and mask_t); weights are outer values.
    let mut body = Graph::with_opsets("cell", e.g.opsets().clone());
    let xd = e.dims(x_tm);
    let b = xd.get(1).cloned().unwrap_or(Dim::Unknown);
    let mut body_ins = Vec::new();
    {
        for (i, &s) in sizes.iter().enumerate() {
            let ty = ValueType::Tensor(TensorType::with_dims(
                DType::F32,
                vec![b.clone(), Dim::Known(s as u64)],
            ));
            body_ins.push(body.add_input(&format!("state_{i}"), ty)?);
        }
        if carry_last {
            // An extra state following the (zeroed) output: Keras's last output.
            let ty = ValueType::Tensor(TensorType::with_dims(
                DType::F32,
                vec![b.clone(), Dim::Known(rec.output_units() as u64)],
            ));
            body_ins.push(body.add_input("last_output", ty)?);
        }
        let feat = xd.get(2).cloned().unwrap_or(Dim::Unknown);
        let ty = ValueType::Tensor(TensorType::with_dims(DType::F32, vec![b.clone(), feat]));
        body_ins.push(body.add_input("x_t", ty)?);
        if m_tm.is_some() {
            let ty = ValueType::Tensor(TensorType::with_dims(
                DType::Bool,
                vec![b.clone(), Dim::Known(1)],
            ));
            body_ins.push(body.add_input("mask_t", ty)?);
        }
    }
    let mut outer: HashMap<ValueRef, ValueRef> = HashMap::new();
    let mut body_ws = Vec::new();
    for w in &ws {
        body_ws.push(w.map(&mut |v: ValueRef| {
            if let Some(&o) = outer.get(&v) {
                return Ok(o);
            }
            let val = e.g.value(v);
            let o = body.add_outer(&val.name, val.ty.clone())?;
            outer.insert(v, o);
            Ok(o)
        })?);
    }
    let n = sizes.len();
    let n_state = n + usize::from(carry_last);
    let (out, new_states) = {
        let mut be = Emit::new(&mut body, "step");
        let mt = m_tm.map(|_| body_ins[n_state + 1]);
        layer_step(
            &mut be,
            rec,
            &body_ws,
            body_ins[n_state],
            &body_ins[..n],
            mt,
        )?
    };
    let mut body_outs = new_states;
    if carry_last {
        body_outs.push(out);
    }
    if rec.return_sequences {
        body_outs.push(out);
    }
    // A value listed twice among the body outputs (h is the new state and the step's
    // output) gets an Identity: onnxruntime mis-handles repeated graph outputs.
    let mut seen = std::collections::HashSet::new();
    let mut be = Emit::new(&mut body, "out");
    for o in &mut body_outs {
        if !seen.insert(*o) {
            *o = be.op(Op::Identity {}, &[*o], "copy")?;
        }
    }
    body.set_outputs(body_outs)?;

    let mut ins = init.clone();
    if carry_last {
        ins.push(e.batch_zeros(x, rec.output_units())?);
    }
    ins.push(x_tm);
    ins.extend(m_tm);
    let n_scan = 1 + usize::from(m_tm.is_some());
    let mut hints: Vec<String> = (0..n_state).map(|i| format!("final_state_{i}")).collect();
    if rec.return_sequences {
        hints.push("sequence".into());
    }
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let stem = if rec.go_backwards {
        format!("{}/backward_scan", e.prefix)
    } else {
        format!("{}/scan", e.prefix)
    };
    // Node names are unique in ONNX files: a shared layer's second call gets `_2`, ...
    let taken = |name: &str| e.g.node_ids().iter().any(|&n| e.g.node(n).name == name);
    let mut scan_name = stem.clone();
    let mut k = 1;
    while taken(&scan_name) {
        k += 1;
        scan_name = format!("{stem}_{k}");
    }
    let outs = e.node(
        &scan_name,
        Op::Scan {
            body: Box::new(body),
            num_scan_inputs: n_scan as i64,
            scan_input_axes: None,
            scan_input_directions: Some(vec![i64::from(rec.go_backwards); n_scan]),
            scan_output_axes: rec.return_sequences.then(|| vec![1]),
            scan_output_directions: None,
            directions: None,
        },
        &ins,
        &hint_refs,
    )?;
    let states = outs[..n].to_vec();
    let last = if rec.return_sequences {
        None
    } else if carry_last {
        Some(outs[n])
    } else {
        Some(states[last_state_index(rec)])
    };
    Ok(RecOut {
        seq: rec.return_sequences.then(|| outs[n_state]),
        last,
        states,
    })
}

/// The index of the last cell's first state (its output `h`).
fn last_state_index(rec: &Recurrent) -> usize {
    let total: usize = rec.cells.iter().map(|c| c.state_sizes().len()).sum();
    total - rec.cells.last().map_or(1, |c| c.state_sizes().len())
}

/// `unroll=True`: the step emitted once per time step.
fn unrolled(
    e: &mut Emit,
    rec: &Recurrent,
    ws: &[CellW],
    x: ValueRef,
    mask3: Option<ValueRef>,
    init: Vec<ValueRef>,
    carry_last: bool,
) -> R<RecOut> {
    let steps = match e.dims(x).get(1) {
        Some(Dim::Known(t)) => *t as i64,
        _ => {
            return Err(KerasError::Unsupported {
                layer: e.prefix.clone(),
                what: "unroll=True with an unknown number of time steps".into(),
            })
        }
    };
    let mut st = init;
    let mut seq = Vec::new();
    let mut last = None;
    for t in 0..steps {
        let i = if rec.go_backwards { steps - 1 - t } else { t };
        let xt = e.pick(x, i, 1)?;
        let mt = mask3.map(|m| e.pick(m, i, 1)).transpose()?;
        let (out, ns) = layer_step(e, rec, ws, xt, &st, mt)?;
        st = ns;
        last = Some(out);
        if rec.return_sequences {
            seq.push(e.unsqueeze(out, &[1])?);
        }
    }
    let seq = if rec.return_sequences {
        if seq.is_empty() {
            return Err(KerasError::Unsupported {
                layer: e.prefix.clone(),
                what: "unroll=True over zero time steps".into(),
            });
        }
        Some(e.op(Op::Concat { axis: 1 }, &seq, "sequence")?)
    } else {
        None
    };
    let last = if rec.return_sequences {
        None
    } else if carry_last {
        last
    } else {
        Some(st[last_state_index(rec)])
    };
    if !rec.return_sequences && last.is_none() {
        return Err(KerasError::Unsupported {
            layer: e.prefix.clone(),
            what: "unroll=True over zero time steps".into(),
        });
    }
    Ok(RecOut {
        seq,
        last,
        states: st,
    })
}

/// Lowers `Bidirectional`: outputs `[merged (or fwd, bwd)] + fwd states + bwd states`.
pub(crate) fn bidirectional(
    e: &mut Emit,
    bi: &Bidirectional,
    fw: &[ValueRef],
    bw: &[ValueRef],
    x: ValueRef,
    mask: Option<ValueRef>,
    init: Option<Vec<ValueRef>>,
) -> R<Vec<ValueRef>> {
    let (fi, bi_init) = match init {
        Some(v) => {
            let half = v.len() / 2;
            (Some(v[..half].to_vec()), Some(v[half..].to_vec()))
        }
        None => (None, None),
    };
    let f = recurrent(e, &bi.forward, fw, x, mask, fi)?;
    let b = recurrent(e, &bi.backward, bw, x, mask, bi_init)?;
    let fo = f
        .seq
        .or(f.last)
        .ok_or_else(|| KerasError::Internal("no forward output".into()))?;
    let mut bo = b
        .seq
        .or(b.last)
        .ok_or_else(|| KerasError::Internal("no backward output".into()))?;
    if b.seq.is_some() {
        // Back to input time order before the merge.
        bo = e.slice(bo, 1, -1, i64::MIN, -1)?;
    }
    let mut outs = match bi.merge_mode {
        Some(MergeMode::Concat) => vec![e.op(Op::Concat { axis: -1 }, &[fo, bo], "concat")?],
        Some(MergeMode::Sum) => vec![e.add(fo, bo)?],
        Some(MergeMode::Mul) => vec![e.mul(fo, bo)?],
        Some(MergeMode::Ave) => {
            let s = e.add(fo, bo)?;
            let h = e.scalar(0.5)?;
            vec![e.mul(s, h)?]
        }
        None => vec![fo, bo],
    };
    outs.extend(f.states);
    outs.extend(b.states);
    Ok(outs)
}
