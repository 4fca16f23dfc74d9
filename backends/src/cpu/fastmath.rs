//! Branch-free f32 `exp`, `sigmoid` and `tanh` over slices, written so the compiler
//! vectorises them (Cephes-style range reduction and polynomials, ~2 ulp). The fused
//! recurrent kernels spend most of their non-GEMM time here.

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

/// e^x for one value (inputs clamped to ±88.7, where f32 over/underflows).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest without a libm call: adding and subtracting 1.5·2^23 leaves the
    // integer part (|x·log2 e| < 2^22), and vectorises on plain SSE2.
    const SHIFT: f32 = 12_582_912.0;
    let shifted = madd::<FMA>(x, std::f32::consts::LOG2_E, SHIFT);
    let n = shifted - SHIFT;
    let r = madd::<FMA>(n, 2.121_944_4e-4, madd::<FMA>(n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = madd::<FMA>(p, r, c);
    }
    let y = madd::<FMA>(p, r * r, r) + 1.0;
    // 2^n from the bits: `shifted`'s low mantissa bits hold n (its ulp is 1), so no
    // float-to-int conversion (which would not vectorise: Rust's `as` saturates).
    let bits = shifted
        .to_bits()
        .wrapping_sub(SHIFT.to_bits())
        .wrapping_add(127)
        << 23;
    y * f32::from_bits(bits)
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_with::<false>(x)
}

#[inline(always)]
fn sigmoid_with<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp_with::<FMA>(-x))
}

/// tanh(x): an odd polynomial below |x| = 0.625, `1 − 2/(e^{2|x|} + 1)` above.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    tanh_with::<false>(x)
}

#[inline(always)]
fn tanh_with<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut q = -5.704_988_7e-3;
    for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
        q = madd::<FMA>(q, z, c);
    }
    let small = madd::<FMA>(q * z, x, x);
    let big = 1.0 - 2.0 / (exp_with::<FMA>(2.0 * a) + 1.0);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.625 {
        small
    } else {
        big
    }
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
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { lstm_rows_avx2(hid, x, hr, c, h) };
        return;
    }
    lstm_rows_with::<false>(hid, x, hr, c, h);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lstm_rows_avx2(hid: usize, x: &[f32], hr: &[f32], c: &mut [f32], h: &mut [f32]) {
    use std::arch::x86_64::*;
    let lanes = hid / 16 * 16;
    for (x, r, c, h) in lstm_row_sets(hid, x, hr, c, h) {
        let (xp, rp) = (x.as_ptr(), r.as_ptr());
        // Gate k's pre-activation at lanes j..j + 8.
        let at = |k: usize, j: usize| {
            // SAFETY: callers pass j + 8 ≤ hid and k < 4, inside x's and r's rows.
            unsafe {
                _mm256_add_ps(
                    _mm256_loadu_ps(xp.add(k * hid + j)),
                    _mm256_loadu_ps(rp.add(k * hid + j)),
                )
            }
        };
        // Two passes (one would chain two tanh through c), and in each the exponentials
        // of independent gates side by side, operation by operation: long dependency
        // chains, so the core needs several in flight to keep its pipes busy.
        for j in (0..lanes).step_by(8) {
            let (ai, af, ag) = (at(0, j), at(2, j), at(3, j));
            let [ei, ef, eg] = v8::exp([v8::neg(ai), v8::neg(af), v8::twice_abs(ag)]);
            let (i, f, g) = (v8::sigmoid_of(ei), v8::sigmoid_of(ef), v8::tanh_of(ag, eg));
            // SAFETY: j + 8 ≤ hid = c's length.
            unsafe {
                let cp = c.as_mut_ptr().add(j);
                let cn = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(cp)), _mm256_mul_ps(i, g));
                _mm256_storeu_ps(cp, cn);
            }
        }
        for j in (0..lanes).step_by(16) {
            let (a0, a1) = (at(1, j), at(1, j + 8));
            // SAFETY: j + 16 ≤ hid = c's length.
            let (c0, c1) = unsafe {
                (
                    _mm256_loadu_ps(c.as_ptr().add(j)),
                    _mm256_loadu_ps(c.as_ptr().add(j + 8)),
                )
            };
            let [e0, e1, t0, t1] = v8::exp([
                v8::neg(a0),
                v8::neg(a1),
                v8::twice_abs(c0),
                v8::twice_abs(c1),
            ]);
            let h0 = _mm256_mul_ps(v8::sigmoid_of(e0), v8::tanh_of(c0, t0));
            let h1 = _mm256_mul_ps(v8::sigmoid_of(e1), v8::tanh_of(c1, t1));
            // SAFETY: j + 16 ≤ hid = h's length.
            unsafe {
                _mm256_storeu_ps(h.as_mut_ptr().add(j), h0);
                _mm256_storeu_ps(h.as_mut_ptr().add(j + 8), h1);
            }
        }
        for j in lanes..hid {
            let at = |v: &[f32], k: usize| v[k * hid + j];
            let i = sigmoid_with::<true>(at(x, 0) + at(r, 0));
            let f = sigmoid_with::<true>(at(x, 2) + at(r, 2));
            let g = tanh_with::<true>(at(x, 3) + at(r, 3));
            let cn = f * c[j] + i * g;
            c[j] = cn;
            let o = sigmoid_with::<true>(at(x, 1) + at(r, 1));
            h[j] = o * tanh_with::<true>(cn);
        }
    }
}

/// The fast functions on 8 lanes with AVX2/FMA intrinsics ([`v8::exp`] on L vectors at
/// once, each operation applied to all L before the next: independent chains side by
/// side for the core to overlap): the same operations in the same order as
/// [`exp_with`], [`sigmoid_with`] and [`tanh_with`] with FMA, so the same values lane by
/// lane.
#[cfg(target_arch = "x86_64")]
mod v8 {
    use std::arch::x86_64::*;

    #[inline(always)]
    fn splat(v: f32) -> __m256 {
        // SAFETY: callers are `avx2,fma` functions (AVX is implied).
        unsafe { _mm256_set1_ps(v) }
    }

    /// `f` on every vector.
    #[inline(always)]
    fn map<const L: usize>(v: [__m256; L], f: impl Fn(__m256) -> __m256) -> [__m256; L] {
        std::array::from_fn(|l| f(v[l]))
    }

    /// `f` on every pair of vectors.
    #[inline(always)]
    fn zip<const L: usize>(
        a: [__m256; L],
        b: [__m256; L],
        f: impl Fn(__m256, __m256) -> __m256,
    ) -> [__m256; L] {
        std::array::from_fn(|l| f(a[l], b[l]))
    }

    /// e^x lane by lane (see [`super::exp_with`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp<const L: usize>(x: [__m256; L]) -> [__m256; L] {
        const SHIFT: f32 = 12_582_912.0;
        // max/min return their second operand when one is NaN: NaN passes through,
        // as with `f32::clamp`.
        let x = map(x, |x| {
            _mm256_min_ps(splat(88.7), _mm256_max_ps(splat(-87.3), x))
        });
        let shifted = map(x, |x| {
            _mm256_fmadd_ps(x, splat(std::f32::consts::LOG2_E), splat(SHIFT))
        });
        let n = map(shifted, |s| _mm256_sub_ps(s, splat(SHIFT)));
        let r = zip(n, x, |n, x| _mm256_fmadd_ps(n, splat(-0.693_359_4), x));
        let r = zip(n, r, |n, r| _mm256_fmadd_ps(n, splat(2.121_944_4e-4), r));
        let mut p = [splat(1.987_569_1e-4); L];
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = zip(p, r, |p, r| _mm256_fmadd_ps(p, r, splat(c)));
        }
        let r2 = map(r, |r| _mm256_mul_ps(r, r));
        let y = std::array::from_fn::<_, L, _>(|l| {
            _mm256_add_ps(_mm256_fmadd_ps(p[l], r2[l], r[l]), splat(1.0))
        });
        std::array::from_fn(|l| {
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_sub_epi32(
                    _mm256_castps_si256(shifted[l]),
                    _mm256_set1_epi32(SHIFT.to_bits() as i32),
                ),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(y[l], _mm256_castsi256_ps(bits))
        })
    }

    /// −x.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn neg(x: __m256) -> __m256 {
        _mm256_xor_ps(x, splat(-0.0))
    }

    /// 2·|x|, the argument of the exponential in [`tanh_of`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn twice_abs(x: __m256) -> __m256 {
        _mm256_mul_ps(splat(2.0), _mm256_andnot_ps(splat(-0.0), x))
    }

    /// σ(x) = 1 / (1 + e) from e = e^-x.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn sigmoid_of(e: __m256) -> __m256 {
        _mm256_div_ps(splat(1.0), _mm256_add_ps(splat(1.0), e))
    }

    /// tanh x from e = e^{2|x|} (see [`super::tanh_with`]: an odd polynomial below
    /// |x| = 0.625, `1 − 2/(e + 1)` with x's sign above).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn tanh_of(x: __m256, e: __m256) -> __m256 {
        let a = _mm256_andnot_ps(splat(-0.0), x);
        let z = _mm256_mul_ps(x, x);
        let mut q = splat(-5.704_988_7e-3);
        for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
            q = _mm256_fmadd_ps(q, z, splat(c));
        }
        let small = _mm256_fmadd_ps(_mm256_mul_ps(q, z), x, x);
        let big = _mm256_sub_ps(
            splat(1.0),
            _mm256_div_ps(splat(2.0), _mm256_add_ps(e, splat(1.0))),
        );
        // big ≥ 0, so x's sign bit gives −big where x < 0.
        let big = _mm256_or_ps(big, _mm256_and_ps(x, splat(-0.0)));
        let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(a, splat(0.625));
        _mm256_blendv_ps(big, small, is_small)
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
        let (xi, xo, xf, xc) = (
            &x[..hid],
            &x[hid..2 * hid],
            &x[2 * hid..3 * hid],
            &x[3 * hid..],
        );
        let (ri, ro, rf, rc) = (
            &r[..hid],
            &r[hid..2 * hid],
            &r[2 * hid..3 * hid],
            &r[3 * hid..],
        );
        for j in 0..hid {
            let i = sigmoid_with::<FMA>(xi[j] + ri[j]);
            let f = sigmoid_with::<FMA>(xf[j] + rf[j]);
            let g = tanh_with::<FMA>(xc[j] + rc[j]);
            let cn = f * c[j] + i * g;
            c[j] = cn;
            let o = sigmoid_with::<FMA>(xo[j] + ro[j]);
            h[j] = o * tanh_with::<FMA>(cn);
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
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { gru_rows_avx2(hid, x, hr, rbh, h) };
        return;
    }
    gru_rows_with::<false>(hid, x, hr, rbh, h);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gru_rows_avx2(hid: usize, x: &[f32], hr: &[f32], rbh: &[f32], h: &mut [f32]) {
    use std::arch::x86_64::*;
    let lanes = hid / 16 * 16;
    for (x, r, h) in gru_row_sets(hid, x, hr, rbh, h) {
        let (xp, rp) = (x.as_ptr(), r.as_ptr());
        // SAFETY (the closures): callers pass j + 8 ≤ hid and k < 3, inside the rows of
        // x and r (3·hid values) and of h and rbh (hid).
        let ld = |p: *const f32, k: usize, j: usize| unsafe { _mm256_loadu_ps(p.add(k * hid + j)) };
        let pre = |k: usize, j: usize| _mm256_add_ps(ld(xp, k, j), ld(rp, k, j));
        // Two blocks of 8 lanes at once, the exponentials side by side (see
        // `lstm_rows_avx2`).
        for j in (0..lanes).step_by(16) {
            let [ez0, er0, ez1, er1] = v8::exp([
                v8::neg(pre(0, j)),
                v8::neg(pre(1, j)),
                v8::neg(pre(0, j + 8)),
                v8::neg(pre(1, j + 8)),
            ]);
            let arg = |j: usize, er: __m256| {
                let rec = _mm256_add_ps(ld(rp, 2, j), ld(rbh.as_ptr(), 0, j));
                _mm256_add_ps(ld(xp, 2, j), _mm256_mul_ps(v8::sigmoid_of(er), rec))
            };
            let (a0, a1) = (arg(j, er0), arg(j + 8, er1));
            let [en0, en1] = v8::exp([v8::twice_abs(a0), v8::twice_abs(a1)]);
            for (jj, ez, a, en) in [(j, ez0, a0, en0), (j + 8, ez1, a1, en1)] {
                let z = v8::sigmoid_of(ez);
                let n = v8::tanh_of(a, en);
                let hp = h.as_mut_ptr();
                // SAFETY: jj + 8 ≤ hid = h's length.
                unsafe {
                    let old = _mm256_loadu_ps(hp.add(jj));
                    let one_z = _mm256_sub_ps(_mm256_set1_ps(1.0), z);
                    let new = _mm256_add_ps(_mm256_mul_ps(one_z, n), _mm256_mul_ps(z, old));
                    _mm256_storeu_ps(hp.add(jj), new);
                }
            }
        }
        for j in lanes..hid {
            let at = |v: &[f32], k: usize| v[k * hid + j];
            let z = sigmoid_with::<true>(at(x, 0) + at(r, 0));
            let rg = sigmoid_with::<true>(at(x, 1) + at(r, 1));
            let n = tanh_with::<true>(at(x, 2) + rg * (at(r, 2) + rbh[j]));
            h[j] = (1.0 - z) * n + z * h[j];
        }
    }
}

#[inline(always)]
fn gru_rows_with<const FMA: bool>(hid: usize, x: &[f32], hr: &[f32], rbh: &[f32], h: &mut [f32]) {
    let rbh = &rbh[..hid];
    for (x, r, h) in gru_row_sets(hid, x, hr, rbh, h) {
        let (xz, xr, xh) = (&x[..hid], &x[hid..2 * hid], &x[2 * hid..]);
        let (rz, rr, rh) = (&r[..hid], &r[hid..2 * hid], &r[2 * hid..]);
        for j in 0..hid {
            let z = sigmoid_with::<FMA>(xz[j] + rz[j]);
            let r = sigmoid_with::<FMA>(xr[j] + rr[j]);
            let n = tanh_with::<FMA>(xh[j] + r * (rh[j] + rbh[j]));
            h[j] = (1.0 - z) * n + z * h[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_functions_match_std_to_a_few_ulp() {
        let mut worst = (0.0f64, 0.0f64, 0.0f64);
        let mut x = -30.0f32;
        while x < 30.0 {
            let (e, s, t) = (exp(x.min(80.0)) as f64, sigmoid(x) as f64, tanh(x) as f64);
            let (e0, s0, t0) = (
                (x.min(80.0) as f64).exp(),
                1.0 / (1.0 + (-(x as f64)).exp()),
                (x as f64).tanh(),
            );
            worst.0 = worst.0.max(((e - e0) / e0).abs());
            worst.1 = worst.1.max(((s - s0) / s0).abs());
            worst.2 = worst.2.max(if t0 == 0.0 {
                t.abs()
            } else {
                ((t - t0) / t0).abs()
            });
            x += 0.000_731;
        }
        assert!(
            worst.0 < 4e-7 && worst.1 < 4e-7 && worst.2 < 4e-7,
            "relative errors {worst:?}"
        );
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert!(sigmoid(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
    }

    #[test]
    fn slice_functions_match_std_to_a_few_ulp() {
        // The slice functions run the FMA variant on CPUs with AVX2/FMA.
        let xs: Vec<f32> = (0..82_000).map(|i| -30.0 + i as f32 * 0.000_731).collect();
        let (mut s, mut t) = (xs.clone(), xs.clone());
        sigmoid_slice(&mut s);
        tanh_slice(&mut t);
        for ((&x, &sv), &tv) in xs.iter().zip(&s).zip(&t) {
            let s0 = 1.0 / (1.0 + (-(x as f64)).exp());
            let t0 = (x as f64).tanh();
            assert!(
                ((sv as f64 - s0) / s0).abs() < 4e-7,
                "sigmoid({x}) = {sv}, not {s0}"
            );
            let te = if t0 == 0.0 {
                (tv as f64).abs()
            } else {
                ((tv as f64 - t0) / t0).abs()
            };
            assert!(te < 4e-7, "tanh({x}) = {tv}, not {t0}");
        }
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
    }
}
