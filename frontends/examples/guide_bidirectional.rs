//! The Keras guide "Working with RNNs", bidirectional RNNs: two stacked
//! `Bidirectional(LSTM)` layers.
//!
//! ```python
//! model = keras.Sequential()
//! model.add(layers.Bidirectional(layers.LSTM(64, return_sequences=True), input_shape=(5, 10)))
//! model.add(layers.Bidirectional(layers.LSTM(32)))
//! model.add(layers.Dense(10))
//! model.summary()
//! ```

use cellgraph::keras::{Bidirectional, Dense, Input, KerasError, Sequential, LSTM};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), KerasError> {
    let mut model = Sequential::new();
    model.add(Input::new(&[Some(5), Some(10)]))?;
    model.add(Bidirectional::new(LSTM::new(64).return_sequences(true)))?;
    model.add(Bidirectional::new(LSTM::new(32)))?;
    model.add(Dense::new(10))?;
    print!("{}", model.summary());

    let x = ArrayD::from_shape_fn(IxDyn(&[3, 5, 10]), |i| ((i[1] * 10 + i[2]) as f32).sin());
    let y = model.predict_f32(&[x])?;
    println!("output shape: {:?}", y[0].shape());
    Ok(())
}
