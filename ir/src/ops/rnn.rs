//! Shape rules of the ONNX recurrent ops `LSTM`, `GRU` and `RNN`.

use super::infer::{outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::types::Dim;

/// The activation functions ONNX lists for the recurrent ops.
pub const ACTIVATIONS: &[&str] = &[
    "Relu",
    "Tanh",
    "Sigmoid",
    "Affine",
    "LeakyRelu",
    "ThresholdedRelu",
    "ScaledTanh",
    "HardSigmoid",
    "Elu",
    "Softsign",
    "Softplus",
];

/// The number of directions for a `direction` attribute.
pub fn num_directions(direction: &str) -> Result<usize, String> {
    match direction {
        "forward" | "reverse" => Ok(1),
        "bidirectional" => Ok(2),
        other => Err(format!(
            "direction {other:?} is not forward, reverse or bidirectional"
        )),
    }
}

/// Output types of a fused recurrent backward op: each gradient has its input's type.
fn infer_grad(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    let map: &[usize] = match op {
        Op::LSTMGrad { .. } => &[0, 1, 2, 3, 5, 6, 7],
        _ => &[0, 1, 2, 3, 5],
    };
    let x = cx.tensor(0)?;
    let types = map
        .iter()
        .map(|&i| {
            if cx.has(i) {
                cx.input(i).cloned()
            } else {
                Ok(tensor(x.dtype, None))
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    outputs(cx, types)
}

/// Output types of a recurrent op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    if matches!(
        op,
        Op::LSTMGrad { .. } | Op::GRUGrad { .. } | Op::RNNGrad { .. }
    ) {
        return infer_grad(op, cx);
    }
    // The masked ops: the base op's rules, and a bool mask `[T, N]` (`[N, T]`, layout 1).
    let base;
    let (op, mask_slot) = match op {
        Op::LSTMMasked { .. } | Op::GRUMasked { .. } | Op::RNNMasked { .. } => {
            let Some((b, _)) = op.unmasked_recurrent() else {
                return Err(format!("{} has no base op", op.name()));
            };
            base = b;
            let slot = if matches!(base, Op::LSTM { .. }) {
                8
            } else {
                6
            };
            (&base, Some(slot))
        }
        _ => (op, None),
    };
    let is_lstm = matches!(op, Op::LSTM { .. });
    let (gates, acts_per_dir, common) = match op {
        Op::LSTM {
            activations,
            direction,
            hidden_size,
            layout,
            clip,
            ..
        } => (4, 3, (activations, direction, hidden_size, layout, clip)),
        Op::GRU {
            activations,
            direction,
            hidden_size,
            layout,
            clip,
            ..
        } => (3, 2, (activations, direction, hidden_size, layout, clip)),
        Op::RNN {
            activations,
            direction,
            hidden_size,
            layout,
            clip,
            ..
        } => (1, 1, (activations, direction, hidden_size, layout, clip)),
        other => return Err(format!("{} is not a recurrent op", other.name())),
    };
    let (activations, direction, hidden_size, layout, clip) = common;
    let d = num_directions(direction)?;
    if *layout != 0 && *layout != 1 {
        return Err(format!("layout {layout} is not 0 or 1"));
    }
    if let Some(c) = clip {
        if c.is_nan() || *c < 0.0 {
            return Err(format!("clip {c} must be ≥ 0"));
        }
    }
    if let Some(a) = activations {
        if a.len() != acts_per_dir * d {
            return Err(format!(
                "{} activations given, {} expected ({acts_per_dir} per direction)",
                a.len(),
                acts_per_dir * d
            ));
        }
        for name in a {
            if !ACTIVATIONS.contains(&name.as_str()) {
                return Err(format!("unknown activation {name:?}"));
            }
        }
    }
    let float_inputs: Vec<usize> = [0, 1, 2, 3, 5, 6, 7]
        .into_iter()
        .filter(|&i| i < cx.inputs.len() && Some(i) != mask_slot && (is_lstm || i < 6))
        .collect();
    let dt = cx.same_dtype(&float_inputs)?;
    if let Some(t) = dt {
        if !t.is_float() {
            return Err(format!("recurrent ops need float inputs, found {t}"));
        }
    }
    if cx.has(4) {
        cx.dtype_in(4, |t| t == DType::I32, "i32")?;
    }
    let x = cx.tensor(0)?;
    let (w, r) = (cx.tensor(1)?, cx.tensor(2)?);
    let (t_dim, n_dim, in_dim) = match &x.shape {
        Some(s) if s.len() == 3 => {
            if *layout == 0 {
                (s[0].clone(), s[1].clone(), s[2].clone())
            } else {
                (s[1].clone(), s[0].clone(), s[2].clone())
            }
        }
        Some(s) => return Err(format!("X must be 3-D, has rank {}", s.len())),
        None => (Dim::Unknown, Dim::Unknown, Dim::Unknown),
    };
    let h = match (
        hidden_size,
        r.shape
            .as_ref()
            .and_then(|s| s.get(2).and_then(|d| d.known())),
    ) {
        (Some(h), Some(rh)) if *h as u64 != rh => {
            return Err(format!("hidden_size {h} but R is [.., .., {rh}]"))
        }
        (Some(h), _) if *h <= 0 => return Err(format!("hidden_size {h} must be positive")),
        (Some(h), _) => Dim::Known(*h as u64),
        (None, Some(rh)) => Dim::Known(rh),
        (None, None) => Dim::Unknown,
    };
    let check = |name: &str, shape: &Option<Vec<Dim>>, want: Vec<Dim>| -> Result<(), String> {
        if let Some(s) = shape {
            if s.len() != want.len() {
                return Err(format!(
                    "{name} must have rank {}, has {}",
                    want.len(),
                    s.len()
                ));
            }
            for (i, (a, b)) in s.iter().zip(&want).enumerate() {
                if let (Dim::Known(x), Dim::Known(y)) = (a, b) {
                    if x != y {
                        return Err(format!("{name} dimension {i} is {x}, expected {y}"));
                    }
                }
            }
        }
        Ok(())
    };
    let gh = match &h {
        Dim::Known(h) => h.checked_mul(gates).map(Dim::Known).unwrap_or(Dim::Unknown),
        _ => Dim::Unknown,
    };
    let dd = Dim::Known(d as u64);
    check("W", &w.shape, vec![dd.clone(), gh.clone(), in_dim])?;
    check("R", &r.shape, vec![dd.clone(), gh.clone(), h.clone()])?;
    if cx.has(3) {
        let bh = match &h {
            Dim::Known(h) => h
                .checked_mul(2 * gates)
                .map(Dim::Known)
                .unwrap_or(Dim::Unknown),
            _ => Dim::Unknown,
        };
        check("B", &cx.tensor(3)?.shape, vec![dd.clone(), bh])?;
    }
    if cx.has(4) {
        check("sequence_lens", &cx.tensor(4)?.shape, vec![n_dim.clone()])?;
    }
    let state = if *layout == 0 {
        vec![dd.clone(), n_dim.clone(), h.clone()]
    } else {
        vec![n_dim.clone(), dd.clone(), h.clone()]
    };
    if let Some(m) = mask_slot {
        cx.dtype_in(m, |t| t == DType::Bool, "bool")?;
        let want = if *layout == 0 {
            vec![t_dim.clone(), n_dim.clone()]
        } else {
            vec![n_dim.clone(), t_dim.clone()]
        };
        check("mask", &cx.tensor(m)?.shape, want)?;
    }
    for (i, name) in [(5, "initial_h"), (6, "initial_c")] {
        if cx.has(i) && (is_lstm || i == 5) {
            check(name, &cx.tensor(i)?.shape, state.clone())?;
        }
    }
    if cx.has(7) {
        let ph = match &h {
            Dim::Known(h) => h.checked_mul(3).map(Dim::Known).unwrap_or(Dim::Unknown),
            _ => Dim::Unknown,
        };
        check("P", &cx.tensor(7)?.shape, vec![dd.clone(), ph])?;
    }
    let y = if *layout == 0 {
        vec![t_dim, dd, n_dim, h]
    } else {
        vec![n_dim, t_dim, dd, h]
    };
    outputs(
        cx,
        vec![
            tensor(dt, Some(y)),
            tensor(dt, Some(state.clone())),
            tensor(dt, Some(state)),
        ],
    )
}
