//! Measures the GEMM candidates on the recurrent shapes: `matrixmultiply` (threads from
//! `MATMUL_NUM_THREADS`) and the `gemm` crate (1 and 2 threads), median GFLOP/s. Run:
//! `MATMUL_NUM_THREADS=2 cargo run --release -p cellgraph-backends --example gemm_compare`.

use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let shapes = [
        (64usize, 1024usize, 2048usize),
        (64, 92, 256),
        (64, 64, 256),
        (64, 512, 2048),
        (6400, 512, 2048),
        (512, 512, 512),
    ];
    // `GEMM_SHAPES=64x512x2048,512x512x512` replaces the list.
    let custom: Vec<(usize, usize, usize)> = std::env::var("GEMM_SHAPES")
        .map(|v| {
            v.split(',')
                .filter_map(|s| {
                    let d: Vec<usize> = s.split('x').filter_map(|x| x.parse().ok()).collect();
                    (d.len() == 3).then(|| (d[0], d[1], d[2]))
                })
                .collect()
        })
        .unwrap_or_default();
    let shapes = if custom.is_empty() {
        shapes.to_vec()
    } else {
        custom
    };
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01)
            .collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let runs = if flops > 1e10 { 5 } else { 100 };
        let mut cols = Vec::new();
        let mm = time(runs, || unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        });
        cols.push(flops / mm / 1e9);
        for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
            let t = time(runs, || unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            });
            cols.push(flops / t / 1e9);
        }
        // cellgraph's packed-B kernel: B packed once (as the recurrent kernels do), then
        // timed products only; rayon's threads (RAYON_NUM_THREADS).
        let packed = cellgraph_backends::packed::PackedB::new(k, n, &b, n, 1);
        let t = time(runs, || packed.gemm(m, &a, k, &mut c, n, false));
        cols.push(flops / t / 1e9);
        println!(
            "{m}x{k}x{n} matrixmultiply(MATMUL_NUM_THREADS={}) {:.0} gemm-1t {:.0} gemm-2t {:.0} packed({}t) {:.0} GFLOP/s",
            std::env::var("MATMUL_NUM_THREADS").unwrap_or_else(|_| "default".into()),
            cols[0],
            cols[1],
            cols[2],
            rayon::current_num_threads(),
            cols[3]
        );
    }
}
