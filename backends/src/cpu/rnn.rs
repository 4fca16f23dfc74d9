//! Fused kernels for ONNX `LSTM`, `GRU` and `RNN`, with every attribute: directions,
//! both layouts, `sequence_lens` (the reverse direction starts at each row's own last
//! step), initial states, peepholes, `linear_before_reset`, all activation functions
//! with `activation_alpha`/`activation_beta` consumed in order, `clip` and
//! `input_forget`.
//!
//! Algorithm per direction: one GEMM for all steps' input projections, then per step one
//! GEMM with the recurrent weights (two for GRU with `linear_before_reset=0`) and fused
//! gate arithmetic. Gate math runs in the tensor's own precision (f32 or f64).

use super::util::{input, opt_input};
use crate::data::Data;
use crate::gemm::{dgemm, sgemm};
use cellgraph_ir::ops::rnn::num_directions;
use cellgraph_ir::{Op, Tensor};
use ndarray::{ArrayD, IxDyn};
use std::ops::{Add, Mul, Sub};

/// Floats the fused kernels run on.
pub trait RFloat:
    Copy
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Send
    + Sync
    + 'static
{
    /// The array of a tensor of this dtype.
    fn array(t: &Tensor) -> Option<&ArrayD<Self>>;
    /// Wraps an array into a tensor.
    fn tensor(a: ArrayD<Self>) -> Tensor;
    /// From f64.
    fn of(x: f64) -> Self;
    /// To f64.
    fn to(self) -> f64;
    /// e^x.
    fn exp(self) -> Self;
    /// tanh.
    fn tanh(self) -> Self;
    /// The smaller (NaN-ignoring).
    fn mn(self, o: Self) -> Self;
    /// The larger (NaN-ignoring).
    fn mx(self, o: Self) -> Self;
    /// Applies an activation to every element (f32 sigmoid and tanh use the vectorised
    /// [`super::fastmath`] versions).
    fn act_slice(a: Act, v: &mut [Self]) {
        for x in v.iter_mut() {
            *x = a.apply(*x);
        }
    }
    /// `C[m×n] = A[m×k]·B[k×n] (+ C when accumulate)`, strided as in `crate::gemm`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        accumulate: bool,
        c: &mut [Self],
        rsc: isize,
    );
}

macro_rules! rfloat_impl {
    ($t:ty, $var:ident, $gemm:path, { $($extra:item)* }) => {
        impl RFloat for $t {
            fn array(t: &Tensor) -> Option<&ArrayD<$t>> {
                match t {
                    Tensor::$var(a) => Some(a),
                    _ => None,
                }
            }
            fn tensor(a: ArrayD<$t>) -> Tensor {
                Tensor::$var(a)
            }
            fn of(x: f64) -> $t {
                x as $t
            }
            fn to(self) -> f64 {
                self as f64
            }
            fn exp(self) -> $t {
                <$t>::exp(self)
            }
            fn tanh(self) -> $t {
                <$t>::tanh(self)
            }
            fn mn(self, o: $t) -> $t {
                <$t>::min(self, o)
            }
            fn mx(self, o: $t) -> $t {
                <$t>::max(self, o)
            }
            fn gemm(m: usize, k: usize, n: usize, a: &[$t], rsa: isize, csa: isize, b: &[$t], rsb: isize, csb: isize, acc: bool, c: &mut [$t], rsc: isize) {
                $gemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, if acc { 1.0 } else { 0.0 }, c, rsc, 1);
            }
            $($extra)*
        }
    };
}

rfloat_impl!(f32, F32, sgemm, {
    fn act_slice(a: Act, v: &mut [f32]) {
        match a {
            Act::Sigmoid => super::fastmath::sigmoid_slice(v),
            Act::Tanh => super::fastmath::tanh_slice(v),
            other => {
                for x in v.iter_mut() {
                    *x = other.apply(*x);
                }
            }
        }
    }
});
rfloat_impl!(f64, F64, dgemm, {});

/// An ONNX recurrent activation function with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// alpha·x + beta.
    Affine(f32, f32),
    /// x < 0 ? alpha·x : x.
    LeakyRelu(f32),
    /// x > alpha ? x : 0.
    ThresholdedRelu(f32),
    /// alpha·tanh(beta·x).
    ScaledTanh(f32, f32),
    /// clip(alpha·x + beta, 0, 1).
    HardSigmoid(f32, f32),
    /// x < 0 ? alpha·(e^x − 1) : x.
    Elu(f32),
    /// x / (1 + |x|).
    Softsign,
    /// ln(1 + e^x).
    Softplus,
}

impl Act {
    /// Applies the function.
    #[inline]
    pub fn apply<T: RFloat>(self, x: T) -> T {
        let zero = T::of(0.0);
        let one = T::of(1.0);
        match self {
            Act::Relu => {
                if x > zero {
                    x
                } else {
                    zero
                }
            }
            Act::Tanh => x.tanh(),
            Act::Sigmoid => {
                if x >= zero {
                    let e = (zero - x).exp();
                    T::of(1.0 / (1.0 + e.to()))
                } else {
                    let e = x.exp();
                    T::of(e.to() / (1.0 + e.to()))
                }
            }
            Act::Affine(a, b) => T::of(a as f64) * x + T::of(b as f64),
            Act::LeakyRelu(a) => {
                if x < zero {
                    T::of(a as f64) * x
                } else {
                    x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > T::of(a as f64) {
                    x
                } else {
                    zero
                }
            }
            Act::ScaledTanh(a, b) => T::of(a as f64) * (T::of(b as f64) * x).tanh(),
            Act::HardSigmoid(a, b) => {
                let v = T::of(a as f64) * x + T::of(b as f64);
                if v < zero {
                    zero
                } else if v > one {
                    one
                } else {
                    v
                }
            }
            Act::Elu(a) => {
                if x < zero {
                    T::of(a as f64) * (x.exp() - one)
                } else {
                    x
                }
            }
            Act::Softsign => T::of(x.to() / (1.0 + x.to().abs())),
            Act::Softplus => T::of(x.to().max(0.0) + (-x.to().abs()).exp().ln_1p()),
        }
    }
}

/// Parses an ONNX activation list, consuming alpha/beta values in order.
pub fn parse_activations(
    names: &[String],
    alpha: &[f32],
    beta: &[f32],
) -> Result<Vec<Act>, String> {
    let (mut ai, mut bi) = (0, 0);
    let next = |v: &[f32], i: &mut usize, d: f32| {
        let x = v.get(*i).copied().unwrap_or(d);
        *i += 1;
        x
    };
    names
        .iter()
        .map(|n| {
            Ok(match n.as_str() {
                "Relu" => Act::Relu,
                "Tanh" => Act::Tanh,
                "Sigmoid" => Act::Sigmoid,
                "Softsign" => Act::Softsign,
                "Softplus" => Act::Softplus,
                "LeakyRelu" => Act::LeakyRelu(next(alpha, &mut ai, 0.01)),
                "ThresholdedRelu" => Act::ThresholdedRelu(next(alpha, &mut ai, 1.0)),
                "Elu" => Act::Elu(next(alpha, &mut ai, 1.0)),
                "HardSigmoid" => {
                    Act::HardSigmoid(next(alpha, &mut ai, 0.2), next(beta, &mut bi, 0.5))
                }
                "Affine" => Act::Affine(next(alpha, &mut ai, 1.0), next(beta, &mut bi, 0.0)),
                "ScaledTanh" => {
                    Act::ScaledTanh(next(alpha, &mut ai, 1.0), next(beta, &mut bi, 1.0))
                }
                other => return Err(format!("unknown activation {other:?}")),
            })
        })
        .collect()
}

/// The recurrent cell kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// LSTM (gates i, o, f, c).
    Lstm,
    /// GRU (gates z, r, h).
    Gru,
    /// Simple RNN.
    Rnn,
}

impl Cell {
    /// Gates per unit.
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }
    /// Activation functions per direction.
    pub fn acts(self) -> usize {
        match self {
            Cell::Lstm => 3,
            Cell::Gru => 2,
            Cell::Rnn => 1,
        }
    }
    fn default_acts(self) -> Vec<Act> {
        match self {
            Cell::Lstm => vec![Act::Sigmoid, Act::Tanh, Act::Tanh],
            Cell::Gru => vec![Act::Sigmoid, Act::Tanh],
            Cell::Rnn => vec![Act::Tanh],
        }
    }
}

/// Everything a fused kernel needs from the op's attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The cell.
    pub cell: Cell,
    /// Units.
    pub hidden: usize,
    /// Per direction: reverse or not.
    pub reverse: Vec<bool>,
    /// Per direction: the activation functions.
    pub acts: Vec<Vec<Act>>,
    /// Gate pre-activation clip.
    pub clip: Option<f32>,
    /// LSTM `input_forget`.
    pub input_forget: bool,
    /// GRU `linear_before_reset`.
    pub linear_before_reset: bool,
    /// Batch-major layout.
    pub layout1: bool,
    /// Masked ops: masked steps output the held state instead of zeros.
    pub hold: bool,
}

impl Spec {
    /// Reads the spec of an LSTM/GRU/RNN op; `hidden` comes from R when the attribute is absent.
    pub fn from_op(op: &Op, r_hidden: usize) -> Result<Spec, String> {
        if !matches!(op, Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. }) {
            if let Some((base, hold)) = op.unmasked_recurrent() {
                let mut spec = Spec::from_op(&base, r_hidden)?;
                spec.hold = hold != 0;
                return Ok(spec);
            }
        }
        let (cell, aa, ab, acts, clip, dir, hs, layout, inf, lbr) = match op {
            Op::LSTM {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                input_forget,
                layout,
            } => (
                Cell::Lstm,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                *input_forget != 0,
                false,
            ),
            Op::GRU {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                linear_before_reset,
            } => (
                Cell::Gru,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                false,
                *linear_before_reset != 0,
            ),
            Op::RNN {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
            } => (
                Cell::Rnn,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                false,
                false,
            ),
            other => return Err(format!("{} is not a recurrent op", other.name())),
        };
        let d = num_directions(dir)?;
        let reverse = match dir.as_str() {
            "forward" => vec![false],
            "reverse" => vec![true],
            _ => vec![false, true],
        };
        let per = cell.acts();
        let acts = match acts {
            Some(names) => {
                let all = parse_activations(
                    names,
                    aa.as_deref().unwrap_or(&[]),
                    ab.as_deref().unwrap_or(&[]),
                )?;
                if all.len() != per * d {
                    return Err(format!(
                        "{} activations for {d} direction(s) of {per}",
                        all.len()
                    ));
                }
                all.chunks(per).map(|c| c.to_vec()).collect()
            }
            None => vec![cell.default_acts(); d],
        };
        let hidden = match hs {
            Some(h) if *h as usize != r_hidden => {
                return Err(format!("hidden_size {h} but R has {r_hidden} columns"))
            }
            _ => r_hidden,
        };
        Ok(Spec {
            cell,
            hidden,
            reverse,
            acts,
            clip: *clip,
            input_forget: inf,
            linear_before_reset: lbr,
            layout1: *layout == 1,
            hold: false,
        })
    }
}

/// The fused kernel's inputs for one call, time-major.
pub struct Inputs<'a, T> {
    /// X `[T, N, I]`.
    pub x: &'a [T],
    /// Steps, batch, input size.
    pub dims: (usize, usize, usize),
    /// W `[D, G·H, I]`.
    pub w: &'a [T],
    /// R `[D, G·H, H]`.
    pub r: &'a [T],
    /// B `[D, 2·G·H]`.
    pub b: Option<&'a [T]>,
    /// Per-row lengths.
    pub lens: Vec<usize>,
    /// Masked ops: the step mask `[T, N]`, time-major (a row runs step t when set).
    pub mask: Option<Vec<bool>>,
    /// initial_h `[D, N, H]`.
    pub h0: Option<&'a [T]>,
    /// initial_c `[D, N, H]`.
    pub c0: Option<&'a [T]>,
    /// P `[D, 3H]`.
    pub p: Option<&'a [T]>,
}

/// The fused kernel's outputs, time-major: Y `[T, D, N, H]`, Y_h and Y_c `[D, N, H]`.
pub struct Outputs<T> {
    /// All hidden states.
    pub y: Vec<T>,
    /// Final hidden states.
    pub yh: Vec<T>,
    /// Final cell states (LSTM).
    pub yc: Vec<T>,
}

/// Runs the fused recurrent kernel.
pub fn run<T: RFloat>(spec: &Spec, inp: &Inputs<'_, T>) -> Result<Outputs<T>, String> {
    let (t_len, n, isz) = inp.dims;
    let h = spec.hidden;
    let g = spec.cell.gates();
    let gh = g * h;
    let d_n = spec.reverse.len();
    let mut y = vec![T::default(); t_len * d_n * n * h];
    let mut yh = vec![T::default(); d_n * n * h];
    let mut yc = vec![T::default(); d_n * n * h];
    let mut xw = vec![T::default(); t_len * n * gh];
    let mut hr = vec![T::default(); n * gh];
    let mut rh = vec![T::default(); n * h];
    let zero = T::of(0.0);
    let one = T::of(1.0);
    // Gate pre-activations are clamped to [lo, hi] (±infinity without `clip`).
    let (lo, hi) = match spec.clip {
        Some(c) => (T::of(-(c as f64)), T::of(c as f64)),
        None => (T::of(f64::NEG_INFINITY), T::of(f64::INFINITY)),
    };
    let has_clip = spec.clip.is_some();
    // Clamps only with `clip`, so NaN still propagates without it.
    let cl = |v: T| if has_clip { v.mx(lo).mn(hi) } else { v };
    let mut gates = vec![T::default(); n * gh];
    for (d, &rev) in spec.reverse.iter().enumerate() {
        let w = &inp.w[d * gh * isz..(d + 1) * gh * isz];
        let r = &inp.r[d * gh * h..(d + 1) * gh * h];
        let (wb, rb) = match inp.b {
            Some(b) => (
                Some(&b[d * 2 * gh..d * 2 * gh + gh]),
                Some(&b[d * 2 * gh + gh..(d + 1) * 2 * gh]),
            ),
            None => (None, None),
        };
        let acts = &spec.acts[d];
        // All steps' input projections in one GEMM: XW[T·N, G·H] = X[T·N, I] · Wᵀ.
        T::gemm(
            t_len * n,
            isz,
            gh,
            inp.x,
            isz as isize,
            1,
            w,
            1,
            isz as isize,
            false,
            &mut xw,
            gh as isize,
        );
        // Fold the biases that sit outside any reset product into XW.
        for row in xw.chunks_mut(gh) {
            for j in 0..gh {
                let mut b = wb.map_or(zero, |v| v[j]);
                let rb_inside = spec.cell == Cell::Gru && j >= 2 * h;
                if !rb_inside {
                    b = b + rb.map_or(zero, |v| v[j]);
                }
                row[j] = row[j] + b;
            }
        }
        let mut hs: Vec<T> = match inp.h0 {
            Some(h0) => h0[d * n * h..(d + 1) * n * h].to_vec(),
            None => vec![zero; n * h],
        };
        let mut cs: Vec<T> = match inp.c0 {
            Some(c0) => c0[d * n * h..(d + 1) * n * h].to_vec(),
            None => vec![zero; n * h],
        };
        let p = inp.p.map(|p| &p[d * 3 * h..(d + 1) * 3 * h]);
        let _ = &acts;
        let max_len = match &inp.mask {
            Some(_) => t_len,
            None => inp.lens.iter().copied().max().unwrap_or(0),
        };
        let zeros = vec![zero; 3 * h];
        let p = p.unwrap_or(&zeros);
        let (pi, po, pf) = (&p[..h], &p[h..2 * h], &p[2 * h..3 * h]);
        let zero_rb = vec![zero; gh];
        let rbv = rb.unwrap_or(&zero_rb);
        let rbh = &rbv[(gh - h).min(2 * h)..];
        let (f, gg, hh) = (
            acts[0],
            acts.get(1).copied().unwrap_or(acts[0]),
            acts.get(2).copied().unwrap_or(acts[0]),
        );
        for s in 0..max_len {
            // Recurrent projection for all rows: HR[N, G·H] = H · Rᵀ (GRU with
            // linear_before_reset=0: only the z and r columns here).
            let gru_lbr0 = spec.cell == Cell::Gru && !spec.linear_before_reset;
            let cols = if gru_lbr0 { 2 * h } else { gh };
            T::gemm(
                n,
                h,
                cols,
                &hs,
                h as isize,
                1,
                r,
                1,
                h as isize,
                false,
                &mut hr,
                gh as isize,
            );
            // The time index row b runs at this step, if it runs: without a mask the
            // reverse direction starts at each row's own last valid step; with one, all
            // rows share the step and masked rows keep their state.
            let step_t = if rev { t_len - 1 - s } else { s };
            let active = |b: usize| -> Option<usize> {
                match &inp.mask {
                    None if s >= inp.lens[b] => None,
                    None if rev => Some(inp.lens[b] - 1 - s),
                    None => Some(s),
                    Some(m) => (m[step_t * n + b] && step_t < inp.lens[b]).then_some(step_t),
                }
            };
            if gru_lbr0 {
                // z and r for every active row, then (r ⊙ H) · R_hᵀ into the h columns.
                for b in 0..n {
                    let Some(t) = active(b) else { continue };
                    let x = &xw[(t * n + b) * gh..(t * n + b + 1) * gh];
                    let zr = &mut gates[b * gh..b * gh + 2 * h];
                    for u in 0..2 * h {
                        zr[u] = cl(x[u] + hr[b * gh + u]);
                    }
                    T::act_slice(f, zr);
                    for u in 0..h {
                        rh[b * h + u] = zr[h + u] * hs[b * h + u];
                    }
                }
                T::gemm(
                    n,
                    h,
                    h,
                    &rh,
                    h as isize,
                    1,
                    &r[2 * h * h..],
                    1,
                    h as isize,
                    false,
                    &mut hr[2 * h..],
                    gh as isize,
                );
            }
            for b in 0..n {
                let Some(t) = active(b) else {
                    if spec.hold && inp.mask.is_some() {
                        let yo = ((step_t * d_n + d) * n + b) * h;
                        y[yo..yo + h].copy_from_slice(&hs[b * h..(b + 1) * h]);
                    }
                    continue;
                };
                let x = &xw[(t * n + b) * gh..(t * n + b + 1) * gh];
                let hrow = &hr[b * gh..(b + 1) * gh];
                let hv = &mut hs[b * h..(b + 1) * h];
                let cv = &mut cs[b * h..(b + 1) * h];
                let buf = &mut gates[b * gh..(b + 1) * gh];
                match spec.cell {
                    Cell::Rnn => {
                        for u in 0..h {
                            hv[u] = cl(x[u] + hrow[u]);
                        }
                        T::act_slice(f, hv);
                    }
                    Cell::Lstm => {
                        // buf holds [i | f | c̃ | o]; X·Wᵀ and H·Rᵀ are in ONNX order i, o, f, c.
                        let (bi, rest) = buf.split_at_mut(h);
                        let (bf, rest) = rest.split_at_mut(h);
                        let (bc, bo) = rest.split_at_mut(h);
                        for u in 0..h {
                            bi[u] = cl(x[u] + hrow[u] + pi[u] * cv[u]);
                            bf[u] = cl(x[2 * h + u] + hrow[2 * h + u] + pf[u] * cv[u]);
                            bc[u] = cl(x[3 * h + u] + hrow[3 * h + u]);
                        }
                        T::act_slice(f, bi);
                        if spec.input_forget {
                            for u in 0..h {
                                bf[u] = one - bi[u];
                            }
                        } else {
                            T::act_slice(f, bf);
                        }
                        T::act_slice(gg, bc);
                        for u in 0..h {
                            let c = bf[u] * cv[u] + bi[u] * bc[u];
                            cv[u] = c;
                            bo[u] = cl(x[h + u] + hrow[h + u] + po[u] * c);
                            bc[u] = c;
                        }
                        T::act_slice(f, bo);
                        T::act_slice(hh, bc);
                        for u in 0..h {
                            hv[u] = bo[u] * bc[u];
                        }
                    }
                    Cell::Gru => {
                        let (zr, bh) = buf.split_at_mut(2 * h);
                        if spec.linear_before_reset {
                            for u in 0..2 * h {
                                zr[u] = cl(x[u] + hrow[u]);
                            }
                            T::act_slice(f, zr);
                            for u in 0..h {
                                bh[u] = cl(x[2 * h + u] + zr[h + u] * (hrow[2 * h + u] + rbh[u]));
                            }
                        } else {
                            for u in 0..h {
                                bh[u] = cl(x[2 * h + u] + hrow[2 * h + u] + rbh[u]);
                            }
                        }
                        T::act_slice(gg, bh);
                        for u in 0..h {
                            let z = zr[u];
                            hv[u] = (one - z) * bh[u] + z * hv[u];
                        }
                    }
                }
                let yo = ((t * d_n + d) * n + b) * h;
                y[yo..yo + h].copy_from_slice(hv);
            }
        }
        yh[d * n * h..(d + 1) * n * h].copy_from_slice(&hs);
        yc[d * n * h..(d + 1) * n * h].copy_from_slice(&cs);
    }
    Ok(Outputs { y, yh, yc })
}

/// The elements in row-major order: borrowed when already contiguous, copied otherwise.
fn slice_of<T: Copy>(t: &ArrayD<T>) -> std::borrow::Cow<'_, [T]> {
    match t.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.as_standard_layout().iter().copied().collect()),
    }
}

fn generic<T: RFloat>(op: &Op, ins: &[Option<&Data>], nout: usize) -> Result<Vec<Data>, String> {
    let get = T::array;
    let wrap = T::tensor;
    let arr = |i: usize| -> Result<Option<std::borrow::Cow<'_, [T]>>, String> {
        match opt_input(ins, i)? {
            Some(t) => Ok(Some(slice_of(get(t).ok_or_else(|| {
                format!("input {i} has dtype {}, X has another", t.dtype())
            })?))),
            None => Ok(None),
        }
    };
    let xt = input(ins, 0)?;
    let x_arr = get(xt).ok_or("X dtype")?;
    if x_arr.ndim() != 3 {
        return Err(format!("X must be 3-D, is {:?}", x_arr.shape()));
    }
    let rt = input(ins, 2)?;
    if rt.shape().len() != 3 {
        return Err(format!("R must be 3-D, is {:?}", rt.shape()));
    }
    let spec = Spec::from_op(op, rt.shape()[2])?;
    let h = spec.hidden;
    let d = spec.reverse.len();
    let g = spec.cell.gates();
    // Time-major X (copied only for layout 1).
    let x_owned = spec.layout1.then(|| {
        x_arr
            .view()
            .permuted_axes(IxDyn(&[1, 0, 2]))
            .as_standard_layout()
            .into_owned()
    });
    let x_tm = x_owned.as_ref().unwrap_or(x_arr);
    let (t_len, n, isz) = (x_tm.shape()[0], x_tm.shape()[1], x_tm.shape()[2]);
    let w = arr(1)?.ok_or("W is required")?;
    let r = arr(2)?.ok_or("R is required")?;
    let check = |name: &str, v: Option<&[T]>, want: usize| -> Result<(), String> {
        match v {
            Some(v) if v.len() != want => {
                Err(format!("{name} has {} elements, expected {want}", v.len()))
            }
            _ => Ok(()),
        }
    };
    check("W", Some(&w), d * g * h * isz)?;
    check("R", Some(&r), d * g * h * h)?;
    let b = arr(3)?;
    check("B", b.as_deref(), d * 2 * g * h)?;
    let lens: Vec<usize> = match opt_input(ins, 4)? {
        Some(t) => {
            let v = t.as_i64_vec().ok_or("sequence_lens must be integers")?;
            if v.len() != n {
                return Err(format!(
                    "sequence_lens has {} entries for a batch of {n}",
                    v.len()
                ));
            }
            v.iter()
                .map(|&l| {
                    if l < 0 || l as usize > t_len {
                        Err(format!("sequence length {l} is outside 0..={t_len}"))
                    } else {
                        Ok(l as usize)
                    }
                })
                .collect::<Result<_, _>>()?
        }
        None => vec![t_len; n],
    };
    let state_tm = |i: usize| -> Result<Option<Vec<T>>, String> {
        let Some(t) = opt_input(ins, i)? else {
            return Ok(None);
        };
        let a = get(t).ok_or("state dtype")?;
        let v: Vec<T> = if spec.layout1 {
            a.view()
                .permuted_axes(IxDyn(&[1, 0, 2]))
                .as_standard_layout()
                .iter()
                .copied()
                .collect()
        } else {
            slice_of(a).into_owned()
        };
        if v.len() != d * n * h {
            return Err(format!(
                "input {i} has {} elements, expected {}",
                v.len(),
                d * n * h
            ));
        }
        Ok(Some(v))
    };
    let h0 = state_tm(5)?;
    let c0 = if spec.cell == Cell::Lstm {
        state_tm(6)?
    } else {
        None
    };
    let p = if spec.cell == Cell::Lstm {
        arr(7)?
    } else {
        None
    };
    check("P", p.as_deref(), d * 3 * h)?;
    let mask = if matches!(
        op,
        Op::LSTMMasked { .. } | Op::GRUMasked { .. } | Op::RNNMasked { .. }
    ) {
        let slot = if spec.cell == Cell::Lstm { 8 } else { 6 };
        Some(step_mask(input(ins, slot)?, t_len, n, spec.layout1)?)
    } else {
        None
    };
    let x = slice_of(x_tm);
    let out = run(
        &spec,
        &Inputs {
            x: &x,
            dims: (t_len, n, isz),
            w: &w,
            r: &r,
            b: b.as_deref(),
            lens,
            mask,
            h0: h0.as_deref(),
            c0: c0.as_deref(),
            p: p.as_deref(),
        },
    )?;
    let mk = |v: Vec<T>, shape: &[usize], perm: &[usize]| -> Result<Tensor, String> {
        let a = ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| e.to_string())?;
        Ok(wrap(if spec.layout1 {
            a.permuted_axes(IxDyn(perm))
                .as_standard_layout()
                .into_owned()
        } else {
            a
        }))
    };
    let mut res = vec![
        Data::Tensor(mk(out.y, &[t_len, d, n, h], &[2, 0, 1, 3])?),
        Data::Tensor(mk(out.yh, &[d, n, h], &[1, 0, 2])?),
    ];
    if spec.cell == Cell::Lstm {
        res.push(Data::Tensor(mk(out.yc, &[d, n, h], &[1, 0, 2])?));
    }
    res.truncate(nout);
    Ok(res)
}

/// A masked op's `mask` input as a time-major `[T, N]` vector (`[N, T]` with layout 1).
pub fn step_mask(t: &Tensor, t_len: usize, n: usize, layout1: bool) -> Result<Vec<bool>, String> {
    let Tensor::Bool(a) = t else {
        return Err(format!("mask has dtype {}, bool expected", t.dtype()));
    };
    let want = if layout1 { [n, t_len] } else { [t_len, n] };
    if a.shape() != want {
        return Err(format!("mask has shape {:?}, expected {want:?}", a.shape()));
    }
    Ok(if layout1 {
        a.view().reversed_axes().iter().copied().collect()
    } else {
        a.iter().copied().collect()
    })
}

/// Runs an ONNX recurrent op with the fused kernel.
pub fn eval(op: &Op, ins: &[Option<&Data>], nout: usize) -> Result<Vec<Data>, String> {
    match input(ins, 0)? {
        Tensor::F32(_) => generic::<f32>(op, ins, nout),
        Tensor::F64(_) => generic::<f64>(op, ins, nout),
        other => Err(format!(
            "recurrent ops run on f32 or f64, not {}",
            other.dtype()
        )),
    }
}
