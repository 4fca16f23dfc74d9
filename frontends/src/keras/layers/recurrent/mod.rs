//! The recurrent layers: `LSTM`, `GRU`, `SimpleRNN`, `RNN(cell)` and `Bidirectional` —
//! their configurations (`config.rs`), their lowering to `Scan` loops (`lower.rs`), and
//! here what [`LayerKind`] asks of them: checks, weights, shapes, states, lowering and
//! Keras configs both ways.

mod config;
pub(crate) mod lower;

pub use config::*;

use super::kind::*;
use crate::keras::activation::{Activation, Shape};
use crate::keras::config::Cx;
use crate::keras::emit::Emit;
use crate::keras::init::Init;
use crate::keras::KerasError;
use serde_json::{json, Value};

impl RnnClass {
    /// Keras's automatic name stem (`lstm`, `simple_rnn`).
    pub fn stem(self) -> &'static str {
        match self {
            RnnClass::LSTM => "lstm",
            RnnClass::GRU => "gru",
            RnnClass::SimpleRNN => "simple_rnn",
            RnnClass::RNN => "rnn",
        }
    }
}

impl LayerKind for Recurrent {
    fn class(&self) -> &'static str {
        self.class.name()
    }
    fn stem(&self) -> &'static str {
        self.class.stem()
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn check(&mut self, name: &str) -> R<()> {
        validate_rnn(self, name)
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        rnn_specs(self, name, input)
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        feature_dim(input, 3, "(batch, time, features)")?;
        Ok(self.output_shapes(input))
    }
    fn is_stateful(&self) -> bool {
        self.stateful
    }
    fn state_sizes(&self) -> Vec<usize> {
        Recurrent::state_sizes(self)
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let mask = io.mask;
        let out = lower::recurrent(e, self, io.w, io.x, mask, io.init)?;
        let main = match (out.seq, out.last) {
            (Some(s), _) => (s, if self.return_sequences { mask } else { None }),
            (None, Some(l)) => (l, None),
            _ => {
                return Err(KerasError::Internal(
                    "recurrent layer without output".into(),
                ))
            }
        };
        let mut v = vec![main];
        if self.return_state || self.stateful {
            // Final states leave the layer (for the caller, or for the state store).
            v.extend(out.states.into_iter().map(|s| (s, None)));
        }
        Ok(v)
    }
    fn config(&self, name: &str) -> Value {
        rnn_entry(self, name)
    }
}

impl LayerKind for Bidirectional {
    fn class(&self) -> &'static str {
        "Bidirectional"
    }
    fn stem(&self) -> &'static str {
        "bidirectional"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// Fills in Keras's inner names (`forward_lstm`, `backward_lstm`) and checks that
    /// the two directions fit together.
    fn check(&mut self, name: &str) -> R<()> {
        let bad = |what: &str| {
            Err(KerasError::Unsupported {
                layer: name.to_string(),
                what: what.to_string(),
            })
        };
        if self.forward.name.is_none() {
            self.forward.name = Some(format!("forward_{}", self.forward.class.stem()));
        }
        if self.backward.name.is_none() {
            self.backward.name = Some(format!("backward_{}", self.backward.class.stem()));
        }
        validate_rnn(&self.forward, name)?;
        validate_rnn(&self.backward, name)?;
        if self.forward.go_backwards == self.backward.go_backwards {
            return bad("a backward_layer with the same go_backwards as the forward layer");
        }
        if self.forward.return_sequences != self.backward.return_sequences
            || self.forward.return_state != self.backward.return_state
        {
            return bad(
                "forward and backward layers that differ in return_sequences or return_state",
            );
        }
        if self.merge_mode.is_some_and(|m| m != MergeMode::Concat)
            && self.forward.output_units() != self.backward.output_units()
        {
            return bad("sum/mul/ave merge of directions with different units");
        }
        Ok(())
    }
    fn weight_specs(&self, name: &str, input: &Shape) -> Result<Vec<Spec>, String> {
        let f = self.forward.name.clone().unwrap_or_default();
        let bw = self.backward.name.clone().unwrap_or_default();
        let mut v = rnn_specs(&self.forward, &format!("{name}/{f}"), input)?;
        v.extend(rnn_specs(&self.backward, &format!("{name}/{bw}"), input)?);
        Ok(v)
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        feature_dim(input, 3, "(batch, time, features)")?;
        Ok(self.output_shapes(input))
    }
    fn is_stateful(&self) -> bool {
        self.forward.stateful || self.backward.stateful
    }
    fn state_sizes(&self) -> Vec<usize> {
        let mut s = self.forward.state_sizes();
        s.extend(self.backward.state_sizes());
        s
    }
    fn lower_call(&self, e: &mut Emit, io: CallIo<'_>) -> R<Vec<Out>> {
        let w = io.w;
        let nf = self
            .forward
            .cells
            .iter()
            .map(|c| c.weight_shapes(0).len())
            .sum::<usize>();
        let outs = lower::bidirectional(e, self, &w[..nf], &w[nf..], io.x, io.mask, io.init)?;
        let out_mask = if self.forward.return_sequences {
            io.mask
        } else {
            None
        };
        let n_out = if self.merge_mode.is_some() { 1 } else { 2 };
        let keep_states = self.forward.return_state || self.is_stateful();
        Ok(outs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i < n_out || keep_states)
            .map(|(i, v)| (v, if i < n_out { out_mask } else { None }))
            .collect())
    }
    fn config(&self, name: &str) -> Value {
        let fname = self
            .forward
            .name
            .clone()
            .unwrap_or_else(|| "forward".into());
        let bname = self
            .backward
            .name
            .clone()
            .unwrap_or_else(|| "backward".into());
        layer_entry(
            "Bidirectional",
            name,
            json!({"merge_mode": self.merge_mode.map(|m| m.name()),
                   "layer": rnn_entry(&self.forward, &fname),
                   "backward_layer": rnn_entry(&self.backward, &bname)}),
        )
    }
}

impl Bidirectional {
    /// From a Keras `Bidirectional` config (its `layer` and `backward_layer` entries).
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<Bidirectional> {
        let fwd = cx.get(cfg, "layer", at)?;
        let forward = Recurrent::from_entry(cx, fwd, at)?;
        let mut b = Bidirectional::new(forward.clone());
        // Keep the inner configs exactly as given (names, zero_output_for_mask).
        b.forward = forward;
        if let Some(bw) = cfg.get("backward_layer").filter(|v| !v.is_null()) {
            b.backward = Recurrent::from_entry(cx, bw, at)?;
        } else {
            let fname = b.forward.name.clone().unwrap_or_default();
            b.backward.name = Some(fname.replacen("forward_", "backward_", 1));
        }
        b.merge_mode = match cfg.get("merge_mode") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "concat" => MergeMode::Concat,
                "sum" => MergeMode::Sum,
                "mul" => MergeMode::Mul,
                "ave" => MergeMode::Ave,
                other => {
                    return Err(KerasError::Unsupported {
                        layer: at.to_string(),
                        what: format!("merge_mode {other:?}"),
                    })
                }
            }),
            Some(other) => return Err(cx.err(at, format!("merge_mode = {other}"))),
        };
        Ok(b.name(at))
    }
}

impl Recurrent {
    /// A recurrent layer's whole entry (`{"class_name", "config"}`), as `Bidirectional`
    /// holds its directions; `outer` names the enclosing layer when the class is not
    /// recurrent.
    fn from_entry(cx: &Cx, entry: &Value, outer: &str) -> R<Recurrent> {
        let class = cx.str(entry, "class_name", outer)?;
        let cfg = cx.get(entry, "config", class)?;
        let name = cfg
            .get("name")
            .and_then(Value::as_str)
            .or_else(|| entry.get("name").and_then(Value::as_str))
            .unwrap_or(class)
            .to_string();
        let custom = class == "RNN" && custom_cell_class(cfg).is_some();
        if !matches!(class, "LSTM" | "GRU" | "SimpleRNN" | "RNN") || custom {
            let what = if custom { "RNN" } else { class };
            return Err(KerasError::Unsupported {
                layer: outer.to_string(),
                what: format!("Bidirectional around {what}"),
            });
        }
        cx.dtype_ok(cfg, &name)?;
        Recurrent::from_config(cx, class, cfg, &name)
    }

    pub(crate) fn from_config(cx: &Cx, class: &str, cfg: &Value, at: &str) -> R<Recurrent> {
        let mut r = match class {
            "LSTM" => LSTM::new(cx.usize(cfg, "units", at)?),
            "GRU" => GRU::new(cx.usize(cfg, "units", at)?),
            "SimpleRNN" => SimpleRNN::new(cx.usize(cfg, "units", at)?),
            _ => {
                let cell = cx.get(cfg, "cell", at)?;
                let cells = match cell {
                    Value::Array(list) => {
                        let mut v = Vec::new();
                        for c in list {
                            v.extend(read_cell(cx, c, at)?);
                        }
                        v
                    }
                    one => read_cell(cx, one, at)?,
                };
                let stacked = cells.len() > 1
                    || cell.get("class_name").and_then(Value::as_str) == Some("StackedRNNCells");
                let mut r = RNN::new(cells[0].clone());
                r.cells = cells;
                r.stacked = stacked;
                r
            }
        };
        if class != "RNN" {
            let c = r.cells.remove(0);
            let mut c = cell_options(cx, c, cfg, at)?;
            c.name = None;
            r.cells = vec![c];
        }
        cx.refuse(cfg, at, &["time_major"])?;
        r.return_sequences = cx.bool(cfg, "return_sequences", false, at)?;
        r.return_state = cx.bool(cfg, "return_state", false, at)?;
        r.go_backwards = cx.bool(cfg, "go_backwards", false, at)?;
        r.stateful = cx.bool(cfg, "stateful", false, at)?;
        r.unroll = cx.bool(cfg, "unroll", false, at)?;
        r.zero_output_for_mask = cx.bool(cfg, "zero_output_for_mask", false, at)?;
        r.name = Some(at.to_string());
        Ok(r)
    }
}

/// The class of an `RNN` layer's cell when it is not one of Keras's own.
pub(crate) fn custom_cell_class(cfg: &Value) -> Option<&str> {
    let class = cfg.get("cell")?.get("class_name")?.as_str()?;
    (!matches!(
        class,
        "LSTMCell" | "GRUCell" | "SimpleRNNCell" | "StackedRNNCells"
    ))
    .then_some(class)
}

fn read_cell(cx: &Cx, entry: &Value, at: &str) -> R<Vec<Cell>> {
    let class = cx.str(entry, "class_name", at)?;
    let cfg = cx.get(entry, "config", at)?;
    let units = || cx.usize(cfg, "units", at);
    let cell = match class {
        "LSTMCell" => LSTMCell::new(units()?),
        "GRUCell" => GRUCell::new(units()?),
        "SimpleRNNCell" => SimpleRNNCell::new(units()?),
        "StackedRNNCells" => {
            let cells = cx
                .get(cfg, "cells", at)?
                .as_array()
                .ok_or_else(|| cx.err(at, "StackedRNNCells.cells is not a list".into()))?;
            let mut out = Vec::new();
            for c in cells {
                out.extend(read_cell(cx, c, at)?);
            }
            return Ok(out);
        }
        other => {
            return Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("cell class {other:?}"),
            })
        }
    };
    cell_options(cx, cell, cfg, at).map(|c| vec![c])
}

fn cell_options(cx: &Cx, mut cell: Cell, cfg: &Value, at: &str) -> R<Cell> {
    cx.refuse(
        cfg,
        at,
        &[
            "kernel_regularizer",
            "recurrent_regularizer",
            "bias_regularizer",
            "kernel_constraint",
            "recurrent_constraint",
            "bias_constraint",
            "activity_regularizer",
            "time_major",
        ],
    )?;
    if cfg
        .get("implementation")
        .and_then(Value::as_i64)
        .is_some_and(|i| i != 1 && i != 2)
    {
        return Err(cx.err(at, "implementation must be 1 or 2".into()));
    }
    cell.activation = cx.activation(cfg, "activation", Activation::Tanh, at)?;
    cell.recurrent_activation =
        cx.activation(cfg, "recurrent_activation", Activation::Sigmoid, at)?;
    cell.use_bias = cx.bool(cfg, "use_bias", true, at)?;
    cell.unit_forget_bias = cx.bool(cfg, "unit_forget_bias", true, at)?;
    cell.reset_after = cx.bool(cfg, "reset_after", true, at)?;
    cell.dropout = cx.f32(cfg, "dropout", 0.0, at)?;
    cell.recurrent_dropout = cx.f32(cfg, "recurrent_dropout", 0.0, at)?;
    if let Some(n) = cfg.get("name").and_then(Value::as_str) {
        cell.name = Some(n.to_string());
    }
    Ok(cell)
}

fn validate_rnn(r: &Recurrent, name: &str) -> R<()> {
    if r.cells.is_empty() {
        return Err(KerasError::Unsupported {
            layer: name.to_string(),
            what: "an RNN without cells".into(),
        });
    }
    for c in &r.cells {
        c.validate(name)?;
    }
    Ok(())
}

fn rnn_specs(r: &Recurrent, prefix: &str, input: &Shape) -> Result<Vec<Spec>, String> {
    let mut d = feature_dim(input, 3, "(batch, time, features)")?;
    let mut v = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for c in &r.cells {
        let stem = c
            .name
            .clone()
            .unwrap_or_else(|| c.kind.default_name().to_string());
        let mut cname = stem.clone();
        let mut k = 0;
        while used.contains(&cname) {
            k += 1;
            cname = format!("{stem}_{k}");
        }
        used.push(cname.clone());
        let cpath = if r.stacked {
            format!("{prefix}/stacked_rnn_cells/{cname}")
        } else {
            format!("{prefix}/{cname}")
        };
        for (w, shape) in c.weight_shapes(d) {
            let init = match w {
                "kernel" => Init::GlorotUniform,
                "recurrent_kernel" => Init::Orthogonal,
                _ if c.kind == CellKind::LSTM && c.unit_forget_bias => Init::ForgetBias,
                _ => Init::Zeros,
            };
            v.push((format!("{cpath}/{w}"), shape, true, init));
        }
        d = c.units;
    }
    Ok(v)
}

fn cell_config(c: &Cell, name: &str) -> Value {
    let mut cfg = json!({
        "name": name,
        "trainable": true,
        "dtype": dtype_policy(),
        "units": c.units,
        "activation": c.activation.name(),
        "recurrent_activation": c.recurrent_activation.name(),
        "use_bias": c.use_bias,
        "dropout": c.dropout,
        "recurrent_dropout": c.recurrent_dropout,
    });
    match c.kind {
        CellKind::LSTM => cfg["unit_forget_bias"] = json!(c.unit_forget_bias),
        CellKind::GRU => cfg["reset_after"] = json!(c.reset_after),
        CellKind::SimpleRNN => {
            if let Some(o) = cfg.as_object_mut() {
                o.remove("recurrent_activation");
            }
        }
    }
    cfg
}

fn rnn_entry(r: &Recurrent, name: &str) -> Value {
    let mut cfg = json!({
        "name": name,
        "trainable": true,
        "dtype": dtype_policy(),
        "return_sequences": r.return_sequences,
        "return_state": r.return_state,
        "go_backwards": r.go_backwards,
        "stateful": r.stateful,
        "unroll": r.unroll,
        "zero_output_for_mask": r.zero_output_for_mask,
    });
    let obj = cfg.as_object_mut().expect("an object");
    if r.class == RnnClass::RNN {
        let cells: Vec<Value> = r
            .cells
            .iter()
            .map(|c| {
                let cname = c
                    .name
                    .clone()
                    .unwrap_or_else(|| c.kind.default_name().into());
                json!({"module": "keras.layers", "class_name": c.kind.class_name(),
                       "config": cell_config(c, &cname), "registered_name": null})
            })
            .collect();
        let cell = if r.stacked {
            json!({"module": "keras.layers", "class_name": "StackedRNNCells",
                   "config": {"name": "stacked_rnn_cells", "trainable": true, "cells": cells},
                   "registered_name": null})
        } else {
            cells.into_iter().next().unwrap_or(Value::Null)
        };
        obj.insert("cell".into(), cell);
    } else if let Some(c) = r.cells.first() {
        if let Some(cc) = cell_config(c, name).as_object() {
            for (k, v) in cc {
                obj.entry(k.clone()).or_insert(v.clone());
            }
        }
    }
    json!({"module": "keras.layers", "class_name": r.class.name(), "config": cfg, "registered_name": null})
}
