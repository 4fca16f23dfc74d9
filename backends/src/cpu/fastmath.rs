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
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    unsafe { $avx(v) };
                    return;
                }
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
}
