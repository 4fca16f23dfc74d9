//! Losses by their Keras names: their values on host tensors, and the loss nodes
//! appended to a lowered graph (`LossEmit`, over the shared graph builder).

use crate::keras::KerasError;
use cellgraph_ir::{Graph, Op, Tensor, ValueRef};
use ndarray::{ArrayD, IxDyn};

type R<T> = Result<T, KerasError>;

/// A loss, by its Keras name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// `mean_squared_error` / `mse`.
    MeanSquaredError,
    /// `mean_absolute_error` / `mae`.
    MeanAbsoluteError,
    /// `SparseCategoricalCrossentropy(from_logits)`: integer class targets.
    SparseCategoricalCrossentropy {
        /// The output is logits (softmax applied inside the loss).
        from_logits: bool,
    },
    /// `CategoricalCrossentropy(from_logits)`: one-hot targets.
    CategoricalCrossentropy {
        /// The output is logits.
        from_logits: bool,
    },
    /// `BinaryCrossentropy(from_logits)`: targets in [0, 1].
    BinaryCrossentropy {
        /// The output is logits.
        from_logits: bool,
    },
}

impl Loss {
    /// The name Keras prints (`loss` is always printed as `loss`; this names the kind).
    pub fn name(&self) -> &'static str {
        match self {
            Loss::MeanSquaredError => "mean_squared_error",
            Loss::MeanAbsoluteError => "mean_absolute_error",
            Loss::SparseCategoricalCrossentropy { .. } => "sparse_categorical_crossentropy",
            Loss::CategoricalCrossentropy { .. } => "categorical_crossentropy",
            Loss::BinaryCrossentropy { .. } => "binary_crossentropy",
        }
    }

    pub(crate) fn key(&self) -> String {
        format!("{self:?}")
    }

    /// The targets as the loss graph reads them: class ids become one-hot rows.
    pub(crate) fn prepare_targets(&self, output_shape: &[usize], t: &Tensor) -> R<Tensor> {
        match self {
            Loss::SparseCategoricalCrossentropy { .. } => {
                let c = *output_shape.last().unwrap_or(&0);
                let mut ids = t.to_f64_vec();
                let mut tshape = t.shape().to_vec();
                if tshape.len() == output_shape.len() && tshape.last() == Some(&1) {
                    tshape.pop();
                }
                if tshape != output_shape[..output_shape.len().saturating_sub(1)] {
                    return Err(KerasError::Input {
                        input: "targets".into(),
                        msg: format!(
                            "class ids of shape {:?} do not fit outputs of shape {:?}",
                            t.shape(),
                            output_shape
                        ),
                    });
                }
                let mut v = vec![0f32; ids.len() * c];
                for (r, id) in ids.iter_mut().enumerate() {
                    if !(id.fract() == 0.0 && *id >= 0.0 && (*id as usize) < c) {
                        return Err(KerasError::Input {
                            input: "targets".into(),
                            msg: format!("class id {id} is not in 0..{c}"),
                        });
                    }
                    v[r * c + *id as usize] = 1.0;
                }
                Ok(Tensor::F32(
                    ArrayD::from_shape_vec(IxDyn(output_shape), v)
                        .map_err(|e| KerasError::Internal(e.to_string()))?,
                ))
            }
            _ => {
                if t.shape() != output_shape {
                    return Err(KerasError::Input {
                        input: "targets".into(),
                        msg: format!(
                            "targets of shape {:?} do not fit outputs of shape {:?}",
                            t.shape(),
                            output_shape
                        ),
                    });
                }
                Ok(Tensor::F32(
                    ArrayD::from_shape_vec(
                        IxDyn(t.shape()),
                        t.to_f64_vec().into_iter().map(|v| v as f32).collect(),
                    )
                    .map_err(|e| KerasError::Internal(e.to_string()))?,
                ))
            }
        }
    }

    /// Emits the scalar loss of `y` against the prepared targets `t`.
    pub(crate) fn emit(&self, g: &mut Graph, y: ValueRef, t: ValueRef) -> R<ValueRef> {
        let mut e = LossEmit {
            b: cellgraph_ir::builder::Builder::new(g, "loss"),
        };
        let rank = e.rank(y);
        let all: Vec<i64> = (0..rank as i64).collect();
        match *self {
            Loss::MeanSquaredError => {
                let d = e.op(Op::Sub {}, &[y, t])?;
                let sq = e.op(Op::Mul {}, &[d, d])?;
                e.mean(sq, &all)
            }
            Loss::MeanAbsoluteError => {
                let d = e.op(Op::Sub {}, &[y, t])?;
                let a = e.op(Op::Abs {}, &[d])?;
                e.mean(a, &all)
            }
            Loss::SparseCategoricalCrossentropy { from_logits }
            | Loss::CategoricalCrossentropy { from_logits } => {
                let lp = if from_logits {
                    e.op(Op::LogSoftmax { axis: Some(-1) }, &[y])?
                } else {
                    // Keras: normalised over the class axis, clipped to [ε, 1 − ε].
                    let s = e.sum(y, &[-1], true)?;
                    let p = e.op(Op::Div {}, &[y, s])?;
                    let p = e.clip(p)?;
                    e.op(Op::Log {}, &[p])?
                };
                let tl = e.op(Op::Mul {}, &[t, lp])?;
                let per = e.sum(tl, &[-1], false)?;
                let m = e.mean(per, &all[..rank.saturating_sub(1)])?;
                e.op(Op::Neg {}, &[m])
            }
            Loss::BinaryCrossentropy { from_logits } => {
                let one = e.scalar(1.0)?;
                let omt = e.op(Op::Sub {}, &[one, t])?;
                let per = if from_logits {
                    // t·softplus(−x) + (1 − t)·softplus(x)
                    let nx = e.op(Op::Neg {}, &[y])?;
                    let a = e.op(Op::Softplus {}, &[nx])?;
                    let b = e.op(Op::Softplus {}, &[y])?;
                    let ta = e.op(Op::Mul {}, &[t, a])?;
                    let tb = e.op(Op::Mul {}, &[omt, b])?;
                    e.op(Op::Add {}, &[ta, tb])?
                } else {
                    let p = e.clip(y)?;
                    let lp = e.op(Op::Log {}, &[p])?;
                    let omp = e.op(Op::Sub {}, &[one, p])?;
                    let lq = e.op(Op::Log {}, &[omp])?;
                    let a = e.op(Op::Mul {}, &[t, lp])?;
                    let b = e.op(Op::Mul {}, &[omt, lq])?;
                    let s = e.op(Op::Add {}, &[a, b])?;
                    e.op(Op::Neg {}, &[s])?
                };
                e.mean(per, &all)
            }
        }
    }
}

/// Adds the loss nodes (`loss/v_<k>`) through the shared builder.
pub(crate) struct LossEmit<'g> {
    pub(crate) b: cellgraph_ir::builder::Builder<'g>,
}

impl LossEmit<'_> {
    pub(crate) fn op(&mut self, op: Op, ins: &[ValueRef]) -> R<ValueRef> {
        // Several losses (one per output) share the graph: the builder skips names
        // already taken.
        Ok(self.b.op(op, ins, "v")?)
    }
    pub(crate) fn constant(&mut self, t: Tensor) -> R<ValueRef> {
        self.op(Op::constant(t), &[])
    }
    pub(crate) fn scalar(&mut self, v: f32) -> R<ValueRef> {
        self.constant(Tensor::scalar_f32(v))
    }
    pub(crate) fn rank(&self, v: ValueRef) -> usize {
        self.b.g.value(v).ty.dims().map_or(0, <[_]>::len)
    }
    pub(crate) fn mean(&mut self, v: ValueRef, axes: &[i64]) -> R<ValueRef> {
        if axes.is_empty() {
            return Ok(v);
        }
        let a = self.constant(Tensor::vec_i64(axes))?;
        self.op(
            Op::ReduceMean {
                axes: None,
                keepdims: 0,
                noop_with_empty_axes: 0,
            },
            &[v, a],
        )
    }
    pub(crate) fn sum(&mut self, v: ValueRef, axes: &[i64], keepdims: bool) -> R<ValueRef> {
        let a = self.constant(Tensor::vec_i64(axes))?;
        self.op(
            Op::ReduceSum {
                axes: None,
                keepdims: i64::from(keepdims),
                noop_with_empty_axes: 0,
            },
            &[v, a],
        )
    }
    pub(crate) fn clip(&mut self, v: ValueRef) -> R<ValueRef> {
        let lo = self.scalar(1e-7)?;
        let hi = self.scalar(1.0 - 1e-7)?;
        self.op(
            Op::Clip {
                min: None,
                max: None,
            },
            &[v, lo, hi],
        )
    }
}

/// The loss computed on the host (for `evaluate`), Keras's definitions.
pub fn loss_value(loss: Loss, output: &Tensor, targets: &Tensor) -> R<f64> {
    let y = output.to_f64_vec();
    let t = targets.to_f64_vec();
    let c = *output.shape().last().unwrap_or(&1);
    let eps = 1e-7;
    let bad = |msg: String| KerasError::Input {
        input: "targets".into(),
        msg,
    };
    Ok(match loss {
        Loss::MeanSquaredError | Loss::MeanAbsoluteError | Loss::BinaryCrossentropy { .. } => {
            if y.len() != t.len() {
                return Err(bad(format!(
                    "{} target values for {} outputs",
                    t.len(),
                    y.len()
                )));
            }
            let per = |(a, b): (&f64, &f64)| match loss {
                Loss::MeanSquaredError => (a - b).powi(2),
                Loss::MeanAbsoluteError => (a - b).abs(),
                Loss::BinaryCrossentropy { from_logits: true } => {
                    let sp = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
                    b * sp(-a) + (1.0 - b) * sp(*a)
                }
                _ => {
                    let p = a.clamp(eps, 1.0 - eps);
                    -(b * p.ln() + (1.0 - b) * (1.0 - p).ln())
                }
            };
            y.iter().zip(&t).map(per).sum::<f64>() / y.len().max(1) as f64
        }
        Loss::SparseCategoricalCrossentropy { from_logits }
        | Loss::CategoricalCrossentropy { from_logits } => {
            let rows = y.len() / c.max(1);
            let sparse = matches!(loss, Loss::SparseCategoricalCrossentropy { .. });
            if (sparse && t.len() != rows) || (!sparse && t.len() != y.len()) {
                return Err(bad(format!("{} targets for {rows} rows", t.len())));
            }
            let mut sum = 0.0;
            for r in 0..rows {
                let row = &y[r * c..(r + 1) * c];
                let lp: Vec<f64> = if from_logits {
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                    row.iter().map(|v| v - lse).collect()
                } else {
                    let s: f64 = row.iter().sum();
                    row.iter()
                        .map(|v| (v / s).clamp(eps, 1.0 - eps).ln())
                        .collect()
                };
                if sparse {
                    let k = t[r];
                    if !(k >= 0.0 && (k as usize) < c) {
                        return Err(bad(format!("class id {k} is not in 0..{c}")));
                    }
                    sum -= lp[k as usize];
                } else {
                    sum -= (0..c).map(|j| t[r * c + j] * lp[j]).sum::<f64>();
                }
            }
            sum / rows.max(1) as f64
        }
    })
}
