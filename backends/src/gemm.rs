//! The one GEMM entry point every matrix product goes through, so the implementation
//! behind it can be swapped and measured. Today: the `matrixmultiply` crate.

macro_rules! strided_gemm {
    ($(#[$doc:meta])* $name:ident, $t:ty, $imp:path) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name(m: usize, k: usize, n: usize, alpha: $t, a: &[$t], rsa: isize, csa: isize, b: &[$t], rsb: isize, csb: isize, beta: $t, c: &mut [$t], rsc: isize, csc: isize) {
            if m == 0 || n == 0 {
                return;
            }
            assert!(
                extent(m, k, rsa, csa) <= a.len() && extent(k, n, rsb, csb) <= b.len() && extent(m, n, rsc, csc) <= c.len(),
                concat!(stringify!($name), " operands are too short")
            );
            // SAFETY: the extents of all three strided matrices lie within their slices
            // (checked above), strides are non-negative (checked by `extent`), and C does
            // not alias A or B (distinct borrows).
            unsafe { $imp(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), rsc, csc) }
        }
    };
}

strided_gemm!(
    /// `C = alpha·A·B + beta·C` for row/column-strided f32 matrices: A is m×k, B is k×n,
    /// C is m×n. Strides are in elements.
    sgemm,
    f32,
    matrixmultiply::sgemm
);
strided_gemm!(
    /// `C = alpha·A·B + beta·C` for f64; see [`sgemm`].
    dgemm,
    f64,
    matrixmultiply::dgemm
);

/// One past the largest element offset a rows×cols matrix with these strides touches.
fn extent(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    assert!(rs >= 0 && cs >= 0, "negative strides are not supported");
    (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1
}

/// Row-major `C[m×n] (+)= A[m×k] · B[k×n]`, with optional transposes of A and B.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_rm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    let (rsa, csa) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (rsb, csb) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    sgemm(
        m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, n as isize, 1,
    );
}
