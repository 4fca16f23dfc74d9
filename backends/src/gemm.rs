//! The one GEMM entry point every matrix product goes through, so the implementation
//! behind it can be swapped and measured. Today: the `matrixmultiply` crate.

/// `C = alpha·A·B + beta·C` for row/column-strided f32 matrices: A is m×k, B is k×n,
/// C is m×n. Strides are in elements.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: isize,
    csa: isize,
    b: &[f32],
    rsb: isize,
    csb: isize,
    beta: f32,
    c: &mut [f32],
    rsc: isize,
    csc: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        extent(m, k, rsa, csa) <= a.len()
            && extent(k, n, rsb, csb) <= b.len()
            && extent(m, n, rsc, csc) <= c.len(),
        "sgemm operands are too short"
    );
    // SAFETY: the extents of all three strided matrices lie within their slices (checked
    // above), strides are non-negative by construction in this crate, and C does not
    // alias A or B (distinct borrows).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        )
    }
}

/// `C = alpha·A·B + beta·C` for f64; see [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub fn dgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: &[f64],
    rsa: isize,
    csa: isize,
    b: &[f64],
    rsb: isize,
    csb: isize,
    beta: f64,
    c: &mut [f64],
    rsc: isize,
    csc: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        extent(m, k, rsa, csa) <= a.len()
            && extent(k, n, rsb, csb) <= b.len()
            && extent(m, n, rsc, csc) <= c.len(),
        "dgemm operands are too short"
    );
    // SAFETY: as in `sgemm`.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        )
    }
}

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
