//! Fused backward kernels for ONNX `LSTM`, `GRU` and `RNN` (the cellgraph-domain ops
//! `LSTMGrad`, `GRUGrad`, `RNNGrad`): backpropagation through time with every forward
//! attribute — directions, `sequence_lens`, initial states, peepholes, `input_forget`,
//! `linear_before_reset`, activations with their parameters, `clip`.
//!
//! The kernel recomputes the forward pass per direction (keeping each step's gate
//! pre-activations and states), then walks the steps backwards, in f32 for f32 inputs
//! and f64 otherwise (gradient checks). Products that do not feed the recurrence (input
//! projections, dX, dW, dR) are one GEMM over all steps. Layout 0 (time-major) only; the importer canonicalises
//! `layout=1`.

use super::rnn::{ActApply, GemmMode, RFloat, PARALLEL_MIN_MACS};
use crate::data::Data;
use cellgraph_ir::ops::rnn::{Act, Cell, GradSlots, Spec};
use cellgraph_ir::{Op, Tensor};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use std::borrow::Cow;

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

/// d act / dx from the pre-activation `x` and the output `y` (sigmoid and tanh from `y`).
fn dact(a: Act, x: f64, y: f64) -> f64 {
    match a {
        Act::Sigmoid => y * (1.0 - y),
        Act::Tanh => 1.0 - y * y,
        _ => deriv(a, x),
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

/// A tensor's values in the kernel's float type: borrowed when the tensor already holds
/// that type in standard layout, converted otherwise.
fn values<T: RFloat>(t: &Tensor) -> Cow<'_, [T]> {
    match T::array(t).and_then(|a| a.as_slice()) {
        Some(v) => Cow::Borrowed(v),
        None => Cow::Owned(t.to_f64_vec().into_iter().map(T::of).collect()),
    }
}

/// An output of `shape` in `dtype` from the kernel's values: moved when the kernel ran
/// in that type (T is f32 for f32 tensors and f64 for every other float dtype),
/// converted otherwise.
fn output<T: RFloat>(dtype: cellgraph_ir::DType, shape: &[usize], v: Vec<T>) -> R<Data> {
    let t = if dtype == cellgraph_ir::DType::F32 || dtype == cellgraph_ir::DType::F64 {
        T::tensor(ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| e.to_string())?)
    } else {
        let v: Vec<f64> = v.iter().map(|x| x.to()).collect();
        Tensor::from_f64_vec(dtype, shape, &v).map_err(|e| e.to_string())?
    };
    Ok(Data::Tensor(t))
}

/// Runs a recurrent backward op.
///
/// `wanted` has one flag per output the node has: an output not wanted (an omitted
/// optional output, or one nothing reads) may come back as an empty tensor without
/// being computed. dX — a GEMM as large as the forward's input projection — is the one
/// skipped; a layer fed by data needs no gradient of its input.
pub fn eval(op: &Op, ins: &[Option<&Data>], wanted: &[bool]) -> R<Vec<Data>> {
    super::paths::count(|c| c.recomputing_backward += 1);
    Ok(run(op, ins, wanted, Mode::Grad(None))?.0)
}

/// What a forward op ran with [`forward_saving`] kept for its backward op.
pub struct Saved(SavedAny);

enum SavedAny {
    F32(Vec<DirSaved<f32>>),
    F64(Vec<DirSaved<f64>>),
}

/// Runs a forward `LSTM`/`GRU`/`RNN` (no sequence_lens, no mask) as its backward op
/// would recompute it, returning its outputs (Y, Y_h, Y_c; one per flag of `wanted`) and
/// what the backward op reads, so that [`eval_saved`] need not run the forward again.
/// An output not wanted may come back as an empty tensor: Y (every step's h, which the
/// backward does not read) is then not assembled.
pub fn forward_saving(op: &Op, ins: &[Option<&Data>], wanted: &[bool]) -> R<(Vec<Data>, Saved)> {
    let grad = match op {
        Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. } => op
            .recurrent_pair()
            .ok_or_else(|| format!("{} has no backward op", op.name()))?,
        other => {
            return Err(format!(
                "{} is not a plain recurrent forward op",
                other.name()
            ))
        }
    };
    super::paths::count(|c| c.saving_forward += 1);
    let (outs, saved) = run(&grad, ins, wanted, Mode::Forward)?;
    Ok((outs, saved.ok_or("the forward kept nothing")?))
}

/// Runs a recurrent backward op from its forward's [`Saved`] state (its inputs must be
/// the ones the forward ran on); `wanted` as for [`eval`].
pub fn eval_saved(op: &Op, ins: &[Option<&Data>], wanted: &[bool], saved: Saved) -> R<Vec<Data>> {
    super::paths::count(|c| c.paired_backward += 1);
    Ok(run(op, ins, wanted, Mode::Grad(Some(saved)))?.0)
}

/// What [`run`] does with a backward op's inputs.
enum Mode {
    /// The gradients (recomputing the forward, or from a saved one).
    Grad(Option<Saved>),
    /// The forward op's outputs, keeping what the gradients read.
    Forward,
}

fn run(
    op: &Op,
    ins: &[Option<&Data>],
    wanted: &[bool],
    mode: Mode,
) -> R<(Vec<Data>, Option<Saved>)> {
    forward_op(op)?;
    let nout = wanted.len();
    let get = |i: usize| ins.get(i).copied().flatten();
    let x_t = get(0).ok_or("X is missing")?.tensor()?;
    let dtype = x_t.dtype();
    if !dtype.is_float() {
        return Err(format!("X of dtype {dtype} (float expected)"));
    }
    // X, W, R and dY (the large inputs) stay tensors until the kernel's float type is
    // known: an f32 tensor is then read in place, not through f64.
    let tensor = |i: usize, what: &str| -> R<&Tensor> {
        get(i)
            .ok_or(format!("{what} is missing"))?
            .tensor()
            .map_err(|e| format!("{what}: {e}"))
    };
    let (w_t, r_t) = (tensor(1, "W")?, tensor(2, "R")?);
    let (xs, ws, rs) = (x_t.shape(), w_t.shape(), r_t.shape());
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
    let slots = GradSlots::of(spec.cell);
    let mask = match get(slots.mask()) {
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
    let cot0 = slots.first_cotangent();
    let (c0, p) = if lstm {
        (tensor_f64(get(6), "initial_c")?, tensor_f64(get(7), "P")?)
    } else {
        (None, None)
    };
    check_state(&c0, "initial_c")?;
    if let Some((ps, _)) = &p {
        if ps != &[d_n, 3 * h] {
            return Err(format!("P {ps:?}, expected [{d_n}, {}]", 3 * h));
        }
    }
    let dy = get(cot0).map(|_| tensor(cot0, "dY")).transpose()?;
    if let Some(s) = dy.map(|t| t.shape()) {
        if s != [t_len, d_n, n, h] {
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

    let ctx = Ctx {
        spec: &spec,
        dims: (t_len, n, isz),
        lens: &lens,
        mask: mask.as_deref(),
        want_dx: wanted.first().copied().unwrap_or(false),
        want_y: wanted.first().copied().unwrap_or(false),
    };
    let args = Args {
        x: x_t,
        w: w_t,
        r: r_t,
        b: b.as_ref().map(|(_, v)| v.as_slice()),
        p: p.as_ref().map(|(_, v)| v.as_slice()),
        h0: h0.as_ref().map(|(_, v)| v.as_slice()),
        c0: c0.as_ref().map(|(_, v)| v.as_slice()),
        dy,
        dyh: dyh.as_ref().map(|(_, v)| v.as_slice()),
        dyc: dyc.as_ref().map(|(_, v)| v.as_slice()),
    };
    // f32 inputs run the GEMMs in f32; f64 inputs (gradient checks) stay in f64.
    let f32_ = dtype == cellgraph_ir::DType::F32;
    let saved = match mode {
        Mode::Forward => {
            if ctx.mask.is_some() || lens.iter().any(|&l| l != t_len) {
                return Err("a saving forward runs without sequence_lens or a mask".into());
            }
            let (mut outs, saved) = if f32_ {
                let (o, s) = forward_all::<f32>(&ctx, &args, dtype)?;
                (o, SavedAny::F32(s))
            } else {
                let (o, s) = forward_all::<f64>(&ctx, &args, dtype)?;
                (o, SavedAny::F64(s))
            };
            outs.truncate(nout);
            return Ok((outs, Some(Saved(saved))));
        }
        Mode::Grad(saved) => saved.map(|s| s.0),
    };
    let mut out = match (f32_, saved) {
        (true, None) => all_directions::<f32>(&ctx, &args, None).into_data(&ctx, dtype)?,
        (true, Some(SavedAny::F32(v))) => {
            all_directions::<f32>(&ctx, &args, Some(v)).into_data(&ctx, dtype)?
        }
        (false, None) => all_directions::<f64>(&ctx, &args, None).into_data(&ctx, dtype)?,
        (false, Some(SavedAny::F64(v))) => {
            all_directions::<f64>(&ctx, &args, Some(v)).into_data(&ctx, dtype)?
        }
        _ => return Err("the saved forward ran in another precision".into()),
    };
    out.truncate(nout);
    Ok((out, None))
}

/// Shapes and masks shared by every direction.
struct Ctx<'a> {
    spec: &'a Spec,
    /// Steps, batch, input size.
    dims: (usize, usize, usize),
    lens: &'a [usize],
    /// Masked ops: the step mask `[T, N]`, time-major.
    mask: Option<&'a [bool]>,
    /// Whether dX is computed (else it comes back empty).
    want_dx: bool,
    /// A saving forward: whether Y is assembled (else it comes back empty).
    want_y: bool,
}

impl Ctx<'_> {
    /// Whether row `b` runs step `t`.
    fn active(&self, t: usize, b: usize) -> bool {
        t < self.lens[b] && self.mask.is_none_or(|m| m[t * self.dims.1 + b])
    }
}

/// The op's inputs (all directions): the large ones as tensors (see [`values`]), the
/// rest as f64.
struct Args<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    r: &'a Tensor,
    b: Option<&'a [f64]>,
    p: Option<&'a [f64]>,
    h0: Option<&'a [f64]>,
    c0: Option<&'a [f64]>,
    dy: Option<&'a Tensor>,
    dyh: Option<&'a [f64]>,
    dyc: Option<&'a [f64]>,
}

/// The gradients of every input, all directions: the large ones in the kernel's float
/// type, the rest as f64.
struct AllGrads<T> {
    dx: Vec<T>,
    dw: Vec<T>,
    dr: Vec<T>,
    db: Vec<f64>,
    dh0: Vec<f64>,
    dc0: Vec<f64>,
    dp: Vec<f64>,
}

fn all_directions<T: RFloat>(
    cx: &Ctx<'_>,
    a: &Args<'_>,
    saved: Option<Vec<DirSaved<T>>>,
) -> AllGrads<T> {
    let spec = cx.spec;
    let (t_len, n, isz) = cx.dims;
    let h = spec.hidden;
    let gh = spec.cell.gates() * h;
    let d_n = spec.reverse.len();
    let x = values::<T>(a.x);
    let dy_all = a.dy.map(values::<T>);
    let zero = T::of(0.0);
    let mut out = AllGrads {
        dx: vec![],
        dw: vec![zero; d_n * gh * isz],
        dr: vec![zero; d_n * gh * h],
        db: vec![0.0; d_n * 2 * gh],
        dh0: vec![0.0; d_n * n * h],
        dc0: vec![0.0; d_n * n * h],
        dp: vec![0.0; d_n * 3 * h],
    };
    let mut saved = saved.map(|v| v.into_iter());
    for d in 0..d_n {
        let part = |v: Option<&[f64]>, size: usize| -> Option<Vec<T>> {
            v.map(|v| {
                v[d * size..(d + 1) * size]
                    .iter()
                    .map(|&x| T::of(x))
                    .collect()
            })
        };
        let dy: Option<Vec<T>> = dy_all.as_deref().map(|v| {
            let mut o = Vec::with_capacity(t_len * n * h);
            for t in 0..t_len {
                let at = (t * d_n + d) * n * h;
                o.extend_from_slice(&v[at..at + n * h]);
            }
            o
        });
        let dir = Dir::new(cx, a, d, &x);
        let g = dir.backward(
            part(a.h0, n * h),
            part(a.c0, n * h),
            dy,
            part(a.dyh, n * h),
            part(a.dyc, n * h),
            saved.as_mut().and_then(|s| s.next()),
        );
        if d == 0 || !cx.want_dx {
            out.dx = g.dx;
        } else {
            for (o, &v) in out.dx.iter_mut().zip(&g.dx) {
                *o = *o + v;
            }
        }
        out.dw[d * gh * isz..(d + 1) * gh * isz].copy_from_slice(&g.dw);
        out.dr[d * gh * h..(d + 1) * gh * h].copy_from_slice(&g.dr);
        let put = |dst: &mut [f64], at: usize, src: &[T]| {
            for (o, v) in dst[at..at + src.len()].iter_mut().zip(src) {
                *o = v.to();
            }
        };
        out.db[d * 2 * gh..d * 2 * gh + gh].copy_from_slice(&g.dwb);
        out.db[d * 2 * gh + gh..(d + 1) * 2 * gh].copy_from_slice(&g.drb);
        put(&mut out.dh0, d * n * h, &g.dh0);
        put(&mut out.dc0, d * n * h, &g.dc0);
        out.dp[d * 3 * h..(d + 1) * 3 * h].copy_from_slice(&g.dp);
    }
    out
}

impl<T: RFloat> AllGrads<T> {
    /// The backward op's outputs in `dtype`: dX, dW, dR, dB, d initial_h (LSTM: and d
    /// initial_c, dP).
    fn into_data(self, cx: &Ctx<'_>, dtype: cellgraph_ir::DType) -> R<Vec<Data>> {
        let (t_len, n, isz) = cx.dims;
        let h = cx.spec.hidden;
        let gh = cx.spec.cell.gates() * h;
        let d_n = cx.spec.reverse.len();
        let big = |shape: &[usize], v: Vec<T>| output(dtype, shape, v);
        let small = |shape: &[usize], v: &[f64]| -> R<Data> {
            Ok(Data::Tensor(
                Tensor::from_f64_vec(dtype, shape, v).map_err(|e| e.to_string())?,
            ))
        };
        let dx_shape = if cx.want_dx {
            vec![t_len, n, isz]
        } else {
            vec![0]
        };
        let mut out = vec![
            big(&dx_shape, self.dx)?,
            big(&[d_n, gh, isz], self.dw)?,
            big(&[d_n, gh, h], self.dr)?,
            small(&[d_n, 2 * gh], &self.db)?,
            small(&[d_n, n, h], &self.dh0)?,
        ];
        if cx.spec.cell == Cell::Lstm {
            out.push(small(&[d_n, n, h], &self.dc0)?);
            out.push(small(&[d_n, 3 * h], &self.dp)?);
        }
        Ok(out)
    }
}

/// Every direction's forward with what its backward reads: the outputs Y `[T, D, N,
/// H]`, Y_h and (LSTM) Y_c `[D, N, H]` in `dtype`, and the saved blocks.
fn forward_all<T: RFloat>(
    cx: &Ctx<'_>,
    a: &Args<'_>,
    dtype: cellgraph_ir::DType,
) -> R<(Vec<Data>, Vec<DirSaved<T>>)> {
    let spec = cx.spec;
    let (t_len, n, _) = cx.dims;
    let h = spec.hidden;
    let d_n = spec.reverse.len();
    let x = values::<T>(a.x);
    let zero = T::of(0.0);
    let mut y = if cx.want_y {
        vec![zero; t_len * d_n * n * h]
    } else {
        vec![]
    };
    let mut yh = vec![zero; d_n * n * h];
    let mut yc = vec![zero; d_n * n * h];
    let mut saved = Vec::with_capacity(d_n);
    for d in 0..d_n {
        let part = |v: Option<&[f64]>| -> Option<Vec<T>> {
            v.map(|v| {
                v[d * n * h..(d + 1) * n * h]
                    .iter()
                    .map(|&x| T::of(x))
                    .collect()
            })
        };
        let sv = Dir::new(cx, a, d, &x).forward_saving(part(a.h0), part(a.c0));
        for ((b0, nb), fwd) in &sv.blocks {
            let rows = nb * h;
            if cx.want_y {
                for t in 0..t_len {
                    let at = ((t * d_n + d) * n + b0) * h;
                    y[at..at + rows].copy_from_slice(&fwd.y[t * rows..(t + 1) * rows]);
                }
            }
            let at = (d * n + b0) * h;
            yh[at..at + rows].copy_from_slice(&fwd.h);
            if spec.cell == Cell::Lstm {
                yc[at..at + rows].copy_from_slice(&fwd.c);
            }
        }
        saved.push(sv);
    }
    let mk = |shape: &[usize], v: Vec<T>| output(dtype, shape, v);
    let y_shape = if cx.want_y {
        vec![t_len, d_n, n, h]
    } else {
        vec![0]
    };
    let mut outs = vec![mk(&y_shape, y)?, mk(&[d_n, n, h], yh)?];
    if spec.cell == Cell::Lstm {
        outs.push(mk(&[d_n, n, h], yc)?);
    }
    Ok((outs, saved))
}

/// One direction: its weights (in the kernel's float type) and the shared context.
struct Dir<'a, T> {
    cx: &'a Ctx<'a>,
    reverse: bool,
    acts: &'a [Act],
    /// X `[T·N, I]`, time-major.
    x: &'a [T],
    /// W `[G·H, I]`, R `[G·H, H]`.
    w: Vec<T>,
    r: Vec<T>,
    wb: Vec<f64>,
    rb: Vec<f64>,
    /// Peepholes `[3H]` (i, o, f).
    p: Vec<f64>,
    /// Whether the op has a P input (whose gradient is then computed).
    need_dp: bool,
}

/// One direction's gradients.
struct DirGrads<T> {
    dx: Vec<T>,
    dw: Vec<T>,
    dr: Vec<T>,
    dwb: Vec<f64>,
    drb: Vec<f64>,
    dh0: Vec<T>,
    dc0: Vec<T>,
    dp: Vec<f64>,
}

impl<'a, T: RFloat> Dir<'a, T> {
    /// Direction `d` of the op's inputs, X already in the kernel's float type.
    fn new(cx: &'a Ctx<'a>, a: &Args<'_>, d: usize, x: &'a [T]) -> Dir<'a, T> {
        let spec = cx.spec;
        let (_, _, isz) = cx.dims;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let part = |v: &Tensor, size: usize| -> Vec<T> {
            values::<T>(v)[d * size..(d + 1) * size].to_vec()
        };
        let bias = a.b.map_or(vec![0.0; 2 * gh], |b| {
            b[d * 2 * gh..(d + 1) * 2 * gh].to_vec()
        });
        Dir {
            cx,
            reverse: spec.reverse[d],
            acts: &spec.acts[d],
            x,
            w: part(a.w, gh * isz),
            r: part(a.r, gh * h),
            wb: bias[..gh].to_vec(),
            rb: bias[gh..].to_vec(),
            p: a.p
                .map_or(vec![0.0; 3 * h], |p| p[d * 3 * h..(d + 1) * 3 * h].to_vec()),
            need_dp: a.p.is_some(),
        }
    }

    /// Time indices in processing order.
    fn order(&self) -> Vec<usize> {
        let t_len = self.cx.dims.0;
        if self.reverse {
            (0..t_len).rev().collect()
        } else {
            (0..t_len).collect()
        }
    }

    /// The gate, cell and hidden activations (ONNX's f, g, h).
    fn acts3(&self) -> (Act, Act, Act) {
        let a = self.acts;
        (
            a[0],
            a.get(1).copied().unwrap_or(a[0]),
            a.get(2).copied().unwrap_or(a[0]),
        )
    }

    /// The common LSTM (σ, tanh, tanh; no clip, peepholes zero, no input_forget): it
    /// runs in the tensor's own precision on contiguous slices (vectorised for f32).
    fn plain_lstm(&self) -> bool {
        let spec = self.cx.spec;
        spec.cell == Cell::Lstm
            && spec.clip.is_none()
            && !spec.input_forget
            && self.acts3() == (Act::Sigmoid, Act::Tanh, Act::Tanh)
            && self.p.iter().all(|&v| v == 0.0)
    }

    /// The common GRU (reset-after, σ and tanh, no clip): its steps run the one-pass
    /// kernel forward and f32 slices backward.
    fn plain_gru(&self) -> bool {
        let spec = self.cx.spec;
        let (f, g, _) = self.acts3();
        spec.cell == Cell::Gru
            && spec.linear_before_reset
            && spec.clip.is_none()
            && (f, g) == (Act::Sigmoid, Act::Tanh)
    }

    /// Weights packed once for every block and step of the forward: Wᵀ for the input
    /// projections, Rᵀ (the z/r columns apart from the h columns for reset-before GRU).
    fn forward_packs(&self) -> FwdPacks<T> {
        let spec = self.cx.spec;
        let isz = self.cx.dims.2;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let lbr0 = spec.cell == Cell::Gru && !spec.linear_before_reset;
        let rec_cols = if lbr0 { 2 * h } else { gh };
        FwdPacks {
            wt: T::pack(isz, gh, &self.w, 1, isz),
            rt: T::pack(h, rec_cols, &self.r, 1, h),
            rht: lbr0.then(|| T::pack(h, h, &self.r[2 * h * h..], 1, h)),
        }
    }

    /// R packed for the backward's per-step products (its h columns apart for
    /// reset-before GRU).
    fn backward_packs(&self) -> BackPacks<T> {
        let spec = self.cx.spec;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let lbr0 = spec.cell == Cell::Gru && !spec.linear_before_reset;
        let rec_cols = if lbr0 { 2 * h } else { gh };
        BackPacks {
            r: T::pack(rec_cols, h, &self.r, h, 1),
            rh: lbr0.then(|| T::pack(h, h, &self.r[2 * h * h..], h, 1)),
        }
    }

    /// The blocks of batch rows `(first row, rows)`: one per thread when the work pays
    /// for the threads, else one.
    fn blocks(&self) -> Vec<(usize, usize)> {
        let (t_len, n, isz) = self.cx.dims;
        let h = self.cx.spec.hidden;
        let gh = self.cx.spec.cell.gates() * h;
        let threads = rayon::current_num_threads().min(n.max(1));
        let rows_per = if threads > 1 && t_len * n * gh * (h + isz) >= PARALLEL_MIN_MACS {
            n.div_ceil(threads)
        } else {
            n.max(1)
        };
        (0..n)
            .step_by(rows_per)
            .map(|b0| (b0, rows_per.min(n - b0)))
            .collect()
    }

    /// The forward of every block, keeping what the backward reads and every step's h:
    /// the forward op's work, done so that its backward need not recompute it.
    fn forward_saving(&self, h0: Option<Vec<T>>, c0: Option<Vec<T>>) -> DirSaved<T> {
        let packs = self.forward_packs();
        let blocks = self.blocks();
        let io = BlockIo {
            h0: h0.as_deref(),
            c0: c0.as_deref(),
            dy: None,
            dyh: None,
            dyc: None,
        };
        let run = |&(b0, nb): &(usize, usize), nested: bool| {
            (
                (b0, nb),
                self.block_forward(&packs, &io, b0, nb, nested, self.cx.want_y),
            )
        };
        super::paths::count(|c| {
            c.threaded_training_passes += usize::from(blocks.len() > 1);
            c.plain_training_directions += usize::from(self.plain_lstm() || self.plain_gru());
        });
        DirSaved {
            blocks: if blocks.len() > 1 {
                blocks.par_iter().map(|b| run(b, true)).collect()
            } else {
                blocks.iter().map(|b| run(b, false)).collect()
            },
        }
    }

    /// Recomputes the forward (keeping each step's pre-activations and states), or
    /// takes it from `saved`, then backpropagates through time. Every product that does
    /// not feed the recurrence is one GEMM over all steps: the input projections, dX,
    /// dW and dR; per step there is one recurrent GEMM forward and one backward (GRU
    /// reset-before: two each). Batch rows never interact through time, so blocks of
    /// rows run their steps on separate threads (as the forward kernel does) when the
    /// work pays for them; the weight gradients then read every block's results.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        h0: Option<Vec<T>>,
        c0: Option<Vec<T>>,
        dy: Option<Vec<T>>,
        dyh: Option<Vec<T>>,
        dyc: Option<Vec<T>>,
        saved: Option<DirSaved<T>>,
    ) -> DirGrads<T> {
        let cx = self.cx;
        let spec = cx.spec;
        let (t_len, n, _) = cx.dims;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let nh = n * h;
        let lstm = spec.cell == Cell::Lstm;
        let back = self.backward_packs();
        let io = BlockIo {
            h0: h0.as_deref(),
            c0: c0.as_deref(),
            dy: dy.as_deref(),
            dyh: dyh.as_deref(),
            dyc: dyc.as_deref(),
        };
        let (blocks, mut parts): (Vec<(usize, usize)>, Vec<Block<T>>) = match saved {
            Some(sv) => {
                let blocks: Vec<(usize, usize)> = sv.blocks.iter().map(|(b, _)| *b).collect();
                let nested = sv.blocks.len() > 1;
                super::paths::count(|c| c.threaded_training_passes += usize::from(nested));
                let run = |((b0, nb), fwd): ((usize, usize), Fwd<T>)| {
                    self.block_backward(&back, &io, b0, nb, nested, fwd)
                };
                let parts = if nested {
                    sv.blocks.into_par_iter().map(run).collect()
                } else {
                    sv.blocks.into_iter().map(run).collect()
                };
                (blocks, parts)
            }
            None => {
                let packs = (self.forward_packs(), back);
                let blocks = self.blocks();
                super::paths::count(|c| {
                    c.threaded_training_passes += usize::from(blocks.len() > 1);
                    c.plain_training_directions +=
                        usize::from(self.plain_lstm() || self.plain_gru());
                });
                let parts = if blocks.len() > 1 {
                    blocks
                        .par_iter()
                        .map(|&(b0, nb)| self.block(&packs, &io, b0, nb, true))
                        .collect()
                } else {
                    blocks
                        .iter()
                        .map(|&(b0, nb)| self.block(&packs, &io, b0, nb, false))
                        .collect()
                };
                (blocks, parts)
            }
        };
        // Every block's rows into the [steps, N, ·] arrays the weight gradients read.
        let (dgx, dgr, hp_all, rh_all, dh, dc, dp) = if parts.len() == 1 {
            let p = parts.pop().expect("one block");
            (p.dgx, p.dgr, p.hp, p.rh, p.dh, p.dc, p.dp)
        } else {
            // Step t of the whole batch is every block's step t, in block order.
            let gather = |part: fn(&Block<T>) -> &[T], width: usize| -> Vec<T> {
                let mut v = Vec::with_capacity(t_len * n * width);
                for t in 0..t_len {
                    for (p, &(_, nb)) in parts.iter().zip(&blocks) {
                        let src = part(p);
                        if !src.is_empty() {
                            v.extend_from_slice(&src[t * nb * width..(t + 1) * nb * width]);
                        }
                    }
                }
                v
            };
            let dgx = gather(|p| &p.dgx, gh);
            let dgr = gather(|p| &p.dgr, gh);
            let hp_all = gather(|p| &p.hp, h);
            let rh_all = gather(|p| &p.rh, h);
            let mut dh = Vec::with_capacity(nh);
            let mut dc = Vec::with_capacity(if lstm { nh } else { 0 });
            let mut dp = vec![0.0; 3 * h];
            for p in &parts {
                dh.extend_from_slice(&p.dh);
                dc.extend_from_slice(&p.dc);
                for (a, v) in dp.iter_mut().zip(&p.dp) {
                    *a += v;
                }
            }
            (dgx, dgr, hp_all, rh_all, dh, dc, dp)
        };
        self.products(&dgx, &dgr, &hp_all, &rh_all, dh, dc, dp)
    }

    /// Batch rows `b0..b0 + nb` through the recomputed forward and the backward, all
    /// steps; `nested`: already on a worker thread, so the products stay on it.
    fn block(
        &self,
        (fwd_packs, back_packs): &(FwdPacks<T>, BackPacks<T>),
        io: &BlockIo<'_, T>,
        b0: usize,
        nb: usize,
        nested: bool,
    ) -> Block<T> {
        let fwd = self.block_forward(fwd_packs, io, b0, nb, nested, false);
        self.block_backward(back_packs, io, b0, nb, nested, fwd)
    }

    /// The forward of rows `b0..b0 + nb`, keeping what the backward reads (and, with
    /// `want_y`, every step's h: the forward op's Y rows).
    fn block_forward(
        &self,
        packs: &FwdPacks<T>,
        io: &BlockIo<'_, T>,
        b0: usize,
        nb: usize,
        nested: bool,
        want_y: bool,
    ) -> Fwd<T> {
        let cx = self.cx;
        let spec = cx.spec;
        let (t_len, n_all, isz) = cx.dims;
        let n = nb;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let nh = n * h;
        let rows = |v: Option<&[T]>| v.map(|v| v[b0 * h..(b0 + nb) * h].to_vec());
        let (h0, c0) = (rows(io.h0), rows(io.c0));
        let active = |t: usize, b: usize| cx.active(t, b0 + b);
        let set = GemmMode::SET.serial_if(nested);
        let zero = T::of(0.0);
        let lstm = spec.cell == Cell::Lstm;
        let gru = spec.cell == Cell::Gru;
        let lbr0 = gru && !spec.linear_before_reset;
        let order = self.order();
        let (f, ga, ha) = self.acts3();
        let c = |v: f64| clip(v, spec.clip);
        // Biases that sit outside a reset product, per column.
        let bias: Vec<f64> = (0..gh)
            .map(|j| {
                let inside = gru && j >= 2 * h;
                self.wb[j] + if inside { 0.0 } else { self.rb[j] }
            })
            .collect();
        let bias_t: Vec<T> = bias.iter().map(|&v| T::of(v)).collect();
        let rbh: &[f64] = if gru { &self.rb[2 * h..3 * h] } else { &[] };
        let plain_lstm = self.plain_lstm();
        let plain_gru = self.plain_gru();
        // ---- forward: the block's input projections, all steps (its rows of one
        // step are contiguous in X); the plain GRU's start from the bias, which its
        // one-pass step reads with them ----
        let (mut xw, proj) = if plain_gru {
            let acc = GemmMode::ACCUMULATE.serial_if(nested);
            (bias_t.repeat(t_len * n), acc)
        } else {
            (vec![zero; t_len * n * gh], set)
        };
        // What the per-step sums still add: nothing where the projections hold it.
        let bias_t = if plain_gru { vec![zero; gh] } else { bias_t };
        let rbh_t: Vec<T> = rbh.iter().map(|&v| T::of(v)).collect();
        if n == n_all {
            T::packed_gemm(&packs.wt, t_len * n, self.x, isz, &mut xw, gh, proj);
        } else {
            // The block's rows of every step gathered first: one product of T·nb rows
            // reads W once per row chunk instead of once per step.
            let mut xb = Vec::with_capacity(t_len * nb * isz);
            for t in 0..t_len {
                xb.extend_from_slice(&self.x[(t * n_all + b0) * isz..(t * n_all + b0 + nb) * isz]);
            }
            T::packed_gemm(&packs.wt, t_len * n, &xb, isz, &mut xw, gh, proj);
        }
        let (rt_packed, rht_packed) = (&packs.rt, &packs.rht);
        let mut y = want_y.then(|| vec![zero; t_len * nh]);
        let mut hs = h0.unwrap_or_else(|| vec![zero; nh]);
        let mut cs = c0.unwrap_or_else(|| vec![zero; nh]);
        // Per processing step k: pre-activations (unclipped) [N, G·H], h and c before
        // the step, and the LSTM new c / GRU reset-after h·R_hᵀ + b_rh, r⊙h (reset-before).
        // The plain LSTM's backward reads only the activations: one step's
        // pre-activations at a time then.
        let pre_steps = if plain_lstm || plain_gru { 1 } else { t_len };
        let mut pre = vec![zero; pre_steps * n * gh];
        let mut hp_all = vec![zero; t_len * nh];
        let mut cp_all = if lstm { vec![zero; t_len * nh] } else { vec![] };
        // The new c per step (the plain LSTM's backward reads it for a P input only).
        let keep_c = gru || (lstm && (!plain_lstm || self.need_dp));
        let mut aux = if keep_c {
            vec![zero; t_len * nh]
        } else {
            vec![]
        };
        let mut rh_all = if lbr0 { vec![zero; t_len * nh] } else { vec![] };
        // Gate activations [N, G·H] by time index, and act(c') for LSTM: the backward
        // reads them instead of recomputing (sigmoid and tanh derivatives come from
        // outputs). The plain LSTM's step turns its rows of the projections into them:
        // one array, no copy.
        let mut act = if plain_lstm || plain_gru {
            std::mem::take(&mut xw)
        } else {
            vec![zero; t_len * n * gh]
        };
        let mut tc = if lstm { vec![zero; t_len * nh] } else { vec![] };
        let mut hr = vec![zero; n * gh];
        let mut rh = vec![zero; nh];
        for (k, &t) in order.iter().enumerate() {
            hp_all[t * nh..(t + 1) * nh].copy_from_slice(&hs);
            if lstm {
                cp_all[k * nh..(k + 1) * nh].copy_from_slice(&cs);
            }
            if plain_lstm && (0..n).all(|b| active(t, b)) {
                // Every row runs: h·Rᵀ adds onto the step's projections in place and
                // one pass turns them into the activations, c, h and tanh(c).
                let at = &mut act[t * n * gh..(t + 1) * n * gh];
                let acc = GemmMode::ACCUMULATE.serial_if(nested);
                T::packed_gemm(rt_packed, n, &hs, h, at, gh, acc);
                let tck = &mut tc[k * nh..(k + 1) * nh];
                T::lstm_rows_keep(h, &bias_t, at, &mut cs, &mut hs, tck);
                if keep_c {
                    aux[k * nh..(k + 1) * nh].copy_from_slice(&cs);
                }
                if let Some(y) = y.as_mut() {
                    y[t * nh..(t + 1) * nh].copy_from_slice(&hs);
                }
                continue;
            }
            T::packed_gemm(rt_packed, n, &hs, h, &mut hr, gh, set);
            if plain_gru && (0..n).all(|b| active(t, b)) {
                // Every row runs: one pass from the projections (with the bias) and
                // h·Rᵀ to the activations, h and the candidate's recurrent term.
                let at = &mut act[t * n * gh..(t + 1) * n * gh];
                let lin = &mut aux[k * nh..(k + 1) * nh];
                T::gru_rows_keep(h, at, &hr, &rbh_t, &mut hs, lin);
                if let Some(y) = y.as_mut() {
                    y[t * nh..(t + 1) * nh].copy_from_slice(&hs);
                }
                continue;
            }
            let kp = if plain_lstm || plain_gru { 0 } else { k };
            let pk = &mut pre[kp * n * gh..(kp + 1) * n * gh];
            // x·Wᵀ + bias + h·Rᵀ, in the tensor's precision (the GRU candidate's
            // recurrent term is added below, after the reset gate; the plain cells'
            // projections are in `act`, the plain GRU's with the bias).
            let rec_to = if gru { 2 * h } else { gh };
            let xw = if plain_lstm || plain_gru { &act } else { &xw };
            for b in 0..n {
                let xr = &xw[(t * n + b) * gh..(t * n + b + 1) * gh];
                let (row, hrow) = (&mut pk[b * gh..(b + 1) * gh], &hr[b * gh..(b + 1) * gh]);
                for j in 0..rec_to {
                    row[j] = xr[j] + bias_t[j] + hrow[j];
                }
                for j in rec_to..gh {
                    row[j] = xr[j] + bias_t[j];
                }
            }
            if gru {
                // r from the z/r pre-activations, then the candidate's recurrent term.
                for b in 0..n {
                    let row = t * n * gh + b * gh;
                    for u in 0..h {
                        act[row + h + u] = T::of(c(pk[b * gh + h + u].to()).0);
                    }
                    T::act_slice(f, &mut act[row + h..row + 2 * h]);
                    if lbr0 {
                        for u in 0..h {
                            rh[b * h + u] = T::of(act[row + h + u].to() * hs[b * h + u].to());
                        }
                    }
                }
                if lbr0 {
                    rh_all[t * nh..(t + 1) * nh].copy_from_slice(&rh);
                    if let Some(p) = &rht_packed {
                        T::packed_gemm(p, n, &rh, h, &mut hr[2 * h..], gh, set);
                    }
                }
                for b in 0..n {
                    for u in 0..h {
                        let lin = hr[b * gh + 2 * h + u].to() + rbh[u];
                        let at = b * gh + 2 * h + u;
                        if lbr0 {
                            pk[at] = T::of(pk[at].to() + lin);
                        } else {
                            let r = act[t * n * gh + b * gh + h + u].to();
                            aux[k * nh + b * h + u] = T::of(lin);
                            pk[at] = T::of(pk[at].to() + r * lin);
                        }
                    }
                }
            }
            // Gate activations over contiguous slices (vectorised for f32). Peepholes
            // read c_prev for i and f; o reads the new c.
            for b in 0..n {
                if !active(t, b) {
                    continue;
                }
                let row = t * n * gh + b * gh;
                let st = b * h;
                let pre_at = |j: usize, u: usize| pk[b * gh + j * h + u].to();
                match spec.cell {
                    Cell::Lstm if plain_lstm => {
                        let a = &mut act[row..row + gh];
                        a.copy_from_slice(&pk[b * gh..(b + 1) * gh]);
                        T::act_slice(Act::Sigmoid, &mut a[..3 * h]);
                        T::act_slice(Act::Tanh, &mut a[3 * h..]);
                        let (io, fg_cc) = a.split_at(2 * h);
                        let (fg, cc) = fg_cc.split_at(h);
                        let (ig, og) = io.split_at(h);
                        let tcr = &mut tc[k * nh + st..k * nh + st + h];
                        let cr = &mut cs[st..st + h];
                        for u in 0..h {
                            let cn = fg[u] * cr[u] + ig[u] * cc[u];
                            cr[u] = cn;
                            tcr[u] = cn;
                        }
                        if keep_c {
                            aux[k * nh + st..k * nh + st + h].copy_from_slice(cr);
                        }
                        T::act_slice(Act::Tanh, tcr);
                        let hr_ = &mut hs[st..st + h];
                        for u in 0..h {
                            hr_[u] = og[u] * tcr[u];
                        }
                    }
                    Cell::Lstm => {
                        for u in 0..h {
                            let cp = cs[st + u].to();
                            act[row + u] = T::of(c(pre_at(0, u) + self.p[u] * cp).0);
                            act[row + 2 * h + u] =
                                T::of(c(pre_at(2, u) + self.p[2 * h + u] * cp).0);
                            act[row + 3 * h + u] = T::of(c(pre_at(3, u)).0);
                        }
                        T::act_slice(f, &mut act[row..row + h]);
                        if spec.input_forget {
                            for u in 0..h {
                                act[row + 2 * h + u] = T::of(1.0 - act[row + u].to());
                            }
                        } else {
                            T::act_slice(f, &mut act[row + 2 * h..row + 3 * h]);
                        }
                        T::act_slice(ga, &mut act[row + 3 * h..row + 4 * h]);
                        let tcr = &mut tc[k * nh + st..k * nh + st + h];
                        for u in 0..h {
                            let (i, fg, cc) = (
                                act[row + u].to(),
                                act[row + 2 * h + u].to(),
                                act[row + 3 * h + u].to(),
                            );
                            let cn = fg * cs[st + u].to() + i * cc;
                            aux[k * nh + st + u] = T::of(cn);
                            cs[st + u] = T::of(cn);
                            tcr[u] = T::of(cn);
                            act[row + h + u] = T::of(c(pre_at(1, u) + self.p[h + u] * cn).0);
                        }
                        T::act_slice(f, &mut act[row + h..row + 2 * h]);
                        T::act_slice(ha, tcr);
                        for u in 0..h {
                            hs[st + u] = act[row + h + u] * tcr[u];
                        }
                    }
                    Cell::Gru => {
                        for u in 0..h {
                            act[row + u] = T::of(c(pre_at(0, u)).0);
                            act[row + 2 * h + u] = T::of(c(pre_at(2, u)).0);
                        }
                        T::act_slice(f, &mut act[row..row + h]);
                        T::act_slice(ga, &mut act[row + 2 * h..row + 3 * h]);
                        for u in 0..h {
                            let (z, hh) = (act[row + u].to(), act[row + 2 * h + u].to());
                            hs[st + u] = T::of((1.0 - z) * hh + z * hs[st + u].to());
                        }
                    }
                    Cell::Rnn => {
                        for u in 0..h {
                            act[row + u] = T::of(c(pre_at(0, u)).0);
                        }
                        T::act_slice(f, &mut act[row..row + h]);
                        hs[st..st + h].copy_from_slice(&act[row..row + h]);
                    }
                }
            }
            if let Some(y) = y.as_mut() {
                y[t * nh..(t + 1) * nh].copy_from_slice(&hs);
            }
        }
        Fwd {
            pre,
            act,
            hp_all,
            cp_all,
            aux,
            tc,
            rh_all,
            h: hs,
            c: cs,
            y: y.unwrap_or_default(),
        }
    }

    /// Backpropagates rows `b0..b0 + nb` through time from their forward.
    fn block_backward(
        &self,
        packs: &BackPacks<T>,
        io: &BlockIo<'_, T>,
        b0: usize,
        nb: usize,
        nested: bool,
        fwd: Fwd<T>,
    ) -> Block<T> {
        let cx = self.cx;
        let need_dp = self.need_dp;
        let spec = cx.spec;
        let (t_len, n_all, _) = cx.dims;
        let n = nb;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let nh = n * h;
        let rows = |v: Option<&[T]>| v.map(|v| v[b0 * h..(b0 + nb) * h].to_vec());
        let (dyh, dyc) = (rows(io.dyh), rows(io.dyc));
        let (r_packed, rh_packed) = (&packs.r, &packs.rh);
        let active = |t: usize, b: usize| cx.active(t, b0 + b);
        let set = GemmMode::SET.serial_if(nested);
        let zero = T::of(0.0);
        let lstm = spec.cell == Cell::Lstm;
        let gru = spec.cell == Cell::Gru;
        let lbr0 = gru && !spec.linear_before_reset;
        let order = self.order();
        let (f, ga, ha) = self.acts3();
        let c = |v: f64| clip(v, spec.clip);
        let plain_lstm = self.plain_lstm();
        let plain_gru = self.plain_gru();
        let Fwd {
            pre,
            act,
            hp_all,
            cp_all,
            aux,
            tc,
            rh_all,
            ..
        } = fwd;
        // ---- backward ----
        // Gate gradients by time index: those that meet X (dgx) and, where they differ
        // (GRU), those that meet h (dgr); LSTM and RNN read dgx for both.
        let mut dgx = vec![zero; t_len * n * gh];
        let mut dgr = if gru {
            vec![zero; t_len * n * gh]
        } else {
            vec![]
        };
        let mut dp = vec![0.0; 3 * h];
        let mut dh = dyh.unwrap_or_else(|| vec![zero; nh]);
        let mut dc = dyc.unwrap_or_else(|| vec![zero; nh]);
        let mut dh_prev = vec![zero; nh];
        let mut dc_prev = vec![zero; nh];
        let mut dpre_h = vec![zero; nh];
        let mut d_rh = vec![zero; nh];
        for (k, &t) in order.iter().enumerate().rev() {
            if let Some(dy) = io.dy {
                // Y is zero on inactive rows (their dY does not flow), or with
                // `hold_output` the held state, which flows on to the previous step.
                for b in 0..n {
                    if spec.hold || active(t, b) {
                        for u in 0..h {
                            let at = b * h + u;
                            let g = t * n_all * h + b0 * h + at;
                            dh[at] = T::of(dh[at].to() + dy[g].to());
                        }
                    }
                }
            }
            // (The plain LSTM's forward kept one scratch step, which it does not read.)
            let pk = pre.get(k * n * gh..(k + 1) * n * gh).unwrap_or_default();
            let ak = &act[t * n * gh..(t + 1) * n * gh];
            let hp = &hp_all[t * nh..(t + 1) * nh];
            let gx = &mut dgx[t * n * gh..(t + 1) * n * gh];
            let gr: &mut [T] = if gru {
                &mut dgr[t * n * gh..(t + 1) * n * gh]
            } else {
                &mut []
            };
            dh_prev.copy_from_slice(&dh);
            dc_prev.copy_from_slice(&dc);
            for b in 0..n {
                if !active(t, b) {
                    continue; // inactive rows carry dh, dc through
                }
                if plain_lstm {
                    // The general loop below with the clip, peephole and input_forget
                    // terms dropped, on slices (vectorised for f32); the peephole
                    // gradient only when the op has a P input.
                    let one = T::of(1.0);
                    let row = &ak[b * gh..(b + 1) * gh];
                    let (i_a, o_a, f_a, c_a) =
                        (&row[..h], &row[h..2 * h], &row[2 * h..3 * h], &row[3 * h..]);
                    let at = b * h;
                    let cp = &cp_all[k * nh + at..k * nh + at + h];
                    let t_c = &tc[k * nh + at..k * nh + at + h];
                    let (dh_r, dc_r) = (&dh[at..at + h], &dc[at..at + h]);
                    let g_row = &mut gx[b * gh..(b + 1) * gh];
                    let (gi, rest) = g_row.split_at_mut(h);
                    let (go, rest) = rest.split_at_mut(h);
                    let (gf, gc) = rest.split_at_mut(h);
                    let dcp = &mut dc_prev[at..at + h];
                    for u in 0..h {
                        let (i, o, fg, cc, tcu) = (i_a[u], o_a[u], f_a[u], c_a[u], t_c[u]);
                        let dhk = dh_r[u];
                        let dck = dc_r[u] + dhk * o * (one - tcu * tcu);
                        go[u] = dhk * tcu * o * (one - o);
                        gi[u] = dck * cc * i * (one - i);
                        gf[u] = dck * cp[u] * fg * (one - fg);
                        gc[u] = dck * i * (one - cc * cc);
                        dcp[u] = dck * fg;
                    }
                    dh_prev[at..at + h].fill(zero);
                    if need_dp {
                        let cn = &aux[k * nh + at..k * nh + at + h];
                        for u in 0..h {
                            dp[u] += (gi[u] * cp[u]).to();
                            dp[h + u] += (go[u] * cn[u]).to();
                            dp[2 * h + u] += (gf[u] * cp[u]).to();
                        }
                    }
                    continue;
                }
                if plain_gru {
                    // The general GRU loop and its reset-gate loop below with the clip
                    // dropped, on slices in the tensor's precision.
                    let one = T::of(1.0);
                    let row = &ak[b * gh..(b + 1) * gh];
                    let (z_a, r_a, n_a) = (&row[..h], &row[h..2 * h], &row[2 * h..]);
                    let at = b * h;
                    let lin = &aux[k * nh + at..k * nh + at + h];
                    let (hp_r, dh_r) = (&hp[at..at + h], &dh[at..at + h]);
                    let (gxz, rest) = gx[b * gh..(b + 1) * gh].split_at_mut(h);
                    let (gxr, gxn) = rest.split_at_mut(h);
                    let (grz, rest) = gr[b * gh..(b + 1) * gh].split_at_mut(h);
                    let (grr, grn) = rest.split_at_mut(h);
                    let dhp = &mut dh_prev[at..at + h];
                    for u in 0..h {
                        let (z, r, nn, d) = (z_a[u], r_a[u], n_a[u], dh_r[u]);
                        let dz = d * (hp_r[u] - nn) * z * (one - z);
                        let dn = d * (one - z) * (one - nn * nn);
                        let dr = dn * lin[u] * r * (one - r);
                        (gxz[u], gxr[u], gxn[u]) = (dz, dr, dn);
                        (grz[u], grr[u], grn[u]) = (dz, dr, dn * r);
                        dhp[u] = d * z;
                    }
                    continue;
                }
                for u in 0..h {
                    let at = b * h + u;
                    let g = |j: usize| pk[b * gh + j * h + u].to();
                    let a = |j: usize| ak[b * gh + j * h + u].to();
                    let dhk = dh[at].to();
                    match spec.cell {
                        Cell::Lstm => {
                            let cp = cp_all[k * nh + at].to();
                            let cn = aux[k * nh + at].to();
                            let (vi, di) = c(g(0) + self.p[u] * cp);
                            let (vf, df) = c(g(2) + self.p[2 * h + u] * cp);
                            let (vc, dcl) = c(g(3));
                            let (vo, do_) = c(g(1) + self.p[h + u] * cn);
                            let (i, o, fg, cc) = (a(0), a(1), a(2), a(3));
                            let t_c = tc[k * nh + at].to();
                            let do_pre = dhk * t_c * dact(f, vo, o) * do_;
                            let dck =
                                dc[at].to() + dhk * o * dact(ha, cn, t_c) + do_pre * self.p[h + u];
                            dp[h + u] += do_pre * cn;
                            let dfg = dck * cp;
                            let mut di_ = dck * cc;
                            let dcc = dck * i;
                            let mut dcp = dck * fg;
                            let df_pre = if spec.input_forget {
                                di_ -= dfg;
                                0.0
                            } else {
                                dfg * dact(f, vf, fg) * df
                            };
                            let di_pre = di_ * dact(f, vi, i) * di;
                            let dc_pre = dcc * dact(ga, vc, cc) * dcl;
                            dcp += di_pre * self.p[u] + df_pre * self.p[2 * h + u];
                            dp[u] += di_pre * cp;
                            dp[2 * h + u] += df_pre * cp;
                            for (j, v) in [(0, di_pre), (1, do_pre), (2, df_pre), (3, dc_pre)] {
                                gx[b * gh + j * h + u] = T::of(v);
                            }
                            dh_prev[at] = zero;
                            dc_prev[at] = T::of(dcp);
                        }
                        Cell::Gru => {
                            let (vz, dz) = c(g(0));
                            let (vh, dhc) = c(g(2));
                            let (z, hh) = (a(0), a(2));
                            let dz_pre = dhk * (hp[at].to() - hh) * dact(f, vz, z) * dz;
                            let dph = dhk * (1.0 - z) * dact(ga, vh, hh) * dhc;
                            gx[b * gh + u] = T::of(dz_pre);
                            gr[b * gh + u] = T::of(dz_pre);
                            gx[b * gh + 2 * h + u] = T::of(dph);
                            dpre_h[at] = T::of(dph);
                            dh_prev[at] = T::of(dhk * z);
                        }
                        Cell::Rnn => {
                            let (v, dd) = c(g(0));
                            gx[b * gh + u] = T::of(dhk * dact(f, v, a(0)) * dd);
                            dh_prev[at] = zero;
                        }
                    }
                }
            }
            if gru && !plain_gru {
                // The reset gate and the candidate's recurrent term.
                if lbr0 {
                    // d(r⊙h) = dpre_h · R_h
                    if let Some(p) = &rh_packed {
                        T::packed_gemm(p, n, &dpre_h, h, &mut d_rh, h, set);
                    }
                }
                for b in 0..n {
                    if !active(t, b) {
                        continue;
                    }
                    for u in 0..h {
                        let at = b * h + u;
                        let (vr, drc) = c(pk[b * gh + h + u].to());
                        let r = ak[b * gh + h + u].to();
                        let dph = dpre_h[at].to();
                        let dr_act = if lbr0 {
                            let drh = d_rh[at].to();
                            dh_prev[at] = T::of(dh_prev[at].to() + drh * r);
                            gr[b * gh + 2 * h + u] = T::of(dph);
                            drh * hp[at].to()
                        } else {
                            gr[b * gh + 2 * h + u] = T::of(dph * r);
                            dph * aux[k * nh + at].to()
                        };
                        let v = T::of(dr_act * dact(f, vr, r) * drc);
                        gx[b * gh + h + u] = v;
                        gr[b * gh + h + u] = v;
                    }
                }
            }
            // dh_prev += dG_rec · R over the columns fed by h (reset-before GRU: z, r).
            // Inactive rows have zero gate grads: the product leaves their carry as is.
            T::packed_gemm(
                r_packed,
                n,
                if gru { gr } else { gx },
                gh,
                &mut dh_prev,
                h,
                GemmMode::ACCUMULATE.serial_if(nested),
            );
            std::mem::swap(&mut dh, &mut dh_prev);
            std::mem::swap(&mut dc, &mut dc_prev);
        }
        Block {
            dgx,
            dgr,
            hp: hp_all,
            rh: rh_all,
            dh,
            dc: if lstm { dc } else { vec![] },
            dp,
        }
    }
}

/// A block's forward, its rows only, by processing step k (pre, cp, aux, tc) or by
/// time index (act, hp, rh, y): what the backward reads, the final states, and (when
/// asked for) every step's h. `aux` (the new c, or the GRU's reset-after product) is
/// empty for the plain LSTM without a P input, which does not read it.
struct Fwd<T> {
    pre: Vec<T>,
    act: Vec<T>,
    hp_all: Vec<T>,
    cp_all: Vec<T>,
    aux: Vec<T>,
    tc: Vec<T>,
    rh_all: Vec<T>,
    h: Vec<T>,
    c: Vec<T>,
    y: Vec<T>,
}

/// One direction's forward, block by block: `((first row, rows), forward)`.
struct DirSaved<T> {
    blocks: Vec<((usize, usize), Fwd<T>)>,
}

/// The packed weights every block's forward products read.
struct FwdPacks<T: RFloat> {
    wt: T::Packed,
    rt: T::Packed,
    rht: Option<T::Packed>,
}

/// The packed weights every block's backward products read.
struct BackPacks<T: RFloat> {
    r: T::Packed,
    rh: Option<T::Packed>,
}

/// A direction's per-row inputs (all batch rows; a block takes its own).
struct BlockIo<'a, T> {
    h0: Option<&'a [T]>,
    c0: Option<&'a [T]>,
    /// dY `[T, N, H]`.
    dy: Option<&'a [T]>,
    dyh: Option<&'a [T]>,
    dyc: Option<&'a [T]>,
}

/// One block's results, its rows only, all by time index: the gate gradients
/// `[T, nb, G·H]` that meet X (dgx) and, for GRU only, those that meet h (dgr; empty
/// otherwise), the states before each step (and r⊙h for reset-before GRU), the
/// gradients of the initial states (dc empty but for LSTM), and its share of the
/// peephole gradient.
struct Block<T> {
    dgx: Vec<T>,
    dgr: Vec<T>,
    hp: Vec<T>,
    rh: Vec<T>,
    dh: Vec<T>,
    dc: Vec<T>,
    dp: Vec<f64>,
}

impl<T: RFloat> Dir<'_, T> {
    /// The gradients of the inputs and weights from the gate gradients over all steps.
    #[allow(clippy::too_many_arguments)]
    fn products(
        &self,
        dgx: &[T],
        dgr: &[T],
        hp_all: &[T],
        rh_all: &[T],
        dh: Vec<T>,
        dc: Vec<T>,
        dp: Vec<f64>,
    ) -> DirGrads<T> {
        let cx = self.cx;
        let spec = cx.spec;
        let (t_len, n, isz) = cx.dims;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let nh = n * h;
        let zero = T::of(0.0);
        let lstm = spec.cell == Cell::Lstm;
        let lbr0 = spec.cell == Cell::Gru && !spec.linear_before_reset;
        let dgr = if spec.cell == Cell::Gru { dgr } else { dgx };
        // ---- the products over all steps at once ----
        // dX = dG·W with W packed (rows of dG are contiguous), when wanted; dW and dR
        // read dG transposed, which the packed kernel does not take.
        let mut dx = vec![];
        if cx.want_dx {
            dx = vec![zero; t_len * n * isz];
            T::packed_gemm(
                &T::pack(gh, isz, &self.w, isz, 1),
                t_len * n,
                dgx,
                gh,
                &mut dx,
                isz,
                GemmMode::SET,
            );
        }
        let mut dw = vec![zero; gh * isz];
        T::gemm(
            gh,
            t_len * n,
            isz,
            dgx,
            1,
            gh as isize,
            self.x,
            isz as isize,
            1,
            false,
            &mut dw,
            isz as isize,
        );
        let mut dr = vec![zero; gh * h];
        let rows = if lbr0 { 2 * h } else { gh };
        T::gemm(
            rows,
            t_len * n,
            h,
            dgr,
            1,
            gh as isize,
            hp_all,
            h as isize,
            1,
            false,
            &mut dr,
            h as isize,
        );
        if lbr0 {
            T::gemm(
                h,
                t_len * n,
                h,
                &dgr[2 * h..],
                1,
                gh as isize,
                rh_all,
                h as isize,
                1,
                false,
                &mut dr[2 * h * h..],
                h as isize,
            );
        }
        let colsum = |m: &[T]| -> Vec<f64> {
            let mut s = vec![0.0; gh];
            for row in m.chunks(gh) {
                for (a, v) in s.iter_mut().zip(row) {
                    *a += v.to();
                }
            }
            s
        };
        DirGrads {
            dx,
            dw,
            dr,
            dwb: colsum(dgx),
            drb: colsum(dgr),
            dh0: dh,
            dc0: if lstm { dc } else { vec![zero; nh] },
            dp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn t32(shape: &[usize], seed: &mut u64, scale: f32) -> Data {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Data::Tensor(Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape"),
        ))
    }

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
            .install(f)
    }

    fn close(what: &str, a: &[Data], b: &[Data]) {
        assert_eq!(a.len(), b.len(), "{what}: output count");
        for (k, (a, b)) in a.iter().zip(b).enumerate() {
            let (a, b) = (
                a.tensor().expect("tensor").to_f64_vec(),
                b.tensor().expect("tensor").to_f64_vec(),
            );
            assert_eq!(a.len(), b.len(), "{what} output {k}");
            let scale = a.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{what} output {k}: {x} vs {y}"
                );
            }
        }
    }

    /// A forward op run with `forward_saving` gives the fused forward kernel's outputs,
    /// and its backward op run from the saved state gives what it gives when it
    /// recomputes the forward: every cell, both directions, initial states, peepholes,
    /// on one block and on three.
    #[test]
    fn saved_forward_matches_the_kernels() {
        let (t, n, i) = (9usize, 7usize, 16usize);
        for (cell, lbr) in [("LSTM", 0), ("GRU", 1), ("GRU", 0), ("RNN", 0)] {
            let h = if cell == "RNN" { 64 } else { 32 };
            let g = match cell {
                "LSTM" => 4,
                "GRU" => 3,
                _ => 1,
            };
            let dir = "bidirectional".to_string();
            let fwd = match cell {
                "LSTM" => Op::LSTM {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: dir,
                    hidden_size: Some(h as i64),
                    input_forget: 0,
                    layout: 0,
                },
                "GRU" => Op::GRU {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: dir,
                    hidden_size: Some(h as i64),
                    layout: 0,
                    linear_before_reset: lbr,
                },
                _ => Op::RNN {
                    activation_alpha: None,
                    activation_beta: None,
                    activations: None,
                    clip: None,
                    direction: dir,
                    hidden_size: Some(h as i64),
                    layout: 0,
                },
            };
            let grad = fwd.recurrent_pair().expect("a backward op");
            let mut seed = 11u64;
            let s = &mut seed;
            let mut ins: Vec<Option<Data>> = vec![
                Some(t32(&[t, n, i], s, 1.0)),
                Some(t32(&[2, g * h, i], s, 0.3)),
                Some(t32(&[2, g * h, h], s, 0.3)),
                Some(t32(&[2, 2 * g * h], s, 0.3)),
                None,
                Some(t32(&[2, n, h], s, 0.5)),
            ];
            if cell == "LSTM" {
                ins.push(Some(t32(&[2, n, h], s, 0.5)));
                ins.push(Some(t32(&[2, 3 * h], s, 0.3)));
            }
            let shared = ins.len();
            ins.push(Some(t32(&[t, 2, n, h], s, 1.0)));
            ins.push(Some(t32(&[2, n, h], s, 1.0)));
            if cell == "LSTM" {
                ins.push(Some(t32(&[2, n, h], s, 1.0)));
            }
            let refs: Vec<Option<&Data>> = ins.iter().map(|d| d.as_ref()).collect();
            let (nf, ng) = if cell == "LSTM" { (3, 7) } else { (2, 5) };
            for threads in [1, 3] {
                let what = format!("{cell} lbr {lbr}, {threads} threads");
                let (kernel, (outs, state), recomputed) = in_pool(threads, || {
                    (
                        crate::cpu::rnn::eval(&fwd, &refs[..shared], nf).expect("forward"),
                        forward_saving(&fwd, &refs[..shared], &vec![true; nf])
                            .expect("saving forward"),
                        eval(&grad, &refs, &vec![true; ng]).expect("backward"),
                    )
                });
                close(&format!("{what}: forward"), &outs, &kernel);
                let from_saved =
                    in_pool(threads, || eval_saved(&grad, &refs, &vec![true; ng], state))
                        .expect("saved");
                close(&format!("{what}: backward"), &from_saved, &recomputed);
                // Without dX (a layer fed by data): dX comes back empty, the rest as before.
                let mut no_dx = vec![true; ng];
                no_dx[0] = false;
                let skipped = in_pool(threads, || eval(&grad, &refs, &no_dx)).expect("no dX");
                assert_eq!(skipped[0].tensor().expect("dX").shape(), [0], "{what}");
                close(
                    &format!("{what}: without dX"),
                    &skipped[1..],
                    &recomputed[1..],
                );
                // A saving forward whose Y nothing reads: Y empty, the states and the
                // backward from what it kept as before.
                let mut no_y = vec![true; nf];
                no_y[0] = false;
                let (outs, state) =
                    in_pool(threads, || forward_saving(&fwd, &refs[..shared], &no_y))
                        .expect("saving forward without Y");
                assert_eq!(outs[0].tensor().expect("Y").shape(), [0], "{what}");
                close(
                    &format!("{what}: states without Y"),
                    &outs[1..],
                    &kernel[1..],
                );
                let from_saved =
                    in_pool(threads, || eval_saved(&grad, &refs, &vec![true; ng], state))
                        .expect("saved without Y");
                close(
                    &format!("{what}: backward without Y"),
                    &from_saved,
                    &recomputed,
                );
            }
        }
    }

    /// The backward ops split the batch into blocks of rows run on separate threads when
    /// the work is large enough: every output equals the one-block result (one thread),
    /// with uneven blocks, both directions, ragged sequence lengths, initial states,
    /// peepholes and every cotangent.
    #[test]
    fn batch_blocks_match_one_block() {
        let (t, n, i) = (9usize, 7usize, 16usize);
        for (cell, lbr) in [("LSTM", 0), ("GRU", 1), ("GRU", 0), ("RNN", 0)] {
            let h = if cell == "RNN" { 64 } else { 32 };
            let g = match cell {
                "LSTM" => 4,
                "GRU" => 3,
                _ => 1,
            };
            assert!(
                t * n * g * h * (h + i) >= PARALLEL_MIN_MACS,
                "{cell}: too small to split"
            );
            let common = (
                None,
                None,
                None,
                None,
                "bidirectional".to_string(),
                Some(h as i64),
            );
            let op = match cell {
                "LSTM" => Op::LSTMGrad {
                    activation_alpha: common.0,
                    activation_beta: common.1,
                    activations: common.2,
                    clip: common.3,
                    direction: common.4,
                    hidden_size: common.5,
                    input_forget: 0,
                    layout: 0,
                    hold_output: 0,
                },
                "GRU" => Op::GRUGrad {
                    activation_alpha: common.0,
                    activation_beta: common.1,
                    activations: common.2,
                    clip: common.3,
                    direction: common.4,
                    hidden_size: common.5,
                    layout: 0,
                    linear_before_reset: lbr,
                    hold_output: 0,
                },
                _ => Op::RNNGrad {
                    activation_alpha: common.0,
                    activation_beta: common.1,
                    activations: common.2,
                    clip: common.3,
                    direction: common.4,
                    hidden_size: common.5,
                    layout: 0,
                    hold_output: 0,
                },
            };
            let mut seed = 7u64;
            let s = &mut seed;
            let lens = Data::Tensor(Tensor::I32(
                ArrayD::from_shape_vec(IxDyn(&[n]), vec![9, 3, 9, 0, 5, 9, 1]).expect("shape"),
            ));
            let mut ins: Vec<Option<Data>> = vec![
                Some(t32(&[t, n, i], s, 1.0)),
                Some(t32(&[2, g * h, i], s, 0.3)),
                Some(t32(&[2, g * h, h], s, 0.3)),
                Some(t32(&[2, 2 * g * h], s, 0.3)),
                Some(lens),
                Some(t32(&[2, n, h], s, 0.5)),
            ];
            if cell == "LSTM" {
                ins.push(Some(t32(&[2, n, h], s, 0.5)));
                ins.push(Some(t32(&[2, 3 * h], s, 0.3)));
            }
            ins.push(Some(t32(&[t, 2, n, h], s, 1.0)));
            ins.push(Some(t32(&[2, n, h], s, 1.0)));
            if cell == "LSTM" {
                ins.push(Some(t32(&[2, n, h], s, 1.0)));
            }
            let refs: Vec<Option<&Data>> = ins.iter().map(|d| d.as_ref()).collect();
            let nout = if cell == "LSTM" { 7 } else { 5 };
            let one = in_pool(1, || eval(&op, &refs, &vec![true; nout])).expect("one block");
            let three = in_pool(3, || eval(&op, &refs, &vec![true; nout])).expect("three blocks");
            for (k, (a, b)) in one.iter().zip(&three).enumerate() {
                let (a, b) = (
                    a.tensor().expect("tensor").to_f64_vec(),
                    b.tensor().expect("tensor").to_f64_vec(),
                );
                assert_eq!(a.len(), b.len());
                let scale = a.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * scale,
                        "{cell} lbr {lbr} output {k}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
