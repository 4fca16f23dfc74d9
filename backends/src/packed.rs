//! f32 GEMM with the right-hand matrix packed once and reused: `C = A·B (+ C)`.
//!
//! The recurrent kernels multiply by the same weights at every time step (and the input
//! projection multiplies thousands of rows by one weight matrix). A general GEMM packs B
//! again on every call; [`PackedB`] packs it once into panels of [`NR`] columns
//! (`k × NR` contiguous, zero-padded), and [`PackedB::gemm`] runs a register-blocked
//! `MR × NR` micro-kernel over them — AVX2/FMA when the CPU has it (checked at run
//! time), portable Rust otherwise. A is read in place (rows at any stride, unit column
//! stride). Work is split over rayon's threads when the product is large enough to pay
//! for it: by column panels when A has few rows (the per-step recurrent product), by
//! row blocks otherwise.

use rayon::prelude::*;

/// Rows of the micro-kernel's tile.
pub const MR: usize = 6;
/// Columns of the micro-kernel's tile (one packed panel).
pub const NR: usize = 16;
/// Rows of A a thread keeps hot in cache while it sweeps all of B's panels.
const MC: usize = 72;
/// The most rows multiplied as one block when a depth chunk of B is larger than
/// [`WIDE_B_BYTES`]: every block streams B's chunk from L3, so one block reads a large B
/// once (a 256-row projection of a 512-unit LSTM reads its 4 MB `Wᵀ` once instead of four
/// times) though its A strips outgrow L2. Measured in one process, alternating per run:
/// W2 inference 2% faster, W3 1%; with taller products in blocks this size too, W2 and
/// W3 training 1% slower, so those keep [`MC`].
const MC_WIDE: usize = 264;
/// Size of B's depth chunk above which rows run in blocks of [`MC_WIDE`].
const WIDE_B_BYTES: usize = 2 << 20;
/// Depth of one pass: a panel's `KC × NR` chunk (32 KiB) stays in L1 or L2 while every
/// row tile reads it; 512 covers the depth of a 512-unit layer in one pass, so C is
/// written once (measured against 256: W2 inference 2–7% faster, training 0–2%).
const KC: usize = 512;
/// How many B rows (of 64 bytes) ahead a panel's first tile prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 8;
/// Matrices below this many values are packed on the calling thread.
const PARALLEL_MIN_PACK: usize = 1 << 18;
/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// B (`k × n`) packed into panels of [`NR`] columns for repeated products `A·B`.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs the `k × n` matrix whose element (p, j) is `b[p·rsb + j·csb]`.
    ///
    /// # Panics
    /// If `b` is too short for these strides.
    pub fn new(k: usize, n: usize, b: &[f32], rsb: usize, csb: usize) -> PackedB {
        if k > 0 && n > 0 {
            assert!(
                (k - 1) * rsb + (n - 1) * csb < b.len(),
                "PackedB: B is too short"
            );
        }
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        let fill = |(p, panel): (usize, &mut [f32])| {
            let (j0, cols) = (p * NR, (n - p * NR).min(NR));
            for (kk, row) in panel.chunks_mut(NR).enumerate() {
                let base = kk * rsb + j0 * csb;
                if csb == 1 {
                    row[..cols].copy_from_slice(&b[base..base + cols]);
                } else {
                    for (j, v) in row[..cols].iter_mut().enumerate() {
                        *v = b[base + j * csb];
                    }
                }
            }
        };
        // `data` holds exactly `panels` panels of k·NR values (none when k = 0).
        let panel_len = (k * NR).max(1);
        if k * n >= PARALLEL_MIN_PACK {
            data.par_chunks_mut(panel_len).enumerate().for_each(fill);
        } else {
            data.chunks_mut(panel_len).enumerate().for_each(fill);
        }
        PackedB { k, n, data }
    }

    /// Rows of B.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of B.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `C[m×n] = A[m×k]·B`, plus the old C when `accumulate`. Row i of A starts at
    /// `a[i·rsa]` (unit column stride); row i of C at `c[i·rsc]`.
    ///
    /// # Panics
    /// If `a` or `c` is too short, or a stride is smaller than a row.
    pub fn gemm(
        &self,
        m: usize,
        a: &[f32],
        rsa: usize,
        c: &mut [f32],
        rsc: usize,
        accumulate: bool,
    ) {
        self.gemm_strided(m, a, rsa, 1, c, rsc, accumulate);
    }

    /// `C[m×n] = A[m×k]·B` (plus the old C when `accumulate`) with A at any strides:
    /// element (i, p) of A is `a[i·rsa + p·csa]` (`rsa = 1, csa = m` reads a stored
    /// transpose). A is copied into the kernel's strips either way.
    ///
    /// # Panics
    /// If `a` or `c` is too short, or C's stride is smaller than a row.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided(
        &self,
        m: usize,
        a: &[f32],
        rsa: usize,
        csa: usize,
        c: &mut [f32],
        rsc: usize,
        accumulate: bool,
    ) {
        let threads = if m * self.n * self.k >= PARALLEL_MIN_MACS {
            rayon::current_num_threads()
        } else {
            1
        };
        self.gemm_threads(threads, m, a, (rsa, csa), c, rsc, accumulate);
    }

    /// [`Self::gemm`] on the calling thread only (for callers that already run on
    /// one of several threads).
    pub fn gemm_serial(
        &self,
        m: usize,
        a: &[f32],
        rsa: usize,
        c: &mut [f32],
        rsc: usize,
        accumulate: bool,
    ) {
        self.gemm_threads(1, m, a, (rsa, 1), c, rsc, accumulate);
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_threads(
        &self,
        threads: usize,
        m: usize,
        a: &[f32],
        (rsa, csa): (usize, usize),
        c: &mut [f32],
        rsc: usize,
        accumulate: bool,
    ) {
        let (k, n) = (self.k, self.n);
        if m == 0 || n == 0 {
            return;
        }
        assert!(
            rsc >= n && (m - 1) * rsc + n <= c.len(),
            "PackedB::gemm: C is too short"
        );
        let c = &mut c[..(m - 1) * rsc + n];
        if k == 0 {
            if !accumulate {
                for row in c.chunks_mut(rsc).take(m) {
                    row[..n].fill(0.0);
                }
            }
            return;
        }
        assert!(
            (m - 1) * rsa + (k - 1) * csa < a.len(),
            "PackedB::gemm: A is too short"
        );
        let panels = n.div_ceil(NR);
        let kernel = Kernel::detect();
        if threads <= 1 {
            block(
                kernel,
                self,
                m,
                a,
                (rsa, csa),
                c.as_mut_ptr(),
                rsc,
                0..panels,
                accumulate,
            );
        } else if m >= MC * threads {
            // Many rows: each thread takes whole row blocks (disjoint slices of C).
            let rows = m.div_ceil(threads).div_ceil(MR) * MR;
            c.par_chunks_mut(rows * rsc)
                .enumerate()
                .for_each(|(t, cc)| {
                    let r0 = t * rows;
                    let mm = rows.min(m - r0);
                    block(
                        kernel,
                        self,
                        mm,
                        &a[r0 * rsa..],
                        (rsa, csa),
                        cc.as_mut_ptr(),
                        rsc,
                        0..panels,
                        accumulate,
                    );
                });
        } else {
            // Few rows: each thread takes a contiguous range of column panels.
            let per = panels.div_ceil(threads);
            let cp = SendPtr(c.as_mut_ptr());
            (0..threads).into_par_iter().for_each(|t| {
                let lo = (t * per).min(panels);
                let hi = ((t + 1) * per).min(panels);
                let cp = &cp;
                block(
                    kernel,
                    self,
                    m,
                    a,
                    (rsa, csa),
                    cp.0,
                    rsc,
                    lo..hi,
                    accumulate,
                );
            });
        }
    }
}

/// A pointer to C shared by threads that write disjoint column ranges of it.
struct SendPtr(*mut f32);
// SAFETY: the threads given a `SendPtr` write disjoint column ranges of C (checked in
// bounds by `PackedB::gemm`), and `par_iter` joins them before C's borrow ends.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

/// Rows `0..m` of A times panels `panels` of B into C (C's rows at stride `rsc` from
/// `c`). Depth is cut into chunks of [`KC`] so a panel's chunk stays close (L1 or L2)
/// while every row tile reads it, and rows into chunks of [`MC`] (or [`MC_WIDE`]) whose A values are copied into
/// strips of [`MR`] rows, depth-major (the micro-kernel then reads one contiguous stream
/// of A, which stays in L2 while every panel passes).
#[allow(clippy::too_many_arguments)]
fn block(
    kernel: Kernel,
    b: &PackedB,
    m: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    c: *mut f32,
    rsc: usize,
    panels: std::ops::Range<usize>,
    acc: bool,
) {
    A_STRIPS.with_borrow_mut(|strips| {
        let (k, n) = (b.k, b.n);
        for k0 in (0..k).step_by(KC) {
            let kc = (k - k0).min(KC);
            let acc = acc || k0 > 0;
            let mc = if m <= MC_WIDE && kc * n * std::mem::size_of::<f32>() > WIDE_B_BYTES {
                MC_WIDE
            } else {
                MC
            };
            for r0 in (0..m).step_by(mc) {
                let r1 = (r0 + mc).min(m);
                pack_a(strips, &a[r0 * rsa + k0 * csa..], (rsa, csa), r1 - r0, kc);
                for p in panels.clone() {
                    let bp = &b.data[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR];
                    let cols = (n - p * NR).min(NR);
                    // The panel's first tile reads B from L3 a few rows ahead; the second
                    // brings the next panel's chunk in meanwhile, so the next first tile
                    // finds it close (the address may pass B's end: prefetches never
                    // fault). Later tiles read B from L1 and prefetch what is there.
                    #[cfg(target_arch = "x86_64")]
                    let ahead = bp.as_ptr().wrapping_add(PREFETCH_ROWS * NR);
                    #[cfg(target_arch = "x86_64")]
                    let next = b.data.as_ptr().wrapping_add((p + 1) * k * NR + k0 * NR);
                    for (s, i) in (r0..r1).step_by(MR).enumerate() {
                        let rows = (r1 - i).min(MR);
                        let ai = &strips[s * MR * kc..(s + 1) * MR * kc];
                        #[cfg(target_arch = "x86_64")]
                        let pf = if s == 1 { next } else { ahead };
                        // SAFETY: rows i..i+rows and columns p·NR..p·NR+cols of C lie
                        // inside the slice `PackedB::gemm` checked; no other thread
                        // writes these columns of these rows.
                        let ci = unsafe { c.add(i * rsc + p * NR) };
                        match kernel {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2
                            // and FMA; the strip holds kc·MR values, bp kc·NR.
                            Kernel::Avx2 => unsafe {
                                avx2::tile(kc, ai, rows, bp, pf, ci, rsc, cols, acc)
                            },
                            Kernel::Portable => unsafe {
                                portable_tile(kc, ai, rows, bp, ci, rsc, cols, acc)
                            },
                        }
                    }
                }
            }
        }
    });
}

thread_local! {
    /// Each thread's copy of the A block it is multiplying (see [`pack_a`]).
    static A_STRIPS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies `rows × kc` values of A (element (i, p) at `a[i·rsa + p·csa]`) into
/// `strips`: strip s holds rows `s·MR..s·MR+MR`, value (i, p) at
/// `s·MR·kc + p·MR + i − s·MR`. A last short strip is zero-padded to MR rows.
fn pack_a(strips: &mut Vec<f32>, a: &[f32], (rsa, csa): (usize, usize), rows: usize, kc: usize) {
    let len = rows.div_ceil(MR) * MR * kc;
    if strips.len() < len {
        strips.resize(len, 0.0);
    }
    for (s, strip) in strips[..len].chunks_mut(MR * kc).enumerate() {
        let r = (rows - s * MR).min(MR);
        let a = &a[s * MR * rsa..];
        if csa == 1 && r == MR {
            // Rows are contiguous: six read streams, one contiguous write.
            let rows: [&[f32]; MR] = std::array::from_fn(|i| &a[i * rsa..i * rsa + kc]);
            for (p, dst) in strip.chunks_exact_mut(MR).enumerate() {
                for (d, row) in dst.iter_mut().zip(&rows) {
                    *d = row[p];
                }
            }
        } else if rsa == 1 && r == MR {
            // A stored transposed: the strip's rows are contiguous at each depth.
            for (p, dst) in strip.chunks_exact_mut(MR).enumerate() {
                dst.copy_from_slice(&a[p * csa..p * csa + MR]);
            }
        } else {
            // Any other strides (or a short strip): element by element.
            for (p, dst) in strip.chunks_mut(MR).enumerate() {
                for (i, d) in dst[..r].iter_mut().enumerate() {
                    *d = a[i * rsa + p * csa];
                }
            }
        }
        if r < MR {
            for dst in strip.chunks_mut(MR) {
                dst[r..].fill(0.0);
            }
        }
    }
}

/// One `rows × cols` tile (rows ≤ MR, cols ≤ NR) in plain Rust.
///
/// # Safety
/// `c` must be valid for writes of `rows` rows of `cols` values at stride `rsc`.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile(
    k: usize,
    a: &[f32],
    rows: usize,
    bp: &[f32],
    c: *mut f32,
    rsc: usize,
    cols: usize,
    acc: bool,
) {
    let mut t = [[0f32; NR]; MR];
    for p in 0..k {
        let brow = &bp[p * NR..(p + 1) * NR];
        for (i, ti) in t.iter_mut().enumerate().take(rows) {
            let av = a[p * MR + i];
            for (x, &bv) in ti.iter_mut().zip(brow) {
                *x += av * bv;
            }
        }
    }
    for (i, ti) in t.iter().enumerate().take(rows) {
        for (j, &v) in ti.iter().enumerate().take(cols) {
            // SAFETY: in bounds by the caller's contract.
            let dst = unsafe { &mut *c.add(i * rsc + j) };
            *dst = if acc { *dst + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};

    use std::arch::x86_64::*;

    /// One `rows × cols` tile (rows ≤ MR, cols ≤ NR): dispatches to the kernel for
    /// exactly that many rows, so a short last tile does only its own work. At depth p
    /// it prefetches the 64 bytes at `pf + p·NR` (any address: prefetches never fault).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `c` must be valid for writes of `rows` rows of
    /// `cols` values at stride `rsc`; `a` is a strip of `k·MR` values (see `pack_a`);
    /// `bp` holds `k·NR` values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        k: usize,
        a: &[f32],
        rows: usize,
        bp: &[f32],
        pf: *const f32,
        c: *mut f32,
        rsc: usize,
        cols: usize,
        acc: bool,
    ) {
        debug_assert!((1..=MR).contains(&rows) && bp.len() >= k * NR);
        debug_assert!(a.len() >= k * MR);
        match rows {
            6 => tile_rows::<6>(k, a, bp, pf, c, rsc, cols, acc),
            5 => tile_rows::<5>(k, a, bp, pf, c, rsc, cols, acc),
            4 => tile_rows::<4>(k, a, bp, pf, c, rsc, cols, acc),
            3 => tile_rows::<3>(k, a, bp, pf, c, rsc, cols, acc),
            2 => tile_rows::<2>(k, a, bp, pf, c, rsc, cols, acc),
            _ => tile_rows::<1>(k, a, bp, pf, c, rsc, cols, acc),
        }
    }

    /// An `R × cols` tile with `2·R` ymm accumulators.
    ///
    /// # Safety
    /// As [`tile`], with `rows = R`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile_rows<const R: usize>(
        k: usize,
        a: &[f32],
        bp: &[f32],
        pf: *const f32,
        c: *mut f32,
        rsc: usize,
        cols: usize,
        acc: bool,
    ) {
        let ap = a.as_ptr();
        let b = bp.as_ptr();
        if acc {
            // C is read at the end: start fetching it now (it may have left the caches
            // since the previous depth chunk added to it).
            for i in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * rsc + NR - 1) as *const i8);
            }
        }
        let mut t = [[_mm256_setzero_ps(); 2]; R];
        // One depth step: a prefetch (see `block`), then B's row p times A's column p
        // into `acc`.
        let step = |p: usize, acc: &mut [[__m256; 2]; R]| {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(p * NR) as *const i8);
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (i, ti) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ap.add(p * MR + i));
                ti[0] = _mm256_fmadd_ps(x, b0, ti[0]);
                ti[1] = _mm256_fmadd_ps(x, b1, ti[1]);
            }
        };
        if R <= 3 {
            // Few rows give too few independent sums to hide the FMA latency: even and
            // odd depths go to separate accumulators, added at the end.
            let mut u = [[_mm256_setzero_ps(); 2]; R];
            for p in (0..k - k % 2).step_by(2) {
                step(p, &mut t);
                step(p + 1, &mut u);
            }
            if k % 2 == 1 {
                step(k - 1, &mut t);
            }
            for (ti, ui) in t.iter_mut().zip(&u) {
                ti[0] = _mm256_add_ps(ti[0], ui[0]);
                ti[1] = _mm256_add_ps(ti[1], ui[1]);
            }
        } else {
            for p in 0..k {
                step(p, &mut t);
            }
        }
        for (i, ti) in t.iter().enumerate() {
            let dst = c.add(i * rsc);
            if cols == NR {
                let (mut v0, mut v1) = (ti[0], ti[1]);
                if acc {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(dst));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(dst.add(8)));
                }
                _mm256_storeu_ps(dst, v0);
                _mm256_storeu_ps(dst.add(8), v1);
            } else {
                let mut buf = [0f32; NR];
                _mm256_storeu_ps(buf.as_mut_ptr(), ti[0]);
                _mm256_storeu_ps(buf.as_mut_ptr().add(8), ti[1]);
                for (j, &v) in buf.iter().enumerate().take(cols) {
                    let d = &mut *dst.add(j);
                    *d = if acc { *d + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        (rsa, csa): (usize, usize),
        b: &[f32],
        rsb: usize,
        csb: usize,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * rsa + p * csa] as f64 * b[p * rsb + j * csb] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_ragged_shapes_threads_and_transposes() {
        let shapes = [
            (1, 1, 1),
            (2, 9, 20),
            (33, 37, 48),
            (32, 301, 64),
            (5, 3, 17),
            (7, 33, 40),
            (64, 64, 256),
            (13, 100, 1000),
            (300, 40, 50),
            (64, 512, 2048),
            // A first depth chunk of B over `WIDE_B_BYTES`: rows in one tall block.
            (150, 520, 1040),
        ];
        for (m, k, n) in shapes {
            for (trans, trans_a, accumulate) in (0..8).map(|f| (f & 1 == 1, f & 2 == 2, f & 4 == 4))
            {
                // A with padded rows, or stored transposed with padded columns.
                let (rsa, csa, alen) = if trans_a {
                    (1, m + 2, k * (m + 2))
                } else {
                    (k + 2, 1, m * (k + 2))
                };
                let a: Vec<f32> = (0..alen)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                    .collect();
                let (rsb, csb) = if trans { (1, k) } else { (n, 1) };
                let packed = PackedB::new(k, n, &b, rsb, csb);
                let rsc = n + 3;
                let mut c: Vec<f32> = (0..m * rsc).map(|i| (i % 5) as f32).collect();
                let before = c.clone();
                if trans_a {
                    packed.gemm_strided(m, &a, rsa, csa, &mut c, rsc, accumulate);
                } else {
                    packed.gemm(m, &a, rsa, &mut c, rsc, accumulate);
                }
                let want = naive(m, k, n, &a, (rsa, csa), &b, rsb, csb);
                for i in 0..m {
                    for j in 0..rsc {
                        let got = c[i * rsc + j];
                        let w = if j >= n {
                            before[i * rsc + j]
                        } else if accumulate {
                            want[i * n + j] + before[i * rsc + j]
                        } else {
                            want[i * n + j]
                        };
                        assert!((got - w).abs() <= 1e-3 * (1.0 + w.abs()), "{m}x{k}x{n} trans={trans} trans_a={trans_a} acc={accumulate} ({i},{j}): {got} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_kernel_matches_too() {
        let (m, k, n) = (11, 9, 35);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let packed = PackedB::new(k, n, &b, n, 1);
        let mut c = vec![0f32; m * n];
        block(
            Kernel::Portable,
            &packed,
            m,
            &a,
            (k, 1),
            c.as_mut_ptr(),
            n,
            0..n.div_ceil(NR),
            false,
        );
        assert_eq!(c, naive(m, k, n, &a, (k, 1), &b, n, 1));
    }
}
