//! Keras's default initializers, seeded: `glorot_uniform` for kernels, `orthogonal` for
//! recurrent kernels, `zeros`/`ones` for biases and normalisation, `uniform(-0.05, 0.05)`
//! for embeddings. The values follow Keras's distributions, not its random stream.

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// How a weight starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// `U(-limit, limit)` with `limit = sqrt(6 / (fan_in + fan_out))`.
    GlorotUniform,
    /// A (semi-)orthogonal matrix from the QR decomposition of a Gaussian one.
    Orthogonal,
    /// `U(-0.05, 0.05)` (Keras's `uniform`, the Embedding default).
    Uniform,
    /// The LSTM bias with `unit_forget_bias`: ones in the f block (the second quarter).
    ForgetBias,
}

/// A seed for weight `index` of layer `layer` of a model seeded with `seed`.
pub fn weight_seed(seed: u64, layer: usize, index: usize) -> u64 {
    // SplitMix64 finaliser over the three numbers: nearby inputs give unrelated streams.
    let mut z = seed
        ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (index as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws a tensor of `shape` from `init` with the given seed.
pub fn init_tensor(init: Init, shape: &[usize], seed: u64) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform => (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect(),
        Init::GlorotUniform => {
            let (fan_in, fan_out) = fans(shape);
            let limit = (6.0 / (fan_in + fan_out).max(1.0)).sqrt() as f32;
            (0..n)
                .map(|_| {
                    if limit > 0.0 {
                        rng.random_range(-limit..limit)
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        Init::Orthogonal => orthogonal(shape, &mut rng),
        Init::ForgetBias => {
            let q = n / 4;
            (0..n)
                .map(|i| if (q..2 * q).contains(&i) { 1.0 } else { 0.0 })
                .collect()
        }
    };
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("length equals the shape's product")
}

fn fans(shape: &[usize]) -> (f64, f64) {
    match shape.len() {
        0 => (1.0, 1.0),
        1 => (shape[0] as f64, shape[0] as f64),
        _ => {
            let receptive: usize = shape[..shape.len() - 2].iter().product();
            (
                (shape[shape.len() - 2] * receptive) as f64,
                (shape[shape.len() - 1] * receptive) as f64,
            )
        }
    }
}

/// Keras's `Orthogonal`: rows = product of all but the last axis, cols = the last axis;
/// QR of a `max × min` Gaussian matrix with the signs of R's diagonal folded into Q,
/// transposed when rows < cols.
fn orthogonal(shape: &[usize], rng: &mut StdRng) -> Vec<f32> {
    let cols = *shape.last().unwrap_or(&1);
    let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
    let (m, n) = (rows.max(cols), rows.min(cols));
    // Column-major m×n Gaussian matrix, orthonormalised by modified Gram-Schmidt, which
    // yields Q with a positive R diagonal: the same Q as Householder QR after the sign fix.
    let mut q: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            (0..m)
                .map(|_| rng.sample::<f64, _>(StandardNormal))
                .collect()
        })
        .collect();
    for j in 0..n {
        for i in 0..j {
            let (done, rest) = q.split_at_mut(j);
            let dot: f64 = done[i].iter().zip(&rest[0]).map(|(a, b)| a * b).sum();
            for (x, y) in rest[0].iter_mut().zip(&done[i]) {
                *x -= dot * y;
            }
        }
        let norm = q[j].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        for x in &mut q[j] {
            *x /= norm;
        }
    }
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            // Q is m×n (columns q[j]); the result is rows×cols: Q itself when rows ≥ cols,
            // else Qᵀ.
            out[r * cols + c] = if rows >= cols { q[c][r] } else { q[r][c] } as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_rows_or_columns_are_orthonormal() {
        for shape in [[8usize, 32], [32, 8], [5, 5]] {
            let a = init_tensor(Init::Orthogonal, &shape, 7);
            let a = a.into_dimensionality::<ndarray::Ix2>().unwrap();
            let g = if shape[0] <= shape[1] {
                a.dot(&a.t())
            } else {
                a.t().dot(&a)
            };
            for ((i, j), v) in g.indexed_iter() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-5, "{shape:?} gram[{i},{j}] = {v}");
            }
        }
    }

    #[test]
    fn glorot_within_limit_and_seeded() {
        let a = init_tensor(Init::GlorotUniform, &[28, 256], 1);
        let limit = (6.0f32 / (28.0 + 256.0)).sqrt();
        assert!(a.iter().all(|v| v.abs() <= limit));
        assert!(a.iter().any(|v| v.abs() > limit / 2.0));
        assert_eq!(a, init_tensor(Init::GlorotUniform, &[28, 256], 1));
        assert_ne!(a, init_tensor(Init::GlorotUniform, &[28, 256], 2));
    }

    #[test]
    fn forget_bias_has_ones_in_the_second_block() {
        let b = init_tensor(Init::ForgetBias, &[8], 0);
        assert_eq!(b.as_slice().unwrap(), &[0., 0., 1., 1., 0., 0., 0., 0.]);
    }
}
