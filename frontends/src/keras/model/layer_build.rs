//! What building a layer into a model checks and creates: its configuration's
//! validation, its output shapes, its weights (names, shapes, initialisers) and its
//! states.

use super::*;

pub(super) fn is_stateful(layer: &Layer) -> bool {
    match layer {
        Layer::Recurrent(r) => r.stateful,
        Layer::Bidirectional(b) => b.forward.stateful || b.backward.stateful,
        _ => false,
    }
}

pub(super) fn state_sizes(layer: &Layer) -> Vec<usize> {
    match layer {
        Layer::Recurrent(r) => r.state_sizes(),
        Layer::Bidirectional(b) => {
            let mut s = b.forward.state_sizes();
            s.extend(b.backward.state_sizes());
            s
        }
        _ => Vec::new(),
    }
}

/// The output shape of a `keras.ops` node.
pub(super) fn op_shape(
    op: &crate::keras::layers::TensorOp,
    input: &Shape,
) -> Result<Shape, String> {
    use crate::keras::layers::TensorOpKind as K;
    Ok(match op.kind {
        K::Any | K::All => match op.axis {
            None if op.keepdims => vec![Some(1); input.len()],
            None => Vec::new(),
            Some(a) => {
                let r = input.len() as i64;
                let ax = if a < 0 { a + r } else { a };
                if !(0..r).contains(&ax) {
                    return Err(format!("axis {a} out of range for rank {r}"));
                }
                let mut s = input.clone();
                if op.keepdims {
                    s[ax as usize] = Some(1);
                } else {
                    s.remove(ax as usize);
                }
                s
            }
        },
        _ => input.clone(),
    })
}

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

/// Checks a layer's options and fills in what Keras derives (Bidirectional inner names).
pub(super) fn validate(layer: &mut Layer, name: &str) -> R<()> {
    let bad = |what: String| {
        Err(KerasError::Unsupported {
            layer: name.to_string(),
            what,
        })
    };
    match layer {
        Layer::Recurrent(r) => validate_rnn(r, name)?,
        Layer::Bidirectional(b) => {
            let inner = |r: &Recurrent| match r.class {
                crate::keras::layers::RnnClass::LSTM => "lstm",
                crate::keras::layers::RnnClass::GRU => "gru",
                crate::keras::layers::RnnClass::SimpleRNN => "simple_rnn",
                crate::keras::layers::RnnClass::RNN => "rnn",
            };
            if b.forward.name.is_none() {
                b.forward.name = Some(format!("forward_{}", inner(&b.forward)));
            }
            if b.backward.name.is_none() {
                b.backward.name = Some(format!("backward_{}", inner(&b.backward)));
            }
            validate_rnn(&b.forward, name)?;
            validate_rnn(&b.backward, name)?;
            if b.forward.go_backwards == b.backward.go_backwards {
                return bad(
                    "a backward_layer with the same go_backwards as the forward layer".into(),
                );
            }
            if b.forward.return_sequences != b.backward.return_sequences
                || b.forward.return_state != b.backward.return_state
            {
                return bad(
                    "forward and backward layers that differ in return_sequences or return_state"
                        .into(),
                );
            }
            if b.merge_mode
                .is_some_and(|m| m != crate::keras::layers::MergeMode::Concat)
                && b.forward.output_units() != b.backward.output_units()
            {
                return bad("sum/mul/ave merge of directions with different units".into());
            }
        }
        Layer::Dense(d) if d.units == 0 => return bad("units = 0".into()),
        Layer::Embedding(e) if e.input_dim == 0 || e.output_dim == 0 => {
            return bad("an empty embedding table".into())
        }
        Layer::Dropout(d) if !(0.0..1.0).contains(&d.rate) => {
            return bad(format!("rate = {} (must be in [0, 1))", d.rate))
        }
        Layer::Input(i) => {
            if dtype_of(&i.dtype).is_none() {
                return bad(format!("dtype {:?} (float32, int32, int64)", i.dtype));
            }
            if i.batch_shape.is_empty() {
                return bad("an Input of rank 0".into());
            }
        }
        Layer::TimeDistributed(t) => {
            if !matches!(
                *t.layer,
                Layer::Dense(_) | Layer::Dropout(_) | Layer::BatchNormalization(_)
            ) {
                return bad(format!(
                    "TimeDistributed({}) (Dense, Dropout and BatchNormalization are supported)",
                    t.layer.class_name()
                ));
            }
            let inner_name = t.layer.default_stem().to_string();
            validate(&mut t.layer, &inner_name)?;
        }
        _ => {}
    }
    Ok(())
}

pub(super) fn validate_rnn(r: &Recurrent, name: &str) -> R<()> {
    if r.cells.is_empty() {
        return Err(KerasError::Unsupported {
            layer: name.to_string(),
            what: "an RNN without cells".into(),
        });
    }
    for c in &r.cells {
        c.validate(name)?;
    }
    Ok(())
}

pub(super) fn feature_dim(name_shape: &Shape, rank: usize, what: &str) -> Result<usize, String> {
    if name_shape.len() != rank {
        return Err(format!(
            "expects inputs of rank {rank} {what}, got shape {}",
            shape_str(name_shape)
        ));
    }
    name_shape.last().copied().flatten().ok_or_else(|| {
        format!(
            "needs a known last dimension, got shape {}",
            shape_str(name_shape)
        )
    })
}

/// The weights a layer creates for an input shape, drawn from Keras's initializers.
pub(super) fn build_weights(
    layer: &Layer,
    name: &str,
    input: &Shape,
    seed: Option<u64>,
    slot: usize,
) -> R<Vec<Weight>> {
    let specs = weight_specs(layer, name, input).map_err(|msg| KerasError::Layer {
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

pub(super) type Spec = (String, Vec<usize>, bool, Init);

pub(super) fn rnn_specs(r: &Recurrent, prefix: &str, input: &Shape) -> Result<Vec<Spec>, String> {
    let mut d = feature_dim(input, 3, "(batch, time, features)")?;
    let mut v = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for c in &r.cells {
        let stem = c
            .name
            .clone()
            .unwrap_or_else(|| c.kind.default_name().to_string());
        let mut cname = stem.clone();
        let mut k = 0;
        while used.contains(&cname) {
            k += 1;
            cname = format!("{stem}_{k}");
        }
        used.push(cname.clone());
        let cpath = if r.stacked {
            format!("{prefix}/stacked_rnn_cells/{cname}")
        } else {
            format!("{prefix}/{cname}")
        };
        for (w, shape) in c.weight_shapes(d) {
            let init = match w {
                "kernel" => Init::GlorotUniform,
                "recurrent_kernel" => Init::Orthogonal,
                _ if c.kind == crate::keras::layers::CellKind::LSTM && c.unit_forget_bias => {
                    Init::ForgetBias
                }
                _ => Init::Zeros,
            };
            v.push((format!("{cpath}/{w}"), shape, true, init));
        }
        d = c.units;
    }
    Ok(v)
}

pub(super) fn weight_specs(layer: &Layer, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
    Ok(match layer {
        Layer::Custom(c) => {
            let steps = c
                .built
                .as_ref()
                .ok_or_else(|| "the layer was not called on inputs yet".to_string())?;
            let cell = c.cell.name();
            c.specs(steps)?
                .into_iter()
                .map(|(w, shape, trainable, init)| {
                    (format!("{name}/{cell}/{w}"), shape, trainable, init)
                })
                .collect()
        }
        Layer::Input(_) | Layer::Dropout(_) | Layer::Masking(_) | Layer::Op(_) => Vec::new(),
        Layer::Embedding(e) => vec![(
            format!("{name}/embeddings"),
            vec![e.input_dim, e.output_dim],
            true,
            Init::Uniform,
        )],
        Layer::Dense(dn) => {
            let d =
                input.last().copied().flatten().ok_or_else(|| {
                    format!("needs a known last dimension, got {}", shape_str(input))
                })?;
            let mut v = vec![(
                format!("{name}/kernel"),
                vec![d, dn.units],
                true,
                Init::GlorotUniform,
            )];
            if dn.use_bias {
                v.push((format!("{name}/bias"), vec![dn.units], true, Init::Zeros));
            }
            v
        }
        Layer::Recurrent(r) => rnn_specs(r, name, input)?,
        Layer::Bidirectional(b) => {
            let f = b.forward.name.clone().unwrap_or_default();
            let bw = b.backward.name.clone().unwrap_or_default();
            let mut v = rnn_specs(&b.forward, &format!("{name}/{f}"), input)?;
            v.extend(rnn_specs(&b.backward, &format!("{name}/{bw}"), input)?);
            v
        }
        Layer::BatchNormalization(bn) => {
            let c =
                input.last().copied().flatten().ok_or_else(|| {
                    format!("needs a known last dimension, got {}", shape_str(input))
                })?;
            let mut v = Vec::new();
            if bn.scale {
                v.push((format!("{name}/gamma"), vec![c], true, Init::Ones));
            }
            if bn.center {
                v.push((format!("{name}/beta"), vec![c], true, Init::Zeros));
            }
            v.push((format!("{name}/moving_mean"), vec![c], false, Init::Zeros));
            v.push((
                format!("{name}/moving_variance"),
                vec![c],
                false,
                Init::Ones,
            ));
            v
        }
        Layer::TimeDistributed(t) => {
            if input.len() < 3 {
                return Err(format!(
                    "expects inputs of rank 3 or more (batch, time, ...), got {}",
                    shape_str(input)
                ));
            }
            let mut inner = vec![None];
            inner.extend_from_slice(&input[2..]);
            let stem = t
                .layer
                .given_name()
                .unwrap_or(t.layer.default_stem())
                .to_string();
            weight_specs(&t.layer, &format!("{name}/{stem}"), &inner)?
        }
    })
}

/// A layer's output shapes for an input shape.
pub(crate) fn output_shapes(layer: &Layer, input: &Shape) -> Result<Vec<Shape>, String> {
    Ok(match layer {
        Layer::Custom(c) => c.output_shapes(std::slice::from_ref(input)),
        Layer::Op(op) => vec![op_shape(op, input)?],
        Layer::Input(i) => vec![i.batch_shape.clone()],
        Layer::Embedding(e) => {
            let mut s = input.clone();
            s.push(Some(e.output_dim));
            vec![s]
        }
        Layer::Dense(d) => {
            let mut s = input.clone();
            if s.len() < 2 {
                return Err(format!(
                    "expects inputs of rank 2 or more, got {}",
                    shape_str(input)
                ));
            }
            *s.last_mut().unwrap_or(&mut None) = Some(d.units);
            vec![s]
        }
        Layer::Recurrent(r) => {
            feature_dim(input, 3, "(batch, time, features)")?;
            r.output_shapes(input)
        }
        Layer::Bidirectional(b) => {
            feature_dim(input, 3, "(batch, time, features)")?;
            b.output_shapes(input)
        }
        Layer::BatchNormalization(_) | Layer::Dropout(_) | Layer::Masking(_) => {
            vec![input.clone()]
        }
        Layer::TimeDistributed(t) => {
            let mut inner = vec![None];
            inner.extend_from_slice(input.get(2..).unwrap_or(&[]));
            let o = output_shapes(&t.layer, &inner)?;
            let mut s = input[..2.min(input.len())].to_vec();
            s.extend_from_slice(o[0].get(1..).unwrap_or(&[]));
            vec![s]
        }
    })
}
