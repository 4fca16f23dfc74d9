//! An f64 reference implementation of the ONNX `LSTM`, `GRU` and `RNN` operators, written
//! from the operator text of `onnx/docs/Operators.md` (opsets 7–22), for tests only.
//!
//! It shares no code with the CPU kernels or the loop lowering: it reads the attributes
//! itself from the fields of [`Op::LSTM`] / [`Op::GRU`] / [`Op::RNN`] and computes every
//! output with plain loops over `Vec<f64>`, one batch row and one direction at a time.
//!
//! How the attributes are read (the spec sentence each reading rests on is quoted):
//!
//! * `activations`: "A list of 3 (or 6 if bidirectional) activation functions for input,
//!   output, forget, cell, and hidden" (LSTM: f, g, h; GRU: 2 or 4: f, g; RNN: 1 or 2: f),
//!   the forward direction's functions first, then the reverse direction's. Absent: the
//!   equations' defaults, "Default: f=Sigmoid, g=Tanh, h=Tanh" (LSTM), "f=Sigmoid, g=Tanh"
//!   (GRU), "f=Tanh" (RNN), for every direction.
//! * `activation_alpha` / `activation_beta`: "Optional scaling values used by some activation
//!   functions. The values are consumed in the order of activation functions, for example
//!   (f, g, h) in LSTM. Default values are the same as of corresponding ONNX operators. For
//!   example with LeakyRelu, the default alpha is 0.01." One cursor runs over each list,
//!   across both directions; a function advances a cursor only if it takes that parameter
//!   (the spec's table: Affine alpha·x + beta; LeakyRelu alpha; ThresholdedRelu alpha;
//!   ScaledTanh alpha·Tanh(beta·x); HardSigmoid alpha, beta; Elu alpha; Relu, Tanh,
//!   Sigmoid, Softsign, Softplus none). onnxruntime 1.32 consumes them the same way
//!   (`rnn_helpers.cc`, `NormalizeActivationArgumentAndGetAlphaBetaCount`; checked by the
//!   generated cases). When a list runs out: the op defaults LeakyRelu 0.01, Elu 1.0,
//!   HardSigmoid 0.2 / 0.5, ThresholdedRelu 1.0 and Affine 1.0 / 0.0 (the experimental
//!   `Affine` and `ThresholdedRelu` ops' attribute defaults), ScaledTanh 1.0 / 1.0 (the
//!   ScaledTanh op declares no defaults; 1.0 / 1.0 is onnxruntime's ScaledTanh kernel's).
//!   Attributes are FLOATs, so a default is its f32 value (0.2 is `0.2f32`, 0.01 is
//!   `0.01f32`), as an op computing in double reads its float attribute.
//!   onnxruntime's recurrent kernels differ here: they fill missing Affine, ScaledTanh
//!   and ThresholdedRelu values with 0 (see `tests/conformance/onnx-rnn-attrs/README.md`).
//! * Activation formulas as the spec's table gives them, except `ThresholdedRelu`, which is
//!   `x > alpha ? x : 0` as the ThresholdedRelu op and onnxruntime define it (the table
//!   says `x >= alpha`; the two differ only at `x == alpha`).
//! * `clip`: "Cell clip threshold. Clipping bounds the elements of a tensor in the range of
//!   [-threshold, +threshold] and is applied to the input of activations." Every gate's
//!   pre-activation (after the bias and peephole terms) is clamped to `[-clip, clip]`
//!   before its activation; the LSTM cell state `C_t` given to `h` is not clipped (it is
//!   the input of `h`, but onnxruntime does not clip it, and the spec calls `C_t` itself
//!   no pre-activation).
//! * `input_forget` (LSTM): "Couple the input and forget gates if 1": `f_t = 1 − i_t`; the
//!   forget gate's weights, bias and peephole are not used.
//! * `P` (LSTM): "`P[iof]` - P peephole weight vector for input, output, and forget gates":
//!   `P[d] = [Pi, Po, Pf]`; `i_t` and `f_t` use `C_{t−1}`, `o_t` uses `C_t`.
//! * Gate blocks: LSTM `W[iofc]`, GRU `W[zrh]`, block `k` = rows `k·H .. (k+1)·H` of
//!   `W[d]`, `R[d]`; `B[d] = [Wb[..], Rb[..]]`. Absent `B`, `P`, initial states: zeros
//!   ("If not specified - assumed to be 0").
//! * `linear_before_reset` (GRU): 0: `h_t = g(Xt·Whᵀ + (r_t ⊙ H_{t−1})·Rhᵀ + Rbh + Wbh)`;
//!   otherwise `h_t = g(Xt·Whᵀ + r_t ⊙ (H_{t−1}·Rhᵀ + Rbh) + Wbh)`;
//!   `H_t = (1 − z_t) ⊙ h_t + z_t ⊙ H_{t−1}`.
//! * `layout`: 0: `X [T, N, I]`, `Y [T, D, N, H]`, `initial_h/initial_c/Y_h/Y_c [D, N, H]`;
//!   1: `X [N, T, I]`, `Y [N, T, D, H]`, states `[N, D, H]`.
//! * `sequence_lens` (`[N]`, each in `0..=T`; absent: all `T`): row `b` runs only its
//!   steps `0 .. len[b]` (the reverse direction from `len[b] − 1` down to 0); `Y` is 0 at
//!   the other steps and `Y_h`/`Y_c` hold the state after the row's last processed step —
//!   the initial state for a zero-length row. (The spec does not define what lies past a
//!   row's length; this is onnxruntime's reading, except that onnxruntime's LSTM and GRU
//!   zero `Y_h`/`Y_c` of a zero-length row.)
//! * `direction`: "forward", "reverse" or "bidirectional" (direction 0 forward, 1 reverse);
//!   the reverse direction's `Y[t]` is the state after reading `X[len−1] … X[t]`.
//! * `hidden_size`: when given it must equal R's last dimension.

use cellgraph::ir::Op;

/// A dense row-major f64 array.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

impl Array {
    /// An array of zeros.
    pub fn zeros(shape: &[usize]) -> Array {
        Array {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// The flat index of a multi-index (checked).
    fn index(&self, idx: &[usize]) -> usize {
        assert_eq!(idx.len(), self.shape.len(), "rank");
        let mut flat = 0;
        for (&i, &n) in idx.iter().zip(&self.shape) {
            assert!(i < n, "index {idx:?} out of {:?}", self.shape);
            flat = flat * n + i;
        }
        flat
    }

    /// The element at a multi-index.
    pub fn at(&self, idx: &[usize]) -> f64 {
        self.data[self.index(idx)]
    }

    fn set(&mut self, idx: &[usize], v: f64) {
        let i = self.index(idx);
        self.data[i] = v;
    }
}

/// Which operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// LSTM: gates i, o, f, c; activations f, g, h.
    Lstm,
    /// GRU: gates z, r, h; activations f, g.
    Gru,
    /// RNN: one gate; activation f.
    Rnn,
}

impl Kind {
    fn gates(self) -> usize {
        match self {
            Kind::Lstm => 4,
            Kind::Gru => 3,
            Kind::Rnn => 1,
        }
    }

    fn functions_per_direction(self) -> usize {
        match self {
            Kind::Lstm => 3,
            Kind::Gru => 2,
            Kind::Rnn => 1,
        }
    }

    fn default_functions(self) -> Vec<Activation> {
        match self {
            Kind::Lstm => vec![Activation::Sigmoid, Activation::Tanh, Activation::Tanh],
            Kind::Gru => vec![Activation::Sigmoid, Activation::Tanh],
            Kind::Rnn => vec![Activation::Tanh],
        }
    }
}

/// An activation function with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// max(0, x)
    Relu,
    /// tanh(x)
    Tanh,
    /// 1 / (1 + e^−x)
    Sigmoid,
    /// alpha·x + beta
    Affine { alpha: f64, beta: f64 },
    /// x if x ≥ 0 else alpha·x
    LeakyRelu { alpha: f64 },
    /// x if x > alpha else 0
    ThresholdedRelu { alpha: f64 },
    /// alpha·tanh(beta·x)
    ScaledTanh { alpha: f64, beta: f64 },
    /// min(max(alpha·x + beta, 0), 1)
    HardSigmoid { alpha: f64, beta: f64 },
    /// x if x ≥ 0 else alpha·(e^x − 1)
    Elu { alpha: f64 },
    /// x / (1 + |x|)
    Softsign,
    /// log(1 + e^x)
    Softplus,
}

impl Activation {
    /// The function's value at `x`.
    pub fn eval(self, x: f64) -> f64 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Affine { alpha, beta } => alpha * x + beta,
            Activation::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
            Activation::ThresholdedRelu { alpha } => {
                if x > alpha {
                    x
                } else {
                    0.0
                }
            }
            Activation::ScaledTanh { alpha, beta } => alpha * (beta * x).tanh(),
            Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Activation::Elu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * (x.exp() - 1.0)
                }
            }
            Activation::Softsign => x / (1.0 + x.abs()),
            // log(1 + e^x) = max(x, 0) + log(1 + e^−|x|), which does not overflow.
            Activation::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        }
    }
}

/// Reads an `activations` list with its `activation_alpha` / `activation_beta` lists: each
/// function that takes alpha (beta) takes the next unread value of that list, or its
/// default when the list has run out.
pub fn parse_activations(
    names: &[String],
    alpha: &[f32],
    beta: &[f32],
) -> Result<Vec<Activation>, String> {
    let mut alphas = alpha.iter().map(|&a| f64::from(a));
    let mut betas = beta.iter().map(|&b| f64::from(b));
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let f = match name.as_str() {
            "Relu" => Activation::Relu,
            "Tanh" => Activation::Tanh,
            "Sigmoid" => Activation::Sigmoid,
            "Softsign" => Activation::Softsign,
            "Softplus" => Activation::Softplus,
            "Affine" => {
                let alpha = alphas.next().unwrap_or(1.0);
                let beta = betas.next().unwrap_or(0.0);
                Activation::Affine { alpha, beta }
            }
            "LeakyRelu" => Activation::LeakyRelu {
                alpha: alphas.next().unwrap_or(f64::from(0.01f32)),
            },
            "ThresholdedRelu" => Activation::ThresholdedRelu {
                alpha: alphas.next().unwrap_or(1.0),
            },
            "ScaledTanh" => {
                let alpha = alphas.next().unwrap_or(1.0);
                let beta = betas.next().unwrap_or(1.0);
                Activation::ScaledTanh { alpha, beta }
            }
            "HardSigmoid" => {
                let alpha = alphas.next().unwrap_or(f64::from(0.2f32));
                let beta = betas.next().unwrap_or(0.5);
                Activation::HardSigmoid { alpha, beta }
            }
            "Elu" => Activation::Elu {
                alpha: alphas.next().unwrap_or(1.0),
            },
            other => return Err(format!("unknown activation {other:?}")),
        };
        out.push(f);
    }
    Ok(out)
}

/// The attributes of one recurrent node, as this oracle reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct Attributes {
    /// The operator.
    pub kind: Kind,
    /// `hidden_size`, when given.
    pub hidden_size: Option<usize>,
    /// Per direction: whether it runs in reverse.
    pub reverse: Vec<bool>,
    /// Per direction: the activation functions (LSTM f, g, h; GRU f, g; RNN f).
    pub functions: Vec<Vec<Activation>>,
    /// `clip`.
    pub clip: Option<f64>,
    /// LSTM `input_forget`.
    pub input_forget: bool,
    /// GRU `linear_before_reset`.
    pub linear_before_reset: bool,
    /// `layout` is 1.
    pub batch_major: bool,
}

/// Reads the attributes of an `LSTM`, `GRU` or `RNN` op.
pub fn read_attributes(op: &Op) -> Result<Attributes, String> {
    // (kind, alpha, beta, activations, clip, direction, hidden_size, layout, input_forget,
    // linear_before_reset)
    let (kind, alpha, beta, names, clip, direction, hidden_size, layout, input_forget, lbr) =
        match op {
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
                Kind::Lstm,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                *layout,
                *input_forget,
                0,
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
                Kind::Gru,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                *layout,
                0,
                *linear_before_reset,
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
                Kind::Rnn,
                activation_alpha,
                activation_beta,
                activations,
                clip,
                direction,
                hidden_size,
                *layout,
                0,
                0,
            ),
            other => return Err(format!("{} is not LSTM, GRU or RNN", other.name())),
        };
    let reverse = match direction.as_str() {
        "forward" => vec![false],
        "reverse" => vec![true],
        "bidirectional" => vec![false, true],
        other => return Err(format!("unknown direction {other:?}")),
    };
    let per = kind.functions_per_direction();
    let functions = match names {
        None => vec![kind.default_functions(); reverse.len()],
        Some(names) => {
            if names.len() != per * reverse.len() {
                return Err(format!(
                    "{} activations for {} direction(s) of {per}",
                    names.len(),
                    reverse.len()
                ));
            }
            let all = parse_activations(
                names,
                alpha.as_deref().unwrap_or(&[]),
                beta.as_deref().unwrap_or(&[]),
            )?;
            all.chunks(per).map(<[Activation]>::to_vec).collect()
        }
    };
    if layout != 0 && layout != 1 {
        return Err(format!("layout {layout}"));
    }
    let clip = clip.map(f64::from);
    if clip.is_some_and(|c| c.is_nan() || c < 0.0) {
        return Err(format!("clip {clip:?}"));
    }
    let hidden_size = match hidden_size {
        Some(h) if *h <= 0 => return Err(format!("hidden_size {h}")),
        Some(h) => Some(*h as usize),
        None => None,
    };
    Ok(Attributes {
        kind,
        hidden_size,
        reverse,
        functions,
        clip,
        input_forget: input_forget != 0,
        linear_before_reset: lbr != 0,
        batch_major: layout == 1,
    })
}

fn check_shape(name: &str, a: &Array, want: &[usize]) -> Result<(), String> {
    if a.shape != want {
        return Err(format!("{name} has shape {:?}, expected {want:?}", a.shape));
    }
    Ok(())
}

/// Evaluates the op on its inputs, given by ONNX slot (`X, W, R, B, sequence_lens,
/// initial_h, initial_c, P`; `sequence_lens` as f64 integers), each `None` when omitted.
/// Returns every output — `[Y, Y_h, Y_c]` for LSTM, `[Y, Y_h]` for GRU and RNN — whether
/// the node requests it or not.
// Index loops over batch rows, units and steps, as the equations are written.
#[allow(clippy::needless_range_loop)]
pub fn evaluate(op: &Op, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let a = read_attributes(op)?;
    let input = |k: usize| inputs.get(k).copied().flatten();
    let x = input(0).ok_or("X is required")?;
    let w = input(1).ok_or("W is required")?;
    let r = input(2).ok_or("R is required")?;
    let is_lstm = a.kind == Kind::Lstm;
    let (b_in, lens_in, h0_in) = (input(3), input(4), input(5));
    let c0_in = if is_lstm { input(6) } else { None };
    let p_in = if is_lstm { input(7) } else { None };

    if x.shape.len() != 3 {
        return Err(format!("X has rank {}", x.shape.len()));
    }
    let (steps, batch, input_size) = if a.batch_major {
        (x.shape[1], x.shape[0], x.shape[2])
    } else {
        (x.shape[0], x.shape[1], x.shape[2])
    };
    let dirs = a.reverse.len();
    let g = a.kind.gates();
    if r.shape.len() != 3 {
        return Err(format!("R has rank {}", r.shape.len()));
    }
    let h = r.shape[2];
    if a.hidden_size.is_some_and(|hs| hs != h) {
        return Err(format!(
            "hidden_size {:?} but R is {:?}",
            a.hidden_size, r.shape
        ));
    }
    check_shape("W", w, &[dirs, g * h, input_size])?;
    check_shape("R", r, &[dirs, g * h, h])?;
    if let Some(b) = b_in {
        check_shape("B", b, &[dirs, 2 * g * h])?;
    }
    if let Some(p) = p_in {
        check_shape("P", p, &[dirs, 3 * h])?;
    }
    let state_shape = if a.batch_major {
        vec![batch, dirs, h]
    } else {
        vec![dirs, batch, h]
    };
    for (name, s) in [("initial_h", h0_in), ("initial_c", c0_in)] {
        if let Some(s) = s {
            check_shape(name, s, &state_shape)?;
        }
    }
    let lens: Vec<usize> = match lens_in {
        None => vec![steps; batch],
        Some(l) => {
            check_shape("sequence_lens", l, &[batch])?;
            l.data
                .iter()
                .map(|&v| {
                    if v >= 0.0 && v <= steps as f64 && v.fract() == 0.0 {
                        Ok(v as usize)
                    } else {
                        Err(format!("sequence_lens value {v} is not in 0..={steps}"))
                    }
                })
                .collect::<Result<_, _>>()?
        }
    };

    // Index helpers for the two layouts.
    let x_at = |t: usize, n: usize, k: usize| {
        if a.batch_major {
            x.at(&[n, t, k])
        } else {
            x.at(&[t, n, k])
        }
    };
    let state_idx = |d: usize, n: usize, j: usize| {
        if a.batch_major {
            vec![n, d, j]
        } else {
            vec![d, n, j]
        }
    };
    let y_shape = if a.batch_major {
        vec![batch, steps, dirs, h]
    } else {
        vec![steps, dirs, batch, h]
    };
    let y_idx = |t: usize, d: usize, n: usize, j: usize| {
        if a.batch_major {
            vec![n, t, d, j]
        } else {
            vec![t, d, n, j]
        }
    };
    let mut y = Array::zeros(&y_shape);
    let mut y_h = Array::zeros(&state_shape);
    let mut y_c = Array::zeros(&state_shape);

    let clip = |v: f64| match a.clip {
        Some(c) => v.max(-c).min(c),
        None => v,
    };

    for d in 0..dirs {
        let funcs = &a.functions[d];
        // Wb and Rb of gate block `k`, unit `j`.
        let wb = |k: usize, j: usize| b_in.map_or(0.0, |b| b.at(&[d, k * h + j]));
        let rb = |k: usize, j: usize| b_in.map_or(0.0, |b| b.at(&[d, g * h + k * h + j]));
        // Peephole of block `k` of P = [Pi, Po, Pf].
        let peep = |k: usize, j: usize| p_in.map_or(0.0, |p| p.at(&[d, k * h + j]));
        for n in 0..batch {
            let mut hid: Vec<f64> = (0..h)
                .map(|j| h0_in.map_or(0.0, |s| s.at(&state_idx(d, n, j))))
                .collect();
            let mut cell: Vec<f64> = (0..h)
                .map(|j| c0_in.map_or(0.0, |s| s.at(&state_idx(d, n, j))))
                .collect();
            let order: Vec<usize> = if a.reverse[d] {
                (0..lens[n]).rev().collect()
            } else {
                (0..lens[n]).collect()
            };
            for t in order {
                let xt: Vec<f64> = (0..input_size).map(|k| x_at(t, n, k)).collect();
                // X_t · W_kᵀ for gate block k, unit j.
                let xw = |k: usize, j: usize| -> f64 {
                    (0..input_size)
                        .map(|i| xt[i] * w.at(&[d, k * h + j, i]))
                        .sum()
                };
                // v · R_kᵀ for gate block k, unit j.
                let vr = |v: &[f64], k: usize, j: usize| -> f64 {
                    (0..h).map(|i| v[i] * r.at(&[d, k * h + j, i])).sum()
                };
                let (new_h, new_c) = match a.kind {
                    Kind::Rnn => {
                        let f = funcs[0];
                        let nh: Vec<f64> = (0..h)
                            .map(|j| f.eval(clip(xw(0, j) + vr(&hid, 0, j) + wb(0, j) + rb(0, j))))
                            .collect();
                        (nh, None)
                    }
                    Kind::Gru => {
                        let (f, gg) = (funcs[0], funcs[1]);
                        // blocks: z = 0, r = 1, h = 2
                        let z: Vec<f64> = (0..h)
                            .map(|j| f.eval(clip(xw(0, j) + vr(&hid, 0, j) + wb(0, j) + rb(0, j))))
                            .collect();
                        let rg: Vec<f64> = (0..h)
                            .map(|j| f.eval(clip(xw(1, j) + vr(&hid, 1, j) + wb(1, j) + rb(1, j))))
                            .collect();
                        let r_hid: Vec<f64> = (0..h).map(|j| rg[j] * hid[j]).collect();
                        let cand: Vec<f64> = (0..h)
                            .map(|j| {
                                let pre = if a.linear_before_reset {
                                    xw(2, j) + rg[j] * (vr(&hid, 2, j) + rb(2, j)) + wb(2, j)
                                } else {
                                    xw(2, j) + vr(&r_hid, 2, j) + rb(2, j) + wb(2, j)
                                };
                                gg.eval(clip(pre))
                            })
                            .collect();
                        let nh: Vec<f64> = (0..h)
                            .map(|j| (1.0 - z[j]) * cand[j] + z[j] * hid[j])
                            .collect();
                        (nh, None)
                    }
                    Kind::Lstm => {
                        let (f, gg, hh) = (funcs[0], funcs[1], funcs[2]);
                        // W/R/B blocks: i = 0, o = 1, f = 2, c = 3. P blocks: i = 0, o = 1, f = 2.
                        let pre =
                            |k: usize, j: usize| xw(k, j) + vr(&hid, k, j) + wb(k, j) + rb(k, j);
                        let i_g: Vec<f64> = (0..h)
                            .map(|j| f.eval(clip(pre(0, j) + peep(0, j) * cell[j])))
                            .collect();
                        let f_g: Vec<f64> = if a.input_forget {
                            (0..h).map(|j| 1.0 - i_g[j]).collect()
                        } else {
                            (0..h)
                                .map(|j| f.eval(clip(pre(2, j) + peep(2, j) * cell[j])))
                                .collect()
                        };
                        let c_cand: Vec<f64> = (0..h).map(|j| gg.eval(clip(pre(3, j)))).collect();
                        let nc: Vec<f64> = (0..h)
                            .map(|j| f_g[j] * cell[j] + i_g[j] * c_cand[j])
                            .collect();
                        let o_g: Vec<f64> = (0..h)
                            .map(|j| f.eval(clip(pre(1, j) + peep(1, j) * nc[j])))
                            .collect();
                        let nh: Vec<f64> = (0..h).map(|j| o_g[j] * hh.eval(nc[j])).collect();
                        (nh, Some(nc))
                    }
                };
                hid = new_h;
                if let Some(c) = new_c {
                    cell = c;
                }
                for (j, &v) in hid.iter().enumerate() {
                    y.set(&y_idx(t, d, n, j), v);
                }
            }
            for j in 0..h {
                y_h.set(&state_idx(d, n, j), hid[j]);
                y_c.set(&state_idx(d, n, j), cell[j]);
            }
        }
    }
    let mut out = vec![y, y_h];
    if is_lstm {
        out.push(y_c);
    }
    Ok(out)
}
