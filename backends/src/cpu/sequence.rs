//! Kernels of ONNX sequence and optional ops.

use super::util::input;
use crate::data::Data;
use cellgraph_ir::{Op, Tensor, ValueType};
use ndarray::{ArrayD, IxDyn};

fn seq<'a>(ins: &[Option<&'a Data>], i: usize) -> Result<&'a [Tensor], String> {
    match ins.get(i).copied().flatten() {
        Some(Data::Sequence(s)) => Ok(s),
        Some(other) => Err(format!(
            "input {i} must be a sequence, got a {}",
            other.kind()
        )),
        None => Err(format!("input {i} is required")),
    }
}

fn position(
    ins: &[Option<&Data>],
    i: usize,
    len: usize,
    insert: bool,
) -> Result<Option<usize>, String> {
    let Some(t) = ins.get(i).copied().flatten() else {
        return Ok(None);
    };
    let p = t
        .tensor()?
        .as_i64_vec()
        .and_then(|v| v.first().copied())
        .ok_or("position must be an integer scalar")?;
    let n = len as i64;
    let q = if p < 0 { p + n } else { p };
    let max = if insert { n } else { n - 1 };
    if q < 0 || q > max {
        return Err(format!(
            "position {p} is out of range for a sequence of {len}"
        ));
    }
    Ok(Some(q as usize))
}

/// Runs a sequence op.
pub fn eval(
    op: &Op,
    ins: &[Option<&Data>],
    _out_types: &[&ValueType],
) -> Result<Vec<Data>, String> {
    let out = match op {
        Op::SequenceConstruct {} => Data::Sequence(
            (0..ins.len())
                .map(|i| input(ins, i).cloned())
                .collect::<Result<_, _>>()?,
        ),
        Op::SequenceEmpty { .. } => Data::Sequence(Vec::new()),
        Op::SequenceInsert {} => {
            let mut s = seq(ins, 0)?.to_vec();
            let t = input(ins, 1)?.clone();
            match position(ins, 2, s.len(), true)? {
                Some(p) => s.insert(p, t),
                None => s.push(t),
            }
            Data::Sequence(s)
        }
        Op::SequenceAt {} => {
            let s = seq(ins, 0)?;
            let p = position(ins, 1, s.len(), false)?.ok_or("position is required")?;
            Data::Tensor(s[p].clone())
        }
        Op::SequenceLength {} => Data::Tensor(Tensor::I64(ArrayD::from_elem(
            IxDyn(&[]),
            seq(ins, 0)?.len() as i64,
        ))),
        Op::ConcatFromSequence { axis, new_axis } => {
            let s = seq(ins, 0)?;
            let first = s.first().ok_or("cannot concatenate an empty sequence")?;
            let r = first.shape().len() + usize::from(*new_axis != 0);
            let a = super::util::axis(*axis, r)?;
            let parts: Vec<Tensor> = if *new_axis != 0 {
                s.iter()
                    .map(|t| {
                        let mut sh = t.shape().to_vec();
                        sh.insert(a, 1);
                        super::shape::reshape(t, &sh)
                    })
                    .collect::<Result<_, _>>()?
            } else {
                s.to_vec()
            };
            let refs: Vec<&Tensor> = parts.iter().collect();
            Data::Tensor(super::shape::concat(&refs, a)?)
        }
        Op::OptionalHasElement {} => {
            let has = match ins.first().copied().flatten() {
                None | Some(Data::Optional(None)) => false,
                Some(_) => true,
            };
            Data::Tensor(Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), has)))
        }
        Op::OptionalGetElement {} => match ins.first().copied().flatten() {
            Some(Data::Optional(Some(d))) => (**d).clone(),
            Some(Data::Optional(None)) => return Err("the optional is empty".into()),
            Some(d) => d.clone(),
            None => return Err("input 0 is required".into()),
        },
        other => return Err(format!("{} has no sequence kernel", other.name())),
    };
    Ok(vec![out])
}
