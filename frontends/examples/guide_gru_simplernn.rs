//! The Keras guide "Working with RNNs", outputs and states: a `GRU` returning its whole
//! sequence feeds a `SimpleRNN`.
//!
//! ```python
//! model = keras.Sequential()
//! model.add(layers.Embedding(input_dim=1000, output_dim=64))
//! # The output of GRU will be a 3D tensor of shape (batch_size, timesteps, 256)
//! model.add(layers.GRU(256, return_sequences=True))
//! # The output of SimpleRNN will be a 2D tensor of shape (batch_size, 128)
//! model.add(layers.SimpleRNN(128))
//! model.add(layers.Dense(10))
//! model.summary()
//! ```

use cellgraph::ir::Tensor;
use cellgraph::keras::{Dense, Embedding, Input, KerasError, Sequential, SimpleRNN, GRU};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), KerasError> {
    let mut model = Sequential::new();
    model.add(Input::new(&[None]))?;
    model.add(Embedding::new(1000, 64))?;
    model.add(GRU::new(256).return_sequences(true))?;
    model.add(SimpleRNN::new(128))?;
    model.add(Dense::new(10))?;
    print!("{}", model.summary());

    let ids = ArrayD::from_shape_vec(IxDyn(&[1, 4]), vec![10, 20, 30, 40])
        .map_err(|e| KerasError::Internal(e.to_string()))?;
    let out = model.predict(&[Tensor::I32(ids)])?;
    println!("output shape: {:?}", out[0].shape());
    Ok(())
}
