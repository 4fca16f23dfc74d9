//! The Keras guide "Working with RNNs", RNN layers and cells / performance: the MNIST
//! model once with `LSTM(64)` and once with `RNN(LSTMCell(64))`. Both compute the same
//! function; with the same weights they give the same outputs.
//!
//! ```python
//! if allow_cudnn_kernel:
//!     lstm_layer = keras.layers.LSTM(units, input_shape=(None, input_dim))
//! else:
//!     lstm_layer = keras.layers.RNN(keras.layers.LSTMCell(units), input_shape=(None, input_dim))
//! model = keras.models.Sequential([lstm_layer, keras.layers.BatchNormalization(),
//!                                  keras.layers.Dense(output_size)])
//! ```

use cellgraph::keras::{
    BatchNormalization, Dense, Input, KerasError, LSTMCell, Layer, Model, Sequential, LSTM, RNN,
};
use ndarray::{ArrayD, IxDyn};

fn build(fused_layer: bool) -> Result<Model, KerasError> {
    let rnn: Layer = if fused_layer {
        LSTM::new(64).into()
    } else {
        RNN::new(LSTMCell::new(64)).into()
    };
    Sequential::from_layers(vec![
        Input::new(&[None, Some(28)]).into(),
        rnn,
        BatchNormalization::new().into(),
        Dense::new(10).into(),
    ])
}

fn main() -> Result<(), KerasError> {
    let mut lstm = build(true)?;
    let mut cell = build(false)?;
    print!("{}", lstm.summary());
    print!("{}", cell.summary());
    cell.set_weights(lstm.get_weights())?;

    // Four "images" of 28 rows of 28 pixels in [0, 1).
    let x = ArrayD::from_shape_fn(IxDyn(&[4, 28, 28]), |i| {
        (((i[0] * 31 + i[1] * 7 + i[2] * 3) % 17) as f32) / 17.0
    });
    let a = lstm.predict_f32(std::slice::from_ref(&x))?;
    let b = cell.predict_f32(&[x])?;
    let diff = a[0]
        .iter()
        .zip(b[0].iter())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    println!("max |LSTM - RNN(LSTMCell)| = {diff:e}");
    Ok(())
}
