//! The Keras guide "Working with RNNs", built-in RNN layers: an `Embedding`, an `LSTM`
//! and a `Dense` head in a `Sequential` model.
//!
//! ```python
//! model = keras.Sequential()
//! model.add(layers.Embedding(input_dim=1000, output_dim=64))
//! model.add(layers.LSTM(128))
//! model.add(layers.Dense(10))
//! model.summary()
//! ```

use cellgraph::ir::Tensor;
use cellgraph::keras::{Dense, Embedding, Input, KerasError, Sequential, LSTM};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), KerasError> {
    let mut model = Sequential::new();
    model.add(Input::new(&[None]))?;
    model.add(Embedding::new(1000, 64))?;
    model.add(LSTM::new(128))?;
    model.add(Dense::new(10))?;
    print!("{}", model.summary());

    // A batch of 2 sequences of 5 token ids.
    let ids = ArrayD::from_shape_vec(IxDyn(&[2, 5]), vec![1, 5, 42, 7, 999, 3, 3, 0, 12, 64])
        .map_err(|e| KerasError::Internal(e.to_string()))?;
    let logits = model.predict(&[Tensor::I32(ids)])?;
    println!("logits shape: {:?}", logits[0].shape());
    Ok(())
}
