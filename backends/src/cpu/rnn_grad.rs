//! Fused backward kernels for ONNX `LSTM`, `GRU` and `RNN` (the cellgraph-domain ops
//! `LSTMGrad`, `GRUGrad`, `RNNGrad`): backpropagation through time with every forward
//! attribute — directions, `sequence_lens`, initial states, peepholes, `input_forget`,
//! `linear_before_reset`, activations with their parameters, `clip`.
//!
//! The kernel recomputes the forward pass per direction (keeping each step's gate
//! pre-activations and states), then walks the steps backwards in f64 and returns the
//! gradients in the input dtype. Layout 0 (time-major) only; the importer canonicalises
//! `layout=1`.

use super::rnn::{Act, Cell, Spec};
use crate::data::Data;
use cellgraph_ir::{Op, Tensor};
use ndarray::{s, Array1, Array2, Array3, Axis};

type R<T> = Result<T, String>;

/// The forward op a backward op differentiates.
fn forward_op(op: &Op) -> R<Op> {
    match op {
        Op::LSTMGrad { .. } | Op::GRUGrad { .. } | Op::RNNGrad { .. } => op
            .recurrent_pair()
            .ok_or_else(|| format!("{} has no forward op", op.name())),
        other => Err(format!("{} is not a recurrent backward op", other.name())),
    }
}

/// d act(x) / dx at x.
fn deriv(a: Act, x: f64) -> f64 {
    match a {
        Act::Relu => f64::from(u8::from(x > 0.0)),
        Act::Tanh => 1.0 - x.tanh().powi(2),
        Act::Sigmoid => {
            let s = a.apply(x);
            s * (1.0 - s)
        }
        Act::Affine(al, _) => al as f64,
        Act::LeakyRelu(al) => {
            if x < 0.0 {
                al as f64
            } else {
                1.0
            }
        }
        Act::ThresholdedRelu(al) => f64::from(u8::from(x > al as f64)),
        Act::ScaledTanh(al, be) => al as f64 * be as f64 * (1.0 - (be as f64 * x).tanh().powi(2)),
        Act::HardSigmoid(al, be) => {
            let v = al as f64 * x + be as f64;
            if v > 0.0 && v < 1.0 {
                al as f64
            } else {
                0.0
            }
        }
        Act::Elu(al) => {
            if x < 0.0 {
                al as f64 * x.exp()
            } else {
                1.0
            }
        }
        Act::Softsign => 1.0 / (1.0 + x.abs()).powi(2),
        Act::Softplus => 1.0 / (1.0 + (-x).exp()),
    }
}

/// A clipped pre-activation and the derivative factor of the clip (0 where it clipped).
fn clip(v: f64, c: Option<f32>) -> (f64, f64) {
    match c {
        Some(c) if v.abs() > c as f64 => (v.clamp(-(c as f64), c as f64), 0.0),
        _ => (v, 1.0),
    }
}

fn tensor_f64(d: Option<&Data>, what: &str) -> R<Option<(Vec<usize>, Vec<f64>)>> {
    match d {
        None => Ok(None),
        Some(d) => {
            let t = d.tensor().map_err(|e| format!("{what}: {e}"))?;
            Ok(Some((t.shape().to_vec(), t.to_f64_vec())))
        }
    }
}

fn arr2(v: &[f64], r: usize, c: usize) -> Array2<f64> {
    Array2::from_shape_vec((r, c), v.to_vec()).expect("sizes checked")
}

/// Runs a recurrent backward op.
pub fn eval(op: &Op, ins: &[Option<&Data>], nout: usize) -> R<Vec<Data>> {
    forward_op(op)?;
    let get = |i: usize| ins.get(i).copied().flatten();
    let x_t = get(0).ok_or("X is missing")?.tensor()?;
    let dtype = x_t.dtype();
    if !dtype.is_float() {
        return Err(format!("X of dtype {dtype} (float expected)"));
    }
    let (xs, x) = tensor_f64(get(0), "X")?.ok_or("X is missing")?;
    let (ws, w) = tensor_f64(get(1), "W")?.ok_or("W is missing")?;
    let (rs, r) = tensor_f64(get(2), "R")?.ok_or("R is missing")?;
    if xs.len() != 3 || ws.len() != 3 || rs.len() != 3 {
        return Err("X, W and R must have rank 3".into());
    }
    let spec = Spec::from_op(op, rs[2])?;
    if spec.layout1 {
        return Err("layout=1 (lower or canonicalise to layout 0 first)".into());
    }
    let (t_len, n, isz) = (xs[0], xs[1], xs[2]);
    let h = spec.hidden;
    let g = spec.cell.gates();
    let d_n = spec.reverse.len();
    if ws != [d_n, g * h, isz] || rs != [d_n, g * h, h] {
        return Err(format!(
            "W {ws:?} / R {rs:?} do not fit {d_n} direction(s), {g} gates, hidden {h}, input {isz}"
        ));
    }
    let lstm = spec.cell == Cell::Lstm;
    let b = tensor_f64(get(3), "B")?;
    if let Some((bs, _)) = &b {
        if bs != &[d_n, 2 * g * h] {
            return Err(format!("B {bs:?}, expected [{d_n}, {}]", 2 * g * h));
        }
    }
    let lens: Vec<usize> = match get(4) {
        Some(d) => {
            let t = d.tensor()?;
            let v = t.to_f64_vec();
            if v.len() != n {
                return Err(format!(
                    "sequence_lens has {} values for batch {n}",
                    v.len()
                ));
            }
            v.into_iter()
                .map(|l| {
                    if l >= 0.0 && l as usize <= t_len {
                        Ok(l as usize)
                    } else {
                        Err(format!("sequence_lens value {l} outside 0..={t_len}"))
                    }
                })
                .collect::<R<_>>()?
        }
        None => vec![t_len; n],
    };
    let mask_slot = if lstm { 11 } else { 8 };
    let mask = match get(mask_slot) {
        Some(m) => Some(crate::cpu::rnn::step_mask(m.tensor()?, t_len, n, false)?),
        None => None,
    };
    let state_shape = [d_n, n, h];
    let check_state = |v: &Option<(Vec<usize>, Vec<f64>)>, what: &str| -> R<()> {
        match v {
            Some((s, _)) if s != &state_shape => {
                Err(format!("{what} {s:?}, expected {state_shape:?}"))
            }
            _ => Ok(()),
        }
    };
    let h0 = tensor_f64(get(5), "initial_h")?;
    check_state(&h0, "initial_h")?;
    let (c0, p, cot0) = if lstm {
        (
            tensor_f64(get(6), "initial_c")?,
            tensor_f64(get(7), "P")?,
            8,
        )
    } else {
        (None, None, 6)
    };
    check_state(&c0, "initial_c")?;
    if let Some((ps, _)) = &p {
        if ps != &[d_n, 3 * h] {
            return Err(format!("P {ps:?}, expected [{d_n}, {}]", 3 * h));
        }
    }
    let dy = tensor_f64(get(cot0), "dY")?;
    if let Some((s, _)) = &dy {
        if s != &[t_len, d_n, n, h] {
            return Err(format!("dY {s:?}, expected [{t_len}, {d_n}, {n}, {h}]"));
        }
    }
    let dyh = tensor_f64(get(cot0 + 1), "dY_h")?;
    check_state(&dyh, "dY_h")?;
    let dyc = if lstm {
        tensor_f64(get(cot0 + 2), "dY_c")?
    } else {
        None
    };
    check_state(&dyc, "dY_c")?;

    let xa = Array3::from_shape_vec((t_len, n, isz), x).map_err(|e| e.to_string())?;
    let mut dx = Array3::<f64>::zeros((t_len, n, isz));
    let mut dw = vec![0.0; d_n * g * h * isz];
    let mut dr = vec![0.0; d_n * g * h * h];
    let mut db = vec![0.0; d_n * 2 * g * h];
    let mut dh0 = vec![0.0; d_n * n * h];
    let mut dc0 = vec![0.0; d_n * n * h];
    let mut dp = vec![0.0; d_n * 3 * h];
    for d in 0..d_n {
        let wd = arr2(&w[d * g * h * isz..(d + 1) * g * h * isz], g * h, isz);
        let rd = arr2(&r[d * g * h * h..(d + 1) * g * h * h], g * h, h);
        let (wb, rb) = match &b {
            Some((_, bv)) => (
                Array1::from(bv[d * 2 * g * h..d * 2 * g * h + g * h].to_vec()),
                Array1::from(bv[d * 2 * g * h + g * h..(d + 1) * 2 * g * h].to_vec()),
            ),
            None => (Array1::zeros(g * h), Array1::zeros(g * h)),
        };
        let state = |v: &Option<(Vec<usize>, Vec<f64>)>| match v {
            Some((_, sv)) => arr2(&sv[d * n * h..(d + 1) * n * h], n, h),
            None => Array2::zeros((n, h)),
        };
        let pd = match &p {
            Some((_, pv)) => Array1::from(pv[d * 3 * h..(d + 1) * 3 * h].to_vec()),
            None => Array1::zeros(3 * h),
        };
        let dir = Dir {
            spec: &spec,
            acts: &spec.acts[d],
            reverse: spec.reverse[d],
            wd: &wd,
            rd: &rd,
            wb: &wb,
            rb: &rb,
            pd: &pd,
            lens: &lens,
            mask: mask.as_deref(),
            x: &xa,
        };
        let dyd = dy.as_ref().map(|(_, v)| {
            Array3::from_shape_fn((t_len, n, h), |(t, b_, k)| {
                v[((t * d_n + d) * n + b_) * h + k]
            })
        });
        let g_out = dir.backward(state(&h0), state(&c0), dyd, state(&dyh), state(&dyc));
        dx += &g_out.dx;
        dw[d * g * h * isz..(d + 1) * g * h * isz]
            .copy_from_slice(g_out.dw.as_slice().ok_or("dw layout")?);
        dr[d * g * h * h..(d + 1) * g * h * h]
            .copy_from_slice(g_out.dr.as_slice().ok_or("dr layout")?);
        db[d * 2 * g * h..d * 2 * g * h + g * h]
            .copy_from_slice(g_out.dwb.as_slice().ok_or("db layout")?);
        db[d * 2 * g * h + g * h..(d + 1) * 2 * g * h]
            .copy_from_slice(g_out.drb.as_slice().ok_or("db layout")?);
        dh0[d * n * h..(d + 1) * n * h].copy_from_slice(g_out.dh0.as_slice().ok_or("dh0")?);
        dc0[d * n * h..(d + 1) * n * h].copy_from_slice(g_out.dc0.as_slice().ok_or("dc0")?);
        dp[d * 3 * h..(d + 1) * 3 * h].copy_from_slice(g_out.dp.as_slice().ok_or("dp")?);
    }
    let mk = |shape: &[usize], v: &[f64]| -> R<Data> {
        Ok(Data::Tensor(
            Tensor::from_f64_vec(dtype, shape, v).map_err(|e| e.to_string())?,
        ))
    };
    let dxv: Vec<f64> = dx.iter().copied().collect();
    let mut out = vec![
        mk(&[t_len, n, isz], &dxv)?,
        mk(&[d_n, g * h, isz], &dw)?,
        mk(&[d_n, g * h, h], &dr)?,
        mk(&[d_n, 2 * g * h], &db)?,
        mk(&[d_n, n, h], &dh0)?,
    ];
    if lstm {
        out.push(mk(&[d_n, n, h], &dc0)?);
        out.push(mk(&[d_n, 3 * h], &dp)?);
    }
    out.truncate(nout);
    Ok(out)
}

/// One direction's weights and inputs.
struct Dir<'a> {
    spec: &'a Spec,
    acts: &'a [Act],
    reverse: bool,
    wd: &'a Array2<f64>,
    rd: &'a Array2<f64>,
    wb: &'a Array1<f64>,
    rb: &'a Array1<f64>,
    pd: &'a Array1<f64>,
    lens: &'a [usize],
    /// Masked ops: the step mask `[T, N]`, time-major.
    mask: Option<&'a [bool]>,
    x: &'a Array3<f64>,
}

/// One direction's gradients.
struct DirGrads {
    dx: Array3<f64>,
    dw: Array2<f64>,
    dr: Array2<f64>,
    dwb: Array1<f64>,
    drb: Array1<f64>,
    dh0: Array2<f64>,
    dc0: Array2<f64>,
    dp: Array1<f64>,
}

/// What the forward recomputation keeps of one step.
struct Step {
    t: usize,
    /// Rows that run this step.
    active: Vec<bool>,
    h_prev: Array2<f64>,
    c_prev: Array2<f64>,
    /// Clipped gate pre-activations `[N, G·H]` and the clip derivative factors.
    pre: Array2<f64>,
    clip_d: Array2<f64>,
    /// Gate activations `[N, G·H]`.
    act: Array2<f64>,
    /// LSTM: the new cell state; GRU linear_before_reset: h·Rhᵀ + Rbh.
    aux: Array2<f64>,
}

impl Dir<'_> {
    fn backward(
        &self,
        h0: Array2<f64>,
        c0: Array2<f64>,
        dy: Option<Array3<f64>>,
        dyh: Array2<f64>,
        dyc: Array2<f64>,
    ) -> DirGrads {
        let spec = self.spec;
        let (t_len, n, isz) = self.x.dim();
        let h = spec.hidden;
        let g = spec.cell.gates();
        let order: Vec<usize> = if self.reverse {
            (0..t_len).rev().collect()
        } else {
            (0..t_len).collect()
        };
        // Forward, keeping every step.
        let mut steps = Vec::with_capacity(t_len);
        let (mut hs, mut cs) = (h0, c0);
        for &t in &order {
            // A row runs step t when t < its length (the reverse direction starts at its
            // own last valid step).
            let active: Vec<bool> = self
                .lens
                .iter()
                .enumerate()
                .map(|(b_, &l)| t < l && self.mask.is_none_or(|m| m[t * n + b_]))
                .collect();
            let xt = self.x.index_axis(Axis(0), t);
            let mut xw = xt.dot(&self.wd.t()) + self.wb;
            let hr = hs.dot(&self.rd.t()) + self.rb;
            let mut pre = Array2::zeros((n, g * h));
            let mut clip_d = Array2::ones((n, g * h));
            let mut act = Array2::zeros((n, g * h));
            let mut aux = Array2::zeros((n, h));
            let (mut h_new, mut c_new) = (hs.clone(), cs.clone());
            match spec.cell {
                Cell::Lstm => {
                    // gates i, o, f, c
                    let (f, ga, ha) = (self.acts[0], self.acts[1], self.acts[2]);
                    xw += &hr;
                    for b_ in 0..n {
                        for k in 0..h {
                            let cp = cs[[b_, k]];
                            let (vi, di) = clip(xw[[b_, k]] + self.pd[k] * cp, spec.clip);
                            let (vf, df) =
                                clip(xw[[b_, 2 * h + k]] + self.pd[2 * h + k] * cp, spec.clip);
                            let (vc, dc) = clip(xw[[b_, 3 * h + k]], spec.clip);
                            let i = f.apply(vi);
                            let fg = if spec.input_forget {
                                1.0 - i
                            } else {
                                f.apply(vf)
                            };
                            let cc = ga.apply(vc);
                            let c = fg * cp + i * cc;
                            let (vo, do_) = clip(xw[[b_, h + k]] + self.pd[h + k] * c, spec.clip);
                            let o = f.apply(vo);
                            for (gi, v, dd, a) in [
                                (0, vi, di, i),
                                (1, vo, do_, o),
                                (2, vf, df, fg),
                                (3, vc, dc, cc),
                            ] {
                                pre[[b_, gi * h + k]] = v;
                                clip_d[[b_, gi * h + k]] = dd;
                                act[[b_, gi * h + k]] = a;
                            }
                            aux[[b_, k]] = c;
                            if active[b_] {
                                c_new[[b_, k]] = c;
                                h_new[[b_, k]] = o * ha.apply(c);
                            }
                        }
                    }
                }
                Cell::Gru => {
                    // gates z, r, h
                    let (f, ga) = (self.acts[0], self.acts[1]);
                    let rh_lin = hr.slice(s![.., 2 * h..]).to_owned();
                    let rh_w = self.rd.slice(s![2 * h.., ..]);
                    for b_ in 0..n {
                        for k in 0..h {
                            let (vz, dz) = clip(xw[[b_, k]] + hr[[b_, k]], spec.clip);
                            let (vr, drr) = clip(xw[[b_, h + k]] + hr[[b_, h + k]], spec.clip);
                            pre[[b_, k]] = vz;
                            clip_d[[b_, k]] = dz;
                            act[[b_, k]] = f.apply(vz);
                            pre[[b_, h + k]] = vr;
                            clip_d[[b_, h + k]] = drr;
                            act[[b_, h + k]] = f.apply(vr);
                        }
                    }
                    let r = act.slice(s![.., h..2 * h]).to_owned();
                    let cand_rec = if spec.linear_before_reset {
                        aux.assign(&rh_lin);
                        &r * &rh_lin
                    } else {
                        (&r * &hs).dot(&rh_w.t()) + self.rb.slice(s![2 * h..])
                    };
                    for b_ in 0..n {
                        for k in 0..h {
                            let (vh, dh) = clip(xw[[b_, 2 * h + k]] + cand_rec[[b_, k]], spec.clip);
                            pre[[b_, 2 * h + k]] = vh;
                            clip_d[[b_, 2 * h + k]] = dh;
                            let hh = ga.apply(vh);
                            act[[b_, 2 * h + k]] = hh;
                            if active[b_] {
                                let z = act[[b_, k]];
                                h_new[[b_, k]] = (1.0 - z) * hh + z * hs[[b_, k]];
                            }
                        }
                    }
                }
                Cell::Rnn => {
                    let f = self.acts[0];
                    xw += &hr;
                    for b_ in 0..n {
                        for k in 0..h {
                            let (v, dd) = clip(xw[[b_, k]], spec.clip);
                            pre[[b_, k]] = v;
                            clip_d[[b_, k]] = dd;
                            let a = f.apply(v);
                            act[[b_, k]] = a;
                            if active[b_] {
                                h_new[[b_, k]] = a;
                            }
                        }
                    }
                }
            }
            steps.push(Step {
                t,
                active,
                h_prev: hs,
                c_prev: cs,
                pre,
                clip_d,
                act,
                aux,
            });
            hs = h_new;
            cs = c_new;
        }
        // Backward through the steps in reverse processing order.
        let mut dx = Array3::zeros((t_len, n, isz));
        let mut dw = Array2::zeros((g * h, isz));
        let mut dr = Array2::zeros((g * h, h));
        let mut dwb = Array1::zeros(g * h);
        let mut drb = Array1::zeros(g * h);
        let mut dp = Array1::zeros(3 * h);
        let (mut dh, mut dc) = (dyh, dyc);
        for st in steps.iter().rev() {
            if let Some(dy) = &dy {
                // Y is zero on inactive rows (their dY does not flow), or with
                // `hold_output` the held state, which flows on to the previous step.
                for b_ in 0..n {
                    if st.active[b_] || spec.hold {
                        let row = dy.slice(s![st.t, b_, ..]);
                        let mut dhr = dh.row_mut(b_);
                        dhr += &row;
                    }
                }
            }
            let mut dgx = Array2::<f64>::zeros((n, g * h)); // gate grads, x side
            let mut dgr = Array2::<f64>::zeros((n, g * h)); // gate grads, recurrent side
            let mut dh_prev = Array2::<f64>::zeros((n, h));
            let mut dc_prev = Array2::<f64>::zeros((n, h));
            match spec.cell {
                Cell::Lstm => {
                    let (f, ga, ha) = (self.acts[0], self.acts[1], self.acts[2]);
                    for b_ in 0..n {
                        if !st.active[b_] {
                            continue;
                        }
                        for k in 0..h {
                            let (i, o, fg, cc) = (
                                st.act[[b_, k]],
                                st.act[[b_, h + k]],
                                st.act[[b_, 2 * h + k]],
                                st.act[[b_, 3 * h + k]],
                            );
                            let c = st.aux[[b_, k]];
                            let cp = st.c_prev[[b_, k]];
                            let dhk = dh[[b_, k]];
                            let do_ = dhk * ha.apply(c);
                            let do_pre =
                                do_ * deriv(f, st.pre[[b_, h + k]]) * st.clip_d[[b_, h + k]];
                            let dck =
                                dc[[b_, k]] + dhk * o * deriv(ha, c) + do_pre * self.pd[h + k];
                            dp[h + k] += do_pre * c;
                            let df = dck * cp;
                            let mut di = dck * cc;
                            let dcc = dck * i;
                            let mut dcp = dck * fg;
                            let df_pre = if spec.input_forget {
                                di -= df;
                                0.0
                            } else {
                                df * deriv(f, st.pre[[b_, 2 * h + k]]) * st.clip_d[[b_, 2 * h + k]]
                            };
                            let di_pre = di * deriv(f, st.pre[[b_, k]]) * st.clip_d[[b_, k]];
                            let dc_pre = dcc
                                * deriv(ga, st.pre[[b_, 3 * h + k]])
                                * st.clip_d[[b_, 3 * h + k]];
                            dcp += di_pre * self.pd[k] + df_pre * self.pd[2 * h + k];
                            dp[k] += di_pre * cp;
                            dp[2 * h + k] += df_pre * cp;
                            for (gi, v) in [(0, di_pre), (1, do_pre), (2, df_pre), (3, dc_pre)] {
                                dgx[[b_, gi * h + k]] = v;
                                dgr[[b_, gi * h + k]] = v;
                            }
                            dc_prev[[b_, k]] = dcp;
                        }
                    }
                }
                Cell::Gru => {
                    let (f, ga) = (self.acts[0], self.acts[1]);
                    let rh_w = self.rd.slice(s![2 * h.., ..]);
                    let mut dpre_h = Array2::<f64>::zeros((n, h));
                    for b_ in 0..n {
                        if !st.active[b_] {
                            continue;
                        }
                        for k in 0..h {
                            let (z, hh) = (st.act[[b_, k]], st.act[[b_, 2 * h + k]]);
                            let hp = st.h_prev[[b_, k]];
                            let dhk = dh[[b_, k]];
                            dgx[[b_, k]] =
                                dhk * (hp - hh) * deriv(f, st.pre[[b_, k]]) * st.clip_d[[b_, k]];
                            dpre_h[[b_, k]] = dhk
                                * (1.0 - z)
                                * deriv(ga, st.pre[[b_, 2 * h + k]])
                                * st.clip_d[[b_, 2 * h + k]];
                            dh_prev[[b_, k]] += dhk * z;
                        }
                    }
                    let r = st.act.slice(s![.., h..2 * h]).to_owned();
                    // The candidate's recurrent term and the reset gate.
                    let dr_act = if spec.linear_before_reset {
                        let d_lin = &dpre_h * &r; // d(h·Rhᵀ + Rbh)
                        dgr.slice_mut(s![.., 2 * h..]).assign(&d_lin);
                        &dpre_h * &st.aux
                    } else {
                        let d_rh = dpre_h.dot(&rh_w); // d(r⊙h_prev)
                        dh_prev += &(&d_rh * &r);
                        let rh = &r * &st.h_prev;
                        // Rh and its bias get their gradient from dpre_h with (r⊙h) inputs.
                        let grad_rh = dpre_h.t().dot(&rh);
                        dr.slice_mut(s![2 * h.., ..]).scaled_add(1.0, &grad_rh);
                        let mut b = drb.slice_mut(s![2 * h..]);
                        b += &dpre_h.sum_axis(Axis(0));
                        &d_rh * &st.h_prev
                    };
                    for b_ in 0..n {
                        if !st.active[b_] {
                            continue;
                        }
                        for k in 0..h {
                            let v = dr_act[[b_, k]]
                                * deriv(f, st.pre[[b_, h + k]])
                                * st.clip_d[[b_, h + k]];
                            dgx[[b_, h + k]] = v;
                            dgr[[b_, h + k]] = v;
                            dgr[[b_, k]] = dgx[[b_, k]];
                            dgx[[b_, 2 * h + k]] = dpre_h[[b_, k]];
                        }
                    }
                }
                Cell::Rnn => {
                    let f = self.acts[0];
                    for b_ in 0..n {
                        if !st.active[b_] {
                            continue;
                        }
                        for k in 0..h {
                            let v = dh[[b_, k]] * deriv(f, st.pre[[b_, k]]) * st.clip_d[[b_, k]];
                            dgx[[b_, k]] = v;
                            dgr[[b_, k]] = v;
                        }
                    }
                }
            }
            // Products with the weights (GRU without linear_before_reset handled Rh above:
            // its recurrent-side candidate grads stay zero in dgr).
            let xt = self.x.index_axis(Axis(0), st.t);
            dx.index_axis_mut(Axis(0), st.t).assign(&dgx.dot(self.wd));
            dw += &dgx.t().dot(&xt);
            dwb += &dgx.sum_axis(Axis(0));
            dr += &dgr.t().dot(&st.h_prev);
            drb += &dgr.sum_axis(Axis(0));
            dh_prev += &dgr.dot(self.rd);
            // Inactive rows carry their cotangents through unchanged.
            for b_ in 0..n {
                if !st.active[b_] {
                    dh_prev.row_mut(b_).assign(&dh.row(b_));
                    dc_prev.row_mut(b_).assign(&dc.row(b_));
                }
            }
            dh = dh_prev;
            dc = dc_prev;
        }
        DirGrads {
            dx,
            dw,
            dr,
            dwb,
            drb,
            dh0: dh,
            dc0: dc,
            dp,
        }
    }
}
