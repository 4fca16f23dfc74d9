//! Optimizers with Keras's update rules and defaults, their state (slots per weight,
//! iterations), gradient clipping, and the compiled training configuration.

use super::loss::Loss;
use super::metric::Metric;
use crate::keras::KerasError;
use ndarray::{ArrayD, IxDyn};
use std::fmt;

type R<T> = Result<T, KerasError>;

/// An optimizer with Keras's update rules and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `SGD(learning_rate=0.01, momentum=0.0, nesterov=False)`.
    SGD {
        /// The learning rate.
        learning_rate: f32,
        /// Momentum.
        momentum: f32,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// `Adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)`.
    Adam {
        /// The learning rate.
        learning_rate: f32,
        /// β₁.
        beta_1: f32,
        /// β₂.
        beta_2: f32,
        /// ε.
        epsilon: f32,
    },
    /// `RMSprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7)`.
    RMSprop {
        /// The learning rate.
        learning_rate: f32,
        /// ρ.
        rho: f32,
        /// Momentum.
        momentum: f32,
        /// ε.
        epsilon: f32,
    },
}

impl Optimizer {
    /// `keras.optimizers.SGD()` with its defaults.
    pub fn sgd() -> Optimizer {
        Optimizer::SGD {
            learning_rate: 0.01,
            momentum: 0.0,
            nesterov: false,
        }
    }
    /// `keras.optimizers.Adam()` with its defaults.
    pub fn adam() -> Optimizer {
        Optimizer::Adam {
            learning_rate: 0.001,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
        }
    }
    /// `keras.optimizers.RMSprop()` with its defaults.
    pub fn rmsprop() -> Optimizer {
        Optimizer::RMSprop {
            learning_rate: 0.001,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
        }
    }

    /// One Keras update of `w` with gradient `g` at step `t` (1-based).
    pub(crate) fn update(&self, w: &mut ArrayD<f32>, g: &ArrayD<f32>, s: &mut OptSlot, t: u64) {
        match *self {
            Optimizer::SGD {
                learning_rate: lr,
                momentum,
                nesterov,
            } => {
                if momentum == 0.0 {
                    w.zip_mut_with(g, |w, &g| *w -= lr * g);
                    return;
                }
                // Keras 3: m = momentum·m − lr·g; w += m (nesterov: w += momentum·m − lr·g)
                ndarray::Zip::from(&mut *w)
                    .and(&mut s.m)
                    .and(g)
                    .for_each(|w, m, &g| {
                        *m = momentum * *m - lr * g;
                        if nesterov {
                            *w += momentum * *m - lr * g;
                        } else {
                            *w += *m;
                        }
                    });
            }
            Optimizer::Adam {
                learning_rate: lr,
                beta_1: b1,
                beta_2: b2,
                epsilon: eps,
            } => {
                // Keras 3: alpha = lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ); m += (g − m)(1 − β₁);
                // v += (g² − v)(1 − β₂); w −= alpha·m/(√v + ε)
                let t = t as i32;
                let alpha = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
                ndarray::Zip::from(&mut *w)
                    .and(&mut s.m)
                    .and(&mut s.v)
                    .and(g)
                    .for_each(|w, m, v, &g| {
                        *m += (g - *m) * (1.0 - b1);
                        *v += (g * g - *v) * (1.0 - b2);
                        *w -= alpha * *m / (v.sqrt() + eps);
                    });
            }
            Optimizer::RMSprop {
                learning_rate: lr,
                rho,
                momentum,
                epsilon: eps,
            } => {
                // Keras 3: v = ρv + (1 − ρ)g²; inc = lr·g/√(v + ε);
                // momentum: m = momentum·m + inc, w −= m; else w −= inc
                ndarray::Zip::from(&mut *w)
                    .and(&mut s.v)
                    .and(&mut s.m)
                    .and(g)
                    .for_each(|w, v, m, &g| {
                        *v = rho * *v + (1.0 - rho) * g * g;
                        let inc = lr * g / (*v + eps).sqrt();
                        if momentum > 0.0 {
                            *m = momentum * *m + inc;
                            *w -= *m;
                        } else {
                            *w -= inc;
                        }
                    });
            }
        }
    }
}

/// FNV-1a 64 of `bytes`.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Optimizer {
    /// The optimizer with every setting, as checkpoints record it:
    /// `adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)`.
    pub fn describe(&self) -> String {
        match *self {
            Optimizer::SGD {
                learning_rate,
                momentum,
                nesterov,
            } => format!(
                "sgd(learning_rate={learning_rate:?}, momentum={momentum:?}, nesterov={nesterov})"
            ),
            Optimizer::Adam {
                learning_rate,
                beta_1,
                beta_2,
                epsilon,
            } => format!(
                "adam(learning_rate={learning_rate:?}, beta_1={beta_1:?}, beta_2={beta_2:?}, \
                 epsilon={epsilon:?})"
            ),
            Optimizer::RMSprop {
                learning_rate,
                rho,
                momentum,
                epsilon,
            } => format!(
                "rmsprop(learning_rate={learning_rate:?}, rho={rho:?}, momentum={momentum:?}, \
                 epsilon={epsilon:?})"
            ),
        }
    }
}

/// An optimizer's per-weight state (momenta, second moments) and its step count.
#[derive(Clone, Debug, Default)]
pub struct OptimizerState {
    pub(crate) slots: Vec<OptSlot>,
    pub(crate) iterations: u64,
}

impl OptimizerState {
    /// The moments (m, v) per weight and the step count.
    #[allow(clippy::type_complexity)]
    pub fn parts(&self) -> (Vec<(&ArrayD<f32>, &ArrayD<f32>)>, u64) {
        (
            self.slots.iter().map(|s| (&s.m, &s.v)).collect(),
            self.iterations,
        )
    }

    /// A state from its moments and step count.
    pub fn from_parts(moments: Vec<(ArrayD<f32>, ArrayD<f32>)>, iterations: u64) -> OptimizerState {
        OptimizerState {
            slots: moments.into_iter().map(|(m, v)| OptSlot { m, v }).collect(),
            iterations,
        }
    }
}

impl Optimizer {
    /// One update of `weights` with `grads` (same order and shapes), as Keras's
    /// `optimizer.apply_gradients`; `state` carries the moments between calls.
    pub fn apply_gradients(
        &self,
        state: &mut OptimizerState,
        weights: &mut [&mut ArrayD<f32>],
        grads: &[ArrayD<f32>],
    ) -> R<()> {
        if weights.len() != grads.len() {
            return Err(KerasError::Weights(format!(
                "{} weights and {} gradients",
                weights.len(),
                grads.len()
            )));
        }
        for (w, g) in weights.iter().zip(grads) {
            if w.shape() != g.shape() {
                return Err(KerasError::Weights(format!(
                    "a gradient of shape {:?} for a weight of shape {:?}",
                    g.shape(),
                    w.shape()
                )));
            }
        }
        if state.slots.len() != weights.len() {
            state.slots = weights
                .iter()
                .map(|w| OptSlot::zeros(w.raw_dim()))
                .collect();
        }
        state.iterations += 1;
        for ((w, g), slot) in weights.iter_mut().zip(grads).zip(&mut state.slots) {
            self.update(w, g, slot, state.iterations);
        }
        Ok(())
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Optimizer::SGD { .. } => f.write_str("SGD"),
            Optimizer::Adam { .. } => f.write_str("Adam"),
            Optimizer::RMSprop { .. } => f.write_str("RMSprop"),
        }
    }
}

/// Per-weight optimizer state.
#[derive(Clone, Debug)]
pub(crate) struct OptSlot {
    pub(crate) m: ArrayD<f32>,
    pub(crate) v: ArrayD<f32>,
}

impl OptSlot {
    pub(crate) fn zeros(dim: IxDyn) -> OptSlot {
        OptSlot {
            m: ArrayD::zeros(dim.clone()),
            v: ArrayD::zeros(dim),
        }
    }
}

/// What `compile` set up.
#[derive(Clone, Debug)]
pub(crate) struct TrainState {
    pub(crate) optimizer: Optimizer,
    pub(crate) loss: Loss,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) state: OptimizerState,
    pub(crate) clipping: Clipping,
}

/// Gradient clipping as Keras's optimizer options (one at a time, as Keras requires):
/// `clipnorm` rescales each gradient to at most that L2 norm, `global_clipnorm` all of
/// them together, `clipvalue` clips each element to `[-v, v]`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Clipping {
    /// Per-gradient L2 norm bound.
    pub clipnorm: Option<f32>,
    /// Bound on the L2 norm of all gradients together.
    pub global_clipnorm: Option<f32>,
    /// Per-element bound.
    pub clipvalue: Option<f32>,
}
