//! Training: losses, gradients through the IR, optimizers, metrics, `compile` and `fit`.
//!
//! The loss is appended to the model's lowered graph and [`cellgraph_autodiff::grad`]
//! turns it into a graph that also computes the gradient of every trainable weight; the
//! CPU backend runs it. Optimizers follow Keras's update rules and defaults.

use super::checkpoint::{CheckpointOptions, Resumed, RunConfig};
use super::model::{run_plan, signature, Feed, Lowered, Model};
use super::KerasError;
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, Axis, IxDyn};
use std::fmt;
use std::time::Instant;

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

    fn key(&self) -> String {
        format!("{self:?}")
    }

    /// The targets as the loss graph reads them: class ids become one-hot rows.
    fn prepare_targets(&self, output_shape: &[usize], t: &Tensor) -> R<Tensor> {
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
    fn emit(&self, g: &mut Graph, y: ValueRef, t: ValueRef) -> R<ValueRef> {
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
struct LossEmit<'g> {
    b: cellgraph_ir::builder::Builder<'g>,
}

impl LossEmit<'_> {
    fn op(&mut self, op: Op, ins: &[ValueRef]) -> R<ValueRef> {
        // Several losses (one per output) share the graph: the builder skips names
        // already taken.
        Ok(self.b.op(op, ins, "v")?)
    }
    fn constant(&mut self, t: Tensor) -> R<ValueRef> {
        self.op(Op::constant(t), &[])
    }
    fn scalar(&mut self, v: f32) -> R<ValueRef> {
        self.constant(Tensor::scalar_f32(v))
    }
    fn rank(&self, v: ValueRef) -> usize {
        self.b.g.value(v).ty.dims().map_or(0, <[_]>::len)
    }
    fn mean(&mut self, v: ValueRef, axes: &[i64]) -> R<ValueRef> {
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
    fn sum(&mut self, v: ValueRef, axes: &[i64], keepdims: bool) -> R<ValueRef> {
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
    fn clip(&mut self, v: ValueRef) -> R<ValueRef> {
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

/// A compiled training graph: forward, loss and the gradient of every trainable weight.
pub(crate) struct GradPlan {
    pub(crate) plan: super::model::ModelPlan,
    lowered: Lowered,
    /// (slot, weight index) of each gradient output, in order.
    params: Vec<(usize, usize)>,
}

/// The loss and the gradient of each trainable weight (Keras's `trainable_weights`
/// order) for one batch.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// The loss value (the sum over the heads).
    pub loss: f32,
    /// Each head's loss, in head order.
    pub losses: Vec<f32>,
    /// The model outputs of this forward pass.
    pub outputs: Vec<Tensor>,
    /// `d loss / d w` for each trainable weight, in `trainable_weights` order.
    pub grads: Vec<ArrayD<f32>>,
}

impl Model {
    /// The IR graph of `Σ loss_h(model(x)[output_h], targets_h)` over the heads and its
    /// gradient with respect to every trainable weight, for inputs of the given signature
    /// (weights are graph inputs; see [`Model::to_graph`] for the inference form). The
    /// graph's outputs: the model outputs, each head's loss, the total, the gradients.
    fn build_grad_plan(
        &self,
        sig: &[(DType, Vec<usize>)],
        training: bool,
        heads: &[(usize, Loss)],
    ) -> R<GradPlan> {
        let mut lowered = self.lower(sig, training, true)?;
        // Recurrent loops raised to fused ops first: their gradient is the fused backward.
        lowered.graph = self.select(&lowered.graph)?.graph;
        let g = &mut lowered.graph;
        let outs = g.outputs().to_vec();
        let mut head_losses = Vec::new();
        for (h, (output, loss)) in heads.iter().enumerate() {
            let y = *outs.get(*output).ok_or_else(|| KerasError::Input {
                input: "targets".into(),
                msg: format!("the model has no output {output}"),
            })?;
            let ty = g.value(y).ty.clone();
            let name = if heads.len() == 1 {
                "loss/targets".to_string()
            } else {
                format!("loss/targets_{h}")
            };
            let t =
                g.add_input(
                    &name,
                    ValueType::Tensor(ty.as_tensor().cloned().ok_or_else(|| {
                        KerasError::Internal("output without a tensor type".into())
                    })?),
                )?;
            head_losses.push(loss.emit(g, y, t)?);
        }
        let mut total = *head_losses
            .first()
            .ok_or_else(|| KerasError::Internal("no loss to differentiate".into()))?;
        for (h, &l) in head_losses.iter().enumerate().skip(1) {
            let id = g.add_node(
                "",
                Op::Add {},
                &[Some(total), Some(l)],
                &[&format!("loss/sum_{h}")],
            )?;
            total = ValueRef { node: id, slot: 0 };
        }
        let mut all = outs.clone();
        for (h, &l) in head_losses.iter().enumerate() {
            let id = g.add_node(
                "",
                Op::Identity {},
                &[Some(l)],
                &[&format!("loss/head_{h}")],
            )?;
            all.push(ValueRef { node: id, slot: 0 });
        }
        let lid = g.add_node("", Op::Identity {}, &[Some(total)], &["loss/value"])?;
        let lv = ValueRef { node: lid, slot: 0 };
        all.push(lv);
        g.set_outputs(all)?;
        let inputs = g.input_values();
        let mut wrt = Vec::new();
        let mut params = Vec::new();
        for (pos, f) in lowered.feeds.iter().enumerate() {
            if let Feed::Weight(s, k) = f {
                if self.slots[*s].weights[*k].trainable {
                    wrt.push(inputs[pos]);
                    params.push((*s, *k));
                }
            }
        }
        let graph = cellgraph_autodiff::grad(&lowered.graph, lv, &wrt)
            .map_err(|e| KerasError::Internal(format!("gradient pass: {e}")))?;
        cellgraph_ir::verify(&graph)?;
        let plan = super::model::ModelPlan::compile(&graph, &self.backends)?;
        lowered.graph = graph;
        Ok(GradPlan {
            plan,
            lowered,
            params,
        })
    }

    /// One forward and backward pass: the loss of output `output` against `targets`
    /// (class ids for sparse categorical cross-entropy, else the target values) and the
    /// gradient of every trainable weight. In training mode dropout is on and
    /// BatchNormalization uses (and moves) batch statistics; stateful layers advance.
    pub fn gradients(
        &mut self,
        inputs: &[Tensor],
        targets: &Tensor,
        loss: Loss,
        output: usize,
        training: bool,
    ) -> R<Gradients> {
        self.gradients_of_heads(
            inputs,
            std::slice::from_ref(targets),
            &[(output, loss)],
            training,
        )
    }

    /// [`Model::gradients`] of a sum of losses, one per head `(output index, loss)` with
    /// its targets (Keras's multi-output training: the total is the sum).
    pub fn gradients_of_heads(
        &mut self,
        inputs: &[Tensor],
        targets: &[Tensor],
        heads: &[(usize, Loss)],
        training: bool,
    ) -> R<Gradients> {
        if targets.len() != heads.len() {
            return Err(KerasError::Input {
                input: "targets".into(),
                msg: format!(
                    "{} target tensors for {} losses",
                    targets.len(),
                    heads.len()
                ),
            });
        }
        self.prepare(inputs)?;
        let sig = signature(inputs);
        let heads_key: Vec<String> = heads
            .iter()
            .map(|(o, l)| format!("{o}:{}", l.key()))
            .collect();
        let key = (sig.clone(), training, heads_key.join(";"));
        if !self.grad_plans.contains_key(&key) {
            let p = self.build_grad_plan(&sig, training, heads)?;
            self.grad_plans.insert(key.clone(), p);
        }
        let (feeds, states, bn, out_shapes) = {
            let p = &self.grad_plans[&key];
            let shapes: Vec<Vec<usize>> = heads
                .iter()
                .map(|(o, _)| {
                    let y = p.lowered.graph.outputs()[*o];
                    p.lowered
                        .graph
                        .value(y)
                        .ty
                        .dims()
                        .map(|d| d.iter().map(|d| d.known().unwrap_or(0) as usize).collect())
                        .unwrap_or_default()
                })
                .collect();
            (
                p.lowered.feeds.clone(),
                p.lowered.states.clone(),
                p.lowered.bn.clone(),
                shapes,
            )
        };
        let ts = heads
            .iter()
            .zip(targets)
            .zip(&out_shapes)
            .map(|(((_, loss), t), shape)| loss.prepare_targets(shape, t))
            .collect::<R<Vec<_>>>()?;
        let data = self.feed(&feeds, inputs, &ts)?;
        let p = self
            .grad_plans
            .get_mut(&key)
            .ok_or_else(|| KerasError::Internal("plan missing".into()))?;
        let n_params = p.params.len();
        let mut outs = run_plan(&mut p.plan, data)?;
        let grads = outs.split_off(outs.len() - n_params);
        let loss_t = outs
            .pop()
            .ok_or_else(|| KerasError::Internal("no loss".into()))?;
        let per_head = outs.split_off(outs.len() - heads.len());
        let n_model = self.outputs.len();
        let rest = outs.split_off(n_model);
        self.absorb(&states, &bn, rest)?;
        let grads = grads
            .into_iter()
            .map(|g| match g {
                Tensor::F32(a) => Ok(a),
                _ => Err(KerasError::Internal("a gradient is not float32".into())),
            })
            .collect::<R<Vec<_>>>()?;
        let scalar = |t: &Tensor| t.to_f64_vec().first().copied().unwrap_or(f64::NAN) as f32;
        Ok(Gradients {
            loss: scalar(&loss_t),
            losses: per_head.iter().map(scalar).collect(),
            outputs: outs,
            grads,
        })
    }

    /// The IR graph [`Model::gradients`] runs (for inspection and export).
    pub fn gradient_graph(
        &self,
        inputs: &[(DType, Vec<usize>)],
        loss: Loss,
        output: usize,
        training: bool,
    ) -> R<Graph> {
        Ok(self
            .build_grad_plan(inputs, training, &[(output, loss)])?
            .lowered
            .graph)
    }

    /// The (slot, index) of each trainable weight, in `trainable_weights` order.
    fn trainable(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (s, slot) in self.slots.iter().enumerate() {
            for (k, w) in slot.weights.iter().enumerate() {
                if w.trainable {
                    v.push((s, k));
                }
            }
        }
        v
    }

    /// The trainable weights' values, in `trainable_weights` order.
    pub fn trainable_weights(&self) -> Vec<ArrayD<f32>> {
        self.trainable()
            .into_iter()
            .map(|(s, k)| self.slots[s].weights[k].value.clone())
            .collect()
    }

    /// `compile(optimizer, loss, metrics)`: what `fit` and `evaluate` use.
    pub fn compile(&mut self, optimizer: Optimizer, loss: Loss, metrics: &[Metric]) {
        self.training = Some(TrainState {
            optimizer,
            loss,
            metrics: metrics.to_vec(),
            state: OptimizerState::default(),
            clipping: Clipping::default(),
        });
    }

    /// Sets gradient clipping (after `compile`); more than one bound is an error, as in
    /// Keras.
    pub fn set_clipping(&mut self, clipping: Clipping) -> R<()> {
        let n = [
            clipping.clipnorm,
            clipping.global_clipnorm,
            clipping.clipvalue,
        ]
        .iter()
        .filter(|v| v.is_some())
        .count();
        if n > 1 {
            return Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: "set only one of clipnorm, global_clipnorm and clipvalue".into(),
            });
        }
        for v in [
            clipping.clipnorm,
            clipping.global_clipnorm,
            clipping.clipvalue,
        ]
        .into_iter()
        .flatten()
        {
            if !(v > 0.0 && v.is_finite()) {
                return Err(KerasError::Layer {
                    layer: self.name.clone(),
                    msg: format!("a clipping bound of {v} (it must be positive)"),
                });
            }
        }
        match self.training.as_mut() {
            Some(t) => {
                t.clipping = clipping;
                Ok(())
            }
            None => Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: "call compile() before set_clipping()".into(),
            }),
        }
    }

    fn apply_gradients(&mut self, grads: Vec<ArrayD<f32>>) -> R<()> {
        let params = self.trainable();
        let mut st = self.training.take().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before fit()".into(),
        })?;
        let mut values: Vec<ArrayD<f32>> = params
            .iter()
            .map(|&(s, k)| std::mem::take(&mut self.slots[s].weights[k].value))
            .collect();
        let res = {
            let mut refs: Vec<&mut ArrayD<f32>> = values.iter_mut().collect();
            st.optimizer
                .apply_gradients(&mut st.state, &mut refs, &grads)
        };
        for (&(s, k), v) in params.iter().zip(values) {
            self.slots[s].weights[k].value = v;
        }
        self.training = Some(st);
        res
    }

    /// `fit`: trains on `x` (model inputs) and `y` (targets) for `epochs`, in batches,
    /// shuffling with `seed`; prints Keras's progress line per epoch when `verbose`.
    pub fn fit(&mut self, x: &[Tensor], y: &Tensor, opts: &FitOptions) -> R<History> {
        self.fit_outputs(x, std::slice::from_ref(y), opts)
    }

    /// `fit` on a model with several outputs: `y` holds one target tensor per output.
    /// The compiled loss applies to every output and the total is their sum; with more
    /// than one output Keras's logs follow: `loss`, then `<output>_loss` for each output,
    /// then `<output>_<metric>` (outputs named by their layer; a layer's second output
    /// `<layer>_1`, ...).
    ///
    /// Before training: 0 samples, a batch size of 0, a `validation_split` outside
    /// [0, 1) or leaving an empty side, and empty `validation_data` are
    /// [`KerasError::Fit`]; with checkpoints, the folder is checked against this run's
    /// [`RunConfig`] and for writing (see [`super::checkpoint`]).
    pub fn fit_outputs(&mut self, x: &[Tensor], y: &[Tensor], opts: &FitOptions) -> R<History> {
        let state = self.training.as_ref().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before fit()".into(),
        })?;
        let (loss, metrics) = (state.loss, state.metrics.clone());
        self.check_target_count(y)?;
        let heads: Vec<(usize, Loss)> = (0..y.len()).map(|o| (o, loss)).collect();
        let names = self.output_names();
        let n = y[0].shape().first().copied().unwrap_or(0);
        if opts.batch_size == 0 {
            return Err(KerasError::Fit(
                "batch_size 0: it must be at least 1".into(),
            ));
        }
        if n == 0 {
            return Err(KerasError::Fit(
                "the targets have 0 samples: there is nothing to train on".into(),
            ));
        }
        for (what, ts) in [("x", x), ("y", y)] {
            for (i, t) in ts.iter().enumerate() {
                if t.shape().first() != Some(&n) {
                    return Err(KerasError::Input {
                        input: format!("{what}[{i}]"),
                        msg: format!(
                            "{} samples, the targets have {n}",
                            t.shape().first().unwrap_or(&0)
                        ),
                    });
                }
            }
        }
        // validation_data wins over validation_split (taken from the end, as Keras).
        type Split = (Vec<Tensor>, Vec<Tensor>);
        let split = opts.validation_split;
        if !(0.0..1.0).contains(&split) {
            return Err(KerasError::Fit(format!(
                "validation_split {split}: it must be at least 0 and below 1"
            )));
        }
        let (train_idx, val): (Vec<usize>, Option<Split>) = match (&opts.validation_data, split) {
            (Some((vx, vy)), _) => {
                let nv = vy.first().and_then(|t| t.shape().first().copied());
                if nv.unwrap_or(0) == 0 {
                    return Err(KerasError::Fit(
                        "validation_data has 0 samples: there is nothing to validate on".into(),
                    ));
                }
                ((0..n).collect(), Some((vx.clone(), vy.clone())))
            }
            (None, s) if s > 0.0 => {
                let nv = ((n as f64) * s as f64).floor() as usize;
                let cut = n - nv;
                if nv == 0 || cut == 0 {
                    return Err(KerasError::Fit(format!(
                        "validation_split {s} of {n} samples leaves {cut} for training \
                             and {nv} for validation: each needs at least one"
                    )));
                }
                let idx: Vec<usize> = (cut..n).collect();
                let val = (take_rows_all(x, &idx)?, take_rows_all(y, &idx)?);
                ((0..cut).collect(), Some(val))
            }
            _ => ((0..n).collect(), None),
        };
        let bs = opts.batch_size;
        let mut history = History::default();
        let mut first = 0;
        // Checked before any training: the folder's checkpoints against this run's
        // configuration (and, resuming, loaded), and the folder's writability.
        let config = match &opts.checkpoint {
            Some(ck) => {
                let config = self.run_config(x, y, opts);
                if let Some(r) = self.prepare_checkpoints(ck, &config, &mut history)? {
                    if opts.verbose {
                        println!("resumed from {} (epoch {} done)", r.path.display(), r.epoch);
                    }
                    first = r.epoch;
                    history.resumed = Some(r);
                }
                Some(config)
            }
            None => None,
        };
        for epoch in first..opts.epochs {
            let start = Instant::now();
            // Per-epoch random streams (shuffling, dropout) derived from the seeds: an
            // epoch resumed from a checkpoint draws exactly what it would have.
            let mut rng: rand::rngs::StdRng =
                rand::SeedableRng::seed_from_u64(super::init::weight_seed(opts.seed, epoch, 1));
            self.reseed_dropout(epoch);
            let mut order = train_idx.clone();
            if opts.shuffle {
                use rand::seq::SliceRandom;
                order.shuffle(&mut rng);
            }
            let steps = order.len().div_ceil(bs);
            let mut sums = Sums::new(heads.len(), metrics.len());
            for (b, chunk) in order.chunks(bs).enumerate() {
                let bx = take_rows_all(x, chunk)?;
                let by = take_rows_all(y, chunk)?;
                let at = format!(" at epoch {}, batch {}", epoch + 1, b + 1);
                let gr = self.train_step(&bx, &by, &heads, &at)?;
                let losses: Vec<f64> = gr.losses.iter().map(|&l| f64::from(l)).collect();
                sums.add(chunk.len(), &losses, &metrics, &gr.outputs, &by, loss)?;
                if opts.verbose && opts.progress_every_batch {
                    eprint!(
                        "\r{}/{} [{}] - loss: {:.4}",
                        b + 1,
                        steps,
                        bar(b + 1, steps),
                        sums.total_loss()
                    );
                }
            }
            let mut logs = sums.logs(&names, &metrics);
            if let Some((vx, vy)) = &val {
                let ev = self.evaluate_outputs_with(vx, vy, bs, loss, &metrics, &names)?;
                logs.push(("val_loss".into(), ev.loss));
                for (name, v) in ev.metrics {
                    logs.push((format!("val_{name}"), v));
                }
            }
            let secs = start.elapsed().as_secs_f64();
            for (k, v) in &logs {
                history.push(k, *v);
            }
            history.epoch_seconds.push(secs);
            if opts.verbose {
                let ms_step = secs * 1000.0 / steps.max(1) as f64;
                let parts: Vec<String> = logs.iter().map(|(k, v)| format!("{k}: {v:.4}")).collect();
                if opts.progress_every_batch {
                    eprintln!();
                }
                println!("Epoch {}/{}", epoch + 1, opts.epochs);
                println!(
                    "{steps}/{steps} [{}] - {:.0}s {:.0}ms/step - {}",
                    bar(steps, steps),
                    secs,
                    ms_step,
                    parts.join(" - ")
                );
            }
            if let (Some(ck), Some(config)) = (&opts.checkpoint, &config) {
                self.write_checkpoint(ck, epoch + 1, &history, config)?;
            }
            for cb in &opts.callbacks {
                cb(epoch, &history);
            }
        }
        Ok(history)
    }

    /// The configuration recorded in checkpoints and compared on resume: the model
    /// (layer classes and config hash), the compiled optimizer, clipping, loss and
    /// metrics, batch size, shuffling, seed, and fingerprints of the data and the
    /// validation.
    pub fn run_config(&self, x: &[Tensor], y: &[Tensor], opts: &FitOptions) -> RunConfig {
        let json = self.to_json();
        let classes: Vec<String> = serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v["config"]["layers"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["class_name"].as_str().map(str::to_string))
            .collect();
        let model = format!(
            "{}[{}] (config fnv64 {:016x})",
            if self.sequential {
                "Sequential"
            } else {
                "Functional"
            },
            classes.join(", "),
            fnv64(json.as_bytes())
        );
        let (optimizer, loss) = match &self.training {
            Some(t) => {
                let mut o = t.optimizer.describe();
                for (name, v) in [
                    ("clipnorm", t.clipping.clipnorm),
                    ("global_clipnorm", t.clipping.global_clipnorm),
                    ("clipvalue", t.clipping.clipvalue),
                ] {
                    if let Some(v) = v {
                        o += &format!(" {name}={v:?}");
                    }
                }
                let metrics: Vec<&str> = t.metrics.iter().map(Metric::name).collect();
                (
                    o,
                    format!("{} metrics [{}]", t.loss.key(), metrics.join(", ")),
                )
            }
            None => ("none".into(), "none".into()),
        };
        let xy: Vec<&Tensor> = x.iter().chain(y).collect();
        let validation = match (&opts.validation_data, opts.validation_split) {
            (Some((vx, vy)), _) => {
                let v: Vec<&Tensor> = vx.iter().chain(vy).collect();
                format!("data {}", super::checkpoint::data_fingerprint(&v))
            }
            (None, s) if s > 0.0 => format!("split {s:?}"),
            _ => "none".into(),
        };
        RunConfig {
            model,
            optimizer,
            loss,
            batch_size: opts.batch_size,
            shuffle: opts.shuffle,
            seed: opts.seed,
            data: super::checkpoint::data_fingerprint(&xy),
            validation,
        }
    }

    /// Keras's `train_on_batch`: one update of the compiled optimizer on one batch
    /// (`x`: the model inputs; `y`: one target tensor per output), with the compiled
    /// loss (summed over the outputs) and clipping; returns the loss before the update.
    /// A loss that is not finite is an error and leaves the weights as they were.
    pub fn train_on_batch(&mut self, x: &[Tensor], y: &[Tensor]) -> R<f32> {
        let loss = self
            .training
            .as_ref()
            .ok_or_else(|| KerasError::Layer {
                layer: self.name.clone(),
                msg: "call compile() before train_on_batch()".into(),
            })?
            .loss;
        self.check_target_count(y)?;
        let heads: Vec<(usize, Loss)> = (0..y.len()).map(|o| (o, loss)).collect();
        Ok(self.train_step(x, y, &heads, "")?.loss)
    }

    /// Gradients of the heads' losses, then (clipped) one optimizer update; `at` ends
    /// the message of a loss that is not finite (`" at epoch 1, batch 3"`). The
    /// returned [`Gradients`] has its `grads` moved out into the update.
    fn train_step(
        &mut self,
        x: &[Tensor],
        y: &[Tensor],
        heads: &[(usize, Loss)],
        at: &str,
    ) -> R<Gradients> {
        let mut gr = self.gradients_of_heads(x, y, heads, true)?;
        if !gr.loss.is_finite() {
            return Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: format!("the loss became {}{at}", gr.loss),
            });
        }
        let grads = std::mem::take(&mut gr.grads);
        let grads = match self.training.as_ref().map(|t| t.clipping) {
            Some(c) => c.apply(grads),
            None => grads,
        };
        self.apply_gradients(grads)?;
        Ok(gr)
    }

    fn check_target_count(&self, y: &[Tensor]) -> R<()> {
        if y.len() == self.outputs.len() {
            return Ok(());
        }
        Err(KerasError::Input {
            input: "y".into(),
            msg: format!(
                "{} target tensors for a model with {} outputs",
                y.len(),
                self.outputs.len()
            ),
        })
    }

    /// The names Keras gives the outputs in logs: the producing layer's name; a second
    /// output of the same layer `<layer>_1`, a third `<layer>_2`, ...
    pub fn output_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for t in &self.outputs {
            let (layer, _, _) = self.history_of(*t);
            let mut name = layer.clone();
            let mut k = 0;
            while names.contains(&name) {
                k += 1;
                name = format!("{layer}_{k}");
            }
            names.push(name);
        }
        names
    }

    /// `evaluate`: the compiled loss and metrics over `x`, `y` in inference mode.
    pub fn evaluate(&mut self, x: &[Tensor], y: &Tensor, batch_size: usize) -> R<Evaluation> {
        self.evaluate_outputs(x, std::slice::from_ref(y), batch_size)
    }

    /// `evaluate` on a model with several outputs: one target tensor per output; the
    /// loss is the sum over the outputs, metrics are named as [`Model::fit_outputs`]
    /// logs them.
    pub fn evaluate_outputs(
        &mut self,
        x: &[Tensor],
        y: &[Tensor],
        batch_size: usize,
    ) -> R<Evaluation> {
        let state = self.training.as_ref().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before evaluate()".into(),
        })?;
        let (loss, metrics) = (state.loss, state.metrics.clone());
        let names = self.output_names();
        self.evaluate_outputs_with(x, y, batch_size, loss, &metrics, &names)
    }

    fn evaluate_outputs_with(
        &mut self,
        x: &[Tensor],
        y: &[Tensor],
        batch_size: usize,
        loss: Loss,
        metrics: &[Metric],
        names: &[String],
    ) -> R<Evaluation> {
        self.check_target_count(y)?;
        let n = y[0].shape().first().copied().unwrap_or(0);
        let idx: Vec<usize> = (0..n).collect();
        let mut sums = Sums::new(y.len(), metrics.len());
        for chunk in idx.chunks(batch_size.max(1)) {
            let bx = take_rows_all(x, chunk)?;
            let by = take_rows_all(y, chunk)?;
            let out = self.predict(&bx)?;
            let losses = out
                .iter()
                .zip(&by)
                .map(|(o, t)| loss_value(loss, o, t))
                .collect::<R<Vec<_>>>()?;
            sums.add(chunk.len(), &losses, metrics, &out, &by, loss)?;
        }
        let mut logs = sums.logs(names, metrics);
        let total = logs.remove(0).1;
        Ok(Evaluation {
            loss: total,
            metrics: logs,
        })
    }
}

/// Running sums of the per-head losses and metric counts over an epoch.
struct Sums {
    loss: Vec<f64>,
    seen: usize,
    metrics: Vec<Vec<(f64, usize)>>,
}

impl Sums {
    fn new(heads: usize, metrics: usize) -> Sums {
        Sums {
            loss: vec![0.0; heads],
            seen: 0,
            metrics: vec![vec![(0.0, 0); metrics]; heads],
        }
    }

    fn add(
        &mut self,
        rows: usize,
        losses: &[f64],
        metrics: &[Metric],
        outs: &[Tensor],
        ys: &[Tensor],
        loss: Loss,
    ) -> R<()> {
        for (acc, l) in self.loss.iter_mut().zip(losses) {
            *acc += l * rows as f64;
        }
        self.seen += rows;
        for (h, st) in self.metrics.iter_mut().enumerate() {
            let (out, y) = (&outs[h], &ys[h]);
            for (m, s) in metrics.iter().zip(st.iter_mut()) {
                let (c, k) = m.count(out, y, loss)?;
                s.0 += c;
                s.1 += k;
            }
        }
        Ok(())
    }

    fn total_loss(&self) -> f64 {
        self.loss.iter().sum::<f64>() / self.seen.max(1) as f64
    }

    /// `loss`, then per output `<name>_loss` and `<name>_<metric>` (one output: the
    /// metrics by their own names).
    fn logs(&self, names: &[String], metrics: &[Metric]) -> Vec<(String, f64)> {
        let seen = self.seen.max(1) as f64;
        let mut logs = vec![("loss".to_string(), self.total_loss())];
        let several = self.loss.len() > 1;
        if several {
            for (name, l) in names.iter().zip(&self.loss) {
                logs.push((format!("{name}_loss"), l / seen));
            }
        }
        for (h, st) in self.metrics.iter().enumerate() {
            for (m, s) in metrics.iter().zip(st) {
                let key = if several {
                    format!("{}_{}", names[h], m.name())
                } else {
                    m.name().to_string()
                };
                logs.push((key, s.0 / s.1.max(1) as f64));
            }
        }
        logs
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

fn bar(done: usize, total: usize) -> String {
    let w = 30;
    let filled = (done * w) / total.max(1);
    if filled >= w {
        "=".repeat(w)
    } else {
        format!("{}>{}", "=".repeat(filled), ".".repeat(w - filled - 1))
    }
}

/// Rows `idx` of each tensor's first axis.
fn take_rows_all(ts: &[Tensor], idx: &[usize]) -> R<Vec<Tensor>> {
    ts.iter().map(|t| take_rows(t, idx)).collect()
}

/// Rows `idx` of a tensor's first axis.
pub fn take_rows(t: &Tensor, idx: &[usize]) -> R<Tensor> {
    macro_rules! rows {
        ($a:expr, $v:ident) => {
            Tensor::$v($a.select(Axis(0), idx))
        };
    }
    Ok(match t {
        Tensor::F32(a) => rows!(a, F32),
        Tensor::F64(a) => rows!(a, F64),
        Tensor::I32(a) => rows!(a, I32),
        Tensor::I64(a) => rows!(a, I64),
        Tensor::U8(a) => rows!(a, U8),
        other => {
            return Err(KerasError::Input {
                input: "x".into(),
                msg: format!("dtype {} is not supported for training data", other.dtype()),
            })
        }
    })
}

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
    fn count(&self, out: &Tensor, y: &Tensor, loss: Loss) -> R<(f64, usize)> {
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
    fn update(&self, w: &mut ArrayD<f32>, g: &ArrayD<f32>, s: &mut OptSlot, t: u64) {
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
fn fnv64(bytes: &[u8]) -> u64 {
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
    slots: Vec<OptSlot>,
    iterations: u64,
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
struct OptSlot {
    m: ArrayD<f32>,
    v: ArrayD<f32>,
}

impl OptSlot {
    fn zeros(dim: IxDyn) -> OptSlot {
        OptSlot {
            m: ArrayD::zeros(dim.clone()),
            v: ArrayD::zeros(dim),
        }
    }
}

/// What `compile` set up.
#[derive(Clone, Debug)]
pub(crate) struct TrainState {
    optimizer: Optimizer,
    loss: Loss,
    metrics: Vec<Metric>,
    pub(crate) state: OptimizerState,
    clipping: Clipping,
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

impl Clipping {
    fn apply(&self, mut grads: Vec<ArrayD<f32>>) -> Vec<ArrayD<f32>> {
        let norm = |g: &ArrayD<f32>| g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        if let Some(c) = self.clipnorm {
            for g in &mut grads {
                let n = norm(g);
                if n > c as f64 {
                    let k = (c as f64 / n) as f32;
                    g.mapv_inplace(|x| x * k);
                }
            }
        } else if let Some(c) = self.global_clipnorm {
            let n = grads.iter().map(|g| norm(g).powi(2)).sum::<f64>().sqrt();
            if n > c as f64 {
                let k = (c as f64 / n) as f32;
                for g in &mut grads {
                    g.mapv_inplace(|x| x * k);
                }
            }
        } else if let Some(c) = self.clipvalue {
            for g in &mut grads {
                g.mapv_inplace(|x| x.clamp(-c, c));
            }
        }
        grads
    }
}

/// A callback run after each epoch with the epoch index and the history so far.
pub type Callback = Box<dyn Fn(usize, &History)>;

/// Options of [`Model::fit`], with Keras's defaults.
pub struct FitOptions {
    /// Samples per gradient step (default 32; 0 is an error).
    pub batch_size: usize,
    /// Passes over the data (default 1; 0 trains nothing, as in Keras). A resumed run
    /// trains the epochs after the checkpoint's.
    pub epochs: usize,
    /// Fraction of the data, from the end, held out for validation: at least 0 and
    /// below 1, leaving at least one sample on each side.
    pub validation_split: f32,
    /// Validation inputs and targets, one target tensor per output (wins over
    /// `validation_split`).
    pub validation_data: Option<(Vec<Tensor>, Vec<Tensor>)>,
    /// Shuffle the training samples every epoch (default true).
    pub shuffle: bool,
    /// The shuffling seed.
    pub seed: u64,
    /// Print the progress line per epoch.
    pub verbose: bool,
    /// Also redraw the progress bar after every batch (on standard error).
    pub progress_every_batch: bool,
    /// Run after each epoch.
    pub callbacks: Vec<Callback>,
    /// Write a checkpoint after every epoch (and resume from the newest one); see
    /// [`super::checkpoint`] for what is checked before training.
    pub checkpoint: Option<CheckpointOptions>,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            batch_size: 32,
            epochs: 1,
            validation_split: 0.0,
            validation_data: None,
            shuffle: true,
            seed: 0,
            verbose: true,
            progress_every_batch: false,
            callbacks: Vec::new(),
            checkpoint: None,
        }
    }
}

/// `History.history`: one value per epoch for each logged quantity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// (name, per-epoch values), in the order Keras logs them.
    pub history: Vec<(String, Vec<f64>)>,
    /// Wall time of each epoch in seconds.
    pub epoch_seconds: Vec<f64>,
    /// Set by a `fit` that resumed from a checkpoint: which one, and the newer ones
    /// skipped because they did not load.
    pub resumed: Option<Resumed>,
}

impl History {
    fn push(&mut self, key: &str, v: f64) {
        match self.history.iter_mut().find(|(k, _)| k == key) {
            Some((_, vals)) => vals.push(v),
            None => self.history.push((key.to_string(), vec![v])),
        }
    }

    /// The values logged under `key` (`loss`, `val_accuracy`, ...).
    pub fn get(&self, key: &str) -> Option<&[f64]> {
        self.history
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// What `evaluate` returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The mean loss.
    pub loss: f64,
    /// (metric name, value).
    pub metrics: Vec<(String, f64)>,
}
