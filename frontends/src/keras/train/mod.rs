//! Training: losses, gradients through the IR, optimizers, metrics, `compile` and `fit`.
//!
//! The loss is appended to the model's lowered graph and [`cellgraph_autodiff::grad`]
//! turns it into a graph that also computes the gradient of every trainable weight; the
//! model's backends run it. Optimizers follow Keras's update rules and defaults.
//! One module per concern: `loss`, `metric`, `optimizer`, `history`; `compile`,
//! `fit`, `evaluate` and the gradient plans here.

pub(crate) mod history;
pub(crate) mod loss;
pub(crate) mod metric;
pub(crate) mod optimizer;
pub(crate) mod step;

pub use history::History;
pub use loss::{loss_value, Loss};
pub use metric::Metric;
pub(crate) use optimizer::{fnv64, TrainState};
pub use optimizer::{Clipping, Optimizer, OptimizerState};

use super::checkpoint::{CheckpointOptions, RunConfig};
use super::model::{run_plan, signature, Feed, GradPlan, Model};
use super::KerasError;
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, Axis};
use std::time::Instant;

type R<T> = Result<T, KerasError>;

/// A callback run after each epoch with the epoch index and the history so far.
pub type Callback = Box<dyn Fn(usize, &History)>;

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
        let (lowered, params) = self.grad_graph(sig, training, heads)?;
        let plan = super::model::ModelPlan::compile(&lowered.graph, &self.backends)?;
        Ok(GradPlan {
            plan,
            lowered,
            params,
        })
    }

    /// The lowered model with its graph replaced by the gradient graph of
    /// [`Model::build_grad_plan`], and the (slot, weight index) of each gradient output.
    pub(crate) fn grad_graph(
        &self,
        sig: &[(DType, Vec<usize>)],
        training: bool,
        heads: &[(usize, Loss)],
    ) -> R<(super::model::Lowered, Vec<(usize, usize)>)> {
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
        lowered.graph = graph;
        Ok((lowered, params))
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
            // Weights and optimizer moments stay where the step plan left them (on its
            // backend) for the epoch, and come to the model before validation and
            // checkpoints, or when a step fails.
            let mut res = step::Resident::default();
            let mut epoch_steps = || -> R<()> {
                for (b, chunk) in order.chunks(bs).enumerate() {
                    let bx = take_rows_all(x, chunk)?;
                    let by = take_rows_all(y, chunk)?;
                    let at = format!(" at epoch {}, batch {}", epoch + 1, b + 1);
                    let out = self.train_step_resident(&mut res, &bx, &by, &heads, &at)?;
                    let losses: Vec<f64> = out.losses.iter().map(|&l| f64::from(l)).collect();
                    sums.add(chunk.len(), &losses, &metrics, &out.outputs, &by, loss)?;
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
                Ok(())
            };
            let trained = epoch_steps();
            let synced = self.sync_resident(&mut res);
            trained?;
            synced?;
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
        let mut res = step::Resident::default();
        let out = self.train_step_resident(&mut res, x, y, &heads, "");
        self.sync_resident(&mut res)?;
        Ok(out?.loss)
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

/// What `evaluate` returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The mean loss.
    pub loss: f64,
    /// (metric name, value).
    pub metrics: Vec<(String, f64)>,
}
