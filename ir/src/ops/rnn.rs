//! The recurrent ops' meaning, shared by every pass and backend: the cell kinds, the
//! activation functions and their parsing, the per-op [`Spec`] a kernel or a lowering
//! reads, the slot table of the fused backward ops ([`GradSlots`]), and the shape rules
//! of `LSTM`, `GRU`, `RNN`, their masked forms and their `*Grad` ops. How an activation
//! is computed is a backend's business (the CPU's is `cpu::rnn::ActApply`).

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
    let map = GradSlots::of_op(op)
        .ok_or_else(|| format!("{} is not a recurrent op", op.name()))?
        .outputs;
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
    if is_grad(op) {
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

/// An ONNX recurrent activation function with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// max(0, x).
    Relu,
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// alpha·x + beta.
    Affine(f32, f32),
    /// x < 0 ? alpha·x : x.
    LeakyRelu(f32),
    /// x > alpha ? x : 0.
    ThresholdedRelu(f32),
    /// alpha·tanh(beta·x).
    ScaledTanh(f32, f32),
    /// clip(alpha·x + beta, 0, 1).
    HardSigmoid(f32, f32),
    /// x < 0 ? alpha·(e^x − 1) : x.
    Elu(f32),
    /// x / (1 + |x|).
    Softsign,
    /// ln(1 + e^x).
    Softplus,
}

/// Parses an ONNX activation list, consuming alpha/beta values in order.
pub fn parse_activations(
    names: &[String],
    alpha: &[f32],
    beta: &[f32],
) -> Result<Vec<Act>, String> {
    let (mut ai, mut bi) = (0, 0);
    let next = |v: &[f32], i: &mut usize, d: f32| {
        let x = v.get(*i).copied().unwrap_or(d);
        *i += 1;
        x
    };
    names
        .iter()
        .map(|n| {
            Ok(match n.as_str() {
                "Relu" => Act::Relu,
                "Tanh" => Act::Tanh,
                "Sigmoid" => Act::Sigmoid,
                "Softsign" => Act::Softsign,
                "Softplus" => Act::Softplus,
                "LeakyRelu" => Act::LeakyRelu(next(alpha, &mut ai, 0.01)),
                "ThresholdedRelu" => Act::ThresholdedRelu(next(alpha, &mut ai, 1.0)),
                "Elu" => Act::Elu(next(alpha, &mut ai, 1.0)),
                "HardSigmoid" => {
                    Act::HardSigmoid(next(alpha, &mut ai, 0.2), next(beta, &mut bi, 0.5))
                }
                "Affine" => Act::Affine(next(alpha, &mut ai, 1.0), next(beta, &mut bi, 0.0)),
                "ScaledTanh" => {
                    Act::ScaledTanh(next(alpha, &mut ai, 1.0), next(beta, &mut bi, 1.0))
                }
                other => return Err(format!("unknown activation {other:?}")),
            })
        })
        .collect()
}

/// The recurrent cell kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// LSTM (gates i, o, f, c).
    Lstm,
    /// GRU (gates z, r, h).
    Gru,
    /// Simple RNN.
    Rnn,
}

impl Cell {
    /// Gates per unit.
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }
    /// Activation functions per direction.
    pub fn acts(self) -> usize {
        match self {
            Cell::Lstm => 3,
            Cell::Gru => 2,
            Cell::Rnn => 1,
        }
    }
    fn default_acts(self) -> Vec<Act> {
        match self {
            Cell::Lstm => vec![Act::Sigmoid, Act::Tanh, Act::Tanh],
            Cell::Gru => vec![Act::Sigmoid, Act::Tanh],
            Cell::Rnn => vec![Act::Tanh],
        }
    }
}

/// Everything a fused kernel needs from the op's attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The cell.
    pub cell: Cell,
    /// Units.
    pub hidden: usize,
    /// Per direction: reverse or not.
    pub reverse: Vec<bool>,
    /// Per direction: the activation functions.
    pub acts: Vec<Vec<Act>>,
    /// Gate pre-activation clip.
    pub clip: Option<f32>,
    /// LSTM `input_forget`.
    pub input_forget: bool,
    /// GRU `linear_before_reset`.
    pub linear_before_reset: bool,
    /// Batch-major layout.
    pub layout1: bool,
    /// Masked ops: masked steps output the held state instead of zeros.
    pub hold: bool,
}

impl Spec {
    /// Reads the spec of an LSTM/GRU/RNN op; `hidden` comes from R when the attribute is absent.
    pub fn from_op(op: &Op, r_hidden: usize) -> Result<Spec, String> {
        if !matches!(op, Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. }) {
            if let Some((base, hold)) = op.unmasked_recurrent() {
                let mut spec = Spec::from_op(&base, r_hidden)?;
                spec.hold = hold != 0;
                return Ok(spec);
            }
        }
        let (cell, aa, ab, acts, clip, dir, hs, layout, inf, lbr) = match op {
            Op::LSTM {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                input_forget,
                layout,
            } => (
                Cell::Lstm,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                *input_forget != 0,
                false,
            ),
            Op::GRU {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                linear_before_reset,
            } => (
                Cell::Gru,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                false,
                *linear_before_reset != 0,
            ),
            Op::RNN {
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
            } => (
                Cell::Rnn,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                layout,
                false,
                false,
            ),
            other => return Err(format!("{} is not a recurrent op", other.name())),
        };
        let d = num_directions(dir)?;
        let reverse = match dir.as_str() {
            "forward" => vec![false],
            "reverse" => vec![true],
            _ => vec![false, true],
        };
        let per = cell.acts();
        let acts = match acts {
            Some(names) => {
                let all = parse_activations(
                    names,
                    aa.as_deref().unwrap_or(&[]),
                    ab.as_deref().unwrap_or(&[]),
                )?;
                if all.len() != per * d {
                    return Err(format!(
                        "{} activations for {d} direction(s) of {per}",
                        all.len()
                    ));
                }
                all.chunks(per).map(|c| c.to_vec()).collect()
            }
            None => vec![cell.default_acts(); d],
        };
        let hidden = match hs {
            Some(h) if *h as usize != r_hidden => {
                return Err(format!("hidden_size {h} but R has {r_hidden} columns"))
            }
            _ => r_hidden,
        };
        Ok(Spec {
            cell,
            hidden,
            reverse,
            acts,
            clip: *clip,
            input_forget: inf,
            linear_before_reset: lbr,
            layout1: *layout == 1,
            hold: false,
        })
    }
}

impl Cell {
    /// The cell of a recurrent op: the forward ops, their masked forms and their `*Grad`
    /// ops; `None` for any other op.
    pub fn of_op(op: &Op) -> Option<Cell> {
        match op {
            Op::LSTM { .. } | Op::LSTMMasked { .. } | Op::LSTMGrad { .. } => Some(Cell::Lstm),
            Op::GRU { .. } | Op::GRUMasked { .. } | Op::GRUGrad { .. } => Some(Cell::Gru),
            Op::RNN { .. } | Op::RNNMasked { .. } | Op::RNNGrad { .. } => Some(Cell::Rnn),
            _ => None,
        }
    }
}

/// Whether `op` is a fused recurrent op of the forward (`LSTM`, `GRU`, `RNN` and their
/// masked forms): what a backend's fused kernel runs and what the selector places.
pub fn is_fused(op: &Op) -> bool {
    matches!(
        op,
        Op::LSTM { .. }
            | Op::GRU { .. }
            | Op::RNN { .. }
            | Op::LSTMMasked { .. }
            | Op::GRUMasked { .. }
            | Op::RNNMasked { .. }
    )
}

/// Whether `op` is a fused recurrent backward op (`LSTMGrad`, `GRUGrad`, `RNNGrad`).
pub fn is_grad(op: &Op) -> bool {
    matches!(
        op,
        Op::LSTMGrad { .. } | Op::GRUGrad { .. } | Op::RNNGrad { .. }
    )
}

/// The slot table of a fused recurrent backward op (`LSTMGrad`, `GRUGrad`, `RNNGrad`),
/// written once for the autodiff rule that emits it, its shape rule, the kernels that run
/// it and the planner that pairs it with its forward.
///
/// Inputs: the forward op's inputs (`X, W, R, B, sequence_lens, initial_h` and for LSTM
/// `initial_c, P`), then the cotangents of the forward's outputs (`dY, dY_h` and for
/// LSTM `dY_c`), then a masked forward's mask. Outputs: the gradients of the forward
/// inputs at [`GradSlots::outputs`] (`sequence_lens` has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradSlots {
    /// How many forward inputs come first (8 for LSTM, 6 otherwise).
    pub forward_inputs: usize,
    /// How many cotangents follow them (3 for LSTM, 2 otherwise).
    pub cotangents: usize,
    /// For each gradient output, the forward input slot it is the gradient of.
    pub outputs: &'static [usize],
}

impl GradSlots {
    /// The table for a cell kind.
    pub fn of(cell: Cell) -> GradSlots {
        const ALL: &[usize] = &[0, 1, 2, 3, 5, 6, 7];
        match cell {
            Cell::Lstm => GradSlots {
                forward_inputs: 8,
                cotangents: 3,
                outputs: ALL,
            },
            Cell::Gru | Cell::Rnn => GradSlots {
                forward_inputs: 6,
                cotangents: 2,
                outputs: &ALL[..5],
            },
        }
    }

    /// The table of a recurrent op (forward, masked or backward); `None` for other ops.
    pub fn of_op(op: &Op) -> Option<GradSlots> {
        Cell::of_op(op).map(GradSlots::of)
    }

    /// The slot of the first cotangent (`dY`).
    pub fn first_cotangent(&self) -> usize {
        self.forward_inputs
    }

    /// The slot of a masked forward's mask.
    pub fn mask(&self) -> usize {
        self.forward_inputs + self.cotangents
    }
}
