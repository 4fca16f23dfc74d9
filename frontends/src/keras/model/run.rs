//! Running a model: its inference graph, `predict`/`call`, and the feeds (inputs,
//! weights, states, dropout masks) and results (states, BatchNorm statistics) of a plan.

use super::*;
use crate::keras::layers::lower_op;

impl Model {
    /// Lowers the model to an IR graph for inputs of the given dtypes and shapes, in
    /// inference mode. Weights are initializers; graph inputs are the model inputs, then
    /// the states of stateful layers (`<layer>/state_k`); outputs are the model outputs,
    /// then those layers' final states.
    pub fn to_graph(&self, inputs: &[(DType, Vec<usize>)]) -> R<Graph> {
        Ok(self.lower(inputs, false, false)?.graph)
    }

    pub(crate) fn lower(
        &self,
        sig: &[(DType, Vec<usize>)],
        training: bool,
        weights_as_inputs: bool,
    ) -> R<Lowered> {
        let dims: Vec<(DType, Vec<Dim>)> = sig
            .iter()
            .map(|(dt, s)| (*dt, s.iter().map(|&d| Dim::Known(d as u64)).collect()))
            .collect();
        self.lower_dims(&dims, training, weights_as_inputs)
    }

    /// The names of the model's inputs (their Input layers).
    pub fn input_names(&self) -> Vec<String> {
        self.inputs
            .iter()
            .map(|t| {
                self.slots[self.nodes[self.tensors[t.0].node].slot]
                    .name
                    .clone()
            })
            .collect()
    }

    /// The dtypes the model's inputs declare (`float32` unless an Input says otherwise).
    pub fn input_dtypes(&self) -> Vec<DType> {
        self.inputs
            .iter()
            .map(
                |t| match &self.slots[self.nodes[self.tensors[t.0].node].slot].layer {
                    Layer::Input(i) => dtype_of(&i.dtype).unwrap_or(DType::F32),
                    _ => DType::F32,
                },
            )
            .collect()
    }

    pub(crate) fn lower_dims(
        &self,
        sig: &[(DType, Vec<Dim>)],
        training: bool,
        weights_as_inputs: bool,
    ) -> R<Lowered> {
        let mut g = Graph::new(self.name.clone());
        let mut feeds = Vec::new();
        let mut vals: HashMap<KerasTensor, (ValueRef, Option<ValueRef>)> = HashMap::new();
        for (i, (t, (dt, dims))) in self.inputs.iter().zip(sig).enumerate() {
            let slot = &self.slots[self.nodes[self.tensors[t.0].node].slot];
            let v = g.add_input(
                &slot.name,
                ValueType::Tensor(TensorType::with_dims(*dt, dims.clone())),
            )?;
            feeds.push(Feed::Input(i));
            let want = match &slot.layer {
                Layer::Input(i) => dtype_of(&i.dtype).ok_or_else(|| KerasError::Unsupported {
                    layer: slot.name.clone(),
                    what: format!("dtype {:?}", i.dtype),
                })?,
                _ => DType::F32,
            };
            let v = if *dt == want {
                v
            } else {
                Emit::new(&mut g, &slot.name).cast(v, want)?
            };
            vals.insert(*t, (v, None));
        }
        let mut wrefs: Vec<Vec<ValueRef>> = Vec::new();
        for (si, s) in self.slots.iter().enumerate() {
            let mut refs = Vec::new();
            for (k, w) in s.weights.iter().enumerate() {
                refs.push(if weights_as_inputs {
                    let d: Vec<u64> = w.value.shape().iter().map(|&d| d as u64).collect();
                    feeds.push(Feed::Weight(si, k));
                    g.add_input(&w.name, ValueType::tensor(DType::F32, &d))?
                } else {
                    g.add_initializer(&w.name, Tensor::F32(w.value.clone()), w.trainable)?
                });
            }
            wrefs.push(refs);
        }
        let mut state_outs: Vec<ValueRef> = Vec::new();
        let mut bn_outs: Vec<ValueRef> = Vec::new();
        let mut bindings = Vec::new();
        let mut bn = Vec::new();
        let batch = sig
            .first()
            .and_then(|(_, s)| s.first())
            .cloned()
            .unwrap_or(Dim::Unknown);
        for node in &self.nodes {
            let slot = &self.slots[node.slot];
            if matches!(slot.layer, Layer::Input(_)) {
                continue;
            }
            if let Layer::Op(op) = &slot.layer {
                let ins = node
                    .inputs
                    .iter()
                    .map(|t| vals.get(t).map(|v| v.0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| KerasError::Internal("op operand not computed".into()))?;
                let mut e = Emit::new(&mut g, &slot.name);
                let v = lower_op(&mut e, op, &ins)?;
                vals.insert(node.outputs[0], (v, None));
                continue;
            }
            let (x, in_mask) = *vals.get(&node.inputs[0]).ok_or_else(|| KerasError::Layer {
                layer: slot.name.clone(),
                msg: "reads a tensor that the model inputs do not determine".into(),
            })?;
            // The call's `mask`, else the (first) input's.
            let mask = match node.args.mask {
                Some(m) => {
                    let mv = vals
                        .get(&m)
                        .ok_or_else(|| KerasError::Internal("mask tensor not computed".into()))?
                        .0;
                    Some(Emit::new(&mut g, &slot.name).cast(mv, DType::Bool)?)
                }
                None => in_mask,
            };
            let mut init: Option<Vec<ValueRef>> = if node.args.initial_state.is_empty() {
                None
            } else {
                Some(
                    node.args
                        .initial_state
                        .iter()
                        .map(|t| vals.get(t).map(|v| v.0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| KerasError::Internal("initial state not computed".into()))?,
                )
            };
            if let Layer::Custom(c) = &slot.layer {
                let parts = node
                    .inputs
                    .iter()
                    .map(|t| vals.get(t).map(|v| v.0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| KerasError::Layer {
                        layer: slot.name.clone(),
                        msg: "reads a tensor that the model inputs do not determine".into(),
                    })?;
                let named: Vec<(String, ValueRef)> = c
                    .specs(c.built.as_ref().ok_or_else(|| {
                        KerasError::Internal("custom RNN lowered before it was built".into())
                    })?)
                    .map_err(|msg| KerasError::Layer {
                        layer: slot.name.clone(),
                        msg,
                    })?
                    .into_iter()
                    .map(|(w, ..)| w)
                    .zip(wrefs[node.slot].iter().copied())
                    .collect();
                let mut e = Emit::new(&mut g, &slot.name);
                e.training = training;
                let outs = crate::keras::custom::lower(&mut e, c, &named, &parts, mask, init)?;
                for (t, v) in node.outputs.iter().zip(outs) {
                    vals.insert(*t, v);
                }
                continue;
            }
            let stateful_here = slot.layer.is_stateful() && init.is_none();
            if stateful_here {
                let mut v = Vec::new();
                for (k, s) in LayerKind::state_sizes(&slot.layer).into_iter().enumerate() {
                    feeds.push(Feed::State(node.slot, k));
                    v.push(g.add_input(
                        &format!("{}/state_{k}", slot.name),
                        ValueType::Tensor(TensorType::with_dims(
                            DType::F32,
                            vec![batch.clone(), Dim::Known(s as u64)],
                        )),
                    )?);
                }
                init = Some(v);
            }
            let w = &wrefs[node.slot];
            let mut e = Emit::new(&mut g, &slot.name);
            e.training = training;
            let mut extra = Vec::new();
            let outs: Vec<(ValueRef, Option<ValueRef>)> =
                lower_layer(&mut e, &slot.layer, w, x, mask, init, &mut extra)?;
            feeds.extend(e.randoms.drain(..).map(|(s, r)| Feed::Random(s, r)));
            if !extra.is_empty() {
                bn.push(node.slot);
                bn_outs.extend(extra);
            }
            if stateful_here {
                let n = LayerKind::state_sizes(&slot.layer).len();
                let finals: Vec<ValueRef> = outs[outs.len() - n..].iter().map(|o| o.0).collect();
                bindings.push((node.slot, n));
                state_outs.extend(finals);
            }
            for (t, v) in node.outputs.iter().zip(outs) {
                vals.insert(*t, v);
            }
        }
        let mut outs = Vec::new();
        for t in &self.outputs {
            outs.push(
                vals.get(t)
                    .ok_or_else(|| KerasError::Internal("output not computed".into()))?
                    .0,
            );
        }
        outs.extend(state_outs);
        outs.extend(bn_outs);
        // A graph output must be a named op output; wrap inputs/initializers in Identity.
        let outs = outs
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let id = g.add_node("", Op::Identity {}, &[Some(v)], &[&format!("output_{i}")])?;
                Ok(ValueRef { node: id, slot: 0 })
            })
            .collect::<Result<Vec<_>, cellgraph_ir::Error>>()?;
        g.set_outputs(outs)?;
        Ok(Lowered {
            graph: g,
            feeds,
            states: bindings,
            bn,
        })
    }

    /// Runs the model on tensors in inference mode (`model.predict`, `model(x,
    /// training=False)`): dropout off, BatchNormalization on its moving statistics.
    /// Inputs in model-input order; float32, or integer token ids. Stateful layers start
    /// from their stored states and keep their final states.
    pub fn predict(&mut self, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        self.call(inputs, false)
    }

    /// Calls the model (`model(x, training=...)`). In training mode `Dropout` layers and
    /// the `dropout`/`recurrent_dropout` of recurrent layers drop with fresh masks drawn
    /// from the model's seeded generator (one mask per call and sequence, as Keras), and
    /// `BatchNormalization` normalises with the batch statistics (masked steps excluded)
    /// and moves its moving mean and variance by `momentum`.
    pub fn call(&mut self, inputs: &[Tensor], training: bool) -> R<Vec<Tensor>> {
        self.prepare(inputs)?;
        let key = (signature(inputs), training);
        if !self.plans.contains_key(&key) {
            // Weights are graph inputs: set_weights and BatchNormalization updates need
            // no recompilation.
            let mut lowered = self.lower(&key.0, training, true)?;
            lowered.graph = self.select(&lowered.graph)?.graph;
            cellgraph_ir::verify(&lowered.graph)?;
            let plan = ModelPlan::compile(&lowered.graph, &self.backends)?;
            self.plans.insert(key.clone(), Compiled { plan, lowered });
        }
        let (feeds, states, bn) = {
            let c = &self.plans[&key].lowered;
            (c.feeds.clone(), c.states.clone(), c.bn.clone())
        };
        let data = self.feed(&feeds, inputs, &[])?;
        let plan = &mut self
            .plans
            .get_mut(&key)
            .ok_or_else(|| KerasError::Internal("plan missing".into()))?
            .plan;
        let mut outs = run_plan(plan, data)?;
        let rest = outs.split_off(self.outputs.len());
        self.absorb(&states, &bn, rest)?;
        Ok(outs)
    }

    /// Checks the inputs against the model's and prepares the state stores.
    pub(crate) fn prepare(&mut self, inputs: &[Tensor]) -> R<()> {
        if inputs.len() != self.inputs.len() {
            return Err(KerasError::Input {
                input: self.name.clone(),
                msg: format!(
                    "the model takes {} inputs, got {}",
                    self.inputs.len(),
                    inputs.len()
                ),
            });
        }
        for (t, x) in self.inputs.iter().zip(inputs) {
            let declared = &self.tensors[t.0].shape;
            let name = &self.slots[self.nodes[self.tensors[t.0].node].slot].name;
            let got = x.shape();
            let ok = declared.len() == got.len()
                && declared
                    .iter()
                    .zip(got)
                    .all(|(d, &g)| d.is_none_or(|d| d == g));
            if !ok {
                return Err(KerasError::Input {
                    input: name.clone(),
                    msg: format!(
                        "expected shape {}, got {}",
                        shape_str(declared),
                        shape_str(&got.iter().map(|&d| Some(d)).collect::<Vec<_>>())
                    ),
                });
            }
            if x.dtype().is_float() {
                if let Some(bad) = x.to_f64_vec().into_iter().find(|v| v.is_nan()) {
                    return Err(KerasError::Input {
                        input: name.clone(),
                        msg: format!("holds {bad}"),
                    });
                }
            }
        }
        let batch = inputs
            .first()
            .and_then(|x| x.shape().first())
            .copied()
            .unwrap_or(0);
        for s in &mut self.slots {
            if !s.layer.is_stateful() {
                continue;
            }
            let sizes = LayerKind::state_sizes(&s.layer);
            match &s.states {
                Some(st) if st.first().map(|a| a.shape()[0]) != Some(batch) => {
                    return Err(KerasError::Layer {
                        layer: s.name.clone(),
                        msg: format!(
                            "is stateful with batch size {}, got a batch of {batch}",
                            st.first().map_or(0, |a| a.shape()[0])
                        ),
                    })
                }
                Some(_) => {}
                None => {
                    s.states = Some(
                        sizes
                            .iter()
                            .map(|&u| ArrayD::zeros(IxDyn(&[batch, u])))
                            .collect(),
                    )
                }
            }
        }
        Ok(())
    }

    /// The data for a plan's graph inputs: model inputs, weights, states, fresh dropout
    /// masks, then `extra` (loss targets).
    pub(crate) fn feed(
        &mut self,
        feeds: &[Feed],
        inputs: &[Tensor],
        extra: &[Tensor],
    ) -> R<Vec<Data>> {
        let mut data: Vec<Data> = Vec::with_capacity(feeds.len() + extra.len());
        for f in feeds {
            let t = match f {
                Feed::Input(i) => inputs[*i].clone(),
                Feed::Weight(s, k) => Tensor::F32(self.slots[*s].weights[*k].value.clone()),
                Feed::State(s, k) => Tensor::F32(
                    self.slots[*s]
                        .states
                        .as_ref()
                        .and_then(|st| st.get(*k))
                        .cloned()
                        .ok_or_else(|| KerasError::Internal("state store missing".into()))?,
                ),
                Feed::Random(shape, rate) => {
                    let keep = 1.0 - rate;
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = (0..n)
                        .map(|_| {
                            if rand::RngExt::random::<f32>(&mut self.rng) < keep {
                                1.0 / keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    Tensor::F32(
                        ArrayD::from_shape_vec(IxDyn(shape), v)
                            .map_err(|e| KerasError::Internal(e.to_string()))?,
                    )
                }
            };
            data.push(Data::Tensor(t));
        }
        data.extend(extra.iter().cloned().map(Data::Tensor));
        Ok(data)
    }

    /// Takes the final states and BatchNormalization batch statistics that follow the
    /// model outputs; returns what is left after them.
    pub(crate) fn absorb(
        &mut self,
        states: &[(usize, usize)],
        bn: &[usize],
        rest: Vec<Tensor>,
    ) -> R<Vec<Tensor>> {
        let mut rest = rest.into_iter();
        let mut f32_out = || match rest.next() {
            Some(Tensor::F32(a)) => Ok(a),
            _ => Err(KerasError::Internal("extra output missing".into())),
        };
        for &(slot, n) in states {
            let new = (0..n).map(|_| f32_out()).collect::<R<Vec<_>>>()?;
            self.slots[slot].states = Some(new);
        }
        for &slot in bn {
            let (mean, var) = (f32_out()?, f32_out()?);
            let momentum = match &self.slots[slot].layer {
                Layer::BatchNormalization(b) => b.momentum,
                _ => return Err(KerasError::Internal("BN update for a non-BN layer".into())),
            };
            let ws = &mut self.slots[slot].weights;
            let n = ws.len();
            for (w, batch_stat) in ws[n - 2..].iter_mut().zip([mean, var]) {
                w.value = &w.value * momentum
                    + &(batch_stat
                        .into_shape_with_order(w.value.raw_dim())
                        .map_err(|e| KerasError::Internal(e.to_string()))?
                        * (1.0 - momentum));
            }
        }
        Ok(rest.collect())
    }

    /// [`Model::predict`] on float32 arrays.
    pub fn predict_f32(&mut self, inputs: &[ArrayD<f32>]) -> R<Vec<ArrayD<f32>>> {
        let ts: Vec<Tensor> = inputs.iter().cloned().map(Tensor::F32).collect();
        self.predict(&ts)?
            .into_iter()
            .map(|t| match t {
                Tensor::F32(a) => Ok(a),
                other => Err(KerasError::Internal(format!(
                    "output of dtype {} is not float32",
                    other.dtype().name()
                ))),
            })
            .collect()
    }
}

/// Input dtypes and shapes.
pub(crate) fn signature(inputs: &[Tensor]) -> Vec<(DType, Vec<usize>)> {
    inputs
        .iter()
        .map(|x| (x.dtype(), x.shape().to_vec()))
        .collect()
}
