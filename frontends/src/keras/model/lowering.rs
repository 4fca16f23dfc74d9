//! Lowering one layer call to IR nodes (recurrent layers through `keras::lower`),
//! BatchNormalization's batch moments and the `keras.ops` nodes of functional models.

use super::*;

/// Lowers one layer call: outputs with their masks. In training mode a
/// BatchNormalization pushes its batch mean and variance onto `extra`.
pub(super) fn lower_layer(
    e: &mut Emit,
    layer: &Layer,
    w: &[ValueRef],
    x: ValueRef,
    mask: Option<ValueRef>,
    init: Option<Vec<ValueRef>>,
    extra: &mut Vec<ValueRef>,
) -> R<Vec<(ValueRef, Option<ValueRef>)>> {
    Ok(match layer {
        Layer::Custom(_) => {
            return Err(KerasError::Internal(
                "custom RNN layers are lowered with all their input parts".into(),
            ))
        }
        Layer::Input(_) => vec![(x, mask)],
        Layer::Embedding(emb) => {
            let ids = e.cast(x, DType::I64)?;
            let y = e.op(Op::Gather { axis: 0 }, &[w[0], ids], "embedding")?;
            let m = if emb.mask_zero {
                let zero = e.constant(Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 0)), "zero_id")?;
                let eq = e.op(Op::Equal {}, &[ids, zero], "is_pad")?;
                Some(e.op(Op::Not {}, &[eq], "mask")?)
            } else {
                mask
            };
            vec![(y, m)]
        }
        Layer::Dense(d) => {
            let mut y = e.matmul(x, w[0])?;
            if d.use_bias {
                y = e.add(y, w[1])?;
            }
            vec![(e.activation(d.activation, y)?, mask)]
        }
        Layer::BatchNormalization(bn) => {
            let mut k = 0;
            let gamma = bn.scale.then(|| {
                k += 1;
                w[k - 1]
            });
            let beta = bn.center.then(|| {
                k += 1;
                w[k - 1]
            });
            let (mean, var) = if e.training {
                let (m, v) = batch_moments(e, x, mask)?;
                extra.push(m);
                extra.push(v);
                (m, v)
            } else {
                (w[k], w[k + 1])
            };
            // Keras: inv = rsqrt(var + eps) · gamma; y = x · inv + (beta − mean · inv)
            let eps = e.scalar(bn.epsilon)?;
            let ve = e.add(var, eps)?;
            let sd = e.op(Op::Sqrt {}, &[ve], "sqrt")?;
            let mut inv = e.op(Op::Reciprocal {}, &[sd], "rsqrt")?;
            if let Some(g) = gamma {
                inv = e.mul(inv, g)?;
            }
            let mi = e.mul(mean, inv)?;
            let mut off = e.op(Op::Neg {}, &[mi], "neg")?;
            if let Some(b) = beta {
                off = e.add(off, b)?;
            }
            let xi = e.mul(x, inv)?;
            vec![(e.add(xi, off)?, mask)]
        }
        Layer::Dropout(d) if e.training && d.rate > 0.0 => {
            let shape = e.dims(x);
            let m = e.random_mask(&shape, d.rate)?;
            vec![(e.mul(x, m)?, mask)]
        }
        Layer::Dropout(_) => vec![(x, mask)],
        Layer::Masking(m) => {
            let mv = e.scalar(m.mask_value)?;
            let eq = e.op(Op::Equal {}, &[x, mv], "eq")?;
            let ne = e.op(Op::Not {}, &[eq], "ne")?;
            let nf = e.cast(ne, DType::F32)?;
            let axes = e.ints(&[-1])?;
            let any = e.op(
                Op::ReduceMax {
                    axes: None,
                    keepdims: 0,
                    noop_with_empty_axes: 0,
                },
                &[nf, axes],
                "any",
            )?;
            let zero = e.scalar(0.0)?;
            let keep = e.op(Op::Greater {}, &[any, zero], "mask")?;
            let kf = e.cast(keep, DType::F32)?;
            let k3 = e.unsqueeze(kf, &[-1])?;
            vec![(e.mul(x, k3)?, Some(keep))]
        }
        Layer::Recurrent(r) => {
            let out = lower::recurrent(e, r, w, x, mask, init)?;
            let main = match (out.seq, out.last) {
                (Some(s), _) => (s, if r.return_sequences { mask } else { None }),
                (None, Some(l)) => (l, None),
                _ => {
                    return Err(KerasError::Internal(
                        "recurrent layer without output".into(),
                    ))
                }
            };
            let mut v = vec![main];
            if r.return_state {
                v.extend(out.states.into_iter().map(|s| (s, None)));
            } else if r.stateful {
                // Final states still leave the layer for the state store.
                v.extend(out.states.into_iter().map(|s| (s, None)));
            }
            v
        }
        Layer::Bidirectional(b) => {
            let nf = b
                .forward
                .cells
                .iter()
                .map(|c| c.weight_shapes(0).len())
                .sum::<usize>();
            let outs = lower::bidirectional(e, b, &w[..nf], &w[nf..], x, mask, init)?;
            let out_mask = if b.forward.return_sequences {
                mask
            } else {
                None
            };
            let n_out = if b.merge_mode.is_some() { 1 } else { 2 };
            let keep_states = b.forward.return_state || is_stateful(layer);
            outs.into_iter()
                .enumerate()
                .filter(|(i, _)| *i < n_out || keep_states)
                .map(|(i, v)| (v, if i < n_out { out_mask } else { None }))
                .collect()
        }
        Layer::TimeDistributed(t) => lower_layer(e, &t.layer, w, x, mask, None, extra)?,
        Layer::Op(op) => vec![(lower_op(e, op, &[x])?, None)],
    })
}

/// Keras's BatchNormalization moments over every axis but the last, as `(channels,)`
/// vectors: plain (biased variance), or with a `(batch, time)` mask only the valid steps.
pub(super) fn batch_moments(
    e: &mut Emit,
    x: ValueRef,
    mask: Option<ValueRef>,
) -> R<(ValueRef, ValueRef)> {
    let rank = e.dims(x).len();
    let axes: Vec<i64> = (0..rank as i64 - 1).collect();
    let ax = e.ints(&axes)?;
    let mean_op = || Op::ReduceMean {
        axes: None,
        keepdims: 1,
        noop_with_empty_axes: 0,
    };
    let sum_op = || Op::ReduceSum {
        axes: None,
        keepdims: 1,
        noop_with_empty_axes: 0,
    };
    let (mean, var) = match mask {
        None => {
            let mean = e.op(mean_op(), &[x, ax], "batch_mean")?;
            let d = e.op(Op::Sub {}, &[x, mean], "centered")?;
            let sq = e.mul(d, d)?;
            let var = e.op(mean_op(), &[sq, ax], "batch_var")?;
            (mean, var)
        }
        Some(m) => {
            // Keras: sums over the valid steps divided by (count + 1e-7).
            let mf = e.cast(m, DType::F32)?;
            let mf = e.unsqueeze(mf, &[-1])?;
            let xm = e.mul(x, mf)?;
            let sx = e.op(sum_op(), &[xm, ax], "masked_sum")?;
            // The mask broadcast to x counts the valid steps once per channel.
            let sw = e.op(sum_op(), &[mf, ax], "valid_count")?;
            let eps = e.scalar(1e-7)?;
            let den = e.add(sw, eps)?;
            let mean = e.op(Op::Div {}, &[sx, den], "batch_mean")?;
            let d = e.op(Op::Sub {}, &[x, mean], "centered")?;
            let dm = e.mul(d, mf)?;
            let sq = e.mul(dm, dm)?;
            let ss = e.op(sum_op(), &[sq, ax], "masked_sq_sum")?;
            let var = e.op(Op::Div {}, &[ss, den], "batch_var")?;
            (mean, var)
        }
    };
    let flat = e.ints(&[-1])?;
    let mean = e.op(Op::Reshape { allowzero: 0 }, &[mean, flat], "mean")?;
    let var = e.op(Op::Reshape { allowzero: 0 }, &[var, flat], "var")?;
    Ok((mean, var))
}

/// Lowers a `keras.ops` node; comparisons and reductions give booleans.
pub(super) fn lower_op(
    e: &mut Emit,
    op: &crate::keras::layers::TensorOp,
    ins: &[ValueRef],
) -> R<ValueRef> {
    use crate::keras::layers::TensorOpKind as K;
    let as_bool = |e: &mut Emit, v: ValueRef| -> R<ValueRef> {
        if e.g.value(v).ty.dtype() == Some(DType::Bool) {
            Ok(v)
        } else {
            e.cast(v, DType::Bool)
        }
    };
    let second = |e: &mut Emit| -> R<ValueRef> {
        match op.scalar {
            Some(c) => {
                let dt = e.g.value(ins[0]).ty.dtype().unwrap_or(DType::F32);
                let t = Tensor::from_f64_vec(dt, &[], &[c])
                    .map_err(|err| KerasError::Internal(err.to_string()))?;
                e.constant(t, "operand")
            }
            None => ins
                .get(1)
                .copied()
                .ok_or_else(|| KerasError::Internal("missing operand".into())),
        }
    };
    match op.kind {
        K::NotEqual | K::Equal => {
            let b = second(e)?;
            let eq = e.op(Op::Equal {}, &[ins[0], b], "equal")?;
            if op.kind == K::Equal {
                Ok(eq)
            } else {
                e.op(Op::Not {}, &[eq], "not_equal")
            }
        }
        K::Greater => {
            let b = second(e)?;
            e.op(Op::Greater {}, &[ins[0], b], "greater")
        }
        K::Less => {
            let b = second(e)?;
            e.op(Op::Less {}, &[ins[0], b], "less")
        }
        K::LogicalNot => {
            let a = as_bool(e, ins[0])?;
            e.op(Op::Not {}, &[a], "not")
        }
        K::LogicalAnd | K::LogicalOr => {
            let a = as_bool(e, ins[0])?;
            let b = second(e)?;
            let b = as_bool(e, b)?;
            let o = if op.kind == K::LogicalAnd {
                Op::And {}
            } else {
                Op::Or {}
            };
            e.op(o, &[a, b], "logical")
        }
        K::Any | K::All => {
            let a = as_bool(e, ins[0])?;
            let f = e.cast(a, DType::F32)?;
            let axes: Vec<i64> = match op.axis {
                Some(a) => vec![a],
                None => (0..e.dims(f).len() as i64).collect(),
            };
            let ax = e.ints(&axes)?;
            let keepdims = i64::from(op.keepdims);
            let r = if op.kind == K::Any {
                e.op(
                    Op::ReduceMax {
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: 0,
                    },
                    &[f, ax],
                    "any",
                )?
            } else {
                e.op(
                    Op::ReduceMin {
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: 0,
                    },
                    &[f, ax],
                    "all",
                )?
            };
            let half = e.scalar(0.5)?;
            e.op(Op::Greater {}, &[r, half], "reduced")
        }
    }
}
