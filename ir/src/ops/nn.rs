//! Shape rules of matrix products, Einsum, BatchNormalization, Softmax and Dropout.

use super::infer::{broadcast, norm_axis, outputs, tensor, InferCtx, RuleResult};
use super::Op;
use crate::dtype::DType;
use crate::types::{Dim, ValueType};
use std::collections::BTreeMap;

/// Output types of an nn op.
pub fn infer(op: &Op, cx: &InferCtx<'_>) -> RuleResult {
    match op {
        Op::MatMul {} => {
            let d = cx.same_dtype(&[0, 1])?;
            let (a, b) = (cx.tensor(0)?.shape, cx.tensor(1)?.shape);
            let shape = match (a, b) {
                (Some(a), Some(b)) => Some(matmul_shape(&a, &b)?),
                _ => None,
            };
            outputs(cx, vec![tensor(d, shape)])
        }
        Op::Gemm { transA, transB, .. } => {
            let d = cx.same_dtype(&[0, 1, 2])?;
            let (a, b) = (cx.tensor(0)?, cx.tensor(1)?);
            for (i, t) in [(0, &a), (1, &b)] {
                if let Some(r) = t.rank() {
                    if r != 2 {
                        return Err(format!("input {i} must be 2-D, has rank {r}"));
                    }
                }
            }
            let (m, ka) = match &a.shape {
                Some(s) if *transA != 0 => (s[1].clone(), s[0].clone()),
                Some(s) => (s[0].clone(), s[1].clone()),
                None => (Dim::Unknown, Dim::Unknown),
            };
            let (kb, n) = match &b.shape {
                Some(s) if *transB != 0 => (s[1].clone(), s[0].clone()),
                Some(s) => (s[0].clone(), s[1].clone()),
                None => (Dim::Unknown, Dim::Unknown),
            };
            if let (Dim::Known(x), Dim::Known(y)) = (&ka, &kb) {
                if x != y {
                    return Err(format!("inner dimensions differ: {x} vs {y}"));
                }
            }
            let out = vec![m, n];
            if cx.has(2) {
                let c = cx.tensor(2)?.shape;
                let b = broadcast(&[Some(out.clone()), c])?;
                if let Some(b) = b {
                    if b.len() != 2 {
                        return Err("C does not broadcast to the 2-D result".into());
                    }
                }
            }
            outputs(cx, vec![tensor(d, Some(out))])
        }
        Op::Einsum { equation } => einsum(equation, cx),
        Op::BatchNormalization { training_mode, .. } => {
            let x = cx.tensor(0)?;
            let d = cx.dtype_in(0, DType::is_float, "a float")?;
            let c = x
                .shape
                .as_ref()
                .and_then(|s| s.get(1).cloned())
                .unwrap_or(Dim::Unknown);
            for i in 1..5 {
                let t = cx.tensor(i)?;
                if let Some(s) = &t.shape {
                    if s.len() != 1 {
                        return Err(format!("input {i} must be 1-D, has rank {}", s.len()));
                    }
                    if let (Dim::Known(a), Dim::Known(b)) = (&s[0], &c) {
                        if a != b {
                            return Err(format!("input {i} has {a} channels, X has {b}"));
                        }
                    }
                }
            }
            if *training_mode == 0 && cx.num_outputs > 1 {
                return Err("extra outputs need training_mode=1".into());
            }
            let stat = tensor(cx.tensor(3)?.dtype, Some(vec![c]));
            outputs(cx, vec![tensor(d, x.shape), stat.clone(), stat])
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let x = cx.tensor(0)?;
            let d = cx.dtype_in(0, DType::is_float, "a float")?;
            if let (Some(r), Some(a)) = (x.rank(), axis) {
                if r > 0 || *a != 0 {
                    norm_axis(*a, r)?;
                }
            }
            outputs(cx, vec![tensor(d, x.shape)])
        }
        Op::Dropout { ratio, .. } => {
            let x = cx.tensor(0)?;
            if let Some(r) = ratio {
                if !(0.0..1.0).contains(r) {
                    return Err(format!("ratio {r} is not in [0, 1)"));
                }
            }
            if cx.has(2) {
                cx.dtype_in(2, |d| d == DType::Bool, "bool")?;
            }
            outputs(
                cx,
                vec![
                    tensor(x.dtype, x.shape.clone()),
                    tensor(Some(DType::Bool), x.shape),
                ],
            )
        }
        other => Err(format!("{} is not an nn op", other.name())),
    }
}

/// numpy matmul shape rule.
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, String> {
    if a.is_empty() || b.is_empty() {
        return Err("MatMul inputs must have rank ≥ 1".into());
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![Dim::Known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), Dim::Known(1)]
    } else {
        b.to_vec()
    };
    let (ka, kb) = (&a2[a2.len() - 1], &b2[b2.len() - 2]);
    if let (Dim::Known(x), Dim::Known(y)) = (ka, kb) {
        if x != y {
            return Err(format!("inner dimensions differ: {x} vs {y}"));
        }
    }
    let batch = broadcast(&[
        Some(a2[..a2.len() - 2].to_vec()),
        Some(b2[..b2.len() - 2].to_vec()),
    ])?
    .unwrap_or_default();
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(out)
}

/// A parsed Einsum equation: one label list per input and the output labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EinsumSpec {
    /// Labels of each input (`'.'` stands for the ellipsis dimensions, expanded per input).
    pub inputs: Vec<Vec<char>>,
    /// Output labels (explicit, or implicit: labels appearing once, sorted).
    pub output: Vec<char>,
}

/// Parses an Einsum equation such as `"bij,ijkl->bkl"` (letters only; `...` allowed once per term).
pub fn parse_einsum(eq: &str) -> Result<EinsumSpec, String> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let parse_term = |t: &str| -> Result<Vec<char>, String> {
        let t = t.replacen("...", ".", 1);
        if t.contains("..") || t.matches('.').count() > 1 {
            return Err(format!("bad ellipsis in einsum term {t:?}"));
        }
        for c in t.chars() {
            if !(c.is_ascii_alphabetic() || c == '.') {
                return Err(format!("bad einsum label {c:?}"));
            }
        }
        Ok(t.chars().collect())
    };
    let inputs: Vec<Vec<char>> = lhs.split(',').map(parse_term).collect::<Result<_, _>>()?;
    let output = match rhs {
        Some(r) => parse_term(&r)?,
        None => {
            let mut count: BTreeMap<char, usize> = BTreeMap::new();
            for c in inputs.iter().flatten().filter(|c| **c != '.') {
                *count.entry(*c).or_default() += 1;
            }
            let mut out: Vec<char> = if inputs.iter().any(|t| t.contains(&'.')) {
                vec!['.']
            } else {
                vec![]
            };
            out.extend(count.into_iter().filter(|(_, n)| *n == 1).map(|(c, _)| c));
            out
        }
    };
    for c in output.iter().filter(|c| **c != '.') {
        if !inputs.iter().flatten().any(|x| x == c) {
            return Err(format!("einsum output label {c:?} is not in any input"));
        }
    }
    Ok(EinsumSpec { inputs, output })
}

fn einsum(equation: &str, cx: &InferCtx<'_>) -> RuleResult {
    let spec = parse_einsum(equation)?;
    let n = (0..cx.inputs.len()).filter(|&i| cx.has(i)).count();
    if spec.inputs.len() != n {
        return Err(format!(
            "equation has {} terms for {n} inputs",
            spec.inputs.len()
        ));
    }
    let d = cx.same_dtype(&(0..n).collect::<Vec<_>>())?;
    let mut sizes: BTreeMap<char, Dim> = BTreeMap::new();
    let mut ellipsis: Option<Vec<Dim>> = Some(vec![]);
    for (i, term) in spec.inputs.iter().enumerate() {
        let Some(shape) = cx.tensor(i)?.shape else {
            ellipsis = None;
            continue;
        };
        let named = term.iter().filter(|c| **c != '.').count();
        let has_ell = term.contains(&'.');
        if (!has_ell && shape.len() != named) || (has_ell && shape.len() < named) {
            return Err(format!(
                "input {i} has rank {} but its term has {named} labels",
                shape.len()
            ));
        }
        let ell_len = shape.len() - named;
        let mut pos = 0;
        for c in term {
            if *c == '.' {
                let part = shape[pos..pos + ell_len].to_vec();
                ellipsis = match ellipsis {
                    Some(e) => broadcast(&[Some(e), Some(part)])?,
                    None => None,
                };
                pos += ell_len;
                continue;
            }
            let dim = shape[pos].clone();
            pos += 1;
            match sizes.get(c) {
                Some(Dim::Known(a)) => {
                    if let Dim::Known(b) = dim {
                        if *a != b && *a != 1 && b != 1 {
                            return Err(format!("label {c:?} has sizes {a} and {b}"));
                        }
                    }
                }
                _ => {
                    sizes.insert(*c, dim);
                }
            }
        }
    }
    let mut out = Vec::new();
    for c in &spec.output {
        if *c == '.' {
            match &ellipsis {
                Some(e) => out.extend(e.iter().cloned()),
                None => return outputs(cx, vec![tensor(d, None)]),
            }
        } else {
            out.push(sizes.get(c).cloned().unwrap_or(Dim::Unknown));
        }
    }
    outputs(
        cx,
        vec![ValueType::Tensor(crate::types::TensorType {
            dtype: d,
            shape: Some(out),
        })],
    )
}
