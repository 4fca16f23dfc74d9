//! The Keras guide "Working with RNNs", cross-batch statefulness: a stateful `LSTM` reads
//! a long sequence in three parts, then `reset_states()` clears what it carried.
//!
//! ```python
//! paragraph1 = np.random.random((20, 10, 50)).astype(np.float32)
//! paragraph2 = np.random.random((20, 10, 50)).astype(np.float32)
//! paragraph3 = np.random.random((20, 10, 50)).astype(np.float32)
//! lstm_layer = layers.LSTM(64, stateful=True)
//! output = lstm_layer(paragraph1)
//! output = lstm_layer(paragraph2)
//! output = lstm_layer(paragraph3)
//! # reset_states() will reset the cached state to the original initial_state.
//! lstm_layer.reset_states()
//! ```

use cellgraph::keras::{Input, KerasError, Sequential, LSTM};
use ndarray::{concatenate, ArrayD, Axis, IxDyn};

fn paragraph(k: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[20, 10, 50]), |i| {
        let h = (i[0] * 7919 + i[1] * 104_729 + i[2] * 1299 + k * 15_485_863) % 1000;
        h as f32 / 1000.0
    })
}

fn main() -> Result<(), KerasError> {
    let mut model = Sequential::new();
    model.add(Input::batch_shape(&[Some(20), Some(10), Some(50)]))?;
    model.add(LSTM::new(64).stateful(true))?;
    print!("{}", model.summary());

    let (p1, p2, p3) = (paragraph(1), paragraph(2), paragraph(3));
    for p in [&p1, &p2] {
        model.predict_f32(std::slice::from_ref(p))?;
    }
    let stateful = model.predict_f32(std::slice::from_ref(&p3))?;

    // The same LSTM over the whole 30-step sequence at once, with the same weights.
    let mut whole = Sequential::new();
    whole.add(Input::new(&[None, Some(50)]))?;
    whole.add(LSTM::new(64))?;
    whole.set_weights(model.get_weights())?;
    let all = concatenate(Axis(1), &[p1.view(), p2.view(), p3.view()])
        .map_err(|e| KerasError::Internal(e.to_string()))?;
    let once = whole.predict_f32(&[all])?;
    let diff = stateful[0]
        .iter()
        .zip(once[0].iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("max |three stateful calls - one call over the whole sequence| = {diff:e}");

    model.reset_states();
    let h = &model.layer_states("lstm")?[0];
    println!(
        "after reset_states: max |h| = {}",
        h.iter().fold(0f32, |m, v| m.max(v.abs()))
    );
    Ok(())
}
