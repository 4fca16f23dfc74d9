//! What building a layer into a model creates: its weights (drawn from the
//! initializers its [`LayerKind::weight_specs`] names, within size limits), and the
//! shape checks of a layer called again. What each layer means is in `keras::layers`.

use super::*;
use crate::keras::layers::kind::LayerKind;

/// Known sizes as a [`Shape`].
pub(super) fn as_shape(size: &[usize]) -> Shape {
    size.iter().map(|&d| Some(d)).collect()
}

pub(super) fn check_same_width(built: &Shape, shape: &Shape) -> Result<(), String> {
    // Keras checks rank and the feature axis; batch and time may differ between calls.
    let ok = built.len() == shape.len();
    let widths_ok = built.last() == shape.last() || built.len() <= 1;
    if ok && widths_ok {
        Ok(())
    } else {
        Err(format!(
            "was built for inputs of shape {}, called on {}",
            shape_str(built),
            shape_str(shape)
        ))
    }
}

/// The weights a layer creates for an input shape, drawn from Keras's initializers.
pub(super) fn build_weights(
    layer: &Layer,
    name: &str,
    input: &Shape,
    seed: Option<u64>,
    slot: usize,
) -> R<Vec<Weight>> {
    let specs = layer
        .weight_specs(name, input)
        .map_err(|msg| KerasError::Layer {
            layer: name.to_string(),
            msg,
        })?;
    // Sizes are checked before anything is allocated (a model file may declare any size).
    let mut total: usize = 0;
    for (wname, shape, _, _) in &specs {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_WEIGHT_ELEMENTS)
            .ok_or_else(|| KerasError::Layer {
                layer: name.to_string(),
                msg: format!(
                    "weight {wname} of shape {shape:?} exceeds the limit of {MAX_WEIGHT_ELEMENTS} elements"
                ),
            })?;
        total = total.saturating_add(n);
    }
    if total > MAX_WEIGHT_ELEMENTS {
        return Err(KerasError::Layer {
            layer: name.to_string(),
            msg: format!("{total} weights exceed the limit of {MAX_WEIGHT_ELEMENTS} elements"),
        });
    }
    if seed.is_some() {
        for (wname, shape, _, init) in &specs {
            if *init == Init::Orthogonal {
                // QR of a max×min matrix costs about max·min² operations.
                let rows: u128 = shape[..shape.len().saturating_sub(1)]
                    .iter()
                    .map(|&d| d as u128)
                    .product();
                let cols = *shape.last().unwrap_or(&1) as u128;
                let cost = rows.max(cols) * rows.min(cols) * rows.min(cols);
                if cost > MAX_ORTHOGONAL_COST {
                    return Err(KerasError::Layer {
                        layer: name.to_string(),
                        msg: format!(
                            "the orthogonal initialisation of {wname} {shape:?} is too costly \
                             ({cost} operations); give the weights (set_weights or weights/NNN.npy)"
                        ),
                    });
                }
            }
        }
    }
    Ok(specs
        .into_iter()
        .enumerate()
        .map(|(i, (wname, shape, trainable, init))| Weight {
            name: wname,
            value: match seed {
                Some(seed) => init_tensor(init, &shape, weight_seed(seed, slot, i)),
                None => ArrayD::zeros(IxDyn(&shape)),
            },
            trainable,
        })
        .collect())
}
