//! Kernels of broadcast binary ops, unary maths, activations, casts and `Where`.

use super::util::{input, map_float, map_num, one, opt_input, zip2, zip3, zip_num};
use crate::data::Data;
use crate::num::Num;
use cellgraph_ir::{DType, Op, Tensor, ValueType};
use ndarray::ArrayD;

fn fmap<T: Num>(a: &ArrayD<T>, f: impl Fn(f64) -> f64) -> ArrayD<T> {
    a.mapv(|x| T::from_f64(f(x.to_f64())))
}

/// Numerically stable logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Numerically stable `ln(1 + e^x)`.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn binary(op: &Op, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    Ok(match op {
        Op::Add {} | Op::Sum {} => zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p.add(*q))?),
        Op::Sub {} => zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p.sub(*q))?),
        Op::Mul {} => zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p.mul(*q))?),
        Op::Div {} => {
            if b.dtype().is_int() && b.to_f64_vec().contains(&0.0) {
                return Err("integer division by zero".into());
            }
            zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p
                .div(*q)
                .unwrap_or_default())?)
        }
        Op::Max {} => zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p.max_(*q))?),
        Op::Min {} => zip_num!(a, b, same, |x, y| zip2(x, y, |p, q| p.min_(*q))?),
        Op::Equal {} => match (a, b) {
            (Tensor::Bool(x), Tensor::Bool(y)) => Tensor::Bool(zip2(x, y, |p, q| p == q)?),
            _ => zip_num!(a, b, bool, |x, y| zip2(x, y, |p, q| p == q)?),
        },
        Op::Less {} => zip_num!(a, b, bool, |x, y| zip2(x, y, |p, q| p < q)?),
        Op::LessOrEqual {} => zip_num!(a, b, bool, |x, y| zip2(x, y, |p, q| p <= q)?),
        Op::Greater {} => zip_num!(a, b, bool, |x, y| zip2(x, y, |p, q| p > q)?),
        Op::GreaterOrEqual {} => zip_num!(a, b, bool, |x, y| zip2(x, y, |p, q| p >= q)?),
        Op::And {} | Op::Or {} | Op::Xor {} => match (a, b) {
            (Tensor::Bool(x), Tensor::Bool(y)) => Tensor::Bool(match op {
                Op::And {} => zip2(x, y, |p, q| *p && *q)?,
                Op::Or {} => zip2(x, y, |p, q| *p || *q)?,
                _ => zip2(x, y, |p, q| p != q)?,
            }),
            _ => return Err("logical ops take bool tensors".into()),
        },
        Op::Pow {} => {
            let e = Tensor::from_f64_vec(DType::F64, b.shape(), &b.to_f64_vec())
                .map_err(|e| e.to_string())?;
            let Tensor::F64(e) = e else {
                unreachable!("from_f64_vec(F64) gives F64")
            };
            map_num!(a, x => zip2(x, &e, |p, q| <_>::from_f64(p.to_f64().powf(*q)))?)
        }
        other => return Err(format!("{} is not a binary op", other.name())),
    })
}

/// Casts a tensor to `to` (ints convert through i64 so large values stay exact).
pub fn cast(t: &Tensor, to: DType) -> Result<Tensor, String> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    let shape = t.shape().to_vec();
    if to == DType::Bool {
        let v: Vec<bool> = t.to_f64_vec().into_iter().map(|x| x != 0.0).collect();
        return Ok(Tensor::Bool(
            ArrayD::from_shape_vec(shape, v).map_err(|e| e.to_string())?,
        ));
    }
    if t.dtype().is_int() && to.is_int() {
        let v = t.as_i64_vec().ok_or("integer tensor expected")?;
        let bytes: Vec<u8> = match to {
            DType::I8 | DType::U8 => v.iter().map(|&x| x as u8).collect(),
            DType::I16 | DType::U16 => v.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect(),
            DType::I32 | DType::U32 => v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        return Tensor::from_le_bytes(to, &shape, &bytes).map_err(|e| e.to_string());
    }
    Tensor::from_f64_vec(to, &shape, &t.to_f64_vec()).map_err(|e| e.to_string())
}

/// Runs an elementwise op.
pub fn eval(op: &Op, ins: &[Option<&Data>], out_types: &[&ValueType]) -> Result<Vec<Data>, String> {
    let x = input(ins, 0)?;
    let t = match op {
        Op::Add {}
        | Op::Sub {}
        | Op::Mul {}
        | Op::Div {}
        | Op::Pow {}
        | Op::And {}
        | Op::Or {}
        | Op::Xor {}
        | Op::Equal {}
        | Op::Less {}
        | Op::LessOrEqual {}
        | Op::Greater {}
        | Op::GreaterOrEqual {} => binary(op, x, input(ins, 1)?)?,
        Op::Sum {} | Op::Min {} | Op::Max {} | Op::Mean {} => {
            let mut acc = x.clone();
            let n = ins.iter().flatten().count();
            for i in 1..ins.len() {
                let next = input(ins, i)?;
                acc = binary(
                    if matches!(op, Op::Mean {}) {
                        &Op::Sum {}
                    } else {
                        op
                    },
                    &acc,
                    next,
                )?;
            }
            if matches!(op, Op::Mean {}) {
                map_num!(&acc, a => a.mapv(|v| v.div(<_>::from_f64(n as f64)).unwrap_or_default()))
            } else {
                acc
            }
        }
        Op::Where {} => {
            let c = match input(ins, 0)? {
                Tensor::Bool(c) => c,
                _ => return Err("condition must be bool".into()),
            };
            let (a, b) = (input(ins, 1)?, input(ins, 2)?);
            match (a, b) {
                (Tensor::Bool(p), Tensor::Bool(q)) => {
                    Tensor::Bool(zip3(c, p, q, |c, p, q| if *c { *p } else { *q })?)
                }
                _ => zip_num!(a, b, same, |p, q| zip3(c, p, q, |c, p, q| if *c {
                    *p
                } else {
                    *q
                })?),
            }
        }
        Op::Identity {} => return Ok(vec![ins[0].ok_or("input 0 is required")?.clone()]),
        Op::Not {} => match x {
            Tensor::Bool(a) => Tensor::Bool(a.mapv(|v| !v)),
            _ => return Err("Not takes bool".into()),
        },
        Op::Neg {} => map_num!(x, a => a.mapv(Num::neg)),
        Op::Abs {} => map_num!(x, a => a.mapv(Num::abs)),
        Op::Relu {} => map_num!(x, a => a.mapv(|v| v.max_(<_>::ZERO))),
        Op::Exp {} => map_float!(x, a => fmap(a, f64::exp)),
        Op::Log {} => map_float!(x, a => fmap(a, f64::ln)),
        Op::Sqrt {} => map_float!(x, a => fmap(a, f64::sqrt)),
        Op::Reciprocal {} => map_float!(x, a => fmap(a, |v| 1.0 / v)),
        Op::Ceil {} => map_float!(x, a => fmap(a, f64::ceil)),
        Op::Floor {} => map_float!(x, a => fmap(a, f64::floor)),
        Op::Sigmoid {} => map_float!(x, a => fmap(a, sigmoid)),
        Op::Tanh {} => map_float!(x, a => fmap(a, f64::tanh)),
        Op::Softsign {} => map_float!(x, a => fmap(a, |v| v / (1.0 + v.abs()))),
        Op::Softplus {} => map_float!(x, a => fmap(a, softplus)),
        Op::LeakyRelu { alpha } => {
            let al = *alpha as f64;
            map_float!(x, a => fmap(a, |v| if v < 0.0 { al * v } else { v }))
        }
        Op::Elu { alpha } => {
            let al = *alpha as f64;
            map_float!(x, a => fmap(a, |v| if v < 0.0 { al * (v.exp() - 1.0) } else { v }))
        }
        Op::ThresholdedRelu { alpha } => {
            let al = *alpha as f64;
            map_float!(x, a => fmap(a, |v| if v > al { v } else { 0.0 }))
        }
        Op::HardSigmoid { alpha, beta } => {
            let (al, be) = (*alpha as f64, *beta as f64);
            map_float!(x, a => fmap(a, |v| (al * v + be).clamp(0.0, 1.0)))
        }
        Op::Clip { min, max } => {
            let bound = |i: usize, attr: &Option<f32>| -> Result<Option<f64>, String> {
                match opt_input(ins, i)? {
                    Some(t) => t
                        .to_f64_vec()
                        .first()
                        .copied()
                        .map(Some)
                        .ok_or_else(|| format!("input {i} is empty")),
                    None => Ok(attr.map(|v| v as f64)),
                }
            };
            let (lo, hi) = (bound(1, min)?, bound(2, max)?);
            map_num!(x, a => a.mapv(|v| {
                let mut v = v;
                if let Some(lo) = lo { v = v.max_(<_>::from_f64(lo)); }
                if let Some(hi) = hi { v = v.min_(<_>::from_f64(hi)); }
                v
            }))
        }
        Op::Cast { .. } | Op::CastLike { .. } => {
            let to = out_types
                .first()
                .and_then(|t| t.dtype())
                .ok_or("output dtype unknown")?;
            cast(x, to)?
        }
        other => return Err(format!("{} has no elementwise kernel", other.name())),
    };
    one(t)
}
