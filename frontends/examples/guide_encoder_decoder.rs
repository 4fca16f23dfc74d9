//! The Keras guide "Working with RNNs", returning states: the encoder's final `[h, c]`
//! is the decoder's `initial_state` in a functional model with two inputs.
//!
//! ```python
//! encoder_input = layers.Input(shape=(None,))
//! encoder_embedded = layers.Embedding(input_dim=1000, output_dim=64)(encoder_input)
//! output, state_h, state_c = layers.LSTM(64, return_state=True, name="encoder")(encoder_embedded)
//! encoder_state = [state_h, state_c]
//! decoder_input = layers.Input(shape=(None,))
//! decoder_embedded = layers.Embedding(input_dim=2000, output_dim=64)(decoder_input)
//! decoder_output = layers.LSTM(64, name="decoder")(decoder_embedded, initial_state=encoder_state)
//! output = layers.Dense(10)(decoder_output)
//! model = keras.Model([encoder_input, decoder_input], output)
//! model.summary()
//! ```

use cellgraph::ir::Tensor;
use cellgraph::keras::{CallArgs, Dense, Embedding, Functional, Input, KerasError, LSTM};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), KerasError> {
    let mut f = Functional::new();
    let encoder_input = f.input(Input::new(&[None]))?;
    let encoder_embedded = f.apply(Embedding::new(1000, 64), &[encoder_input])?[0];
    let enc = f.apply(
        LSTM::new(64).return_state(true).name("encoder"),
        &[encoder_embedded],
    )?;
    let encoder_state = vec![enc[1], enc[2]];

    let decoder_input = f.input(Input::new(&[None]))?;
    let decoder_embedded = f.apply(Embedding::new(2000, 64), &[decoder_input])?[0];
    let decoder = f.layer(LSTM::new(64).name("decoder"))?;
    let decoder_output = f.call_with(
        decoder,
        &[decoder_embedded],
        CallArgs {
            initial_state: encoder_state,
            mask: None,
        },
    )?[0];
    let output = f.apply(Dense::new(10), &[decoder_output])?[0];
    let mut model = f.build(&[encoder_input, decoder_input], &[output])?;
    print!("{}", model.summary());

    let ids = |v: Vec<i32>, t: usize| {
        ArrayD::from_shape_vec(IxDyn(&[1, t]), v).map_err(|e| KerasError::Internal(e.to_string()))
    };
    let out = model.predict(&[
        Tensor::I32(ids(vec![4, 8, 15], 3)?),
        Tensor::I32(ids(vec![16, 23, 42, 1], 4)?),
    ])?;
    println!("output shape: {:?}", out[0].shape());
    Ok(())
}
