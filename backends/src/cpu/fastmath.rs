//! Branch-free f32 `sigmoid` and `tanh` over slices and in the fused LSTM/GRU step
//! kernels, written so the compiler vectorises them (and, for the step kernels, AVX2/FMA
//! intrinsics). tanh is Eigen's rational approximation — an odd polynomial of degree 13
//! over an even one of degree 6, on inputs clamped to ±9 — the one onnxruntime's MLAS and
//! XLA's CPU backend use, its result clamped to [−1, 1] (near |x| = 8.5 it rounds a ulp
//! above 1); σ(x) = ½·tanh(x/2) + ½, so σ lies in [0, 1] and saturates. Absolute
//! errors against the exact functions over [−30, 30]: 3.3e-7 for tanh and 1.8e-7 for σ
//! at most (the tests bound them by 4e-7 and 2e-7; tanh's relative error below |x| = 0.5
//! by 3e-7). The fused recurrent kernels spend most of their non-GEMM time here.

/// `a·b + c`: one fused multiply-add where the caller's code is compiled with FMA (the
/// AVX2/FMA slice functions), else a multiply and an add (`mul_add` without hardware FMA
/// would be a libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Inputs are clamped to ±this (MLAS's bound: the rational approximation is exactly 1
/// there; f32's tanh reaches 1 at 9.0109).
const TANH_CLAMP: f32 = 9.0;
/// The numerator's coefficients in x², highest power first (times x: degree 13).
const TANH_P: [f32; 7] = [
    -2.760_768_4e-16,
    2.000_188e-13,
    -8.604_672e-11,
    5.122_297_3e-8,
    1.485_722_4e-5,
    6.372_619_5e-4,
    4.893_524_6e-3,
];
/// The denominator's coefficients in x², highest power first (degree 6).
const TANH_Q: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_7e-3, 4.893_525e-3];

/// σ(x) = 1 / (1 + e^-x), as ½·tanh(x/2) + ½.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_with::<false>(x)
}

#[inline(always)]
fn sigmoid_with<const FMA: bool>(x: f32) -> f32 {
    madd::<FMA>(tanh_with::<FMA>(0.5 * x), 0.5, 0.5)
}

/// tanh(x) (NaN stays NaN).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    tanh_with::<false>(x)
}

#[inline(always)]
fn tanh_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let z = x * x;
    let mut p = TANH_P[0];
    for &c in &TANH_P[1..] {
        p = madd::<FMA>(p, z, c);
    }
    let mut q = TANH_Q[0];
    for &c in &TANH_Q[1..] {
        q = madd::<FMA>(q, z, c);
    }
    (p * x / q).clamp(-1.0, 1.0)
}

macro_rules! slice_fn {
    ($(#[$doc:meta])* $name:ident, $avx:ident, $f:ident, $f_fma:ident) => {
        $(#[$doc])*
        pub fn $name(v: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA.
                unsafe { $avx(v) };
                return;
            }
            for x in v.iter_mut() {
                *x = $f(*x);
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx(v: &mut [f32]) {
            for x in v.iter_mut() {
                *x = $f_fma::<true>(*x);
            }
        }
    };
}

slice_fn!(
    /// Applies [`sigmoid`] in place (AVX2/FMA code when the CPU has it).
    sigmoid_slice,
    sigmoid_avx2,
    sigmoid,
    sigmoid_with
);
slice_fn!(
    /// Applies [`tanh`] in place (AVX2/FMA code when the CPU has it).
    tanh_slice,
    tanh_avx2,
    tanh,
    tanh_with
);

/// Whether the CPU runs the AVX2/FMA versions.
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The rows of an LSTM step's operands in [`lstm_rows`]'s layout, (x, hr, c, h) per row
/// (x's one row for every row when it holds one).
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
#[allow(clippy::type_complexity)]
pub fn lstm_row_sets<'a, T>(
    hid: usize,
    x: &'a [T],
    hr: &'a [T],
    c: &'a mut [T],
    h: &'a mut [T],
) -> impl Iterator<Item = (&'a [T], &'a [T], &'a mut [T], &'a mut [T])> {
    assert!(
        hid > 0
            && c.len() % hid == 0
            && h.len() == c.len()
            && hr.len() == 4 * c.len()
            && (x.len() == hr.len() || x.len() == 4 * hid),
        "lstm_rows: lengths do not fit H = {hid}"
    );
    x.chunks_exact(4 * hid)
        .cycle()
        .zip(hr.chunks_exact(4 * hid))
        .zip(c.chunks_exact_mut(hid))
        .zip(h.chunks_exact_mut(hid))
        .map(|(((x, r), c), h)| (x, r, c, h))
}

/// The rows of a GRU step's operands in [`gru_rows`]'s layout, (x, hr, h) per row.
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
pub fn gru_row_sets<'a, T>(
    hid: usize,
    x: &'a [T],
    hr: &'a [T],
    rbh: &[T],
    h: &'a mut [T],
) -> impl Iterator<Item = (&'a [T], &'a [T], &'a mut [T])> {
    assert!(
        hid > 0
            && h.len() % hid == 0
            && rbh.len() == hid
            && x.len() == 3 * h.len()
            && hr.len() == x.len(),
        "gru_rows: lengths do not fit H = {hid}"
    );
    x.chunks_exact(3 * hid)
        .zip(hr.chunks_exact(3 * hid))
        .zip(h.chunks_exact_mut(hid))
        .map(|((x, r), h)| (x, r, h))
}

/// One standard LSTM step (σ, tanh, tanh; no clip, peepholes or coupled gates) for a
/// block of rows in one pass: the gates' pre-activations are `x + hr`, `[rows, 4·hid]`
/// in ONNX gate order i, o, f, c (`x` may also be one row, `[4·hid]`, added to every
/// row: a bias); the states `c` and `h` (`[rows, hid]`) are updated in place. The same
/// functions in the same order as the general kernel's separate passes, so the same
/// values, without storing the gates in between.
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
pub fn lstm_rows(hid: usize, x: &[f32], hr: &[f32], c: &mut [f32], h: &mut [f32]) {
    // Checks the lengths (the kernels below index by them).
    drop(lstm_row_sets(hid, x, hr, c, h));
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA; the lengths fit `hid` (checked above);
        // with KEEP false nothing is written through the pointers from `hr` or to `tc`.
        unsafe {
            lstm_rows_avx2::<false>(hid, x, hr.as_ptr().cast_mut(), c, h, std::ptr::null_mut())
        };
        return;
    }
    lstm_rows_with::<false>(hid, x, hr, c, h);
}

/// [`lstm_rows`] for a training forward, which keeps what the backward reads: the
/// pre-activations (minus `x`) come in `pre` and leave it as the gates' activations
/// (i, o, f, c order), and `tc` (`[rows, hid]`) receives tanh of the new cell state.
/// The same values as [`lstm_rows`].
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
pub fn lstm_rows_keep(
    hid: usize,
    x: &[f32],
    pre: &mut [f32],
    c: &mut [f32],
    h: &mut [f32],
    tc: &mut [f32],
) {
    drop(lstm_row_sets(hid, x, pre, c, h));
    assert_eq!(tc.len(), c.len(), "lstm_rows_keep: tanh(c) rows do not fit");
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA; the lengths fit `hid` (checked above),
        // and `pre` and `tc` are exclusive borrows.
        unsafe { lstm_rows_avx2::<true>(hid, x, pre.as_mut_ptr(), c, h, tc.as_mut_ptr()) };
        return;
    }
    lstm_rows_keep_with::<false>(hid, x, pre, c, h, tc);
}

/// [`lstm_rows_keep`] in plain Rust (and FMA where compiled with it).
#[inline(always)]
fn lstm_rows_keep_with<const FMA: bool>(
    hid: usize,
    x: &[f32],
    pre: &mut [f32],
    c: &mut [f32],
    h: &mut [f32],
    tc: &mut [f32],
) {
    let states = c.chunks_exact_mut(hid).zip(h.chunks_exact_mut(hid));
    let rows = pre.chunks_exact_mut(4 * hid).zip(tc.chunks_exact_mut(hid));
    for ((x, (c, h)), (p, tc)) in x.chunks_exact(4 * hid).cycle().zip(states).zip(rows) {
        for j in 0..hid {
            let v = std::array::from_fn(|k| x[k * hid + j] + p[k * hid + j]);
            let (a, cn, t) = lstm_lane::<FMA>(v, c[j]);
            (c[j], h[j], tc[j]) = (cn, a[1] * t, t);
            for (k, v) in a.into_iter().enumerate() {
                p[k * hid + j] = v;
            }
        }
    }
}

/// One lane of the standard LSTM step from its pre-activations (i, o, f, c order) and
/// cell state: the gates' activations, the new cell state and its tanh.
#[inline(always)]
fn lstm_lane<const FMA: bool>(p: [f32; 4], c: f32) -> ([f32; 4], f32, f32) {
    let i = sigmoid_with::<FMA>(p[0]);
    let f = sigmoid_with::<FMA>(p[2]);
    let g = tanh_with::<FMA>(p[3]);
    let cn = f * c + i * g;
    let o = sigmoid_with::<FMA>(p[1]);
    ([i, o, f, g], cn, tanh_with::<FMA>(cn))
}

/// The AVX2 step kernel: pre-activations `x + pre` (`x` one row or a row per row),
/// with `KEEP` the activations written back over `pre` and tanh(c) to `tc`.
///
/// # Safety
/// AVX2/FMA; `x`, `c`, `h` fit `hid` as [`lstm_row_sets`] checks; `pre` points at
/// `c.len() / hid` rows of `4·hid` values, `tc` (with `KEEP`) at `c.len()` values, both
/// written only with `KEEP`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lstm_rows_avx2<const KEEP: bool>(
    hid: usize,
    x: &[f32],
    pre: *mut f32,
    c: &mut [f32],
    h: &mut [f32],
    tc: *mut f32,
) {
    use std::arch::x86_64::*;
    let lanes = hid / 16 * 16;
    let xs = x.chunks_exact(4 * hid).cycle();
    let states = c.chunks_exact_mut(hid).zip(h.chunks_exact_mut(hid));
    for (row, (x, (c, h))) in xs.zip(states).enumerate() {
        // SAFETY (all pointer arithmetic below): row < rows, lanes < hid, gates < 4.
        let (xp, rp) = (x.as_ptr(), unsafe { pre.add(row * 4 * hid) });
        let tp = if KEEP {
            unsafe { tc.add(row * hid) }
        } else {
            tc
        };
        // Gate k's pre-activation at lanes j..j + 8.
        let at = |k: usize, j: usize| unsafe {
            _mm256_add_ps(
                _mm256_loadu_ps(xp.add(k * hid + j)),
                _mm256_loadu_ps(rp.add(k * hid + j)),
            )
        };
        let keep = |k: usize, j: usize, v: __m256| {
            if KEEP {
                unsafe { _mm256_storeu_ps(rp.add(k * hid + j), v) };
            }
        };
        // Two passes (one would chain two tanh through c), each over two blocks of 8
        // lanes, and the functions of independent values side by side, operation by
        // operation: long dependency chains, so the core needs several in flight to keep
        // its pipes busy. Each lane's pre-activations are read before its activations
        // overwrite them.
        for j in (0..lanes).step_by(16) {
            let [i0, i1, f0, f1, g0, g1] = v8::tanh([
                v8::half(at(0, j)),
                v8::half(at(0, j + 8)),
                v8::half(at(2, j)),
                v8::half(at(2, j + 8)),
                at(3, j),
                at(3, j + 8),
            ]);
            for (jj, i, f, g) in [(j, i0, f0, g0), (j + 8, i1, f1, g1)] {
                let (i, f) = (v8::sigmoid_of(i), v8::sigmoid_of(f));
                keep(0, jj, i);
                keep(2, jj, f);
                keep(3, jj, g);
                unsafe {
                    let cp = c.as_mut_ptr().add(jj);
                    let cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(cp), _mm256_mul_ps(i, g));
                    _mm256_storeu_ps(cp, cn);
                }
            }
        }
        for j in (0..lanes).step_by(16) {
            let (c0, c1) = unsafe {
                (
                    _mm256_loadu_ps(c.as_ptr().add(j)),
                    _mm256_loadu_ps(c.as_ptr().add(j + 8)),
                )
            };
            let [o0, o1, t0, t1] = v8::tanh([v8::half(at(1, j)), v8::half(at(1, j + 8)), c0, c1]);
            let (o0, o1) = (v8::sigmoid_of(o0), v8::sigmoid_of(o1));
            keep(1, j, o0);
            keep(1, j + 8, o1);
            unsafe {
                _mm256_storeu_ps(h.as_mut_ptr().add(j), _mm256_mul_ps(o0, t0));
                _mm256_storeu_ps(h.as_mut_ptr().add(j + 8), _mm256_mul_ps(o1, t1));
                if KEEP {
                    _mm256_storeu_ps(tp.add(j), t0);
                    _mm256_storeu_ps(tp.add(j + 8), t1);
                }
            }
        }
        for j in lanes..hid {
            let p = std::array::from_fn(|k| x[k * hid + j] + unsafe { *rp.add(k * hid + j) });
            let (a, cn, t) = lstm_lane::<true>(p, c[j]);
            c[j] = cn;
            h[j] = a[1] * t;
            if KEEP {
                for (k, v) in a.into_iter().enumerate() {
                    unsafe { *rp.add(k * hid + j) = v };
                }
                unsafe { *tp.add(j) = t };
            }
        }
    }
}

/// The fast functions on 8 lanes with AVX2/FMA intrinsics ([`v8::tanh`] on L vectors
/// at once, each operation applied to all L before the next: independent chains side by
/// side for the core to overlap): the same operations in the same order as
/// [`tanh_with`] and [`sigmoid_with`] with FMA, so the same values lane by lane.
#[cfg(target_arch = "x86_64")]
mod v8 {
    use super::{TANH_CLAMP, TANH_P, TANH_Q};
    use std::arch::x86_64::*;

    #[inline(always)]
    fn splat(v: f32) -> __m256 {
        // SAFETY: callers are `avx2,fma` functions (AVX is implied).
        unsafe { _mm256_set1_ps(v) }
    }

    /// tanh lane by lane (see [`super::tanh_with`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn tanh<const L: usize>(x: [__m256; L]) -> [__m256; L] {
        // max/min return their second operand when one is NaN: NaN passes through,
        // as with `f32::clamp`.
        let x: [__m256; L] = std::array::from_fn(|l| {
            _mm256_min_ps(splat(TANH_CLAMP), _mm256_max_ps(splat(-TANH_CLAMP), x[l]))
        });
        let z: [__m256; L] = std::array::from_fn(|l| _mm256_mul_ps(x[l], x[l]));
        let mut p = [splat(TANH_P[0]); L];
        for &c in &TANH_P[1..] {
            p = std::array::from_fn(|l| _mm256_fmadd_ps(p[l], z[l], splat(c)));
        }
        let mut q = [splat(TANH_Q[0]); L];
        for &c in &TANH_Q[1..] {
            q = std::array::from_fn(|l| _mm256_fmadd_ps(q[l], z[l], splat(c)));
        }
        std::array::from_fn(|l| {
            let t = _mm256_div_ps(_mm256_mul_ps(p[l], x[l]), q[l]);
            _mm256_min_ps(splat(1.0), _mm256_max_ps(splat(-1.0), t))
        })
    }

    /// x/2, the argument of the tanh in σ.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn half(x: __m256) -> __m256 {
        _mm256_mul_ps(splat(0.5), x)
    }

    /// σ(x) = ½·t + ½ from t = tanh(x/2).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn sigmoid_of(t: __m256) -> __m256 {
        _mm256_fmadd_ps(t, splat(0.5), splat(0.5))
    }
}

#[inline(always)]
fn lstm_rows_with<const FMA: bool>(
    hid: usize,
    x: &[f32],
    hr: &[f32],
    c: &mut [f32],
    h: &mut [f32],
) {
    for (x, r, c, h) in lstm_row_sets(hid, x, hr, c, h) {
        for j in 0..hid {
            let (a, cn, t) = lstm_lane::<FMA>(
                std::array::from_fn(|k| x[k * hid + j] + r[k * hid + j]),
                c[j],
            );
            c[j] = cn;
            h[j] = a[1] * t;
        }
    }
}

/// One standard GRU step with `linear_before_reset` (σ, tanh; no clip) for a block of
/// rows in one pass: `x` and `hr` hold each row's X·Wᵀ + b (the h gate's recurrent bias
/// left out) and H·Rᵀ (`[rows, 3·hid]`, ONNX gate order z, r, h); `rbh` is the h gate's
/// recurrent bias; the state `h` (`[rows, hid]`) is updated in place. The same values as
/// the general kernel's separate passes.
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
pub fn gru_rows(hid: usize, x: &[f32], hr: &[f32], rbh: &[f32], h: &mut [f32]) {
    // Checks the lengths (the kernels below index by them).
    drop(gru_row_sets(hid, x, hr, rbh, h));
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA; the lengths fit `hid` (checked above);
        // with KEEP false nothing is written through the pointers from `x` or to `lin`.
        unsafe {
            gru_rows_avx2::<false>(hid, x.as_ptr().cast_mut(), hr, rbh, h, std::ptr::null_mut())
        };
        return;
    }
    gru_rows_with::<false>(hid, x, hr, rbh, h);
}

/// [`gru_rows`] for a training forward, which keeps what the backward reads: `x` comes in
/// as X·Wᵀ + b and leaves as the gates' activations (z, r and the candidate n), and `lin`
/// (`[rows, hid]`) receives the candidate's recurrent term h·R_hᵀ + b_rh. The same values
/// as [`gru_rows`].
///
/// # Panics
/// When the lengths do not fit `hid` (a caller's bug, not a user's input).
pub fn gru_rows_keep(
    hid: usize,
    x: &mut [f32],
    hr: &[f32],
    rbh: &[f32],
    h: &mut [f32],
    lin: &mut [f32],
) {
    drop(gru_row_sets(hid, x, hr, rbh, h));
    assert_eq!(
        lin.len(),
        h.len(),
        "gru_rows_keep: recurrent term rows do not fit"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA; the lengths fit `hid` (checked above),
        // and `x` and `lin` are exclusive borrows.
        unsafe { gru_rows_avx2::<true>(hid, x.as_mut_ptr(), hr, rbh, h, lin.as_mut_ptr()) };
        return;
    }
    gru_rows_keep_with::<false>(hid, x, hr, rbh, h, lin);
}

/// One lane of the GRU step (reset-after) from its pre-activations less the candidate's
/// recurrent term (z, r, n order), that term and the state: the gates' activations and
/// the new state.
#[inline(always)]
fn gru_lane<const FMA: bool>(p: [f32; 3], lin: f32, h: f32) -> ([f32; 3], f32) {
    let z = sigmoid_with::<FMA>(p[0]);
    let r = sigmoid_with::<FMA>(p[1]);
    let n = tanh_with::<FMA>(p[2] + r * lin);
    ([z, r, n], (1.0 - z) * n + z * h)
}

/// The AVX2 GRU step kernel (see [`gru_rows`]); with `KEEP` the activations are written
/// back over `x` and the candidate's recurrent term to `lin`.
///
/// # Safety
/// AVX2/FMA; `hr`, `rbh`, `h` fit `hid` as [`gru_row_sets`] checks; `x` points at
/// `h.len() / hid` rows of `3·hid` values, `lin` (with `KEEP`) at `h.len()` values, both
/// written only with `KEEP`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_rows_avx2<const KEEP: bool>(
    hid: usize,
    x: *mut f32,
    hr: &[f32],
    rbh: &[f32],
    h: &mut [f32],
    lin: *mut f32,
) {
    use std::arch::x86_64::*;
    let lanes = hid / 16 * 16;
    for (row, (r, h)) in hr
        .chunks_exact(3 * hid)
        .zip(h.chunks_exact_mut(hid))
        .enumerate()
    {
        // SAFETY (all pointer arithmetic below): row < rows, lanes < hid, gates < 3.
        let (xp, rp) = (unsafe { x.add(row * 3 * hid) }, r.as_ptr());
        let lp = if KEEP {
            unsafe { lin.add(row * hid) }
        } else {
            lin
        };
        let ld = |p: *const f32, k: usize, j: usize| unsafe { _mm256_loadu_ps(p.add(k * hid + j)) };
        let keep = |p: *mut f32, k: usize, j: usize, v: __m256| {
            if KEEP {
                unsafe { _mm256_storeu_ps(p.add(k * hid + j), v) };
            }
        };
        let pre = |k: usize, j: usize| _mm256_add_ps(ld(xp, k, j), ld(rp, k, j));
        // Two blocks of 8 lanes at once, the functions side by side (see
        // `lstm_rows_avx2`). Each lane's inputs are read before its activations
        // overwrite them.
        for j in (0..lanes).step_by(16) {
            let [tz0, tr0, tz1, tr1] = v8::tanh([
                v8::half(pre(0, j)),
                v8::half(pre(1, j)),
                v8::half(pre(0, j + 8)),
                v8::half(pre(1, j + 8)),
            ]);
            let rec = |j: usize| _mm256_add_ps(ld(rp, 2, j), ld(rbh.as_ptr(), 0, j));
            let (rec0, rec1) = (rec(j), rec(j + 8));
            let (r0, r1) = (v8::sigmoid_of(tr0), v8::sigmoid_of(tr1));
            let arg = |j: usize, r: __m256, rec: __m256| {
                _mm256_add_ps(ld(xp, 2, j), _mm256_mul_ps(r, rec))
            };
            let [n0, n1] = v8::tanh([arg(j, r0, rec0), arg(j + 8, r1, rec1)]);
            for (jj, tz, r, rec, n) in [(j, tz0, r0, rec0, n0), (j + 8, tz1, r1, rec1, n1)] {
                let z = v8::sigmoid_of(tz);
                keep(xp, 0, jj, z);
                keep(xp, 1, jj, r);
                keep(xp, 2, jj, n);
                keep(lp, 0, jj, rec);
                let hp = h.as_mut_ptr();
                unsafe {
                    let old = _mm256_loadu_ps(hp.add(jj));
                    let one_z = _mm256_sub_ps(_mm256_set1_ps(1.0), z);
                    let new = _mm256_add_ps(_mm256_mul_ps(one_z, n), _mm256_mul_ps(z, old));
                    _mm256_storeu_ps(hp.add(jj), new);
                }
            }
        }
        for j in lanes..hid {
            let xv = |k: usize| unsafe { *xp.add(k * hid + j) };
            let l = r[2 * hid + j] + rbh[j];
            let p = [xv(0) + r[j], xv(1) + r[hid + j], xv(2)];
            let (a, hn) = gru_lane::<true>(p, l, h[j]);
            h[j] = hn;
            if KEEP {
                for (k, v) in a.into_iter().enumerate() {
                    unsafe { *xp.add(k * hid + j) = v };
                }
                unsafe { *lp.add(j) = l };
            }
        }
    }
}

#[inline(always)]
fn gru_rows_with<const FMA: bool>(hid: usize, x: &[f32], hr: &[f32], rbh: &[f32], h: &mut [f32]) {
    for (x, r, h) in gru_row_sets(hid, x, hr, rbh, h) {
        for j in 0..hid {
            let p = [x[j] + r[j], x[hid + j] + r[hid + j], x[2 * hid + j]];
            h[j] = gru_lane::<FMA>(p, r[2 * hid + j] + rbh[j], h[j]).1;
        }
    }
}

/// [`gru_rows_keep`] in plain Rust (and FMA where compiled with it).
#[inline(always)]
fn gru_rows_keep_with<const FMA: bool>(
    hid: usize,
    x: &mut [f32],
    hr: &[f32],
    rbh: &[f32],
    h: &mut [f32],
    lin: &mut [f32],
) {
    let rows = x.chunks_exact_mut(3 * hid).zip(lin.chunks_exact_mut(hid));
    for ((x, l), (r, h)) in rows.zip(hr.chunks_exact(3 * hid).zip(h.chunks_exact_mut(hid))) {
        for j in 0..hid {
            let p = [x[j] + r[j], x[hid + j] + r[hid + j], x[2 * hid + j]];
            l[j] = r[2 * hid + j] + rbh[j];
            let (a, hn) = gru_lane::<FMA>(p, l[j], h[j]);
            h[j] = hn;
            (x[j], x[hid + j], x[2 * hid + j]) = (a[0], a[1], a[2]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest absolute errors of σ and tanh against f64 over [−30, 30], and the
    /// largest relative error of tanh below |x| = 0.5 (where it is small).
    fn worst_errors(xs: &[f32], s: &[f32], t: &[f32]) -> (f64, f64, f64) {
        let mut worst = (0.0f64, 0.0f64, 0.0f64);
        for ((&x, &sv), &tv) in xs.iter().zip(s).zip(t) {
            let s0 = 1.0 / (1.0 + (-(x as f64)).exp());
            let t0 = (x as f64).tanh();
            worst.0 = worst.0.max((sv as f64 - s0).abs());
            worst.1 = worst.1.max((tv as f64 - t0).abs());
            if x != 0.0 && x.abs() < 0.5 {
                worst.2 = worst.2.max(((tv as f64 - t0) / t0).abs());
            }
        }
        worst
    }

    fn grid() -> Vec<f32> {
        (0..82_000).map(|i| -30.0 + i as f32 * 0.000_731).collect()
    }

    #[test]
    fn fast_functions_are_within_their_error_bounds() {
        let xs = grid();
        let s: Vec<f32> = xs.iter().map(|&x| sigmoid(x)).collect();
        let t: Vec<f32> = xs.iter().map(|&x| tanh(x)).collect();
        let worst = worst_errors(&xs, &s, &t);
        assert!(
            worst.0 < 2e-7 && worst.1 < 4e-7 && worst.2 < 3e-7,
            "errors (σ abs, tanh abs, tanh rel near 0) {worst:?}"
        );
        for &x in &xs {
            assert_eq!(tanh(-x), -tanh(x), "tanh is odd");
        }
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert!(sigmoid(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
    }

    #[test]
    fn slice_functions_are_within_the_same_bounds() {
        // The slice functions run the FMA variant on CPUs with AVX2/FMA.
        let xs = grid();
        let (mut s, mut t) = (xs.clone(), xs.clone());
        sigmoid_slice(&mut s);
        tanh_slice(&mut t);
        let worst = worst_errors(&xs, &s, &t);
        assert!(
            worst.0 < 2e-7 && worst.1 < 4e-7 && worst.2 < 3e-7,
            "errors (σ abs, tanh abs, tanh rel near 0) {worst:?}"
        );
        let mut edge = [-200.0f32, 200.0, f32::NAN];
        sigmoid_slice(&mut edge);
        assert_eq!(&edge[..2], &[0.0, 1.0]);
        assert!(edge[2].is_nan());
    }

    #[test]
    fn one_pass_cells_compute_the_composed_functions() {
        // hid = 37: two 16-lane blocks and a 5-lane tail; 3 rows.
        let (hid, rows) = (37usize, 3usize);
        let val = |k: usize| ((k * 7919 % 2001) as f32 / 250.0) - 4.0;
        let x: Vec<f32> = (0..rows * 4 * hid).map(val).collect();
        let hr: Vec<f32> = (0..rows * 4 * hid).map(|k| val(k + 11) / 2.0).collect();
        let c0: Vec<f32> = (0..rows * hid).map(|k| val(k + 5) / 4.0).collect();
        let h0: Vec<f32> = (0..rows * hid).map(|k| val(k + 3) / 4.0).collect();
        // The LSTM step composed from the slice functions' scalar versions, per row (x a
        // row per row) and with one shared row of x (a bias).
        for shared in [false, true] {
            let xs = if shared { &x[..4 * hid] } else { &x[..] };
            let (mut c, mut h) = (c0.clone(), h0.clone());
            lstm_rows(hid, xs, &hr, &mut c, &mut h);
            let (mut cp, mut hp) = (c0.clone(), h0.clone());
            lstm_rows_with::<false>(hid, xs, &hr, &mut cp, &mut hp);
            for b in 0..rows {
                let xr = if shared { 0 } else { b * 4 * hid };
                for j in 0..hid {
                    let pre =
                        |k: usize| (xs[xr + k * hid + j] + hr[b * 4 * hid + k * hid + j]) as f64;
                    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
                    let cn = sig(pre(2)) * c0[b * hid + j] as f64 + sig(pre(0)) * pre(3).tanh();
                    let hn = sig(pre(1)) * cn.tanh();
                    for (got, want) in [
                        (c[b * hid + j], cn),
                        (h[b * hid + j], hn),
                        (cp[b * hid + j], cn),
                        (hp[b * hid + j], hn),
                    ] {
                        assert!(
                            (got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                            "row {b} lane {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        // The training forward's step: the same c and h as the inference step, the
        // activations over the pre-activations and tanh(c) beside them (AVX2 where the
        // CPU has it, and plain Rust).
        type Step = fn(usize, &[f32], &[f32], &mut [f32], &mut [f32]);
        type Keep = fn(usize, &[f32], &mut [f32], &mut [f32], &mut [f32], &mut [f32]);
        let pairs: [(Step, Keep); 2] = [
            (lstm_rows, lstm_rows_keep),
            (lstm_rows_with::<false>, lstm_rows_keep_with::<false>),
        ];
        for shared in [false, true] {
            let xs = if shared { &x[..4 * hid] } else { &x[..] };
            for (step, keep) in pairs {
                let (mut c, mut h) = (c0.clone(), h0.clone());
                step(hid, xs, &hr, &mut c, &mut h);
                let (mut ck, mut hk, mut pk) = (c0.clone(), h0.clone(), hr.clone());
                let mut tc = vec![0f32; rows * hid];
                keep(hid, xs, &mut pk, &mut ck, &mut hk, &mut tc);
                assert_eq!((&ck, &hk), (&c, &h), "shared {shared}");
                for b in 0..rows {
                    let xr = if shared { 0 } else { b * 4 * hid };
                    for j in 0..hid {
                        let at = |k: usize| b * 4 * hid + k * hid + j;
                        let pre = |k: usize| (xs[xr + k * hid + j] + hr[at(k)]) as f64;
                        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
                        let want = [sig(pre(0)), sig(pre(1)), sig(pre(2)), pre(3).tanh()];
                        for (k, w) in want.into_iter().enumerate() {
                            let got = pk[at(k)] as f64;
                            assert!(
                                (got - w).abs() < 1e-6,
                                "row {b} gate {k} lane {j}: {got} vs {w}"
                            );
                        }
                        let t = (c[b * hid + j] as f64).tanh();
                        assert!((tc[b * hid + j] as f64 - t).abs() < 1e-6, "tanh(c) {b} {j}");
                    }
                }
            }
        }
        // GRU (linear_before_reset).
        let rbh: Vec<f32> = (0..hid).map(|k| val(k + 17) / 4.0).collect();
        let (x3, hr3) = (&x[..rows * 3 * hid], &hr[..rows * 3 * hid]);
        let mut h = h0.clone();
        gru_rows(hid, x3, hr3, &rbh, &mut h);
        let mut hp = h0.clone();
        gru_rows_with::<false>(hid, x3, hr3, &rbh, &mut hp);
        for b in 0..rows {
            for j in 0..hid {
                let at = |v: &[f32], k: usize| v[b * 3 * hid + k * hid + j] as f64;
                let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
                let z = sig(at(x3, 0) + at(hr3, 0));
                let r = sig(at(x3, 1) + at(hr3, 1));
                let n = (at(x3, 2) + r * (at(hr3, 2) + rbh[j] as f64)).tanh();
                let want = (1.0 - z) * n + z * h0[b * hid + j] as f64;
                for got in [h[b * hid + j], hp[b * hid + j]] {
                    assert!(
                        (got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                        "GRU row {b} lane {j}: {got} vs {want}"
                    );
                }
            }
        }
        // The training forward's GRU step: the same h, the activations over the inputs
        // and the candidate's recurrent term beside them.
        type GStep = fn(usize, &[f32], &[f32], &[f32], &mut [f32]);
        type GKeep = fn(usize, &mut [f32], &[f32], &[f32], &mut [f32], &mut [f32]);
        let pairs: [(GStep, GKeep); 2] = [
            (gru_rows, gru_rows_keep),
            (gru_rows_with::<false>, gru_rows_keep_with::<false>),
        ];
        for (step, keep) in pairs {
            let mut h = h0.clone();
            step(hid, x3, hr3, &rbh, &mut h);
            let (mut hk, mut xk) = (h0.clone(), x3.to_vec());
            let mut lin = vec![0f32; rows * hid];
            keep(hid, &mut xk, hr3, &rbh, &mut hk, &mut lin);
            assert_eq!(hk, h);
            for b in 0..rows {
                for j in 0..hid {
                    let at = |v: &[f32], k: usize| v[b * 3 * hid + k * hid + j] as f64;
                    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
                    let l = at(hr3, 2) + rbh[j] as f64;
                    let r = sig(at(x3, 1) + at(hr3, 1));
                    let want = [sig(at(x3, 0) + at(hr3, 0)), r, (at(x3, 2) + r * l).tanh()];
                    for (k, w) in want.into_iter().enumerate() {
                        let got = at(&xk, k);
                        assert!(
                            (got - w).abs() < 1e-6,
                            "GRU row {b} gate {k} lane {j}: {got} vs {w}"
                        );
                    }
                    assert!(
                        (lin[b * hid + j] as f64 - l).abs() < 1e-6,
                        "GRU h·R_hᵀ + b {b} {j}"
                    );
                }
            }
        }
    }
}
