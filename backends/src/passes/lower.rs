//! Lowering: ONNX `LSTM`/`GRU`/`RNN` expanded into `Scan` loops over the cell's
//! primitive ops (MatMul, Add, Mul, activations, Clip, Where) — the reference the fused
//! kernels are tested against, and the inverse of the later raise pass.
//!
//! Per direction, outside the loop: the direction's weights are gathered and transposed
//! into one `[in, H]` matrix per gate, biases summed per gate (GRU keeps the recurrent
//! candidate bias apart, as it sits inside the reset product). The `Scan` body is the
//! cell. With `sequence_lens`, a `[T, N, 1]` mask is scanned along: masked steps keep the
//! state and emit zeros, and a reversed scan over the whole time axis starts each row at
//! its own last valid step.

use crate::error::{Error, Result};
use cellgraph_ir::builder::Builder as IrBuilder;
use cellgraph_ir::ops::rnn::{self, Act, Cell, Spec};
use cellgraph_ir::{DType, Dim, Graph, NodeId, Op, Tensor, TensorType, ValueRef, ValueType};
use std::collections::HashMap;

/// Returns a copy of `graph` (and of its nested graphs) in which every recurrent op runs
/// as a `Scan` loop.
pub fn lower_recurrent(graph: &Graph) -> Result<Graph> {
    lower_where(graph, &|_, _, _| true)
}

/// Like [`lower_recurrent`], for the recurrent nodes `pick(graph, node, op)` selects
/// (`graph` is the one holding the node: the top level or a nested body).
pub fn lower_where(graph: &Graph, pick: &dyn Fn(&Graph, NodeId, &Op) -> bool) -> Result<Graph> {
    rewrite(
        graph,
        &mut |dst, src, n, ins, names| {
            let node = src.node(n);
            match node.op() {
                Some(op)
                    if op.unmasked_recurrent().is_some()
                        && !rnn::is_grad(op)
                        && pick(src, n, op) =>
                {
                    expand(dst, &node.display_name(), op, ins, names).map(Some)
                }
                _ => Ok(None),
            }
        },
        &mut |body| lower_where(body, pick),
    )
}

/// What a [`rewrite`] callback returns for one node: `None` copies the node, `Some`
/// gives the values standing for its outputs.
pub(crate) type Replaced = Option<Vec<Option<ValueRef>>>;

/// The callback of [`rewrite`]: `(dst, src, node, mapped inputs, output names)`.
pub(crate) type ReplaceFn<'a> =
    dyn FnMut(&mut Graph, &Graph, NodeId, &[Option<ValueRef>], &[&str]) -> Result<Replaced> + 'a;

/// Copies `graph` node by node in topological order. `replace(dst, src, node, inputs,
/// output_names)` may emit something else for a node (inputs already mapped into
/// `dst`); nodes it leaves alone are copied with their nested graphs passed through
/// `body`.
pub(crate) fn rewrite(
    graph: &Graph,
    replace: &mut ReplaceFn<'_>,
    body: &mut dyn FnMut(&Graph) -> Result<Graph>,
) -> Result<Graph> {
    let mut dst = Graph::with_opsets(graph.name.clone(), graph.opsets().clone());
    dst.doc = graph.doc.clone();
    let mut map = graph.copy_sources(&mut dst)?;
    let order = graph
        .topo_order()
        .map_err(|_| Error::Compile(format!("graph {:?} has a cycle", graph.name)))?;
    for n in order {
        let node = graph.node(n);
        let Some(op) = node.op() else { continue };
        let ins: Vec<Option<ValueRef>> = graph
            .node_inputs(n)
            .iter()
            .map(|v| v.map(|v| map[&v]))
            .collect();
        let names: Vec<&str> = node.outputs.iter().map(|v| v.name.as_str()).collect();
        let outs: Vec<Option<ValueRef>> = match replace(&mut dst, graph, n, &ins, &names)? {
            Some(outs) => outs,
            None => {
                let mut op = op.clone();
                for b in op.subgraphs_mut() {
                    *b = body(b)?;
                }
                let id = dst.add_node(&node.name, op, &ins, &names)?;
                (0..names.len())
                    .map(|s| Some(ValueRef { node: id, slot: s }))
                    .collect()
            }
        };
        for (s, (v, nv)) in node.outputs.iter().zip(outs).enumerate() {
            if let Some(nv) = nv {
                if v.declared {
                    dst.declare_type(nv, &v.ty)?;
                }
                map.insert(ValueRef { node: n, slot: s }, nv);
            }
        }
    }
    let outs = graph
        .outputs()
        .iter()
        .map(|v| {
            map.get(v).copied().ok_or_else(|| {
                Error::Compile(format!(
                    "output {:?} was not rewritten",
                    graph.value(*v).name
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    dst.set_outputs(outs)?;
    Ok(dst)
}

/// `LSTMMasked`/`GRUMasked`/`RNNMasked`.
fn is_masked(op: &Op) -> bool {
    matches!(
        op,
        Op::LSTMMasked { .. } | Op::GRUMasked { .. } | Op::RNNMasked { .. }
    )
}

/// Adds nodes with generated unique names: the shared [`cellgraph_ir::builder::Builder`]
/// (reached through `Deref`) with inputs given as `Option`s (omitted optional inputs) and
/// the recurrent ops' pieces (activations, clip, direction slices).
pub(crate) struct Builder<'g> {
    b: IrBuilder<'g>,
}

impl<'g> std::ops::Deref for Builder<'g> {
    type Target = IrBuilder<'g>;
    fn deref(&self) -> &IrBuilder<'g> {
        &self.b
    }
}

impl std::ops::DerefMut for Builder<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.b
    }
}

impl<'g> Builder<'g> {
    pub(crate) fn new(g: &'g mut Graph, prefix: &str) -> Builder<'g> {
        Builder {
            b: IrBuilder::new(g, prefix),
        }
    }
}

impl Builder<'_> {
    pub(crate) fn op(&mut self, op: Op, ins: &[Option<ValueRef>], hint: &str) -> Result<ValueRef> {
        Ok(self.multi(op, ins, &[hint])?[0])
    }

    pub(crate) fn multi(
        &mut self,
        op: Op,
        ins: &[Option<ValueRef>],
        hints: &[&str],
    ) -> Result<Vec<ValueRef>> {
        Ok(self.b.node("", op, ins, hints)?)
    }

    fn named(&mut self, name: &str, op: Op, ins: &[Option<ValueRef>]) -> Result<ValueRef> {
        let id = self.b.g.add_node("", op, ins, &[name])?;
        Ok(ValueRef { node: id, slot: 0 })
    }

    pub(crate) fn constant(&mut self, t: Tensor, hint: &str) -> Result<ValueRef> {
        Ok(self.b.constant(t, hint)?)
    }

    fn scalar(&mut self, dt: DType, v: f64) -> Result<ValueRef> {
        Ok(self.b.scalar(dt, v)?)
    }

    pub(crate) fn ints(&mut self, v: &[i64]) -> Result<ValueRef> {
        Ok(self.b.ints(v)?)
    }

    fn ty(&self, v: ValueRef) -> ValueType {
        self.g.value(v).ty.clone()
    }

    /// `Gather(x, [d], axis 0)` squeezed: the direction's slice.
    fn direction(&mut self, x: ValueRef, d: usize) -> Result<ValueRef> {
        let idx = self.constant(
            Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), d as i64)),
            "dir",
        )?;
        self.op(Op::Gather { axis: 0 }, &[Some(x), Some(idx)], "dir_slice")
    }

    fn act(&mut self, a: Act, x: ValueRef, dt: DType) -> Result<ValueRef> {
        let s = Some(x);
        match a {
            Act::Relu => self.op(Op::Relu {}, &[s], "relu"),
            Act::Tanh => self.op(Op::Tanh {}, &[s], "tanh"),
            Act::Sigmoid => self.op(Op::Sigmoid {}, &[s], "sigmoid"),
            Act::Softsign => self.op(Op::Softsign {}, &[s], "softsign"),
            Act::Softplus => self.op(Op::Softplus {}, &[s], "softplus"),
            Act::LeakyRelu(alpha) => self.op(Op::LeakyRelu { alpha }, &[s], "leaky_relu"),
            Act::ThresholdedRelu(alpha) => {
                self.op(Op::ThresholdedRelu { alpha }, &[s], "thresholded_relu")
            }
            Act::Elu(alpha) => self.op(Op::Elu { alpha }, &[s], "elu"),
            Act::HardSigmoid(alpha, beta) => {
                self.op(Op::HardSigmoid { alpha, beta }, &[s], "hard_sigmoid")
            }
            Act::Affine(alpha, beta) => {
                let a = self.scalar(dt, alpha as f64)?;
                let b = self.scalar(dt, beta as f64)?;
                let m = self.op(Op::Mul {}, &[s, Some(a)], "affine_mul")?;
                self.op(Op::Add {}, &[Some(m), Some(b)], "affine")
            }
            Act::ScaledTanh(alpha, beta) => {
                let a = self.scalar(dt, alpha as f64)?;
                let b = self.scalar(dt, beta as f64)?;
                let m = self.op(Op::Mul {}, &[s, Some(b)], "scaled_in")?;
                let t = self.op(Op::Tanh {}, &[Some(m)], "scaled_tanh")?;
                self.op(Op::Mul {}, &[Some(t), Some(a)], "scaled")
            }
        }
    }

    fn clip(&mut self, x: ValueRef, clip: Option<f32>) -> Result<ValueRef> {
        match clip {
            Some(c) => self.op(
                Op::Clip {
                    min: Some(-c),
                    max: Some(c),
                },
                &[Some(x)],
                "clip",
            ),
            None => Ok(x),
        }
    }

    pub(crate) fn add(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        Ok(self.b.add(a, b)?)
    }

    fn mul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        Ok(self.b.mul(a, b)?)
    }

    fn matmul(&mut self, a: ValueRef, b: ValueRef) -> Result<ValueRef> {
        Ok(self.b.matmul(a, b)?)
    }
}

/// Static facts of one recurrent node.
struct Rec {
    cell: Cell,
    h: usize,
    reverse: Vec<bool>,
    acts: Vec<Vec<Act>>,
    clip: Option<f32>,
    input_forget: bool,
    lbr: bool,
    layout1: bool,
    hold: bool,
    dt: DType,
}

fn facts(g: &Graph, op: &Op, ins: &[Option<ValueRef>]) -> Result<Rec> {
    let err = |m: String| Error::Compile(format!("lowering {}: {m}", op.name()));
    let r = ins
        .get(2)
        .copied()
        .flatten()
        .ok_or_else(|| err("R is required".into()))?;
    let h = match g.value(r).ty.dims().and_then(|d| d.get(2).cloned()) {
        Some(Dim::Known(h)) => h as usize,
        _ => {
            return Err(err(
                "the hidden size must be known (R's last dimension)".into()
            ))
        }
    };
    let spec = Spec::from_op(op, h).map_err(err)?;
    let x = ins
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| err("X is required".into()))?;
    let dt = g
        .value(x)
        .ty
        .dtype()
        .ok_or_else(|| err("X's dtype must be known".into()))?;
    Ok(Rec {
        cell: spec.cell,
        h,
        reverse: spec.reverse,
        acts: spec.acts,
        clip: spec.clip,
        input_forget: spec.input_forget,
        lbr: spec.linear_before_reset,
        layout1: spec.layout1,
        hold: spec.hold,
        dt,
    })
}

fn tt(dt: DType, dims: Vec<Dim>) -> ValueType {
    ValueType::Tensor(TensorType::with_dims(dt, dims))
}

/// Expands one recurrent node; returns the values standing for its outputs.
fn expand(
    g: &mut Graph,
    label: &str,
    op: &Op,
    ins: &[Option<ValueRef>],
    names: &[&str],
) -> Result<Vec<Option<ValueRef>>> {
    let f = facts(g, op, ins)?;
    let (h, dt, gates) = (f.h, f.dt, f.cell.gates());
    let mut b = Builder::new(g, &format!("{label}/lower"));
    let input = |i: usize| ins.get(i).copied().flatten();
    let mut x = input(0).ok_or_else(|| Error::Compile("X is required".into()))?;
    let t102 = |b: &mut Builder<'_>, v: ValueRef| {
        b.op(
            Op::Transpose {
                perm: Some(vec![1, 0, 2]),
            },
            &[Some(v)],
            "time_major",
        )
    };
    if f.layout1 {
        x = t102(&mut b, x)?;
    }
    let (w, r) = (
        input(1).ok_or_else(|| Error::Compile("W is required".into()))?,
        input(2).ok_or_else(|| Error::Compile("R is required".into()))?,
    );
    let bias = input(3);
    let seq_lens = input(4);
    let mut h0 = input(5);
    let mut c0 = if f.cell == Cell::Lstm { input(6) } else { None };
    let peep = if f.cell == Cell::Lstm { input(7) } else { None };
    if f.layout1 {
        h0 = h0.map(|v| t102(&mut b, v)).transpose()?;
        c0 = c0.map(|v| t102(&mut b, v)).transpose()?;
    }
    let xdims = b.ty(x).dims().map(|d| d.to_vec());
    let (t_dim, n_dim, i_dim) = match &xdims {
        Some(d) if d.len() == 3 => (d[0].clone(), d[1].clone(), d[2].clone()),
        _ => (Dim::Unknown, Dim::Unknown, Dim::Unknown),
    };
    // Zero initial states of shape [N, H], N read at run time.
    let zeros_nh = |b: &mut Builder<'_>| -> Result<ValueRef> {
        let shape = b.op(
            Op::Shape {
                start: Some(1),
                end: Some(2),
            },
            &[Some(x)],
            "batch",
        )?;
        let hv = b.ints(&[h as i64])?;
        let full = b.op(
            Op::Concat { axis: 0 },
            &[Some(shape), Some(hv)],
            "state_shape",
        )?;
        let zero =
            Tensor::from_f64_vec(dt, &[1], &[0.0]).map_err(|e| Error::Compile(e.to_string()))?;
        b.op(
            Op::ConstantOfShape { value: Some(zero) },
            &[Some(full)],
            "zeros",
        )
    };
    // The [T, N, 1] step mask from sequence_lens.
    let mask = match seq_lens {
        Some(sl) => {
            let tshape = b.op(
                Op::Shape {
                    start: Some(0),
                    end: Some(1),
                },
                &[Some(x)],
                "steps",
            )?;
            let zero_i = b.constant(
                Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), 0)),
                "zero",
            )?;
            let sq = b.op(
                Op::Squeeze { axes: None },
                &[Some(tshape), Some(zero_i)],
                "steps_scalar",
            )?;
            let one_i = b.constant(
                Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), 1)),
                "one",
            )?;
            let range = b.op(
                Op::Range {},
                &[Some(zero_i), Some(sq), Some(one_i)],
                "time_index",
            )?;
            let ax1 = b.ints(&[1])?;
            let tcol = b.op(
                Op::Unsqueeze { axes: None },
                &[Some(range), Some(ax1)],
                "time_col",
            )?;
            let sl64 = b.op(
                Op::Cast {
                    to: DType::I64.onnx_code() as i64,
                    saturate: None,
                    round_mode: None,
                },
                &[Some(sl)],
                "lens",
            )?;
            let ax0 = b.ints(&[0])?;
            let lrow = b.op(
                Op::Unsqueeze { axes: None },
                &[Some(sl64), Some(ax0)],
                "lens_row",
            )?;
            let m = b.op(Op::Less {}, &[Some(tcol), Some(lrow)], "valid")?;
            let ax2 = b.ints(&[2])?;
            Some(b.op(Op::Unsqueeze { axes: None }, &[Some(m), Some(ax2)], "mask")?)
        }
        None => None,
    };
    // A masked op's own mask, [T, N, 1], and-ed with the sequence_lens one.
    let mask_slot = if f.cell == Cell::Lstm { 8 } else { 6 };
    let own_mask = match input(mask_slot) {
        Some(m) if is_masked(op) => {
            let m = if f.layout1 {
                b.op(
                    Op::Transpose {
                        perm: Some(vec![1, 0]),
                    },
                    &[Some(m)],
                    "mask_time_major",
                )?
            } else {
                m
            };
            let ax2 = b.ints(&[2])?;
            Some(b.op(
                Op::Unsqueeze { axes: None },
                &[Some(m), Some(ax2)],
                "own_mask",
            )?)
        }
        _ => None,
    };
    let mask = match (mask, own_mask) {
        (Some(a), Some(m)) => Some(b.op(Op::And {}, &[Some(a), Some(m)], "mask_and")?),
        (a, m) => a.or(m),
    };
    let mut ys = Vec::new();
    let mut yhs = Vec::new();
    let mut ycs = Vec::new();
    for (d, &rev) in f.reverse.iter().enumerate() {
        // Per-gate transposed weights [in, H] and [H, H].
        let wd = b.direction(w, d)?;
        let rd = b.direction(r, d)?;
        let wt = b.op(
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &[Some(wd)],
            "w_t",
        )?;
        let rt = b.op(
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &[Some(rd)],
            "r_t",
        )?;
        let gate_hints: Vec<String> = (0..gates).map(|k| format!("gate{k}")).collect();
        let gh: Vec<&str> = gate_hints.iter().map(String::as_str).collect();
        let wg = b.multi(
            Op::Split {
                axis: 1,
                split: None,
                num_outputs: None,
            },
            &[Some(wt)],
            &gh,
        )?;
        let rg = b.multi(
            Op::Split {
                axis: 1,
                split: None,
                num_outputs: None,
            },
            &[Some(rt)],
            &gh,
        )?;
        // Biases: Wb + Rb per gate, except GRU's candidate recurrent bias.
        let (wb, rb) = match bias {
            Some(bv) => {
                let bd = b.direction(bv, d)?;
                let parts = b.multi(
                    Op::Split {
                        axis: 0,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(bd)],
                    &["wb", "rb"],
                )?;
                let wbg = b.multi(
                    Op::Split {
                        axis: 0,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(parts[0])],
                    &gh,
                )?;
                let rbg = b.multi(
                    Op::Split {
                        axis: 0,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(parts[1])],
                    &gh,
                )?;
                (Some(wbg), Some(rbg))
            }
            None => (None, None),
        };
        let mut gate_bias = Vec::new();
        for k in 0..gates {
            let candidate_rb_apart = f.cell == Cell::Gru && k == 2;
            gate_bias.push(match (&wb, &rb) {
                (Some(wb), Some(rb)) if !candidate_rb_apart => Some(b.add(wb[k], rb[k])?),
                (Some(wb), _) => Some(wb[k]),
                _ => None,
            });
        }
        let rbh = if f.cell == Cell::Gru {
            rb.as_ref().map(|v| v[2])
        } else {
            None
        };
        let peeps = match peep {
            Some(p) => {
                let pd = b.direction(p, d)?;
                Some(b.multi(
                    Op::Split {
                        axis: 0,
                        split: None,
                        num_outputs: None,
                    },
                    &[Some(pd)],
                    &["p_i", "p_o", "p_f"],
                )?)
            }
            None => None,
        };
        let hd = match h0 {
            Some(v) => b.direction(v, d)?,
            None => zeros_nh(&mut b)?,
        };
        let cd = match (f.cell, c0) {
            (Cell::Lstm, Some(v)) => Some(b.direction(v, d)?),
            (Cell::Lstm, None) => Some(zeros_nh(&mut b)?),
            _ => None,
        };
        // The body reads these by name.
        let outer_vals: Vec<ValueRef> = wg
            .iter()
            .chain(&rg)
            .copied()
            .chain(gate_bias.iter().flatten().copied())
            .chain(rbh)
            .chain(peeps.iter().flatten().copied())
            .collect();
        let body = cell_body(
            &f,
            d,
            &b,
            &outer_vals,
            &wg,
            &rg,
            &gate_bias,
            rbh,
            peeps.as_deref(),
            mask.is_some(),
            (n_dim.clone(), i_dim.clone()),
        )?;
        let mut scan_ins = vec![Some(hd)];
        if let Some(c) = cd {
            scan_ins.push(Some(c));
        }
        scan_ins.push(Some(x));
        let m = if mask.is_some() { 2 } else { 1 };
        if let Some(mk) = mask {
            scan_ins.push(Some(mk));
        }
        let nstate = if f.cell == Cell::Lstm { 2 } else { 1 };
        let dirs = if rev { Some(vec![1; m]) } else { None };
        let scan = Op::Scan {
            body: Box::new(body),
            num_scan_inputs: m as i64,
            scan_input_axes: None,
            scan_input_directions: dirs,
            scan_output_axes: None,
            scan_output_directions: if rev { Some(vec![1]) } else { None },
            directions: None,
        };
        let hints: Vec<&str> = if nstate == 2 {
            vec!["h_last", "c_last", "y"]
        } else {
            vec!["h_last", "y"]
        };
        let outs = b.multi(scan, &scan_ins, &hints)?;
        let ax = b.ints(&[1])?;
        ys.push(b.op(
            Op::Unsqueeze { axes: None },
            &[Some(outs[nstate]), Some(ax)],
            "y_dir",
        )?);
        let ax0 = b.ints(&[0])?;
        yhs.push(b.op(
            Op::Unsqueeze { axes: None },
            &[Some(outs[0]), Some(ax0)],
            "yh_dir",
        )?);
        if nstate == 2 {
            let ax0 = b.ints(&[0])?;
            ycs.push(b.op(
                Op::Unsqueeze { axes: None },
                &[Some(outs[1]), Some(ax0)],
                "yc_dir",
            )?);
        }
    }
    let _ = t_dim;
    let mut result = Vec::new();
    for (slot, (parts, axis)) in [(ys, 1i64), (yhs, 0), (ycs, 0)].into_iter().enumerate() {
        let Some(name) = names.get(slot) else { break };
        if name.is_empty() || parts.is_empty() {
            result.push(None);
            continue;
        }
        let refs: Vec<Option<ValueRef>> = parts.iter().map(|&v| Some(v)).collect();
        let perm: Vec<i64> = if slot == 0 {
            vec![2, 0, 1, 3]
        } else {
            vec![1, 0, 2]
        };
        let v = if f.layout1 {
            let cat = b.op(Op::Concat { axis }, &refs, "cat")?;
            b.named(name, Op::Transpose { perm: Some(perm) }, &[Some(cat)])?
        } else {
            b.named(name, Op::Concat { axis }, &refs)?
        };
        result.push(Some(v));
    }
    Ok(result)
}

/// Builds the Scan body of one direction: states, then the step input (and mask).
#[allow(clippy::too_many_arguments)]
fn cell_body(
    f: &Rec,
    d: usize,
    parent: &Builder<'_>,
    outer_vals: &[ValueRef],
    wg: &[ValueRef],
    rg: &[ValueRef],
    gate_bias: &[Option<ValueRef>],
    rbh: Option<ValueRef>,
    peeps: Option<&[ValueRef]>,
    masked: bool,
    (n, i): (Dim, Dim),
) -> Result<Graph> {
    let (h, dt) = (f.h, f.dt);
    let mut body = Graph::with_opsets(
        format!("{}_dir{d}_cell", parent.prefix()),
        parent.g.opsets().clone(),
    );
    let mut outer: HashMap<ValueRef, ValueRef> = HashMap::new();
    for &v in outer_vals {
        let val = parent.g.value(v);
        outer.insert(v, body.add_outer(&val.name, val.ty.clone())?);
    }
    let state_ty = tt(dt, vec![n.clone(), Dim::Known(h as u64)]);
    let hp = body.add_input("h_prev", state_ty.clone())?;
    let cp = if f.cell == Cell::Lstm {
        Some(body.add_input("c_prev", state_ty.clone())?)
    } else {
        None
    };
    let xt = body.add_input("x_t", tt(dt, vec![n.clone(), i]))?;
    let mt = if masked {
        Some(body.add_input("m_t", tt(DType::Bool, vec![n, Dim::Known(1)]))?)
    } else {
        None
    };
    let mut b = Builder::new(&mut body, "cell");
    let acts = &f.acts[d];
    // Pre-activation of gate k: x·W_k + h·R_k (+ bias).
    let pre = |b: &mut Builder<'_>, k: usize, with_h: bool| -> Result<ValueRef> {
        let xw = b.matmul(xt, outer[&wg[k]])?;
        let mut s = xw;
        if with_h {
            let hr = b.matmul(hp, outer[&rg[k]])?;
            s = b.add(s, hr)?;
        }
        if let Some(bias) = gate_bias[k] {
            s = b.add(s, outer[&bias])?;
        }
        Ok(s)
    };
    let (h_new, c_new) = match f.cell {
        Cell::Rnn => {
            let p = pre(&mut b, 0, true)?;
            let p = b.clip(p, f.clip)?;
            (b.act(acts[0], p, dt)?, None)
        }
        Cell::Lstm => {
            let c_prev = cp.ok_or_else(|| Error::Compile("LSTM needs a cell state".into()))?;
            let peep =
                |b: &mut Builder<'_>, s: ValueRef, k: usize, c: ValueRef| -> Result<ValueRef> {
                    match peeps {
                        Some(p) => {
                            let m = b.mul(outer[&p[k]], c)?;
                            b.add(s, m)
                        }
                        None => Ok(s),
                    }
                };
            // ONNX gate order i, o, f, c; peepholes i, o, f.
            let pi = pre(&mut b, 0, true)?;
            let pi = peep(&mut b, pi, 0, c_prev)?;
            let pi = b.clip(pi, f.clip)?;
            let ig = b.act(acts[0], pi, dt)?;
            let fg = if f.input_forget {
                let one = b.scalar(dt, 1.0)?;
                b.op(Op::Sub {}, &[Some(one), Some(ig)], "forget")?
            } else {
                let pf = pre(&mut b, 2, true)?;
                let pf = peep(&mut b, pf, 2, c_prev)?;
                let pf = b.clip(pf, f.clip)?;
                b.act(acts[0], pf, dt)?
            };
            let pc = pre(&mut b, 3, true)?;
            let pc = b.clip(pc, f.clip)?;
            let cand = b.act(acts[1], pc, dt)?;
            let keep = b.mul(fg, c_prev)?;
            let write = b.mul(ig, cand)?;
            let c = b.add(keep, write)?;
            let po = pre(&mut b, 1, true)?;
            let po = peep(&mut b, po, 1, c)?;
            let po = b.clip(po, f.clip)?;
            let og = b.act(acts[0], po, dt)?;
            let hc = b.act(acts[2], c, dt)?;
            (b.mul(og, hc)?, Some(c))
        }
        Cell::Gru => {
            // Gate order z, r, h.
            let pz = pre(&mut b, 0, true)?;
            let pz = b.clip(pz, f.clip)?;
            let z = b.act(acts[0], pz, dt)?;
            let pr = pre(&mut b, 1, true)?;
            let pr = b.clip(pr, f.clip)?;
            let r = b.act(acts[0], pr, dt)?;
            let xh = pre(&mut b, 2, false)?;
            let rec = if f.lbr {
                let mut hr = b.matmul(hp, outer[&rg[2]])?;
                if let Some(rb) = rbh {
                    hr = b.add(hr, outer[&rb])?;
                }
                b.mul(r, hr)?
            } else {
                let rh = b.mul(r, hp)?;
                let mut hr = b.matmul(rh, outer[&rg[2]])?;
                if let Some(rb) = rbh {
                    hr = b.add(hr, outer[&rb])?;
                }
                hr
            };
            let ph = b.add(xh, rec)?;
            let ph = b.clip(ph, f.clip)?;
            let cand = b.act(acts[1], ph, dt)?;
            let one = b.scalar(dt, 1.0)?;
            let omz = b.op(Op::Sub {}, &[Some(one), Some(z)], "one_minus_z")?;
            let a = b.mul(omz, cand)?;
            let c = b.mul(z, hp)?;
            (b.add(a, c)?, None)
        }
    };
    let (h_out, c_out, y) = match mt {
        Some(m) => {
            let h_out = b.op(Op::Where {}, &[Some(m), Some(h_new), Some(hp)], "h_keep")?;
            let c_out = match (c_new, cp) {
                (Some(c), Some(p)) => {
                    Some(b.op(Op::Where {}, &[Some(m), Some(c), Some(p)], "c_keep")?)
                }
                _ => None,
            };
            let other = if f.hold { hp } else { b.scalar(dt, 0.0)? };
            let y = b.op(Op::Where {}, &[Some(m), Some(h_new), Some(other)], "y_t")?;
            (h_out, c_out, y)
        }
        None => {
            let y = b.op(Op::Identity {}, &[Some(h_new)], "y_t")?;
            (h_new, c_new, y)
        }
    };
    let mut outs = vec![h_out];
    outs.extend(c_out);
    outs.push(y);
    body.set_outputs(outs)?;
    Ok(body)
}
