//! The Keras guide "Working with RNNs", RNN state reuse: the states a stateful layer
//! recorded become the `initial_state` of a new layer.
//!
//! ```python
//! lstm_layer = layers.LSTM(64, stateful=True)
//! for s in sub_sequences:
//!     output = lstm_layer(s)
//! existing_state = lstm_layer.states
//! new_lstm_layer = layers.LSTM(64)
//! new_output = new_lstm_layer(paragraph3, initial_state=existing_state)
//! ```

use cellgraph::ir::Tensor;
use cellgraph::keras::{CallArgs, Functional, Input, KerasError, Sequential, LSTM};
use ndarray::{ArrayD, IxDyn};

fn paragraph(k: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[20, 10, 50]), |i| {
        ((i[0] * 13 + i[1] * 7 + i[2] * 3 + k * 101) % 97) as f32 / 97.0
    })
}

fn main() -> Result<(), KerasError> {
    let mut first = Sequential::new();
    first.add(Input::batch_shape(&[Some(20), Some(10), Some(50)]))?;
    first.add(LSTM::new(64).stateful(true))?;
    for k in [1, 2] {
        first.predict_f32(&[paragraph(k)])?;
    }
    let existing_state = first.layer_states("lstm")?;

    let mut f = Functional::with_seed(1);
    let x = f.input(Input::batch_shape(&[Some(20), Some(10), Some(50)]).name("paragraph3"))?;
    let h = f.input(Input::batch_shape(&[Some(20), Some(64)]).name("state_h"))?;
    let c = f.input(Input::batch_shape(&[Some(20), Some(64)]).name("state_c"))?;
    let new_lstm = f.layer(LSTM::new(64).name("new_lstm"))?;
    let out = f.call_with(
        new_lstm,
        &[x],
        CallArgs {
            initial_state: vec![h, c],
            mask: None,
        },
    )?[0];
    let mut second = f.build(&[x, h, c], &[out])?;
    print!("{}", second.summary());

    let mut inputs = vec![Tensor::F32(paragraph(3))];
    inputs.extend(existing_state.into_iter().map(Tensor::F32));
    let new_output = second.predict(&inputs)?;
    println!("new_output shape: {:?}", new_output[0].shape());
    Ok(())
}
