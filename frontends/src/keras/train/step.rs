//! One training step as one graph, run on the model's backends with its state resident.
//!
//! The step graph is the gradient graph ([`Model`]'s forward, the losses, the gradient of
//! every trainable weight) with the rest of a Keras `train_step` appended as IR nodes:
//! gradient clipping, the optimizer's update of every weight and its moments, and
//! BatchNormalization's moving statistics. Its inputs are the batch, the targets, the
//! weights, the optimizer moments and the step's scalars (the learning rate, or Adam's
//! bias-corrected rate); its outputs are the model outputs, the stateful layers' states,
//! the losses, and the new weights and moments.
//!
//! A [`Resident`] holds the new weights and moments as the plan returned them —
//! [`Value::Device`] on a device backend — and feeds them to the next step, so within
//! `fit` only the batch goes in and only the losses and the model outputs (for the
//! metrics) come back per step. [`Model::sync_resident`] brings them to the host at the
//! end of each epoch (before validation and checkpoints) and when a step fails.
//!
//! The update nodes compute what [`Optimizer::update`] computes on the host, operation
//! for operation in float32, so a step gives the host update's results bit for bit
//! (`train_step_matches_the_host_optimizer` in `frontends/tests/keras_train.rs`).

use super::loss::Loss;
use super::optimizer::{Clipping, Optimizer};
use crate::keras::model::{signature, Feed, Model, ModelPlan, Moment, StepKey, StepPlan, WeightId};
use crate::keras::KerasError;
use cellgraph_backends::{Data, Value};
use cellgraph_ir::builder::Builder;
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::ArrayD;
use std::collections::HashMap;

type R<T> = Result<T, KerasError>;

/// Weights and optimizer moments held where the last step left them (see the module
/// docs). Empty: everything is read from the model.
#[derive(Default)]
pub(crate) struct Resident {
    weights: HashMap<WeightId, Value>,
    moments: HashMap<(WeightId, Moment), Value>,
}

impl Resident {
    /// Whether nothing is held.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.weights.is_empty() && self.moments.is_empty()
    }

    /// Where each held value is (`None`: the host), by weight and by moment: for tests
    /// and reports.
    #[cfg(test)]
    pub(crate) fn locations(&self) -> Vec<Option<&'static str>> {
        self.weights
            .values()
            .chain(self.moments.values())
            .map(Value::device)
            .collect()
    }
}

/// What one step returns to the host.
pub(crate) struct StepOut {
    /// The total loss.
    pub loss: f32,
    /// Each head's loss.
    pub losses: Vec<f32>,
    /// The model outputs (for the metrics).
    pub outputs: Vec<Tensor>,
}

impl Optimizer {
    /// Which moments the update reads and writes: (m, v).
    pub(crate) fn moments_used(&self) -> (bool, bool) {
        match *self {
            Optimizer::SGD { momentum, .. } => (momentum != 0.0, false),
            Optimizer::Adam { .. } => (true, true),
            Optimizer::RMSprop { momentum, .. } => (momentum > 0.0, true),
        }
    }

    /// The scalars a step at iteration `t` (1-based) feeds the update: the learning
    /// rate, or for Adam `lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ)` computed as the host update does.
    pub(crate) fn step_scalars(&self, t: u64) -> Vec<f32> {
        match *self {
            Optimizer::SGD { learning_rate, .. } | Optimizer::RMSprop { learning_rate, .. } => {
                vec![learning_rate]
            }
            Optimizer::Adam {
                learning_rate: lr,
                beta_1: b1,
                beta_2: b2,
                ..
            } => {
                let t = t.min(i32::MAX as u64) as i32;
                vec![lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t))]
            }
        }
    }

    /// The update of `w` with gradient `g` as graph nodes, operation for operation what
    /// [`Optimizer::update`] computes; `s` is the step scalar, `m`/`v` the moments
    /// [`Optimizer::moments_used`] asks for. Returns the new weight and the new moments.
    fn emit_update(
        &self,
        b: &mut Builder,
        w: ValueRef,
        g: ValueRef,
        m: Option<ValueRef>,
        v: Option<ValueRef>,
        s: ValueRef,
    ) -> R<(ValueRef, Option<ValueRef>, Option<ValueRef>)> {
        let f = DType::F32;
        let need = |x: Option<ValueRef>| {
            x.ok_or_else(|| KerasError::Internal("an optimizer moment is missing".into()))
        };
        Ok(match *self {
            Optimizer::SGD {
                momentum, nesterov, ..
            } => {
                let lr_g = b.mul(s, g)?;
                if momentum == 0.0 {
                    (b.sub(w, lr_g)?, None, None)
                } else {
                    // m = momentum·m − lr·g; w += m (nesterov: w += momentum·m − lr·g)
                    let mu = b.scalar(f, momentum as f64)?;
                    let mu_m = b.mul(mu, need(m)?)?;
                    let m2 = b.sub(mu_m, lr_g)?;
                    let w2 = if nesterov {
                        let mu_m2 = b.mul(mu, m2)?;
                        let step = b.sub(mu_m2, lr_g)?;
                        b.add(w, step)?
                    } else {
                        b.add(w, m2)?
                    };
                    (w2, Some(m2), None)
                }
            }
            Optimizer::Adam {
                beta_1: b1,
                beta_2: b2,
                epsilon: eps,
                ..
            } => {
                // m += (g − m)(1 − β₁); v += (g² − v)(1 − β₂); w −= alpha·m/(√v + ε)
                let (m, v) = (need(m)?, need(v)?);
                let c1 = b.scalar(f, (1.0 - b1) as f64)?;
                let c2 = b.scalar(f, (1.0 - b2) as f64)?;
                let e = b.scalar(f, eps as f64)?;
                let gm = b.sub(g, m)?;
                let gm = b.mul(gm, c1)?;
                let m2 = b.add(m, gm)?;
                let gg = b.mul(g, g)?;
                let gv = b.sub(gg, v)?;
                let gv = b.mul(gv, c2)?;
                let v2 = b.add(v, gv)?;
                let am = b.mul(s, m2)?;
                let sq = b.op(Op::Sqrt {}, &[v2], "sqrt")?;
                let den = b.add(sq, e)?;
                let step = b.div(am, den)?;
                (b.sub(w, step)?, Some(m2), Some(v2))
            }
            Optimizer::RMSprop {
                rho,
                momentum,
                epsilon: eps,
                ..
            } => {
                // v = ρv + (1 − ρ)g²; inc = lr·g/√(v + ε); momentum: m = momentum·m + inc,
                // w −= m; else w −= inc
                let v = need(v)?;
                let r = b.scalar(f, rho as f64)?;
                let c = b.scalar(f, (1.0 - rho) as f64)?;
                let e = b.scalar(f, eps as f64)?;
                let rv = b.mul(r, v)?;
                let cg = b.mul(c, g)?;
                let cgg = b.mul(cg, g)?;
                let v2 = b.add(rv, cgg)?;
                let lr_g = b.mul(s, g)?;
                let ve = b.add(v2, e)?;
                let den = b.op(Op::Sqrt {}, &[ve], "sqrt")?;
                let inc = b.div(lr_g, den)?;
                if momentum > 0.0 {
                    let mu = b.scalar(f, momentum as f64)?;
                    let mu_m = b.mul(mu, need(m)?)?;
                    let m2 = b.add(mu_m, inc)?;
                    (b.sub(w, m2)?, Some(m2), Some(v2))
                } else {
                    (b.sub(w, inc)?, None, Some(v2))
                }
            }
        })
    }
}

impl Clipping {
    /// Clipping as graph nodes: each gradient scaled by `c / max(‖g‖, c)` (`clipnorm`;
    /// exactly 1 when the norm is within the bound), all of them by `c / max(‖G‖, c)`
    /// (`global_clipnorm`), or each element clipped to `[-c, c]` (`clipvalue`). Norms
    /// are computed in float32, as Keras does.
    fn emit(&self, b: &mut Builder, grads: Vec<ValueRef>) -> R<Vec<ValueRef>> {
        let f = DType::F32;
        let sum_sq = |b: &mut Builder, g: ValueRef| -> R<ValueRef> {
            let gg = b.mul(g, g)?;
            let rank = b.dims(g).len() as i64;
            let axes: Vec<i64> = (0..rank).collect();
            Ok(if axes.is_empty() {
                gg
            } else {
                b.reduce_sum(gg, &axes, false)?
            })
        };
        let scale = |b: &mut Builder, sq: ValueRef, c: f32| -> R<ValueRef> {
            let n = b.op(Op::Sqrt {}, &[sq], "norm")?;
            let c = b.scalar(f, c as f64)?;
            let top = b.op(Op::Max {}, &[n, c], "max")?;
            Ok(b.div(c, top)?)
        };
        if let Some(c) = self.clipnorm {
            grads
                .into_iter()
                .map(|g| {
                    let sq = sum_sq(b, g)?;
                    let k = scale(b, sq, c)?;
                    Ok(b.mul(g, k)?)
                })
                .collect()
        } else if let Some(c) = self.global_clipnorm {
            let mut total: Option<ValueRef> = None;
            for &g in &grads {
                let sq = sum_sq(b, g)?;
                total = Some(match total {
                    None => sq,
                    Some(t) => b.add(t, sq)?,
                });
            }
            let Some(total) = total else {
                return Ok(grads);
            };
            let k = scale(b, total, c)?;
            grads.into_iter().map(|g| Ok(b.mul(g, k)?)).collect()
        } else if let Some(c) = self.clipvalue {
            let hi = b.scalar(f, c as f64)?;
            let lo = b.scalar(f, -c as f64)?;
            grads
                .into_iter()
                .map(|g| {
                    let t = b.op(Op::Min {}, &[g, hi], "clip")?;
                    Ok(b.op(Op::Max {}, &[t, lo], "clip")?)
                })
                .collect()
        } else {
            Ok(grads)
        }
    }
}

impl Model {
    /// Builds and compiles the step graph for this signature and these heads.
    fn build_step_plan(&self, sig: &[(DType, Vec<usize>)], heads: &[(usize, Loss)]) -> R<StepPlan> {
        let st = self.training.as_ref().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before fit()".into(),
        })?;
        let (optimizer, clipping) = (st.optimizer, st.clipping);
        let (mut lowered, params) = self.grad_graph(sig, true, heads)?;
        let head_shapes = heads
            .iter()
            .map(|(o, _)| {
                let y = lowered.graph.outputs()[*o];
                lowered
                    .graph
                    .value(y)
                    .ty
                    .dims()
                    .map(|d| d.iter().map(|d| d.known().unwrap_or(0) as usize).collect())
                    .unwrap_or_default()
            })
            .collect();
        let n_model = self.outputs.len();
        let n_states: usize = lowered.states.iter().map(|&(_, n)| n).sum();
        let bn = lowered.bn.clone();
        let feeds = lowered.feeds.clone();
        let g: &mut Graph = &mut lowered.graph;
        let outs = g.outputs().to_vec();
        let n_heads = heads.len();
        let n_params = params.len();
        // The gradient graph's outputs: model outputs, states, BN batch statistics, head
        // losses, the total, then one gradient per trainable weight.
        let n_bn = 2 * bn.len();
        let expect = n_model + n_states + n_bn + n_heads + 1 + n_params;
        if outs.len() != expect {
            return Err(KerasError::Internal(format!(
                "the gradient graph has {} outputs, the step expects {expect}",
                outs.len()
            )));
        }
        let inputs = g.input_values();
        let weight_input: HashMap<WeightId, ValueRef> = feeds
            .iter()
            .zip(&inputs)
            .filter_map(|(f, &v)| match f {
                Feed::Weight(s, k) => Some(((*s, *k), v)),
                _ => None,
            })
            .collect();
        let mut b = Builder::new(g, "step");
        let f32_input = |b: &mut Builder, name: &str, shape: &[usize]| {
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            b.input(name, ValueType::tensor(DType::F32, &dims))
        };
        // BatchNorm moving statistics: read as inputs where the forward does not.
        let mut extra_weights = Vec::new();
        let mut bn_ins = Vec::new();
        for &slot in &bn {
            let n = self.slots[slot].weights.len();
            for k in [n - 2, n - 1] {
                let v = match weight_input.get(&(slot, k)) {
                    Some(&v) => v,
                    None => {
                        let shape = self.slots[slot].weights[k].value.shape().to_vec();
                        extra_weights.push((slot, k));
                        f32_input(&mut b, &format!("step/w_{slot}_{k}"), &shape)?
                    }
                };
                bn_ins.push(((slot, k), v));
            }
        }
        let (use_m, use_v) = optimizer.moments_used();
        let mut moments = Vec::new();
        let mut moment_in: HashMap<(WeightId, Moment), ValueRef> = HashMap::new();
        for &(s, k) in &params {
            let shape = self.slots[s].weights[k].value.shape().to_vec();
            for (used, which, tag) in [(use_m, Moment::M, "m"), (use_v, Moment::V, "v")] {
                if used {
                    let v = f32_input(&mut b, &format!("step/{tag}_{s}_{k}"), &shape)?;
                    moments.push(((s, k), which));
                    moment_in.insert(((s, k), which), v);
                }
            }
        }
        let n_scalars = optimizer.step_scalars(1).len();
        let scalars = (0..n_scalars)
            .map(|i| f32_input(&mut b, &format!("step/scalar_{i}"), &[]))
            .collect::<Result<Vec<_>, _>>()?;
        let s = *scalars
            .first()
            .ok_or_else(|| KerasError::Internal("an optimizer without a step scalar".into()))?;
        let grads = clipping.emit(&mut b, outs[expect - n_params..].to_vec())?;
        let mut new_outs: Vec<ValueRef> = outs[..n_model + n_states].to_vec();
        new_outs.extend_from_slice(&outs[n_model + n_states + n_bn..expect - n_params]);
        let mut writes = Vec::new();
        let mut new_weights = Vec::new();
        let mut new_moments: HashMap<(WeightId, Moment), ValueRef> = HashMap::new();
        for (&(sl, k), &g) in params.iter().zip(&grads) {
            let w = *weight_input.get(&(sl, k)).ok_or_else(|| {
                KerasError::Internal(format!("trainable weight {sl}/{k} is not a graph input"))
            })?;
            let m = moment_in.get(&((sl, k), Moment::M)).copied();
            let v = moment_in.get(&((sl, k), Moment::V)).copied();
            let (w2, m2, v2) = optimizer.emit_update(&mut b, w, g, m, v, s)?;
            writes.push((sl, k));
            new_weights.push(w2);
            if let Some(m2) = m2 {
                new_moments.insert(((sl, k), Moment::M), m2);
            }
            if let Some(v2) = v2 {
                new_moments.insert(((sl, k), Moment::V), v2);
            }
        }
        // moving = moving·momentum + batch·(1 − momentum), as the inference update does.
        let stats = &outs[n_model + n_states..n_model + n_states + n_bn];
        for ((id, moving), &batch) in bn_ins.iter().zip(stats) {
            let momentum = match &self.slots[id.0].layer {
                crate::keras::layers::Layer::BatchNormalization(l) => l.momentum,
                _ => return Err(KerasError::Internal("BN update for a non-BN layer".into())),
            };
            let shape = self.slots[id.0].weights[id.1].value.shape().to_vec();
            let mu = b.scalar(DType::F32, momentum as f64)?;
            let rest = b.scalar(DType::F32, (1.0 - momentum) as f64)?;
            let batch = b.reshape(batch, &shape)?;
            let a = b.mul(*moving, mu)?;
            let c = b.mul(batch, rest)?;
            writes.push(*id);
            new_weights.push(b.add(a, c)?);
        }
        new_outs.extend(new_weights);
        for key in &moments {
            new_outs.push(*new_moments.get(key).ok_or_else(|| {
                KerasError::Internal("an optimizer moment without its update".into())
            })?);
        }
        b.outputs(&new_outs)?;
        cellgraph_ir::verify(&lowered.graph)?;
        let plan = ModelPlan::compile(&lowered.graph, &self.backends)?;
        Ok(StepPlan {
            plan,
            feeds,
            states: lowered.states,
            extra_weights,
            moments,
            n_scalars,
            writes,
            n_model,
            n_heads,
            head_shapes,
        })
    }

    /// One training step (forward, losses, gradients, clipping, the optimizer update)
    /// on the model's backends, reading and writing weights and moments through `res`.
    /// A loss that is not finite is an error and changes nothing; `at` ends its message.
    pub(crate) fn train_step_resident(
        &mut self,
        res: &mut Resident,
        x: &[Tensor],
        y: &[Tensor],
        heads: &[(usize, Loss)],
        at: &str,
    ) -> R<StepOut> {
        self.prepare(x)?;
        let st = self.training.as_ref().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before fit()".into(),
        })?;
        let heads_key: Vec<String> = heads
            .iter()
            .map(|(o, l)| format!("{o}:{}", l.key()))
            .collect();
        let key: StepKey = (
            signature(x),
            heads_key.join(";"),
            format!("{:?} {:?}", st.optimizer, st.clipping),
        );
        let optimizer = st.optimizer;
        let t = st.state.iterations + 1;
        if !self.step_plans.contains_key(&key) {
            let p = self.build_step_plan(&key.0, heads)?;
            self.step_plans.insert(key.clone(), p);
        }
        let (feeds, extra, moments, head_shapes) = {
            let p = &self.step_plans[&key];
            (
                p.feeds.clone(),
                p.extra_weights.clone(),
                p.moments.clone(),
                p.head_shapes.clone(),
            )
        };
        let ts = heads
            .iter()
            .zip(y)
            .zip(&head_shapes)
            .map(|(((_, loss), t), shape)| loss.prepare_targets(shape, t))
            .collect::<R<Vec<_>>>()?;
        // Feeds as the model has them (dropout masks drawn here, in order), with the
        // resident weights in place of the model's copies.
        let data = self.feed(&feeds, x, &ts)?;
        let mut ins: Vec<Value> = Vec::with_capacity(data.len() + extra.len() + moments.len() + 1);
        for (i, d) in data.into_iter().enumerate() {
            let held = match feeds.get(i) {
                Some(Feed::Weight(s, k)) => res.weights.get(&(*s, *k)).cloned(),
                _ => None,
            };
            ins.push(held.unwrap_or(Value::Host(d)));
        }
        for id in &extra {
            ins.push(match res.weights.get(id) {
                Some(v) => v.clone(),
                None => Value::Host(Data::Tensor(Tensor::F32(
                    self.slots[id.0].weights[id.1].value.clone(),
                ))),
            });
        }
        let order = self.trainable();
        let allocated = self.training.as_ref().map_or(0, |t| t.state.slots.len());
        if allocated != order.len() {
            let zeros: Vec<_> = order
                .iter()
                .map(|&(s, k)| {
                    super::optimizer::OptSlot::zeros(self.slots[s].weights[k].value.raw_dim())
                })
                .collect();
            if let Some(t) = self.training.as_mut() {
                t.state.slots = zeros;
            }
        }
        for key in &moments {
            ins.push(match res.moments.get(key) {
                Some(v) => v.clone(),
                None => {
                    let i = order.iter().position(|w| *w == key.0).ok_or_else(|| {
                        KerasError::Internal("a moment of a weight that is not trainable".into())
                    })?;
                    let slot = &self.training.as_ref().expect("checked").state.slots[i];
                    let a = match key.1 {
                        Moment::M => slot.m.clone(),
                        Moment::V => slot.v.clone(),
                    };
                    Value::Host(Data::Tensor(Tensor::F32(a)))
                }
            });
        }
        for s in optimizer.step_scalars(t) {
            ins.push(Value::Host(Data::Tensor(Tensor::F32(ArrayD::from_elem(
                ndarray::IxDyn(&[]),
                s,
            )))));
        }
        let p = self
            .step_plans
            .get_mut(&key)
            .ok_or_else(|| KerasError::Internal("step plan missing".into()))?;
        if ins.len() != feeds.len() + p.n_heads + extra.len() + moments.len() + p.n_scalars {
            return Err(KerasError::Internal("step inputs miscounted".into()));
        }
        let mut outs = p.plan.run_values(ins)?.into_iter();
        let plan = &mut p.plan;
        let mut host = |v: Option<Value>| -> R<Tensor> {
            let v = v.ok_or_else(|| KerasError::Internal("a step output is missing".into()))?;
            plan.download(v)?
                .into_tensor()
                .map_err(KerasError::Internal)
        };
        let mut outputs = Vec::with_capacity(p.n_model);
        for _ in 0..p.n_model {
            outputs.push(host(outs.next())?);
        }
        let mut states = Vec::new();
        for &(slot, n) in &p.states {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                match host(outs.next())? {
                    Tensor::F32(a) => v.push(a),
                    _ => return Err(KerasError::Internal("a state is not float32".into())),
                }
            }
            states.push((slot, v));
        }
        let scalar = |t: &Tensor| t.to_f64_vec().first().copied().unwrap_or(f64::NAN) as f32;
        let mut losses = Vec::with_capacity(p.n_heads);
        for _ in 0..p.n_heads {
            losses.push(scalar(&host(outs.next())?));
        }
        let loss = scalar(&host(outs.next())?);
        let writes = p.writes.clone();
        if !loss.is_finite() {
            return Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: format!("the loss became {loss}{at}"),
            });
        }
        for id in writes {
            let v = outs
                .next()
                .ok_or_else(|| KerasError::Internal("a new weight is missing".into()))?;
            res.weights.insert(id, v);
        }
        for key in moments {
            let v = outs
                .next()
                .ok_or_else(|| KerasError::Internal("a new moment is missing".into()))?;
            res.moments.insert(key, v);
        }
        for (slot, v) in states {
            self.slots[slot].states = Some(v);
        }
        if let Some(st) = self.training.as_mut() {
            st.state.iterations = t;
        }
        Ok(StepOut {
            loss,
            losses,
            outputs,
        })
    }

    /// Brings what `res` holds to the model (weights) and the optimizer state (moments),
    /// downloading device values; `res` is empty afterwards.
    pub(crate) fn sync_resident(&mut self, res: &mut Resident) -> R<()> {
        let to_host = |backends: &[std::sync::Arc<dyn cellgraph_backends::Device>],
                       v: Value|
         -> R<ArrayD<f32>> {
            let d = match v {
                Value::Host(d) => d,
                Value::Device(ref dv) => backends
                    .iter()
                    .find(|b| b.name() == dv.backend)
                    .ok_or_else(|| {
                        KerasError::Internal(format!(
                            "a value on backend {}, which the model does not use",
                            dv.backend
                        ))
                    })?
                    .download(&v)?,
            };
            match d.into_tensor().map_err(KerasError::Internal)? {
                Tensor::F32(a) => Ok(a),
                _ => Err(KerasError::Internal(
                    "a resident value is not float32".into(),
                )),
            }
        };
        for ((s, k), v) in std::mem::take(&mut res.weights) {
            self.slots[s].weights[k].value = to_host(&self.backends, v)?;
        }
        let order = self.trainable();
        for ((id, which), v) in std::mem::take(&mut res.moments) {
            let a = to_host(&self.backends, v)?;
            let i = order
                .iter()
                .position(|w| *w == id)
                .ok_or_else(|| KerasError::Internal("a moment of an unknown weight".into()))?;
            let st = self
                .training
                .as_mut()
                .ok_or_else(|| KerasError::Internal("training state missing".into()))?;
            let slot = st
                .state
                .slots
                .get_mut(i)
                .ok_or_else(|| KerasError::Internal("optimizer slots miscounted".into()))?;
            match which {
                Moment::M => slot.m = a,
                Moment::V => slot.v = a,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keras::{Dense, Input, Optimizer, Sequential};
    use cellgraph_backends::subset::SubsetBackend;
    use std::sync::Arc;

    fn transfers(m: &Model) -> (usize, usize) {
        let mut t = (0, 0);
        for p in m.step_plans.values() {
            if let ModelPlan::Placed(p) = p.plan() {
                t.0 += p.transfers().uploads;
                t.1 += p.transfers().downloads;
            }
        }
        t
    }

    /// On a device backend, the weights and Adam's moments stay in its memory between
    /// steps: after the first step (which uploads them) each step uploads only the batch,
    /// the targets and the step scalar, and none of the six stay on the host; `sync`
    /// brings them back, equal to the CPU's training.
    #[test]
    fn weights_and_moments_stay_on_the_device_between_steps() {
        let build = || {
            let mut m = Sequential::with_seed(2);
            m.add(Input::new(&[Some(4)])).unwrap();
            m.add(Dense::new(3)).unwrap();
            m.compile(Optimizer::adam(), Loss::MeanSquaredError, &[]);
            m
        };
        let x = Tensor::F32(ArrayD::from_shape_fn(ndarray::IxDyn(&[5, 4]), |d| {
            (d[0] as f32 - 2.0) * 0.3 + d[1] as f32 * 0.1
        }));
        let y = Tensor::F32(ArrayD::from_shape_fn(ndarray::IxDyn(&[5, 3]), |d| {
            (d[0] + d[1]) as f32 * 0.2
        }));
        let heads = [(0, Loss::MeanSquaredError)];
        let mut dev = build();
        dev.set_backends(vec![Arc::new(SubsetBackend)]);
        let mut cpu = build();
        let (mut res_dev, mut res_cpu) = (Resident::default(), Resident::default());
        let mut per_step = Vec::new();
        for _ in 0..4 {
            let before = transfers(&dev);
            let a = dev
                .train_step_resident(
                    &mut res_dev,
                    std::slice::from_ref(&x),
                    std::slice::from_ref(&y),
                    &heads,
                    "",
                )
                .unwrap();
            let after = transfers(&dev);
            per_step.push((after.0 - before.0, after.1 - before.1));
            let locations = res_dev.locations();
            assert_eq!(locations.len(), 2 + 4, "kernel, bias and their m and v");
            assert!(
                locations.iter().all(|l| *l == Some("subset")),
                "{locations:?}"
            );
            let b = cpu
                .train_step_resident(
                    &mut res_cpu,
                    std::slice::from_ref(&x),
                    std::slice::from_ref(&y),
                    &heads,
                    "",
                )
                .unwrap();
            assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss.abs().max(1.0));
            assert!(res_cpu.locations().iter().all(Option::is_none));
        }
        // The first step uploads the two weights and four moments; later steps do not.
        let steady = per_step[1];
        assert!(per_step[2..].iter().all(|s| *s == steady), "{per_step:?}");
        assert_eq!(per_step[0].0, steady.0 + 6, "{per_step:?}");
        assert_eq!(per_step[0].1, steady.1, "{per_step:?}");
        dev.sync_resident(&mut res_dev).unwrap();
        cpu.sync_resident(&mut res_cpu).unwrap();
        assert!(res_dev.is_empty() && res_cpu.is_empty());
        for (p, q) in dev.get_weights().iter().zip(cpu.get_weights()) {
            for (a, b) in p.iter().zip(&q) {
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
            }
        }
        let (m_dev, t_dev) = dev.training.as_ref().unwrap().state.parts();
        let (m_cpu, t_cpu) = cpu.training.as_ref().unwrap().state.parts();
        assert_eq!((t_dev, t_cpu), (4, 4));
        for ((a, b), (c, d)) in m_dev.iter().zip(&m_cpu) {
            for (p, q) in a.iter().chain(b.iter()).zip(c.iter().chain(d.iter())) {
                assert!((p - q).abs() <= 1e-6 + 1e-5 * q.abs(), "{p} vs {q}");
            }
        }
    }
}
