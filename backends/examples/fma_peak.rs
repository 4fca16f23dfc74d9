//! The FMA peak of one core: twelve independent AVX2 fused multiply-add chains on
//! registers only (two FMA units with a latency of 4–5 cycles need 8–10 in flight), so
//! the GEMM numbers of `gemm_compare` can be read as a share of what the core can do.
//! Run one copy per core to see the peak of several: `cargo run --release -p
//! cellgraph-backends --example fma_peak`.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (x, y) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, x, y);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for a in acc {
        sum = _mm256_add_ps(sum, a);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out[0]
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            println!("this CPU has no AVX2/FMA");
            return;
        }
        let iters = 200_000_000;
        let t = std::time::Instant::now();
        // SAFETY: AVX2 and FMA were detected above.
        let r = unsafe { chains(iters) };
        let s = t.elapsed().as_secs_f64();
        // 12 chains × 8 lanes × 2 FLOPs per FMA.
        let gflops = (iters * 12 * 16) as f64 / s / 1e9;
        println!("FMA peak, one core: {gflops:.1} GFLOP/s (checksum {r:.1})");
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("fma_peak measures x86-64 AVX2/FMA only");
}
