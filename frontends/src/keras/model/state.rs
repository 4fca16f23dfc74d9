//! A model's state: its layers, weights (Keras order), parameter counts, shapes, the
//! stateful layers' states and the dropout stream.

use super::*;

impl Model {
    /// Restarts the dropout stream for an epoch of `fit` (derived from the model seed).
    pub(crate) fn reseed_dropout(&mut self, epoch: usize) {
        self.rng = rand::SeedableRng::seed_from_u64(crate::keras::init::weight_seed(
            self.seed ^ 0x5EED_D80F,
            epoch,
            2,
        ));
    }

    /// The names of the layers, in order (Sequential models include their Input).
    pub fn layer_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// A layer by name.
    pub fn layer(&self, name: &str) -> Option<&Layer> {
        self.slots.iter().find(|s| s.name == name).map(|s| &s.layer)
    }

    /// The weight variables in Keras's `model.weights` order.
    pub fn weights(&self) -> Vec<&Weight> {
        self.slots.iter().flat_map(|s| &s.weights).collect()
    }

    /// `get_weights()`: the values in Keras order.
    pub fn get_weights(&self) -> Vec<ArrayD<f32>> {
        self.weights()
            .into_iter()
            .map(|w| w.value.clone())
            .collect()
    }

    /// `set_weights(...)`: values in Keras order; every shape must match.
    pub fn set_weights(&mut self, values: Vec<ArrayD<f32>>) -> R<()> {
        let n = self.weights().len();
        if values.len() != n {
            return Err(KerasError::Weights(format!(
                "the model has {n} weights, got {}",
                values.len()
            )));
        }
        for (w, v) in self.weights().into_iter().zip(&values) {
            if w.value.shape() != v.shape() {
                return Err(KerasError::Weights(format!(
                    "{}: expected shape {:?}, got {:?}",
                    w.name,
                    w.value.shape(),
                    v.shape()
                )));
            }
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                return Err(KerasError::Weights(format!(
                    "{}: holds the non-finite value {bad}",
                    w.name
                )));
            }
        }
        let mut it = values.into_iter();
        for s in &mut self.slots {
            for w in &mut s.weights {
                if let Some(v) = it.next() {
                    w.value = v;
                }
            }
        }
        Ok(())
    }

    /// Total, trainable and non-trainable parameter counts.
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let (mut t, mut n) = (0, 0);
        for w in self.weights() {
            if w.trainable {
                t += w.value.len();
            } else {
                n += w.value.len();
            }
        }
        (t + n, t, n)
    }

    /// `count_params()`.
    pub fn count_params(&self) -> usize {
        self.param_counts().0
    }

    /// The shapes of the model outputs, batch first.
    pub fn output_shapes(&self) -> Vec<Shape> {
        self.outputs
            .iter()
            .map(|t| self.tensors[t.0].shape.clone())
            .collect()
    }

    /// The declared shapes of the model inputs, batch first.
    pub fn input_shapes(&self) -> Vec<Shape> {
        self.inputs
            .iter()
            .map(|t| self.tensors[t.0].shape.clone())
            .collect()
    }

    /// The current states of a stateful recurrent layer (`layer.states`): LSTM `[h, c]`,
    /// GRU/SimpleRNN `[h]`; a stateful `Bidirectional` gives forward then backward states.
    /// Zeros before the first call when the batch size is declared.
    pub fn layer_states(&self, layer: &str) -> R<Vec<ArrayD<f32>>> {
        let slot =
            self.slots
                .iter()
                .find(|s| s.name == layer)
                .ok_or_else(|| KerasError::Layer {
                    layer: layer.to_string(),
                    msg: "no layer of this name in the model".into(),
                })?;
        if !slot.layer.is_stateful() {
            return Err(KerasError::Layer {
                layer: layer.to_string(),
                msg: "is not stateful: it keeps no states between calls".into(),
            });
        }
        if let Some(s) = &slot.states {
            return Ok(s.clone());
        }
        let batch = slot
            .built
            .as_ref()
            .and_then(|s| s.first().copied().flatten())
            .ok_or_else(|| KerasError::Layer {
                layer: layer.to_string(),
                msg: "has no states yet: the batch size is unknown until the first call".into(),
            })?;
        Ok(LayerKind::state_sizes(&slot.layer)
            .into_iter()
            .map(|s| ArrayD::zeros(IxDyn(&[batch, s])))
            .collect())
    }

    /// `reset_states()`: every state of every stateful layer back to zeros.
    pub fn reset_states(&mut self) {
        for s in &mut self.slots {
            if let Some(st) = &mut s.states {
                for a in st {
                    a.fill(0.0);
                }
            }
        }
    }
}
