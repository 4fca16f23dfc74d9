//! The Keras guide "Working with RNNs", last section: a custom cell with nested inputs
//! and states, wrapped in `RNN`, trained for one epoch with Adam, MSE and accuracy.
//!
//! ```python
//! cell = NestedCell(unit_1, unit_2, unit_3)
//! rnn = keras.layers.RNN(cell)
//! input_1 = keras.Input((None, i1))
//! input_2 = keras.Input((None, i2, i3))
//! outputs = rnn((input_1, input_2))
//! model = keras.models.Model([input_1, input_2], outputs)
//! model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
//! model.fit(input_data, target_data, batch_size=batch_size)
//! ```
//!
//! `cargo run --release -p cellgraph --example guide_nested_cell [TIMESTEPS]` (the guide
//! uses 50 steps). It also saves the model, loads it back through the cell registry, and
//! prints how the selector runs the cell.

#[path = "common/nested_cell.rs"]
mod nested_cell;

use cellgraph::ir::{DType, Tensor};
use cellgraph::keras::{
    load_model, CallArgs, CustomRnn, FitOptions, Functional, Input, KerasError, Loss, Metric, Nest,
    Optimizer,
};
use ndarray::{ArrayD, IxDyn};
use nested_cell::NestedCell;

/// Uniform [0, 1) values from a xorshift stream (numpy's `random.random` in the guide).
fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape matches"))
}

fn main() -> Result<(), KerasError> {
    let (unit_1, unit_2, unit_3) = (10, 20, 30);
    let (i1, i2, i3) = (32, 64, 32);
    let (batch_size, num_batches) = (64, 10);
    let timestep: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    nested_cell::register();

    let mut f = Functional::new();
    let input_1 = f.input(Input::new(&[None, Some(i1)]))?;
    let input_2 = f.input(Input::new(&[None, Some(i2), Some(i3)]))?;
    let rnn = f.layer(CustomRnn::new(NestedCell {
        unit_1,
        unit_2,
        unit_3,
    }))?;
    let outputs = f.call_nested(rnn, &Nest::leaves([input_1, input_2]), CallArgs::default())?;
    let mut model = f.build(&[input_1, input_2], &outputs)?;
    model.compile(
        Optimizer::adam(),
        Loss::MeanSquaredError,
        &[Metric::Accuracy],
    );
    print!("{}", model.summary());

    let n = batch_size * num_batches;
    let input_data = [
        random(&[n, timestep, i1], 1),
        random(&[n, timestep, i2, i3], 2),
    ];
    let target_data = [random(&[n, unit_1], 3), random(&[n, unit_2, unit_3], 4)];
    let opts = FitOptions {
        batch_size,
        ..FitOptions::default()
    };
    model.fit_outputs(&input_data, &target_data, &opts)?;

    let sig = [
        (DType::F32, vec![batch_size, timestep, i1]),
        (DType::F32, vec![batch_size, timestep, i2, i3]),
    ];
    for choice in model.recurrent_choices(&sig)? {
        println!("{choice}");
    }

    let dir = std::env::temp_dir().join(format!("cellgraph-nested-{}", std::process::id()));
    model.save(&dir)?;
    let mut loaded = load_model(&dir)?;
    let probe: Vec<Tensor> = input_data
        .iter()
        .map(|t| cellgraph::keras::train::take_rows(t, &[0, 1]))
        .collect::<Result<_, _>>()?;
    let a = model.predict(&probe)?;
    let b = loaded.predict(&probe)?;
    let same = a.iter().zip(&b).all(|(x, y)| x == y);
    println!(
        "saved to {} and loaded back through the cell registry: predictions {}",
        dir.display(),
        if same { "identical" } else { "DIFFER" }
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
