//! Emitting ops into a graph with fresh names, in the forms the graph's opset expects.

use crate::{Error, Result};
use cellgraph_ir::builder::Builder;
use cellgraph_ir::{DType, Graph, NodeId, Op, Tensor, ValueRef};

/// Adds nodes to a graph under a name prefix: the shared [`Builder`] (fresh names,
/// typed ops in the graph's opset forms), reached through `Deref`, plus what only the
/// gradient pass needs (zeros shaped like a value, sums of broadcast cotangents).
pub(crate) struct Emit<'g> {
    b: Builder<'g>,
}

impl<'g> std::ops::Deref for Emit<'g> {
    type Target = Builder<'g>;
    fn deref(&self) -> &Builder<'g> {
        &self.b
    }
}

impl std::ops::DerefMut for Emit<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.b
    }
}

impl<'g> Emit<'g> {
    pub fn new(g: &'g mut Graph, prefix: &str) -> Emit<'g> {
        Emit {
            b: Builder::new(g, prefix),
        }
    }

    /// Adds an unnamed node; returns its id.
    pub fn node(&mut self, op: Op, ins: &[Option<ValueRef>], hints: &[&str]) -> Result<NodeId> {
        Ok(self.b.node("", op, ins, hints)?[0].node)
    }

    pub fn constant(&mut self, t: Tensor) -> Result<ValueRef> {
        Ok(self.b.constant(t, "const")?)
    }

    /// A scalar constant (inherent, so `e.scalar(e.dtype(v), x)` borrows `e` once).
    pub fn scalar(&mut self, dt: DType, v: f64) -> Result<ValueRef> {
        Ok(self.b.scalar(dt, v)?)
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
        Ok(self.op(Op::ConstantOfShape { value: Some(zero) }, &[shape], "zeros")?)
    }

    pub fn transpose(&mut self, v: ValueRef, perm: Vec<i64>) -> Result<ValueRef> {
        Ok(self.b.transpose(v, &perm)?)
    }

    /// Swaps the last two axes.
    pub fn swap_last(&mut self, v: ValueRef, rank: usize) -> Result<ValueRef> {
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 1, rank - 2);
        self.transpose(v, perm)
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
        Ok(self.reshape(r, target)?)
    }
}
