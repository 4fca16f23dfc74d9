//! Metrics by their Keras names.

use super::loss::Loss;
use crate::keras::KerasError;
use cellgraph_ir::Tensor;

type R<T> = Result<T, KerasError>;

/// A metric, by its Keras name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// `accuracy`: binary, sparse categorical or categorical, chosen from the shapes of
    /// the outputs and targets as Keras 3 does.
    Accuracy,
    /// `sparse_categorical_accuracy`.
    SparseCategoricalAccuracy,
    /// `categorical_accuracy`.
    CategoricalAccuracy,
    /// `binary_accuracy` (threshold 0.5).
    BinaryAccuracy,
}

impl Metric {
    /// The name Keras prints.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::SparseCategoricalAccuracy => "sparse_categorical_accuracy",
            Metric::CategoricalAccuracy => "categorical_accuracy",
            Metric::BinaryAccuracy => "binary_accuracy",
        }
    }

    /// (correct, counted) on one batch.
    pub(crate) fn count(&self, out: &Tensor, y: &Tensor, loss: Loss) -> R<(f64, usize)> {
        let kind = match self {
            // Keras 3 picks by shapes: binary for one output column, sparse when the
            // targets have a lower rank (or one column against several), else categorical.
            Metric::Accuracy => {
                let (p, t) = (out.shape(), y.shape());
                let p_last = p.last().copied().unwrap_or(1);
                let t_last = t.last().copied().unwrap_or(1);
                if p_last == 1 {
                    Metric::BinaryAccuracy
                } else if t.len() < p.len() || (t_last == 1 && p_last > 1) {
                    Metric::SparseCategoricalAccuracy
                } else {
                    Metric::CategoricalAccuracy
                }
            }
            m => *m,
        };
        let o = out.to_f64_vec();
        let t = y.to_f64_vec();
        let c = *out.shape().last().unwrap_or(&1);
        let argmax = |row: &[f64]| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        };
        Ok(match kind {
            Metric::SparseCategoricalAccuracy => {
                let rows = o.len() / c.max(1);
                let hits = (0..rows)
                    .filter(|&r| {
                        t.get(r)
                            .is_some_and(|&k| argmax(&o[r * c..(r + 1) * c]) as f64 == k)
                    })
                    .count();
                (hits as f64, rows)
            }
            Metric::CategoricalAccuracy => {
                let rows = o.len() / c.max(1);
                let hits = (0..rows)
                    .filter(|&r| argmax(&o[r * c..(r + 1) * c]) == argmax(&t[r * c..(r + 1) * c]))
                    .count();
                (hits as f64, rows)
            }
            _ => {
                let logits = matches!(loss, Loss::BinaryCrossentropy { from_logits: true });
                let th = if logits { 0.0 } else { 0.5 };
                let hits = o
                    .iter()
                    .zip(&t)
                    .filter(|(p, y)| ((**p > th) as i32 as f64) == **y)
                    .count();
                (hits as f64, o.len())
            }
        })
    }
}
