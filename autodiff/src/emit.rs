//! Emitting ops into a graph with fresh names, in the forms the graph's opset expects.

use crate::{Error, Result};
use cellgraph_ir::{DType, Dim, Graph, NodeId, Op, Tensor, ValueRef};

/// Adds nodes to a graph under a name prefix.
pub(crate) struct Emit<'g> {
    pub g: &'g mut Graph,
    prefix: String,
    k: usize,
}

impl<'g> Emit<'g> {
    pub fn new(g: &'g mut Graph, prefix: &str) -> Emit<'g> {
        Emit {
            g,
            prefix: prefix.to_string(),
            k: 0,
        }
    }

    pub fn fresh(&mut self, hint: &str) -> String {
        loop {
            self.k += 1;
            let name = format!("{}/{hint}_{}", self.prefix, self.k);
            if self.g.find(&name).is_none() {
                return name;
            }
        }
    }

    pub fn node(&mut self, op: Op, ins: &[Option<ValueRef>], hints: &[&str]) -> Result<NodeId> {
        let names: Vec<String> = hints.iter().map(|h| self.fresh(h)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(self.g.add_node("", op, ins, &refs)?)
    }

    pub fn op(&mut self, op: Op, ins: &[ValueRef], hint: &str) -> Result<ValueRef> {
        let ins: Vec<Option<ValueRef>> = ins.iter().copied().map(Some).collect();
        let id = self.node(op, &ins, &[hint])?;
        Ok(ValueRef { node: id, slot: 0 })
    }

    fn opset(&self) -> i64 {
        self.g.opset("")
    }

    pub fn constant(&mut self, t: Tensor) -> Result<ValueRef> {
        self.op(Op::constant(t), &[], "const")
    }

    pub fn scalar(&mut self, dt: DType, v: f64) -> Result<ValueRef> {
        let t = Tensor::from_f64_vec(dt, &[], &[v]).map_err(|e| Error::Internal(e.to_string()))?;
        self.constant(t)
    }

    pub fn ints(&mut self, v: &[i64]) -> Result<ValueRef> {
        self.constant(Tensor::vec_i64(v))
    }

    pub fn dtype(&self, v: ValueRef) -> DType {
        self.g.value(v).ty.dtype().unwrap_or(DType::F32)
    }

    /// The static shape of a value, if every dimension is known.
    pub fn shape_of(&self, v: ValueRef) -> Option<Vec<usize>> {
        self.g
            .value(v)
            .ty
            .dims()?
            .iter()
            .map(|d| match d {
                Dim::Known(n) => Some(*n as usize),
                _ => None,
            })
            .collect()
    }

    pub fn static_shape(&self, v: ValueRef, what: &str) -> Result<Vec<usize>> {
        self.shape_of(v).ok_or_else(|| Error::Shape {
            value: self.g.value(v).name.clone(),
            why: what.to_string(),
        })
    }

    pub fn zeros(&mut self, dt: DType, shape: &[usize]) -> Result<ValueRef> {
        self.constant(Tensor::zeros(dt, shape))
    }

    pub fn zeros_like(&mut self, v: ValueRef, what: &str) -> Result<ValueRef> {
        let s = self.static_shape(v, what)?;
        let dt = self.dtype(v);
        self.zeros(dt, &s)
    }

    /// Zeros shaped like `v` at run time (for values whose shape is not static).
    pub fn zeros_dyn(&mut self, v: ValueRef) -> Result<ValueRef> {
        if self.shape_of(v).is_some() {
            return self.zeros_like(v, "");
        }
        let dt = self.dtype(v);
        let shape = self.op(
            Op::Shape {
                start: None,
                end: None,
            },
            &[v],
            "shape",
        )?;
        let zero =
            Tensor::from_f64_vec(dt, &[1], &[0.0]).map_err(|e| Error::Internal(e.to_string()))?;
        self.op(Op::ConstantOfShape { value: Some(zero) }, &[shape], "zeros")
    }

    pub fn add(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Add {}, &[a, b], "add")
    }
    pub fn sub(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Sub {}, &[a, b], "sub")
    }
    pub fn mul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Mul {}, &[a, b], "mul")
    }
    pub fn div(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Div {}, &[a, b], "div")
    }
    pub fn neg(&mut self, a: ValueRef) -> Result<ValueRef> {
        self.op(Op::Neg {}, &[a], "neg")
    }
    pub fn matmul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::MatMul {}, &[a, b], "matmul")
    }
    pub fn where_(&mut self, c: ValueRef, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        self.op(Op::Where {}, &[c, a, b], "where")
    }
    pub fn cast(&mut self, v: ValueRef, to: DType) -> Result<ValueRef> {
        self.op(
            Op::Cast {
                to: to.onnx_code() as i64,
                saturate: None,
                round_mode: None,
            },
            &[v],
            "cast",
        )
    }

    pub fn transpose(&mut self, v: ValueRef, perm: Vec<i64>) -> Result<ValueRef> {
        self.op(Op::Transpose { perm: Some(perm) }, &[v], "transpose")
    }

    /// Swaps the last two axes.
    pub fn swap_last(&mut self, v: ValueRef, rank: usize) -> Result<ValueRef> {
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 1, rank - 2);
        self.transpose(v, perm)
    }

    pub fn reshape(&mut self, v: ValueRef, shape: &[usize]) -> Result<ValueRef> {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.ints(&s)?;
        self.op(Op::Reshape { allowzero: 0 }, &[v, s], "reshape")
    }

    fn reduce(
        &mut self,
        kind: &str,
        v: ValueRef,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<ValueRef> {
        let k = i64::from(keepdims);
        let new_form = match kind {
            "sum" => self.opset() >= 13,
            _ => self.opset() >= 18,
        };
        let attr = (!new_form).then(|| axes.to_vec());
        let op = match kind {
            "sum" => Op::ReduceSum {
                axes: attr,
                keepdims: k,
                noop_with_empty_axes: 0,
            },
            _ => Op::ReduceMean {
                axes: attr,
                keepdims: k,
                noop_with_empty_axes: 0,
            },
        };
        if new_form {
            let a = self.ints(axes)?;
            self.op(op, &[v, a], kind)
        } else {
            self.op(op, &[v], kind)
        }
    }

    pub fn reduce_sum(&mut self, v: ValueRef, axes: &[i64], keepdims: bool) -> Result<ValueRef> {
        self.reduce("sum", v, axes, keepdims)
    }

    pub fn unsqueeze(&mut self, v: ValueRef, axes: &[i64]) -> Result<ValueRef> {
        if self.opset() >= 13 {
            let a = self.ints(axes)?;
            self.op(Op::Unsqueeze { axes: None }, &[v, a], "unsqueeze")
        } else {
            self.op(
                Op::Unsqueeze {
                    axes: Some(axes.to_vec()),
                },
                &[v],
                "unsqueeze",
            )
        }
    }

    /// Broadcasts `v` to `shape` (numpy rules).
    pub fn expand(&mut self, v: ValueRef, shape: &[usize]) -> Result<ValueRef> {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.ints(&s)?;
        self.op(Op::Expand {}, &[v, s], "expand")
    }

    /// Sums a broadcast cotangent back to `target`'s shape.
    pub fn unbroadcast(&mut self, g: ValueRef, target: &[usize]) -> Result<ValueRef> {
        let gs = self.static_shape(g, "a broadcast gradient needs static shapes")?;
        if gs == target {
            return Ok(g);
        }
        let lead = gs.len().saturating_sub(target.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        for (i, &t) in target.iter().enumerate() {
            if t == 1 && gs.get(lead + i) != Some(&1) {
                axes.push((lead + i) as i64);
            }
        }
        let mut r = g;
        if !axes.is_empty() {
            r = self.reduce_sum(g, &axes, true)?;
        }
        self.reshape(r, target)
    }

    /// Splits `v` along `axis` into pieces of the given sizes.
    pub fn split(&mut self, v: ValueRef, axis: i64, sizes: &[usize]) -> Result<Vec<ValueRef>> {
        let hints = vec!["split"; sizes.len()];
        let sz: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
        let id = if self.opset() >= 13 {
            let s = self.ints(&sz)?;
            self.node(
                Op::Split {
                    axis,
                    split: None,
                    num_outputs: None,
                },
                &[Some(v), Some(s)],
                &hints,
            )?
        } else {
            self.node(
                Op::Split {
                    axis,
                    split: Some(sz),
                    num_outputs: None,
                },
                &[Some(v)],
                &hints,
            )?
        };
        Ok((0..sizes.len())
            .map(|slot| ValueRef { node: id, slot })
            .collect())
    }
}
