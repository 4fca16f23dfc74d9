//! Times the CPU's two LSTM forward recurrences on the same inputs, alternating run by
//! run: the inference kernel (`cpu::rnn`, what `LSTM` runs) and the training forward
//! that keeps what the backward reads (`cpu::rnn_grad::forward_saving`). It is why both
//! exist (docs/ARCHITECTURE.md). `cargo run --release -p cellgraph-backends --example
//! forward_paths`.

use cellgraph_backends::cpu::{rnn_grad, CpuBackend};
use cellgraph_backends::{Backend, Data, Plan};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

fn t(shape: &[usize], s: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::F32(
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n)
                .map(|k| (((k as u64 * 2654435761 + s) % 1000) as f32 / 5000.0) - 0.1)
                .collect(),
        )
        .unwrap(),
    )
}
fn main() {
    for (tl, n, i, h, runs) in [
        (28usize, 64usize, 28usize, 64usize, 300usize),
        (100, 64, 512, 512, 10),
    ] {
        let op = Op::LSTM {
            activation_alpha: None,
            activation_beta: None,
            activations: None,
            clip: None,
            direction: "forward".into(),
            hidden_size: Some(h as i64),
            input_forget: 0,
            layout: 0,
        };
        let mut g = Graph::new("l");
        let x = g
            .add_input(
                "x",
                ValueType::tensor(DType::F32, &[tl as u64, n as u64, i as u64]),
            )
            .unwrap();
        let w = g
            .add_input(
                "w",
                ValueType::tensor(DType::F32, &[1, 4 * h as u64, i as u64]),
            )
            .unwrap();
        let r = g
            .add_input(
                "r",
                ValueType::tensor(DType::F32, &[1, 4 * h as u64, h as u64]),
            )
            .unwrap();
        let id = g
            .add_node(
                "lstm",
                op.clone(),
                &[Some(x), Some(w), Some(r)],
                &["y", "yh", "yc"],
            )
            .unwrap();
        g.set_outputs((0..3).map(|s| ValueRef { node: id, slot: s }).collect())
            .unwrap();
        let data = vec![
            Data::Tensor(t(&[tl, n, i], 1)),
            Data::Tensor(t(&[1, 4 * h, i], 2)),
            Data::Tensor(t(&[1, 4 * h, h], 3)),
        ];
        let mut plan = CpuBackend::default().compile(&g).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..2 * runs + 2 {
            let s = Instant::now();
            if round % 2 == 0 {
                plan.run(data.clone()).unwrap();
                a.push(s.elapsed().as_secs_f64() * 1e3);
            } else {
                let ins: Vec<Option<&Data>> = data.iter().map(Some).collect();
                rnn_grad::forward_saving(&op, &ins, &[true, true, true]).unwrap();
                b.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        println!("T{tl} N{n} I{i} H{h}: inference kernel median {:.3} ms min {:.3}; saving forward median {:.3} ms min {:.3}; ratio {:.2}", a[a.len()/2], a[0], b[b.len()/2], b[0], b[b.len()/2]/a[a.len()/2]);
    }
}
