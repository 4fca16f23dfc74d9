//! A GRU cell built by hand as a `Scan` with the graph builder, differentiated with
//! `autodiff::grad`, run on a chosen backend list and exported to ONNX.
//!
//! ```sh
//! cargo run --release --example gru_scan_by_hand            # on the CPU
//! cargo run --release --example gru_scan_by_hand -- subset  # the subset backend, then the CPU
//! ```
//!
//! The cell is ONNX's GRU (gates z, r, h; reset before the recurrent product):
//! `z = σ(x·Wz + h·Rz + bz)`, `r = σ(x·Wr + h·Rr + br)`,
//! `ĥ = tanh(x·Wh + (r⊙h)·Rh + bh)`, `h' = (1 − z)⊙ĥ + z⊙h`.
//! The loss is `Σ y²` over the sequence of states `y`. The example prints the loss, the
//! gradient of one weight against a central finite difference, where each node ran, and
//! the ONNX file it wrote.

use cellgraph::autodiff::grad;
use cellgraph::backends::cpu::CpuBackend;
use cellgraph::backends::subset::SubsetBackend;
use cellgraph::backends::{Data, Device, PlacedPlan, Plan};
use cellgraph::ir::builder::Builder;
use cellgraph::ir::onnx::Model;
use cellgraph::ir::{DType, Graph, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;

const T: usize = 6;
const N: usize = 2;
const I: usize = 3;
const H: usize = 4;

/// The weights' names and shapes: input kernels, recurrent kernels, biases per gate.
const WEIGHTS: [(&str, [usize; 2]); 9] = [
    ("Wz", [I, H]),
    ("Wr", [I, H]),
    ("Wh", [I, H]),
    ("Rz", [H, H]),
    ("Rr", [H, H]),
    ("Rh", [H, H]),
    ("bz", [1, H]),
    ("br", [1, H]),
    ("bh", [1, H]),
];

fn f32_type(shape: &[usize]) -> ValueType {
    let d: Vec<u64> = shape.iter().map(|&n| n as u64).collect();
    ValueType::tensor(DType::F32, &d)
}

/// One step: (h, x_t) → (h', h'), reading the weights from the enclosing graph.
fn cell(opsets: &std::collections::BTreeMap<String, i64>) -> cellgraph::ir::Result<Graph> {
    let mut body = Graph::with_opsets("gru_cell", opsets.clone());
    let mut b = Builder::new(&mut body, "cell");
    let h = b.input("h", f32_type(&[N, H]))?;
    let x = b.input("x_t", f32_type(&[N, I]))?;
    let mut w = std::collections::HashMap::new();
    for (name, shape) in WEIGHTS {
        w.insert(name, b.outer(name, f32_type(&shape))?);
    }
    let gate = |b: &mut Builder<'_>, wx: &str, rh: ValueRef, rk: &str, bias: &str| {
        let a = b.matmul(x, w[wx])?;
        let c = b.matmul(rh, w[rk])?;
        let s = b.add(a, c)?;
        b.add(s, w[bias])
    };
    let z = gate(&mut b, "Wz", h, "Rz", "bz")?;
    let z = b.sigmoid(z)?;
    let r = gate(&mut b, "Wr", h, "Rr", "br")?;
    let r = b.sigmoid(r)?;
    let rh = b.mul(r, h)?;
    let hh = gate(&mut b, "Wh", rh, "Rh", "bh")?;
    let hh = b.tanh(hh)?;
    let one = b.scalar(DType::F32, 1.0)?;
    let keep = b.sub(one, z)?;
    let new = b.mul(keep, hh)?;
    let old = b.mul(z, h)?;
    let h2 = b.add(new, old)?;
    // A Scan body lists a value once among its outputs: the sequence output is a copy.
    let y = b.op(cellgraph::ir::Op::Identity {}, &[h2], "y")?;
    b.outputs(&[h2, y])?;
    Ok(body)
}

/// The model: x `[T, N, I]` and the weights as inputs; outputs the loss and the states.
fn model() -> cellgraph::ir::Result<(Graph, ValueRef, Vec<ValueRef>)> {
    let mut g = Graph::new("gru_by_hand");
    let opsets = g.opsets().clone();
    let body = cell(&opsets)?;
    let mut b = Builder::new(&mut g, "gru");
    let x = b.input("x", f32_type(&[T, N, I]))?;
    let mut weights = Vec::new();
    for (name, shape) in WEIGHTS {
        weights.push(b.input(name, f32_type(&shape))?);
    }
    let h0 = b.constant(Tensor::zeros(DType::F32, &[N, H]), "h0")?;
    let outs = b.scan(body, &[h0], &[x], false)?;
    let y = outs[1];
    let sq = b.mul(y, y)?;
    let loss = b.reduce_sum(sq, &[0, 1, 2], false)?;
    b.outputs(&[loss, y])?;
    Ok((g, loss, weights))
}

fn data(shape: &[usize], seed: u32) -> Data {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    Data::Tensor(Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape"),
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = std::env::args().nth(1).unwrap_or_else(|| "cpu".into());
    let mut list: Vec<Arc<dyn Device>> = match backend.as_str() {
        "cpu" => Vec::new(),
        "subset" => vec![Arc::new(SubsetBackend)],
        other => return Err(format!("unknown backend {other:?} (cpu or subset)").into()),
    };
    list.push(Arc::new(CpuBackend::default()));

    let (g, loss, weights) = model()?;
    cellgraph::ir::verify(&g)?;
    // d loss / d every weight: the graph returns loss, y, then the nine gradients.
    let dg = grad(&g, loss, &weights)?;
    let mut plan = PlacedPlan::compile(&dg, list.clone())?;
    let mut inputs = vec![data(&[T, N, I], 1)];
    for (k, (_, shape)) in WEIGHTS.iter().enumerate() {
        inputs.push(data(shape, 7 + k as u32));
    }
    let outs = plan.run(inputs.clone())?;
    let loss_value = outs[0].tensor()?.to_f64_vec()[0];
    println!("loss: {loss_value:.6}");

    // The gradient of Rh[1, 2] against a central difference of the forward graph.
    // Input 6 is Rh (after x and Wz, Wr, Wh, Rz, Rr); its gradient is output 2 + 5.
    let (k, row, col) = (6, 1, 2);
    let idx = row * H + col;
    let analytic = outs[2 + 5].tensor()?.to_f64_vec()[idx];
    let mut forward = PlacedPlan::compile(&g, list)?;
    let mut at = |delta: f32| -> Result<f64, Box<dyn std::error::Error>> {
        let mut ins = inputs.clone();
        if let Data::Tensor(Tensor::F32(a)) = &mut ins[k] {
            a.as_slice_mut().ok_or("contiguous")?[idx] += delta;
        }
        Ok(forward.run(ins)?[0].tensor()?.to_f64_vec()[0])
    };
    let eps = 1e-2;
    let numeric = (at(eps)? - at(-eps)?) / (2.0 * f64::from(eps));
    println!("d loss / d Rh[1,2]: {analytic:.6} (central difference: {numeric:.6})");

    let on: Vec<String> = plan
        .placement()
        .iter()
        .filter(|p| p.backend != "cpu")
        .map(|p| format!("{} ({})", p.node, p.op))
        .collect();
    println!(
        "backends {:?}: parts {:?}; {} node(s) off the cpu{}; copies {:?}",
        backend,
        plan.parts(),
        on.len(),
        if on.is_empty() {
            String::new()
        } else {
            format!(": {}", on.join(", "))
        },
        plan.transfers()
    );

    let path = std::env::temp_dir().join("gru_by_hand.onnx");
    Model::new(g).save(&path)?;
    let back = Model::load(&path)?;
    println!(
        "wrote {} ({} ops; it imports back)",
        path.display(),
        back.graph.op_count()
    );
    Ok(())
}
