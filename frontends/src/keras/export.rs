//! Saving models: Keras 3 `model.json` plus `weights/NNN.npy` in `get_weights()` order —
//! the layout [`super::load_model`] reads back — and ONNX inference graphs.

use super::custom::Nest;
use super::layers::kind::{shape_json, LayerKind};
use super::layers::*;
use super::model::{KerasTensor, Model};
use super::KerasError;
use cellgraph_ir::{DType, Dim, Tensor};
use serde_json::{json, Value};
use std::path::Path;

type R<T> = Result<T, KerasError>;

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
            self.slots.iter().map(|s| s.layer.config(&s.name)).collect()
        } else {
            self.slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut entry = s.layer.config(&s.name);
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
