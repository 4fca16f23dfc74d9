//! Saving models: Keras 3 `model.json` plus `weights/NNN.npy` in `get_weights()` order —
//! the layout [`super::load_model`] reads back — and ONNX inference graphs.

use super::custom::Nest;
use super::layers::*;
use super::model::{KerasTensor, Model};
use super::KerasError;
use cellgraph_ir::{DType, Dim, Tensor};
use serde_json::{json, Value};
use std::path::Path;

type R<T> = Result<T, KerasError>;

fn dtype_policy() -> Value {
    json!({"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": null})
}

fn shape_json(s: &[Option<usize>]) -> Value {
    Value::Array(
        s.iter()
            .map(|d| d.map_or(Value::Null, |d| json!(d)))
            .collect(),
    )
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

/// The Keras 3 JSON entry of one layer (`{module, class_name, config}`).
fn layer_entry(layer: &Layer, name: &str) -> Value {
    let base = |class: &str, mut cfg: Value| {
        cfg["name"] = json!(name);
        cfg["trainable"] = json!(true);
        cfg["dtype"] = dtype_policy();
        json!({"module": "keras.layers", "class_name": class, "config": cfg, "registered_name": null})
    };
    match layer {
        Layer::Input(i) => json!({
            "module": "keras.layers", "class_name": "InputLayer",
            "config": {"batch_shape": shape_json(&i.batch_shape), "dtype": i.dtype,
                       "sparse": false, "ragged": false, "name": name, "optional": false},
            "registered_name": null}),
        Layer::Embedding(e) => base(
            "Embedding",
            json!({"input_dim": e.input_dim, "output_dim": e.output_dim, "mask_zero": e.mask_zero}),
        ),
        Layer::Dense(d) => base(
            "Dense",
            json!({"units": d.units, "activation": d.activation.name(), "use_bias": d.use_bias}),
        ),
        Layer::Recurrent(r) => rnn_entry(r, name),
        Layer::Bidirectional(b) => {
            let fname = b.forward.name.clone().unwrap_or_else(|| "forward".into());
            let bname = b.backward.name.clone().unwrap_or_else(|| "backward".into());
            base(
                "Bidirectional",
                json!({"merge_mode": b.merge_mode.map(|m| m.name()),
                       "layer": rnn_entry(&b.forward, &fname),
                       "backward_layer": rnn_entry(&b.backward, &bname)}),
            )
        }
        Layer::BatchNormalization(bn) => base(
            "BatchNormalization",
            json!({"axis": -1, "momentum": bn.momentum, "epsilon": bn.epsilon,
                   "center": bn.center, "scale": bn.scale}),
        ),
        Layer::Dropout(d) => base("Dropout", json!({"rate": d.rate})),
        Layer::Masking(m) => base("Masking", json!({"mask_value": m.mask_value})),
        Layer::TimeDistributed(t) => {
            let inner = t
                .layer
                .given_name()
                .unwrap_or(t.layer.default_stem())
                .to_string();
            base(
                "TimeDistributed",
                json!({"layer": layer_entry(&t.layer, &inner)}),
            )
        }
        Layer::Custom(c) => {
            let cell = json!({"module": null, "class_name": c.cell.class_name(),
                              "config": c.cell.get_config(),
                              "registered_name": c.cell.class_name()});
            base(
                "RNN",
                json!({"return_sequences": c.return_sequences, "return_state": c.return_state,
                       "go_backwards": c.go_backwards, "stateful": false, "unroll": false,
                       "zero_output_for_mask": c.zero_output_for_mask, "cell": cell}),
            )
        }
        Layer::Op(o) => {
            let mut cfg = json!({"name": name});
            if let Some(a) = o.axis {
                cfg["axis"] = json!(a);
            }
            if matches!(o.kind, TensorOpKind::Any | TensorOpKind::All) {
                cfg["keepdims"] = json!(o.keepdims);
            }
            json!({"module": "keras.src.ops.numpy", "class_name": o.kind.class_name(),
                   "config": cfg, "registered_name": null})
        }
    }
}

/// A nested structure of JSON values as Keras writes call arguments: lists and objects.
fn nest_json(n: Nest<Value>) -> Value {
    match n {
        Nest::Leaf(v) => v,
        Nest::List(v) => Value::Array(v.into_iter().map(nest_json).collect()),
        Nest::Dict(m) => Value::Object(m.into_iter().map(|(k, v)| (k, nest_json(v))).collect()),
    }
}

impl Model {
    fn tensor_json(&self, t: KerasTensor) -> Value {
        let (layer, call, index) = self.history_of(t);
        json!({"class_name": "__keras_tensor__",
               "config": {"shape": shape_json(&self.tensors[t.0].shape), "dtype": "float32",
                          "keras_history": [layer, call, index]}})
    }

    /// The model as Keras 3 `model.to_json()` writes it (what [`super::model_from_json`]
    /// reads).
    pub fn to_json(&self) -> String {
        let layers: Vec<Value> = if self.sequential {
            self.slots
                .iter()
                .map(|s| layer_entry(&s.layer, &s.name))
                .collect()
        } else {
            self.slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut entry = layer_entry(&s.layer, &s.name);
                    let nodes: Vec<Value> = self
                        .nodes
                        .iter()
                        .filter(|n| n.slot == i && !n.inputs.is_empty())
                        .map(|n| {
                            let mut args: Vec<Value> = match &s.layer {
                                Layer::Custom(c) => {
                                    // One positional argument: the nested structure.
                                    let st = c.structure.clone().unwrap_or(Nest::Leaf(()));
                                    let leaves: Vec<Value> =
                                        n.inputs.iter().map(|&t| self.tensor_json(t)).collect();
                                    vec![st.pack(leaves).map(nest_json).unwrap_or(Value::Null)]
                                }
                                _ => n.inputs.iter().map(|&t| self.tensor_json(t)).collect(),
                            };
                            if let Layer::Op(o) = &s.layer {
                                if let Some(c) = o.scalar {
                                    args.push(json!(c));
                                }
                            }
                            let mut kwargs = json!({});
                            if !n.args.initial_state.is_empty() {
                                kwargs["initial_state"] = Value::Array(
                                    n.args
                                        .initial_state
                                        .iter()
                                        .map(|&t| self.tensor_json(t))
                                        .collect(),
                                );
                            }
                            if let Some(m) = n.args.mask {
                                kwargs["mask"] = self.tensor_json(m);
                            }
                            json!({"args": args, "kwargs": kwargs})
                        })
                        .collect();
                    entry["name"] = json!(s.name);
                    entry["inbound_nodes"] = Value::Array(nodes);
                    entry
                })
                .collect()
        };
        let endpoint = |t: &KerasTensor| {
            let (layer, call, index) = self.history_of(*t);
            json!([layer, call, index])
        };
        let mut config = json!({"name": self.name, "trainable": true, "layers": layers});
        if !self.sequential {
            config["input_layers"] = Value::Array(self.inputs.iter().map(endpoint).collect());
            config["output_layers"] = Value::Array(self.outputs.iter().map(endpoint).collect());
        }
        let class = if self.sequential {
            "Sequential"
        } else {
            "Functional"
        };
        let v = json!({"module": "keras", "class_name": class, "config": config,
                       "registered_name": null});
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Saves the model to `dir`: `model.json` (Keras 3 format) and `weights/NNN.npy` in
    /// `get_weights()` order; [`super::load_model`] reads it back.
    pub fn save(&self, dir: &Path) -> R<()> {
        let io = |path: &Path, source: std::io::Error| KerasError::Io {
            path: path.display().to_string(),
            source,
        };
        let wdir = dir.join("weights");
        std::fs::create_dir_all(&wdir).map_err(|e| io(&wdir, e))?;
        let json = dir.join("model.json");
        std::fs::write(&json, self.to_json()).map_err(|e| io(&json, e))?;
        for (i, w) in self.get_weights().into_iter().enumerate() {
            let path = wdir.join(format!("{i:03}.npy"));
            crate::npy::write(&path, &Tensor::F32(w))
                .map_err(|msg| KerasError::Weights(format!("{}: {msg}", path.display())))?;
        }
        Ok(())
    }

    /// Writes the inference graph as an ONNX file; unknown input sizes become symbolic
    /// dimensions (`batch`, `<input>_dim1`, ...), so the file runs on any batch size.
    pub fn save_onnx(&self, path: &Path) -> R<()> {
        let names = self.input_names();
        let sig: Vec<(DType, Vec<Dim>)> = self
            .input_shapes()
            .iter()
            .zip(self.input_dtypes())
            .zip(&names)
            .map(|((shape, dt), name)| {
                let dims = shape
                    .iter()
                    .enumerate()
                    .map(|(k, d)| match d {
                        Some(n) => Dim::Known(*n as u64),
                        None if k == 0 => Dim::Sym("batch".into()),
                        None => Dim::Sym(format!("{name}_dim{k}")),
                    })
                    .collect();
                (dt, dims)
            })
            .collect();
        let graph = self.lower_dims(&sig, false, false)?.graph;
        cellgraph_ir::verify(&graph)?;
        cellgraph_ir::onnx::Model::new(graph).save(path)?;
        Ok(())
    }
}
