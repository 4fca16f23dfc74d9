//! Fused kernels for ONNX `LSTM`, `GRU` and `RNN`, with every attribute: directions,
//! both layouts, `sequence_lens` (the reverse direction starts at each row's own last
//! step), initial states, peepholes, `linear_before_reset`, all activation functions
//! with `activation_alpha`/`activation_beta` consumed in order, `clip` and
//! `input_forget`.
//!
//! Algorithm per direction: one GEMM for all steps' input projections, then per step one
//! GEMM with the recurrent weights (two for GRU with `linear_before_reset=0`) and fused
//! gate arithmetic. Gate math runs in the tensor's own precision (f32 or f64).

use super::steal::{Board, Slot};
use super::util::{input, opt_input};
use crate::data::Data;
use crate::gemm::{dgemm, sgemm};
use cellgraph_ir::ops::rnn::{Act, Cell, Spec};
use cellgraph_ir::{Op, Tensor};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
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
    /// The standard LSTM step for a block's rows in one pass (layout as
    /// [`super::fastmath::lstm_rows`], which f32 runs; other types run
    /// [`lstm_rows_generic`]).
    fn lstm_rows(hid: usize, x: &[Self], hr: &[Self], c: &mut [Self], h: &mut [Self]) {
        lstm_rows_generic(hid, x, hr, c, h);
    }
    /// [`Self::lstm_rows`] keeping what a training backward reads: `pre` comes in as the
    /// pre-activations less `x` and leaves as the gates' activations (i, o, f, c), `tc`
    /// (`[rows, hid]`) receives tanh of the new cell state (f32:
    /// [`super::fastmath::lstm_rows_keep`]).
    fn lstm_rows_keep(
        hid: usize,
        x: &[Self],
        pre: &mut [Self],
        c: &mut [Self],
        h: &mut [Self],
        tc: &mut [Self],
    ) {
        lstm_rows_keep_generic(hid, x, pre, c, h, tc);
    }
    /// The standard GRU step with `linear_before_reset` for a block's rows in one pass
    /// (layout as [`super::fastmath::gru_rows`], which f32 runs; other types run
    /// [`gru_rows_generic`]).
    fn gru_rows(hid: usize, x: &[Self], hr: &[Self], rbh: &[Self], h: &mut [Self]) {
        gru_rows_generic(hid, x, hr, rbh, h);
    }
    /// [`Self::gru_rows`] keeping what a training backward reads: `x` comes in as
    /// X·Wᵀ + b and leaves as the gates' activations (z, r, n), `lin` (`[rows, hid]`)
    /// receives h·R_hᵀ + b_rh (f32: [`super::fastmath::gru_rows_keep`]).
    fn gru_rows_keep(
        hid: usize,
        x: &mut [Self],
        hr: &[Self],
        rbh: &[Self],
        h: &mut [Self],
        lin: &mut [Self],
    ) {
        gru_rows_keep_generic(hid, x, hr, rbh, h, lin);
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
    /// A right-hand matrix prepared once for repeated products ([`Self::pack`]).
    type Packed: Send + Sync;
    /// Prepares the `k × n` matrix with element (p, j) at `b[p·rsb + j·csb]` for
    /// [`Self::packed_gemm`] (f32: packed panels for the micro-kernel of
    /// [`crate::packed`]; f64: a row-major copy).
    fn pack(k: usize, n: usize, b: &[Self], rsb: usize, csb: usize) -> Self::Packed;
    /// `C[m×n] = A[m×k]·B`, plus the old C with `mode.accumulate`; rows of A at stride
    /// `rsa` (unit column stride), rows of C at stride `rsc`. With `mode.parallel`, large
    /// products use rayon's threads.
    fn packed_gemm(
        b: &Self::Packed,
        m: usize,
        a: &[Self],
        rsa: usize,
        c: &mut [Self],
        rsc: usize,
        mode: GemmMode,
    );
}

/// [`RFloat::lstm_rows`] for any float: the general kernel's formulas, row by row.
pub fn lstm_rows_generic<T: RFloat>(hid: usize, x: &[T], hr: &[T], c: &mut [T], h: &mut [T]) {
    let (sig, tanh) = (Act::Sigmoid, Act::Tanh);
    for (x, r, c, h) in super::fastmath::lstm_row_sets(hid, x, hr, c, h) {
        for j in 0..hid {
            let i = sig.apply(x[j] + r[j]);
            let f = sig.apply(x[2 * hid + j] + r[2 * hid + j]);
            let g = tanh.apply(x[3 * hid + j] + r[3 * hid + j]);
            c[j] = f * c[j] + i * g;
            let o = sig.apply(x[hid + j] + r[hid + j]);
            h[j] = o * tanh.apply(c[j]);
        }
    }
}

/// [`RFloat::lstm_rows_keep`] for any float: [`lstm_rows_generic`]'s formulas.
pub fn lstm_rows_keep_generic<T: RFloat>(
    hid: usize,
    x: &[T],
    pre: &mut [T],
    c: &mut [T],
    h: &mut [T],
    tc: &mut [T],
) {
    let (sig, tanh) = (Act::Sigmoid, Act::Tanh);
    drop(super::fastmath::lstm_row_sets(hid, x, pre, c, h));
    assert_eq!(tc.len(), c.len(), "lstm_rows_keep: tanh(c) rows do not fit");
    let rows = pre.chunks_exact_mut(4 * hid).zip(tc.chunks_exact_mut(hid));
    let states = c.chunks_exact_mut(hid).zip(h.chunks_exact_mut(hid));
    for ((x, (c, h)), (p, tc)) in x.chunks_exact(4 * hid).cycle().zip(states).zip(rows) {
        for j in 0..hid {
            let at = |k: usize| x[k * hid + j] + p[k * hid + j];
            let (i, f, g) = (sig.apply(at(0)), sig.apply(at(2)), tanh.apply(at(3)));
            c[j] = f * c[j] + i * g;
            let o = sig.apply(at(1));
            tc[j] = tanh.apply(c[j]);
            h[j] = o * tc[j];
            (p[j], p[hid + j], p[2 * hid + j], p[3 * hid + j]) = (i, o, f, g);
        }
    }
}

/// [`RFloat::gru_rows`] for any float: the general kernel's formulas, row by row.
pub fn gru_rows_generic<T: RFloat>(hid: usize, x: &[T], hr: &[T], rbh: &[T], h: &mut [T]) {
    let (sig, tanh) = (Act::Sigmoid, Act::Tanh);
    let one = T::of(1.0);
    for (x, r, h) in super::fastmath::gru_row_sets(hid, x, hr, rbh, h) {
        for j in 0..hid {
            let z = sig.apply(x[j] + r[j]);
            let rg = sig.apply(x[hid + j] + r[hid + j]);
            let n = tanh.apply(x[2 * hid + j] + rg * (r[2 * hid + j] + rbh[j]));
            h[j] = (one - z) * n + z * h[j];
        }
    }
}

/// [`RFloat::gru_rows_keep`] for any float: [`gru_rows_generic`]'s formulas.
pub fn gru_rows_keep_generic<T: RFloat>(
    hid: usize,
    x: &mut [T],
    hr: &[T],
    rbh: &[T],
    h: &mut [T],
    lin: &mut [T],
) {
    let (sig, tanh) = (Act::Sigmoid, Act::Tanh);
    let one = T::of(1.0);
    drop(super::fastmath::gru_row_sets(hid, x, hr, rbh, h));
    assert_eq!(
        lin.len(),
        h.len(),
        "gru_rows_keep: recurrent term rows do not fit"
    );
    let rows = x.chunks_exact_mut(3 * hid).zip(lin.chunks_exact_mut(hid));
    for ((x, l), (r, h)) in rows.zip(hr.chunks_exact(3 * hid).zip(h.chunks_exact_mut(hid))) {
        for j in 0..hid {
            let z = sig.apply(x[j] + r[j]);
            let rg = sig.apply(x[hid + j] + r[hid + j]);
            l[j] = r[2 * hid + j] + rbh[j];
            let n = tanh.apply(x[2 * hid + j] + rg * l[j]);
            h[j] = (one - z) * n + z * h[j];
            (x[j], x[hid + j], x[2 * hid + j]) = (z, rg, n);
        }
    }
}

/// How a packed product writes C and where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmMode {
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    /// Split large products over rayon's threads (off for callers already on a worker).
    pub parallel: bool,
}

impl GemmMode {
    /// Overwrite C, threads allowed.
    pub const SET: GemmMode = GemmMode {
        accumulate: false,
        parallel: true,
    };
    /// Add to C, threads allowed.
    pub const ACCUMULATE: GemmMode = GemmMode {
        accumulate: true,
        parallel: true,
    };

    /// This mode, on the calling thread only when `on_worker`.
    pub fn serial_if(self, on_worker: bool) -> GemmMode {
        GemmMode {
            parallel: self.parallel && !on_worker,
            ..self
        }
    }
}

/// f64's "packed" matrix: a row-major copy multiplied with [`dgemm`].
pub struct PlainB {
    k: usize,
    n: usize,
    b: Vec<f64>,
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
    type Packed = crate::packed::PackedB;
    fn pack(k: usize, n: usize, b: &[f32], rsb: usize, csb: usize) -> Self::Packed {
        crate::packed::PackedB::new(k, n, b, rsb, csb)
    }
    fn packed_gemm(
        b: &Self::Packed,
        m: usize,
        a: &[f32],
        rsa: usize,
        c: &mut [f32],
        rsc: usize,
        mode: GemmMode,
    ) {
        if mode.parallel {
            b.gemm(m, a, rsa, c, rsc, mode.accumulate);
        } else {
            b.gemm_serial(m, a, rsa, c, rsc, mode.accumulate);
        }
    }
    fn lstm_rows(hid: usize, x: &[f32], hr: &[f32], c: &mut [f32], h: &mut [f32]) {
        super::fastmath::lstm_rows(hid, x, hr, c, h);
    }
    fn lstm_rows_keep(
        hid: usize,
        x: &[f32],
        pre: &mut [f32],
        c: &mut [f32],
        h: &mut [f32],
        tc: &mut [f32],
    ) {
        super::fastmath::lstm_rows_keep(hid, x, pre, c, h, tc);
    }
    fn gru_rows(hid: usize, x: &[f32], hr: &[f32], rbh: &[f32], h: &mut [f32]) {
        super::fastmath::gru_rows(hid, x, hr, rbh, h);
    }
    fn gru_rows_keep(
        hid: usize,
        x: &mut [f32],
        hr: &[f32],
        rbh: &[f32],
        h: &mut [f32],
        lin: &mut [f32],
    ) {
        super::fastmath::gru_rows_keep(hid, x, hr, rbh, h, lin);
    }
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
rfloat_impl!(f64, F64, dgemm, {
    type Packed = PlainB;
    fn pack(k: usize, n: usize, b: &[f64], rsb: usize, csb: usize) -> PlainB {
        let b = (0..k * n)
            .map(|i| b[(i / n) * rsb + (i % n) * csb])
            .collect();
        PlainB { k, n, b }
    }
    fn packed_gemm(
        p: &PlainB,
        m: usize,
        a: &[f64],
        rsa: usize,
        c: &mut [f64],
        rsc: usize,
        mode: GemmMode,
    ) {
        let beta = if mode.accumulate { 1.0 } else { 0.0 };
        dgemm(
            m,
            p.k,
            p.n,
            1.0,
            a,
            rsa as isize,
            1,
            &p.b,
            p.n as isize,
            1,
            beta,
            c,
            rsc as isize,
            1,
        );
    }
});

/// The CPU's arithmetic of an activation function ([`Act`] itself is backend-neutral and
/// lives with the recurrent ops in `cellgraph_ir::ops::rnn`).
pub trait ActApply {
    /// Applies the function.
    fn apply<T: RFloat>(self, x: T) -> T;
}

impl ActApply for Act {
    #[inline]
    fn apply<T: RFloat>(self, x: T) -> T {
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

/// Runs the fused recurrent kernel. On several threads, each runs whole blocks of
/// batch rows through every step and then takes rows from the block with the most work
/// left (see `steal`); the values are the same bit for bit however the rows were shared.
pub fn run<T: RFloat>(spec: &Spec, inp: &Inputs<'_, T>) -> Result<Outputs<T>, String> {
    run_with(spec, inp, true)
}

/// [`run`]; `share`: idle threads take rows from running blocks.
fn run_with<T: RFloat>(
    spec: &Spec,
    inp: &Inputs<'_, T>,
    share: bool,
) -> Result<Outputs<T>, String> {
    let (t_len, n, isz) = inp.dims;
    let h = spec.hidden;
    let g = spec.cell.gates();
    let gh = g * h;
    let d_n = spec.reverse.len();
    let mut y = vec![T::default(); t_len * d_n * n * h];
    let mut yh = vec![T::default(); d_n * n * h];
    let mut yc = vec![T::default(); d_n * n * h];
    let zero = T::of(0.0);
    // Batch rows and directions never interact: each thread runs its own block of rows
    // of one direction through every step, with no synchronisation per step (when the
    // work pays for the threads). Directions go to different threads first, so each
    // block keeps as many rows as it can.
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && d_n * t_len * n * gh * (h + isz) >= PARALLEL_MIN_MACS;
    let rows_per = if parallel {
        n.div_ceil((threads / d_n.max(1)).clamp(1, n.max(1)))
    } else {
        n.max(1)
    };
    // Every row runs every step (no mask, full lengths).
    let every_step = inp.mask.is_none() && inp.lens.iter().all(|&l| l == t_len);
    let zeros = vec![zero; h];
    let mut dirs = Vec::with_capacity(d_n);
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
        // The biases that sit outside any reset product, folded into X·Wᵀ.
        let bias: Vec<T> = (0..gh)
            .map(|j| {
                let rb_inside = spec.cell == Cell::Gru && j >= 2 * h;
                let b = wb.map_or(zero, |v| v[j]);
                if rb_inside {
                    b
                } else {
                    b + rb.map_or(zero, |v| v[j])
                }
            })
            .collect();
        // Weights packed once for every product (GRU with linear_before_reset=0: the
        // recurrent z/r columns and h columns apart).
        let lbr0 = spec.cell == Cell::Gru && !spec.linear_before_reset;
        let rec_cols = if lbr0 { 2 * h } else { gh };
        let acts = &spec.acts[d];
        let rbh = match rb {
            Some(rb) if spec.cell == Cell::Gru => &rb[2 * h..3 * h],
            _ => &zeros[..],
        };
        let peep = inp.p.map(|p| &p[d * 3 * h..(d + 1) * 3 * h]);
        let standard = spec.clip.is_none()
            && acts[0] == Act::Sigmoid
            && acts.get(1).is_none_or(|&a| a == Act::Tanh)
            && match spec.cell {
                Cell::Lstm => {
                    peep.is_none()
                        && !spec.input_forget
                        && acts.get(2).is_none_or(|&a| a == Act::Tanh)
                }
                Cell::Gru => spec.linear_before_reset,
                Cell::Rnn => false,
            };
        let joint = spec.cell == Cell::Lstm
            && standard
            && every_step
            && (isz + h) * gh * std::mem::size_of::<T>() <= JOINT_MAX_BYTES;
        let packs = if joint {
            let k = isz + h;
            let mut wr = vec![zero; gh * k];
            for (j, row) in wr.chunks_exact_mut(k).enumerate() {
                row[..isz].copy_from_slice(&w[j * isz..(j + 1) * isz]);
                row[isz..].copy_from_slice(&r[j * h..(j + 1) * h]);
            }
            Packs::Joint(T::pack(k, gh, &wr, 1, k))
        } else {
            Packs::Apart {
                w: T::pack(isz, gh, w, 1, isz),
                r: T::pack(h, rec_cols, r, 1, h),
                rh: lbr0.then(|| T::pack(h, h, &r[2 * h * h..], 1, h)),
            }
        };
        let dir = Direction {
            spec,
            inp,
            d,
            rev,
            packs,
            bias,
            acts: (
                acts[0],
                acts.get(1).copied().unwrap_or(acts[0]),
                acts.get(2).copied().unwrap_or(acts[0]),
            ),
            standard,
            peep,
            rbh,
            y: SyncPtr(y.as_mut_ptr()),
        };
        dirs.push(dir);
    }
    // Every block: its direction and rows, from step 0 with the initial states.
    let mut blocks = Vec::new();
    if n * h > 0 {
        for dir in &dirs {
            for b0 in (0..n).step_by(rows_per) {
                blocks.push(dir.start(b0, rows_per.min(n - b0)));
            }
        }
    }
    let mut done = Vec::with_capacity(blocks.len());
    super::paths::count(|c| {
        c.forward += 1;
        c.forward_threaded += usize::from(parallel && blocks.len() > 1);
        for dir in &dirs {
            c.one_pass_directions += usize::from(dir.standard);
            c.joint_directions += usize::from(matches!(dir.packs, Packs::Joint(_)));
        }
    });
    if parallel && blocks.len() > 1 {
        // Each thread takes whole blocks while there are any, then part of the rows of
        // the running block with the most work left (see `steal`).
        let board = Board::new();
        let slots: Vec<_> = blocks
            .iter()
            .map(|p| {
                let nb = p.hs.len() / h.max(1);
                board.register(Direction::<T>::work(
                    nb,
                    p.s,
                    dirs[p.d].uniform_end(p.b0, nb),
                ))
            })
            .collect();
        let queue = std::sync::Mutex::new(blocks.into_iter().zip(slots).collect::<Vec<_>>());
        let finished = std::sync::Mutex::new(Vec::new());
        let pop = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let splits = std::sync::atomic::AtomicUsize::new(0);
        (0..threads).into_par_iter().for_each(|_| {
            let mut mine = Vec::new();
            while let Some((part, slot)) = pop() {
                mine.push(dirs[part.d].rows(part, Some(&slot), true));
            }
            while let Some(part) = share.then(|| board.take()).flatten() {
                splits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let slot = board.register(0);
                mine.push(dirs[part.d].rows(part, Some(&slot), true));
            }
            finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut mine);
        });
        done = finished.into_inner().unwrap_or_else(|e| e.into_inner());
        super::paths::count(|c| c.row_splits += splits.into_inner());
    } else {
        for part in blocks {
            done.push(dirs[part.d].rows(part, None, false));
        }
    }
    // The final states of every block's rows (or of the parts it was split into).
    for part in done {
        let at = (part.d * n + part.b0) * h;
        yh[at..at + part.hs.len()].copy_from_slice(&part.hs);
        yc[at..at + part.cs.len()].copy_from_slice(&part.cs);
    }
    Ok(Outputs { y, yh, yc })
}

/// Rows of a block, from one step on, with their states: what a thread runs, and what
/// it hands to an idle one (see [`Direction::share`]).
struct Part<T> {
    d: usize,
    b0: usize,
    /// The first step the rows run.
    s: usize,
    hs: Vec<T>,
    cs: Vec<T>,
}

/// A block is split only when each half keeps at least this many rows (smaller products
/// run the kernel's tiles less efficiently than the idle thread gains).
const SPLIT_MIN_ROWS: usize = 12;

/// Products below this many multiply-adds over the whole sequence run on one thread.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 18;
/// The largest [Wᵀ; Rᵀ] (in bytes) a standard LSTM multiplies as one matrix per step
/// instead of projecting X apart: about a core's L2, which the product streams through
/// every step (larger weights are better served by one projection over many steps).
const JOINT_MAX_BYTES: usize = 512 << 10;
/// Rows of X a block projects at once (a few steps of its rows: enough rows for an
/// efficient GEMM, few enough that the projections stay in cache until their steps).
const CHUNK_ROWS: usize = 256;

/// A direction's weights, packed once per call for the products its steps run.
enum Packs<P> {
    /// [Wᵀ; Rᵀ] as one `(I + H) × 4H` matrix: a standard LSTM whose weights together are
    /// small and whose rows all run every step (see [`Direction::rows_joint`]).
    Joint(P),
    /// Wᵀ for the projections, Rᵀ for the recurrent products (GRU with
    /// linear_before_reset=0: Rᵀ's z and r columns, and R_hᵀ apart).
    Apart { w: P, r: P, rh: Option<P> },
}

/// Y shared by the threads that run disjoint blocks of batch rows.
struct SyncPtr<T>(*mut T);
// SAFETY: each thread writes only Y's rows of its own batch block (see `Direction::rows`),
// and every thread is joined before `run` reads or returns Y.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

/// One direction of a fused op, ready to run blocks of batch rows.
struct Direction<'a, T: RFloat> {
    spec: &'a Spec,
    inp: &'a Inputs<'a, T>,
    d: usize,
    rev: bool,
    packs: Packs<T::Packed>,
    bias: Vec<T>,
    acts: (Act, Act, Act),
    /// The cell is the standard one a one-pass kernel covers ([`RFloat::lstm_rows`],
    /// [`RFloat::gru_rows`]): default activations, no clip, peepholes or coupled gates.
    standard: bool,
    peep: Option<&'a [T]>,
    rbh: &'a [T],
    y: SyncPtr<T>,
}

impl<T: RFloat> Direction<'_, T> {
    /// Rows `b0..b0 + nb` at step 0, with their initial states.
    fn start(&self, b0: usize, nb: usize) -> Part<T> {
        let (_, n, _) = self.inp.dims;
        let h = self.spec.hidden;
        let init = |v: Option<&[T]>| match v {
            Some(v) => v[(self.d * n + b0) * h..(self.d * n + b0 + nb) * h].to_vec(),
            None => vec![T::of(0.0); nb * h],
        };
        Part {
            d: self.d,
            b0,
            s: 0,
            hs: init(self.inp.h0),
            cs: init(self.inp.c0),
        }
    }

    /// The steps rows `b0..b0 + nb` run: up to the longest of their sequences.
    fn end(&self, b0: usize, nb: usize) -> usize {
        match &self.inp.mask {
            Some(_) => self.inp.dims.0,
            None => self.inp.lens[b0..b0 + nb]
                .iter()
                .copied()
                .max()
                .unwrap_or(0),
        }
    }

    /// The last step of rows `b0..b0 + nb` when they all run every step up to it, the
    /// only rows that split: with a mask or ragged lengths, which kernel a step takes
    /// depends on every row of the block (one pass when all run), and its values on that
    /// choice. (Rows a block keeps after a split are a subset: still uniform.)
    fn uniform_end(&self, b0: usize, nb: usize) -> Option<usize> {
        let end = self.end(b0, nb);
        let uniform =
            self.inp.mask.is_none() && self.inp.lens[b0..b0 + nb].iter().all(|&l| l == end);
        uniform.then_some(end)
    }

    /// What `nb` rows at step `s` could give away (rows × steps left), 0 when they do not
    /// split (see [`Direction::uniform_end`]) or are too few.
    fn work(nb: usize, s: usize, end: Option<usize>) -> usize {
        match end {
            Some(end) if nb >= 2 * SPLIT_MIN_ROWS && end >= s + 2 => nb * (end - s),
            _ => 0,
        }
    }

    /// Before step `s` of rows `b0..` with states `hs`, `cs` (`end`: their
    /// [`Direction::uniform_end`]): publishes the work left and, when a thread asks, gives
    /// it the last rows (from a multiple of the kernel's row tile, so every row keeps its
    /// place in the products' tiles and its values bit for bit) or declines. Returns the
    /// rows kept.
    #[allow(clippy::too_many_arguments)]
    fn share(
        &self,
        slot: Option<&Slot<Part<T>>>,
        s: usize,
        b0: usize,
        end: Option<usize>,
        hs: &mut Vec<T>,
        cs: &mut Vec<T>,
    ) -> usize {
        let h = self.spec.hidden.max(1);
        let nb = hs.len() / h;
        let Some(slot) = slot else { return nb };
        let work = Self::work(nb, s, end);
        slot.set_work(work);
        if !slot.asked() {
            return nb;
        }
        if work == 0 {
            slot.answer(None);
            return nb;
        }
        let keep = nb / 2 / crate::packed::MR * crate::packed::MR;
        let given = Part {
            d: self.d,
            b0: b0 + keep,
            s,
            hs: hs.split_off(keep * h),
            cs: cs.split_off(keep * h),
        };
        slot.answer(Some(given));
        keep
    }

    /// Runs a part's rows from its step through the last, writing their Y rows, and
    /// returns their final states. Every few steps it projects the inputs the next
    /// steps' rows read with one GEMM. `slot`: where idle threads ask for rows (see
    /// [`Direction::share`]); `nested`: already on a worker thread, so the products stay
    /// on it.
    fn rows(&self, mut part: Part<T>, slot: Option<&Slot<Part<T>>>, nested: bool) -> Part<T> {
        match &self.packs {
            Packs::Joint(joint) => self.rows_joint(joint, &mut part, slot, nested),
            Packs::Apart { w, r, rh } => {
                self.rows_apart((w, r, rh.as_ref()), &mut part, slot, nested)
            }
        }
        if let Some(slot) = slot {
            slot.finish();
        }
        part
    }

    /// [`Direction::rows`] with the input projections apart: every few steps one GEMM
    /// projects the inputs the next steps' rows read, then per step the recurrent
    /// product(s) and the gate arithmetic.
    fn rows_apart(
        &self,
        (w_packed, r_packed, rh_packed): (&T::Packed, &T::Packed, Option<&T::Packed>),
        part: &mut Part<T>,
        slot: Option<&Slot<Part<T>>>,
        nested: bool,
    ) {
        let (first, b0) = (part.s, part.b0);
        let (hs, cs) = (&mut part.hs, &mut part.cs);
        let (_, _, isz) = self.inp.dims;
        let h = self.spec.hidden;
        let gh = self.spec.cell.gates() * h;
        let zero = T::of(0.0);
        let nb0 = hs.len() / h.max(1);
        let mut hr = vec![zero; nb0 * gh];
        let mut rh = vec![zero; nb0 * h];
        let mut gates = vec![zero; nb0 * gh];
        let max_len = self.end(b0, nb0);
        let end = self.uniform_end(b0, nb0);
        // Rows a chunk projects: padded to whole row tiles (each row's projection then
        // comes out of a full tile, the same bits however the rows are split).
        let chunk = (CHUNK_ROWS / nb0.max(1)).clamp(1, max_len.max(1));
        let tile = crate::packed::MR;
        let mut xa = vec![zero; (chunk * nb0).next_multiple_of(tile) * isz];
        let mut xs = vec![zero; (chunk * nb0).next_multiple_of(tile) * gh];
        let mut s0 = first;
        while s0 < max_len {
            // The rows this chunk projects, and its stride in `xs`.
            let nbc = self.share(slot, s0, b0, end, hs, cs);
            let steps = chunk.min(max_len - s0);
            // A standard LSTM whose rows all run every step of this chunk: the recurrent
            // product adds onto the projection in place and the gate kernel adds the bias,
            // so the chunk's projections need no bias pass and each step reads one array.
            let in_place = self.standard
                && self.spec.cell == Cell::Lstm
                && self.inp.mask.is_none()
                && self.inp.lens[b0..b0 + nbc].iter().all(|&l| l >= s0 + steps);
            self.project(
                w_packed,
                (s0, steps),
                b0,
                nbc,
                &mut xa,
                &mut xs,
                nested,
                !in_place,
            );
            for s in s0..s0 + steps {
                // After the chunk's first step, rows may go to another thread: the
                // projections keep their stride, the rows kept are the first.
                let nb = if s == s0 {
                    nbc
                } else {
                    self.share(slot, s, b0, end, hs, cs)
                };
                let xs = &mut xs[(s - s0) * nbc * gh..][..nb * gh];
                if in_place {
                    let acc = GemmMode::ACCUMULATE.serial_if(nested);
                    T::packed_gemm(r_packed, nb, hs, h, xs, gh, acc);
                    T::lstm_rows(h, &self.bias, xs, cs, hs);
                    self.write_active_rows(s, b0, hs);
                    continue;
                }
                // Recurrent projection for these rows: HR[nb, G·H] = H · Rᵀ (GRU with
                // linear_before_reset=0: only the z and r columns here).
                let mode = GemmMode::SET.serial_if(nested);
                let hr = &mut hr[..nb * gh];
                T::packed_gemm(r_packed, nb, hs, h, hr, gh, mode);
                let gates = &mut gates[..nb * gh];
                if let Some(rhp) = rh_packed {
                    let rh = &mut rh[..nb * h];
                    self.reset_phase(s, b0, xs, hs, hr, gates, rh);
                    T::packed_gemm(rhp, nb, rh, h, &mut hr[2 * h..], gh, mode);
                }
                self.gate_phase(s, b0, xs, hs, cs, hr, gates);
            }
            s0 += steps;
        }
    }

    /// A standard LSTM's rows when every row runs every step and the weights are small:
    /// per step one product of [X_t | H] with [Wᵀ; Rᵀ] (the two depths joined, so no
    /// separate projection and no second pass adding it), then the one-pass gate kernel
    /// with the bias. From the part's step on; rows may go to another thread between
    /// steps.
    fn rows_joint(
        &self,
        joint: &T::Packed,
        part: &mut Part<T>,
        slot: Option<&Slot<Part<T>>>,
        nested: bool,
    ) {
        let (first, b0) = (part.s, part.b0);
        let (hs, cs) = (&mut part.hs, &mut part.cs);
        let (t_len, n, isz) = self.inp.dims;
        let h = self.spec.hidden;
        let (gh, k) = (4 * h, isz + h);
        let nb0 = hs.len() / h.max(1);
        let end = self.uniform_end(b0, nb0);
        let mut xh = vec![T::default(); nb0 * k];
        let mut pre = vec![T::default(); nb0 * gh];
        let mode = GemmMode::SET.serial_if(nested);
        for s in first..t_len {
            let nb = self.share(slot, s, b0, end, hs, cs);
            let t = if self.rev { t_len - 1 - s } else { s };
            for (b, row) in xh.chunks_exact_mut(k).take(nb).enumerate() {
                row[..isz].copy_from_slice(&self.inp.x[(t * n + b0 + b) * isz..][..isz]);
                row[isz..].copy_from_slice(&hs[b * h..(b + 1) * h]);
            }
            let pre = &mut pre[..nb * gh];
            T::packed_gemm(joint, nb, &xh[..nb * k], k, pre, gh, mode);
            T::lstm_rows(h, &self.bias, pre, cs, hs);
            for b in 0..nb {
                self.write_y(t, b0 + b, &hs[b * h..(b + 1) * h]);
            }
        }
    }

    /// X·Wᵀ (+ b with `bias`; `w`: Wᵀ packed) of rows `b0..b0 + nb` for steps
    /// `s0..s0 + steps` (each row's own time index; zeros where a row does not run) into
    /// `xs`, row (s − s0)·nb + b. `xa` and `xs` hold `steps · nb` rows rounded up to a
    /// multiple of the kernel's row tile.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        w: &T::Packed,
        (s0, steps): (usize, usize),
        b0: usize,
        nb: usize,
        xa: &mut [T],
        xs: &mut [T],
        nested: bool,
        bias: bool,
    ) {
        let (_, n, isz) = self.inp.dims;
        let gh = self.spec.cell.gates() * self.spec.hidden;
        let zero = T::of(0.0);
        for (i, row) in xa.chunks_mut(isz.max(1)).take(steps * nb).enumerate() {
            let (s, b) = (s0 + i / nb, i % nb);
            match self.active(s, b0 + b) {
                Some(t) => row.copy_from_slice(&self.inp.x[(t * n + b0 + b) * isz..][..isz]),
                None => row.fill(zero),
            }
        }
        // Whole row tiles (the rows past `steps · nb` are scratch; see `rows`).
        let m = (steps * nb).next_multiple_of(crate::packed::MR);
        let mode = GemmMode::SET.serial_if(nested);
        T::packed_gemm(w, m, xa, isz, xs, gh, mode);
        if !bias {
            return;
        }
        for row in xs.chunks_mut(gh).take(steps * nb) {
            for (x, &b) in row.iter_mut().zip(&self.bias) {
                *x = *x + b;
            }
        }
    }

    /// The time index row `b` runs at step s, if it runs: without a mask the reverse
    /// direction starts at each row's own last valid step; with one, all rows share the
    /// step and masked rows keep their state.
    #[inline]
    fn active(&self, s: usize, b: usize) -> Option<usize> {
        let inp = self.inp;
        let t_len = inp.dims.0;
        let step_t = if self.rev { t_len - 1 - s } else { s };
        match &inp.mask {
            None if s >= inp.lens[b] => None,
            None if self.rev => Some(inp.lens[b] - 1 - s),
            None => Some(s),
            Some(m) => (m[step_t * inp.dims.1 + b] && step_t < inp.lens[b]).then_some(step_t),
        }
    }

    fn clip(&self) -> Option<(T, T)> {
        self.spec
            .clip
            .map(|c| (T::of(-(c as f64)), T::of(c as f64)))
    }

    /// GRU with linear_before_reset=0: z and r for every active row of the block, and
    /// r ⊙ H for the product with R_h. `xs`: the rows' X·Wᵀ + b for this step.
    #[allow(clippy::too_many_arguments)]
    fn reset_phase(
        &self,
        s: usize,
        b0: usize,
        xs: &[T],
        hs: &[T],
        hr: &[T],
        gates: &mut [T],
        rh: &mut [T],
    ) {
        let h = self.spec.hidden;
        let gh = self.spec.cell.gates() * h;
        let clip = self.clip();
        let (f, _, _) = self.acts;
        for b in 0..hs.len() / h.max(1) {
            if self.active(s, b0 + b).is_none() {
                continue;
            }
            let zr = &mut gates[b * gh..b * gh + 2 * h];
            add_clip(
                zr,
                &xs[b * gh..b * gh + 2 * h],
                &hr[b * gh..b * gh + 2 * h],
                clip,
            );
            T::act_slice(f, zr);
            for ((o, &r), &hv) in rh[b * h..(b + 1) * h]
                .iter_mut()
                .zip(&zr[h..])
                .zip(&hs[b * h..(b + 1) * h])
            {
                *o = r * hv;
            }
        }
    }

    /// The gate arithmetic of step s for every row of the block: new states, Y rows.
    #[allow(clippy::too_many_arguments)]
    fn gate_phase(
        &self,
        s: usize,
        b0: usize,
        xs: &[T],
        hs: &mut [T],
        cs: &mut [T],
        hr: &[T],
        gates: &mut [T],
    ) {
        let (spec, inp) = (self.spec, self.inp);
        let t_len = inp.dims.0;
        let h = spec.hidden;
        let gh = spec.cell.gates() * h;
        let one = T::of(1.0);
        let clip = self.clip();
        let (f, gg, hh) = self.acts;
        let step_t = if self.rev { t_len - 1 - s } else { s };
        let nb = hs.len() / h.max(1);
        // Every row runs this step (no mask, no row ended): one pass over the block.
        if self.standard && inp.mask.is_none() && inp.lens[b0..b0 + nb].iter().all(|&l| s < l) {
            let one_pass = match spec.cell {
                Cell::Lstm => {
                    T::lstm_rows(h, xs, hr, cs, hs);
                    true
                }
                Cell::Gru => {
                    T::gru_rows(h, xs, hr, self.rbh, hs);
                    true
                }
                Cell::Rnn => false,
            };
            if one_pass {
                self.write_active_rows(s, b0, hs);
                return;
            }
        }
        for b in 0..nb {
            let Some(t) = self.active(s, b0 + b) else {
                if spec.hold && inp.mask.is_some() {
                    self.write_y(step_t, b0 + b, &hs[b * h..(b + 1) * h]);
                }
                continue;
            };
            let x = &xs[b * gh..(b + 1) * gh];
            let hrow = &hr[b * gh..(b + 1) * gh];
            let hv = &mut hs[b * h..(b + 1) * h];
            let cv = &mut cs[b * h..(b + 1) * h];
            let buf = &mut gates[b * gh..(b + 1) * gh];
            match spec.cell {
                Cell::Rnn => {
                    add_clip(hv, x, hrow, clip);
                    T::act_slice(f, hv);
                }
                Cell::Lstm => {
                    // buf holds [i | f | c̃ | o]; X·Wᵀ and H·Rᵀ are in ONNX order i, o, f, c.
                    let (bi, rest) = buf.split_at_mut(h);
                    let (bf, rest) = rest.split_at_mut(h);
                    let (bc, bo) = rest.split_at_mut(h);
                    match self.peep {
                        Some(p) => {
                            add_peep_clip(bi, part(x, h, 0), part(hrow, h, 0), &p[..h], cv, clip);
                            add_peep_clip(
                                bf,
                                part(x, h, 2),
                                part(hrow, h, 2),
                                &p[2 * h..],
                                cv,
                                clip,
                            );
                        }
                        None => {
                            add_clip(bi, part(x, h, 0), part(hrow, h, 0), clip);
                            add_clip(bf, part(x, h, 2), part(hrow, h, 2), clip);
                        }
                    }
                    add_clip(bc, part(x, h, 3), part(hrow, h, 3), clip);
                    T::act_slice(f, bi);
                    if spec.input_forget {
                        for (bf, &bi) in bf.iter_mut().zip(bi.iter()) {
                            *bf = one - bi;
                        }
                    } else {
                        T::act_slice(f, bf);
                    }
                    T::act_slice(gg, bc);
                    // c' = f⊙c + i⊙c̃, kept in c and (for act(c')) in bc.
                    for (((c, g), &fv), &iv) in cv
                        .iter_mut()
                        .zip(bc.iter_mut())
                        .zip(bf.iter())
                        .zip(bi.iter())
                    {
                        *c = fv * *c + iv * *g;
                        *g = *c;
                    }
                    match self.peep {
                        Some(p) => add_peep_clip(
                            bo,
                            part(x, h, 1),
                            part(hrow, h, 1),
                            &p[h..2 * h],
                            cv,
                            clip,
                        ),
                        None => add_clip(bo, part(x, h, 1), part(hrow, h, 1), clip),
                    }
                    T::act_slice(f, bo);
                    T::act_slice(hh, bc);
                    for ((hv, &o), &c) in hv.iter_mut().zip(bo.iter()).zip(bc.iter()) {
                        *hv = o * c;
                    }
                }
                Cell::Gru => {
                    let (zr, bh) = buf.split_at_mut(2 * h);
                    let (xh, rhh) = (&x[2 * h..], &hrow[2 * h..]);
                    if spec.linear_before_reset {
                        add_clip(zr, &x[..2 * h], &hrow[..2 * h], clip);
                        T::act_slice(f, zr);
                        for ((((o, &xv), &r), &hv), &b) in
                            bh.iter_mut().zip(xh).zip(&zr[h..]).zip(rhh).zip(self.rbh)
                        {
                            *o = clamp(xv + r * (hv + b), clip);
                        }
                    } else {
                        for (((o, &xv), &hv), &b) in bh.iter_mut().zip(xh).zip(rhh).zip(self.rbh) {
                            *o = clamp(xv + hv + b, clip);
                        }
                    }
                    T::act_slice(gg, bh);
                    for ((hv, &z), &c) in hv.iter_mut().zip(zr[..h].iter()).zip(bh.iter()) {
                        *hv = (one - z) * c + z * *hv;
                    }
                }
            }
            self.write_y(t, b0 + b, &hs[b * h..(b + 1) * h]);
        }
    }

    /// The Y rows of step s for the block's rows that run it (rows `b0..`, their H in
    /// `hs`).
    fn write_active_rows(&self, s: usize, b0: usize, hs: &[T]) {
        let h = self.spec.hidden;
        for (b, row) in hs.chunks_exact(h.max(1)).enumerate() {
            if let Some(t) = self.active(s, b0 + b) {
                self.write_y(t, b0 + b, row);
            }
        }
    }

    /// Y[t, d, b, :] = v.
    fn write_y(&self, t: usize, b: usize, v: &[T]) {
        let (_, n, _) = self.inp.dims;
        let h = self.spec.hidden;
        let at = ((t * self.spec.reverse.len() + self.d) * n + b) * h;
        debug_assert!(v.len() == h && t < self.inp.dims.0 && b < n);
        // SAFETY: Y holds T·D·N·H values and (t, d, b) is in range, so the H values at
        // `at` lie inside it; row b belongs to the calling thread's part alone (a part
        // handed over between steps is written by its new owner only after the old one
        // stopped: see `steal`), and the threads are joined before Y is read.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.y.0.add(at), h) };
    }
}

/// The k-th `h`-wide gate block of a row.
#[inline(always)]
fn part<T>(v: &[T], h: usize, k: usize) -> &[T] {
    &v[k * h..(k + 1) * h]
}

/// Clamps to `clip` when given (NaN propagates either way).
#[inline(always)]
fn clamp<T: RFloat>(v: T, clip: Option<(T, T)>) -> T {
    match clip {
        Some((lo, hi)) => v.mx(lo).mn(hi),
        None => v,
    }
}

/// `out = clip(a + b)`.
#[inline]
fn add_clip<T: RFloat>(out: &mut [T], a: &[T], b: &[T], clip: Option<(T, T)>) {
    match clip {
        None => {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        }
        Some(_) => {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = clamp(a + b, clip);
            }
        }
    }
}

/// `out = clip(a + b + p ⊙ c)` (peepholes).
#[inline]
fn add_peep_clip<T: RFloat>(
    out: &mut [T],
    a: &[T],
    b: &[T],
    p: &[T],
    c: &[T],
    clip: Option<(T, T)>,
) {
    for ((((o, &a), &b), &p), &c) in out.iter_mut().zip(a).zip(b).zip(p).zip(c) {
        *o = clamp(a + b + p * c, clip);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The op's configuration and inputs, in f64.
    #[derive(Debug, Clone)]
    struct Case {
        cell: Cell,
        lbr: bool,
        peep: bool,
        clip: Option<f32>,
        dirs: Vec<bool>,
        dims: (usize, usize, usize),
        h: usize,
        lens: Vec<usize>,
        state: bool,
        vals: Vec<f64>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (
                0usize..3,
                any::<bool>(),
                prop::option::weighted(0.2, 0.5f32..3.0),
            ),
            (
                prop_oneof![Just(vec![false]), Just(vec![true]), Just(vec![false, true])],
                any::<bool>(),
            ),
            (1usize..=6, 1usize..=40, 1usize..=12, 1usize..=20),
            (any::<bool>(), any::<u64>()),
        )
            .prop_map(
                |((cell, peep, clip), (dirs, ragged), (t, n, i, h), (state, seed))| {
                    let cell = [Cell::Lstm, Cell::Gru, Cell::Gru][cell];
                    let lbr = cell == Cell::Gru && seed % 3 != 0;
                    // A small deterministic generator for values in (−1, 1) and lengths.
                    let mut s = seed | 1;
                    let mut next = move || {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        s
                    };
                    let lens = (0..n)
                        .map(|_| {
                            if ragged {
                                (next() % (t as u64 + 1)) as usize
                            } else {
                                t
                            }
                        })
                        .collect();
                    let vals = (0..4096)
                        .map(|_| (next() % 2001) as f64 / 1000.0 - 1.0)
                        .collect();
                    Case {
                        cell,
                        lbr,
                        peep: peep && cell == Cell::Lstm,
                        clip,
                        dirs,
                        dims: (t, n, i),
                        h,
                        lens,
                        state,
                        vals,
                    }
                },
            )
    }

    /// Inputs drawn from the case's values (cycled): X, W, R, B, h0, c0, P.
    fn tensors(c: &Case) -> [Vec<f64>; 7] {
        let (t, n, i) = c.dims;
        let (h, d, g) = (c.h, c.dirs.len(), c.cell.gates());
        let mut k = 0;
        let mut take = |len: usize, scale: f64| -> Vec<f64> {
            (0..len)
                .map(|_| {
                    k += 1;
                    c.vals[k % c.vals.len()] * scale
                })
                .collect()
        };
        [
            take(t * n * i, 2.0),
            take(d * g * h * i, 0.7),
            take(d * g * h * h, 0.7),
            take(d * 2 * g * h, 0.5),
            take(d * n * h, 1.0),
            take(d * n * h, 1.0),
            take(d * 3 * h, 0.5),
        ]
    }

    /// The ONNX recurrent ops, one row and one step at a time in f64: Y `[T, D, N, H]`
    /// (zeros past a row's length), Y_h and Y_c `[D, N, H]`.
    fn reference(c: &Case) -> [Vec<f64>; 3] {
        let [x, w, r, b, h0, c0, p] = tensors(c);
        let (t_len, n, isz) = c.dims;
        let (h, nd, g) = (c.h, c.dirs.len(), c.cell.gates());
        let gh = g * h;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let clip = |v: f64| match c.clip {
            Some(cl) => v.clamp(-(cl as f64), cl as f64),
            None => v,
        };
        let (mut y, mut yh, mut yc) = (
            vec![0.0; t_len * nd * n * h],
            vec![0.0; nd * n * h],
            vec![0.0; nd * n * h],
        );
        for (d, &rev) in c.dirs.iter().enumerate() {
            let (w, r, b) = (&w[d * gh * isz..], &r[d * gh * h..], &b[d * 2 * gh..]);
            let p = &p[d * 3 * h..];
            for row in 0..n {
                let at = (d * n + row) * h;
                let mut hs = if c.state {
                    h0[at..at + h].to_vec()
                } else {
                    vec![0.0; h]
                };
                let mut cs = if c.state {
                    c0[at..at + h].to_vec()
                } else {
                    vec![0.0; h]
                };
                for s in 0..c.lens[row] {
                    let t = if rev { c.lens[row] - 1 - s } else { s };
                    let xr = &x[(t * n + row) * isz..(t * n + row + 1) * isz];
                    let xw = |j: usize| -> f64 {
                        (0..isz).map(|q| w[j * isz + q] * xr[q]).sum::<f64>() + b[j]
                    };
                    let hr = |j: usize, v: &[f64]| -> f64 {
                        (0..h).map(|q| r[j * h + q] * v[q]).sum::<f64>() + b[gh + j]
                    };
                    match c.cell {
                        Cell::Lstm => {
                            let pre = |k: usize, j: usize| xw(k * h + j) + hr(k * h + j, &hs);
                            let peep = |k: usize, j: usize, cv: f64| {
                                if c.peep {
                                    p[k * h + j] * cv
                                } else {
                                    0.0
                                }
                            };
                            let mut hn = vec![0.0; h];
                            for j in 0..h {
                                let i = sig(clip(pre(0, j) + peep(0, j, cs[j])));
                                let f = sig(clip(pre(2, j) + peep(2, j, cs[j])));
                                let cand = clip(pre(3, j)).tanh();
                                cs[j] = f * cs[j] + i * cand;
                                let o = sig(clip(pre(1, j) + peep(1, j, cs[j])));
                                hn[j] = o * cs[j].tanh();
                            }
                            hs = hn;
                        }
                        _ => {
                            let z: Vec<f64> =
                                (0..h).map(|j| sig(clip(xw(j) + hr(j, &hs)))).collect();
                            let rg: Vec<f64> = (0..h)
                                .map(|j| sig(clip(xw(h + j) + hr(h + j, &hs))))
                                .collect();
                            let rh: Vec<f64> = (0..h).map(|j| rg[j] * hs[j]).collect();
                            hs = (0..h)
                                .map(|j| {
                                    let rec = if c.lbr {
                                        rg[j] * hr(2 * h + j, &hs)
                                    } else {
                                        hr(2 * h + j, &rh)
                                    };
                                    let cand = clip(xw(2 * h + j) + rec).tanh();
                                    (1.0 - z[j]) * cand + z[j] * hs[j]
                                })
                                .collect();
                        }
                    }
                    let o = ((t * nd + d) * n + row) * h;
                    y[o..o + h].copy_from_slice(&hs);
                }
                yh[at..at + h].copy_from_slice(&hs);
                if c.cell == Cell::Lstm {
                    yc[at..at + h].copy_from_slice(&cs);
                }
            }
        }
        [y, yh, yc]
    }

    /// The fused kernel's outputs on the case in type T (`share`: idle threads take
    /// rows from running blocks).
    fn outputs<T: RFloat>(c: &Case, share: bool) -> Outputs<T> {
        let ts = tensors(c).map(|v| v.into_iter().map(T::of).collect::<Vec<T>>());
        let acts = match c.cell {
            Cell::Lstm => vec![Act::Sigmoid, Act::Tanh, Act::Tanh],
            _ => vec![Act::Sigmoid, Act::Tanh],
        };
        let spec = Spec {
            cell: c.cell,
            hidden: c.h,
            reverse: c.dirs.clone(),
            acts: vec![acts; c.dirs.len()],
            clip: c.clip,
            input_forget: false,
            linear_before_reset: c.lbr,
            layout1: false,
            hold: false,
        };
        let inp = Inputs {
            x: &ts[0],
            dims: c.dims,
            w: &ts[1],
            r: &ts[2],
            b: Some(&ts[3]),
            lens: c.lens.clone(),
            mask: None,
            h0: c.state.then_some(&ts[4][..]),
            c0: c.state.then_some(&ts[5][..]),
            p: c.peep.then_some(&ts[6][..]),
        };
        run_with(&spec, &inp, share).expect("the fused kernel runs")
    }

    /// The fused kernel on the case in type T.
    fn fused<T: RFloat>(c: &Case) -> [Vec<f64>; 3] {
        let out = outputs::<T>(c, true);
        let yc = if c.cell == Cell::Lstm {
            out.yc
        } else {
            vec![T::of(0.0); out.yh.len()]
        };
        [out.y, out.yh, yc].map(|v| v.into_iter().map(T::to).collect())
    }

    fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len(), "{} length", what);
        for (k, (a, b)) in got.iter().zip(want).enumerate() {
            prop_assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}[{k}]: {a} vs {b}"
            );
        }
        Ok(())
    }

    /// Standard cells too large for the joined product (projections over chunks of steps),
    /// on three threads' blocks of rows, against the plain f64 reference: the LSTM's
    /// recurrent product adds onto the projections in place and the gate kernel adds the
    /// bias while every row of a block runs, and chunks after a row has ended take the
    /// general path; one direction and two, forward and reverse, LSTM and GRU.
    #[test]
    fn large_cells_match_the_reference() {
        let (t, n, i, h) = (20, 64, 160, 128);
        assert!(
            (i + h) * 4 * h * 4 > JOINT_MAX_BYTES,
            "the case must not take the joined product"
        );
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let vals: Vec<f64> = (0..4099)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s % 2001) as f64 / 1000.0 - 1.0) * 0.2
            })
            .collect();
        let mut ragged = vec![t; n];
        ragged[5] = 11;
        ragged[40] = 3;
        // Three threads, whatever the machine has (one direction: blocks of 22, 22, 20 rows).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a thread pool");
        let cases = [
            (Cell::Lstm, vec![false, true], vec![t; n], false),
            (Cell::Lstm, vec![false, true], ragged.clone(), true),
            (Cell::Lstm, vec![false], vec![t; n], true),
            (Cell::Lstm, vec![true], vec![t; n], false),
            (Cell::Lstm, vec![true], ragged, true),
            (Cell::Gru, vec![false], vec![t; n], true),
            (Cell::Gru, vec![true], vec![t; n], false),
        ];
        for (cell, dirs, lens, state) in cases {
            let c = Case {
                cell,
                lbr: cell == Cell::Gru,
                peep: false,
                clip: None,
                dirs,
                dims: (t, n, i),
                h,
                lens,
                state,
                vals: vals.clone(),
            };
            let want = reference(&c);
            let got = pool.install(|| [(fused::<f32>(&c), 2e-5), (fused::<f64>(&c), 1e-12)]);
            for (k, (got, tol)) in got.iter().enumerate() {
                for (o, name) in ["Y", "Y_h", "Y_c"].iter().enumerate() {
                    if let Err(e) = close(
                        &format!("{} {name}", ["f32", "f64"][k]),
                        &got[o],
                        &want[o],
                        *tol,
                    ) {
                        panic!("{e}");
                    }
                }
            }
        }
    }

    /// Rows shared between threads mid-sequence give the values of the unshared run bit
    /// for bit: two threads, the second block's rows end after one or two steps so its
    /// thread asks for part of the first block's rows; joined products (small LSTM) and
    /// projections over chunks of steps (large LSTM in place, GRU), both directions.
    #[test]
    fn rows_shared_between_threads_give_the_same_bits() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a thread pool");
        let (t, n) = (24, 64);
        let mut lens = vec![t; n];
        lens[32..].fill(2);
        lens[40] = 1;
        let mut splits = 0;
        for (cell, i, h, dirs) in [
            (Cell::Lstm, 5, 8, vec![false]),
            (Cell::Lstm, 160, 128, vec![false]),
            (Cell::Gru, 160, 128, vec![true]),
            (Cell::Lstm, 5, 8, vec![false, true]),
        ] {
            let mut s = 0x2545_f491_4f6c_dd1du64;
            let c = Case {
                cell,
                lbr: cell == Cell::Gru,
                peep: false,
                clip: None,
                dims: (t, n, i),
                h,
                lens: lens.clone(),
                state: true,
                vals: (0..4099)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        ((s % 2001) as f64 / 1000.0 - 1.0) * 0.3
                    })
                    .collect(),
                dirs,
            };
            let alone = pool.install(|| outputs::<f32>(&c, false));
            for _ in 0..8 {
                // The counts of the pool thread that ran the kernel (taken before too:
                // the thread may have run other work).
                let (shared, paths) = pool.install(|| {
                    super::super::paths::take();
                    (outputs::<f32>(&c, true), super::super::paths::take())
                });
                splits += paths.row_splits;
                for (name, a, b) in [
                    ("Y", &shared.y, &alone.y),
                    ("Y_h", &shared.yh, &alone.yh),
                    ("Y_c", &shared.yc, &alone.yc),
                ] {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same && a.len() == b.len(), "{cell:?} {name} differs");
                }
            }
            // Against the f64 reference too.
            let want = reference(&c);
            let got = pool.install(|| fused::<f32>(&c));
            for (o, name) in ["Y", "Y_h", "Y_c"].iter().enumerate() {
                if let Err(e) = close(name, &got[o], &want[o], 2e-5) {
                    panic!("{cell:?} {e}");
                }
            }
        }
        assert!(splits > 0, "no rows were shared");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// The fused kernel (one-pass gate kernels, joined products, blocks of rows and
        /// directions on threads, ragged lengths, peepholes, clip) against the ops
        /// computed plainly in f64, in f32 and in f64.
        #[test]
        fn fused_kernel_matches_a_plain_f64_reference(c in case()) {
            let want = reference(&c);
            for (k, (got, tol)) in [(fused::<f32>(&c), 2e-5), (fused::<f64>(&c), 1e-12)].iter().enumerate() {
                for (o, name) in ["Y", "Y_h", "Y_c"].iter().enumerate() {
                    close(&format!("{} {name}", ["f32", "f64"][k]), &got[o], &want[o], *tol)?;
                }
            }
        }
    }
}
