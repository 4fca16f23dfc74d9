//! Shape rules of `Scan`, `Loop` and `If`, read off their body graphs.

use super::infer::{norm_axis, outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::types::{Dim, ValueType};

fn insert_axis(t: &ValueType, axis: i64, len: Dim) -> Result<ValueType, String> {
    match t {
        ValueType::Tensor(tt) => match &tt.shape {
            Some(s) => {
                let a = norm_axis(axis, s.len() + 1)?;
                let mut s = s.clone();
                s.insert(a, len);
                Ok(tensor(tt.dtype, Some(s)))
            }
            None => Ok(tensor(tt.dtype, None)),
        },
        ValueType::Unknown => Ok(ValueType::Unknown),
        other => Err(format!("a scan output must be a tensor, found {other}")),
    }
}

fn check_compatible(what: &str, outer: &ValueType, inner: &ValueType) -> Result<(), String> {
    match (outer.dtype(), inner.dtype()) {
        (Some(a), Some(b)) if a != b => {
            Err(format!("{what}: outer value is {a}, body expects {b}"))
        }
        _ => Ok(()),
    }
}

/// Output types of a control-flow op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    match op {
        Op::Scan {
            body,
            num_scan_inputs,
            scan_input_axes,
            scan_output_axes,
            ..
        } => {
            let m = usize::try_from(*num_scan_inputs)
                .map_err(|_| format!("num_scan_inputs {num_scan_inputs} is negative"))?;
            let legacy = cx.opset < 9;
            let first = usize::from(legacy);
            let total = cx.inputs.len();
            if total < first + m {
                return Err(format!("{total} inputs cannot hold {m} scan inputs"));
            }
            let n = total - first - m;
            let bin = body.input_types();
            let bout = body.output_types();
            if bin.len() != n + m {
                return Err(format!(
                    "body has {} inputs, expected {n} states + {m} scan inputs",
                    bin.len()
                ));
            }
            if bout.len() < n {
                return Err(format!(
                    "body has {} outputs, fewer than the {n} states",
                    bout.len()
                ));
            }
            if let Some(ax) = scan_input_axes {
                if ax.len() != m {
                    return Err(format!(
                        "scan_input_axes has {} entries for {m} scan inputs",
                        ax.len()
                    ));
                }
            }
            let k = bout.len() - n;
            if let Some(ax) = scan_output_axes {
                if ax.len() != k {
                    return Err(format!(
                        "scan_output_axes has {} entries for {k} scan outputs",
                        ax.len()
                    ));
                }
            }
            for (i, inner) in bin.iter().enumerate() {
                if cx.has(first + i) {
                    check_compatible(&format!("input {}", first + i), cx.input(first + i)?, inner)?;
                }
            }
            // The sequence length, from the first scan input.
            let mut seq = Dim::Unknown;
            if m > 0 && cx.has(first + n) {
                if let Some(s) = cx.tensor(first + n)?.shape {
                    let ax = if legacy {
                        1
                    } else {
                        scan_input_axes.as_ref().map(|a| a[0]).unwrap_or(0)
                    };
                    if let Ok(a) = norm_axis(ax, s.len()) {
                        seq = s[a].clone();
                    }
                }
            }
            let mut outs = Vec::new();
            let batch = if legacy && cx.has(first) {
                cx.tensor(first)?
                    .shape
                    .and_then(|s| s.first().cloned())
                    .unwrap_or(Dim::Unknown)
            } else {
                Dim::Unknown
            };
            for (i, t) in bout.iter().enumerate() {
                let t = if legacy && i < n {
                    insert_axis(t, 0, batch.clone())?
                } else {
                    t.clone()
                };
                let t = if i < n && cx.has(first + i) {
                    cx.input(first + i)?.merge(&t).unwrap_or(t)
                } else {
                    t
                };
                if legacy {
                    if i < n {
                        outs.push(t);
                    } else {
                        outs.push(insert_axis(
                            &insert_axis(&t, 0, seq.clone())?,
                            0,
                            batch.clone(),
                        )?);
                    }
                } else if i < n {
                    outs.push(t);
                } else {
                    let ax = scan_output_axes.as_ref().map(|a| a[i - n]).unwrap_or(0);
                    outs.push(insert_axis(&t, ax, seq.clone())?);
                }
            }
            outputs(cx, outs)
        }
        Op::Loop { body } => {
            let total = cx.inputs.len();
            let n = total - 2;
            if cx.has(0) {
                cx.dtype_in(0, |d| d == DType::I64, "i64")?;
            }
            if cx.has(1) {
                cx.dtype_in(1, |d| d == DType::Bool, "bool")?;
            }
            let bin = body.input_types();
            let bout = body.output_types();
            if bin.len() != n + 2 {
                return Err(format!(
                    "body has {} inputs, expected 2 + {n} loop-carried",
                    bin.len()
                ));
            }
            if bout.len() < n + 1 {
                return Err(format!(
                    "body has {} outputs, expected at least 1 + {n}",
                    bout.len()
                ));
            }
            for i in 0..n {
                if cx.has(2 + i) {
                    check_compatible(&format!("input {}", 2 + i), cx.input(2 + i)?, &bin[2 + i])?;
                }
            }
            let trips = cx
                .const_ints(0)
                .and_then(|v| v.first().copied())
                .filter(|&t| t >= 0 && !cx.has(1));
            let mut outs = Vec::new();
            for (i, t) in bout.iter().enumerate().skip(1) {
                if i <= n {
                    let outer = if cx.has(1 + i) {
                        cx.input(1 + i)?.clone()
                    } else {
                        ValueType::Unknown
                    };
                    outs.push(outer.merge(t).unwrap_or_else(|_| t.clone()));
                } else {
                    let len = trips.map(|t| Dim::Known(t as u64)).unwrap_or(Dim::Unknown);
                    outs.push(insert_axis(t, 0, len)?);
                }
            }
            outputs(cx, outs)
        }
        Op::If {
            then_branch,
            else_branch,
        } => {
            cx.dtype_in(0, |d| d == DType::Bool, "bool")?;
            let (a, b) = (then_branch.output_types(), else_branch.output_types());
            if a.len() != b.len() {
                return Err(format!(
                    "then branch has {} outputs, else branch {}",
                    a.len(),
                    b.len()
                ));
            }
            let outs = a
                .iter()
                .zip(&b)
                .map(|(x, y)| match (x, y) {
                    (ValueType::Tensor(p), ValueType::Tensor(q))
                        if p.dtype == q.dtype || p.dtype.is_none() || q.dtype.is_none() =>
                    {
                        let shape = match (&p.shape, &q.shape) {
                            (Some(s), Some(t)) if s.len() == t.len() => Some(
                                s.iter()
                                    .zip(t)
                                    .map(|(u, v)| if u == v { u.clone() } else { Dim::Unknown })
                                    .collect(),
                            ),
                            _ => None,
                        };
                        Ok(tensor(p.dtype.or(q.dtype), shape))
                    }
                    (x, y) => x.merge(y).map_err(|e| format!("branches disagree: {e}")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            outputs(cx, outs)
        }
        other => Err(format!("{} is not a control-flow op", other.name())),
    }
}
