//! Keras 3 `model.json` import (`model.to_json()`), with weights as `.npy` files in
//! `get_weights()` order.
//!
//! `Sequential` and `Functional` models of the layers in [`super::layers`] are read;
//! `RNN` cells (`LSTMCell`, `GRUCell`, `SimpleRNNCell`, `StackedRNNCells`) and
//! `Bidirectional` (with its explicit `backward_layer`) too. Any other layer class, and
//! any option that would change the computation and is not implemented, is an error naming
//! the layer and the option.

use super::custom::{registered_cell, registered_cells, CustomRnn, Nest};
use super::layers::*;
use super::model::{CallArgs, Functional, KerasTensor, LayerId, Model, Sequential};
use super::KerasError;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

type R<T> = Result<T, KerasError>;

/// How [`load_model_with`] reads a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Size limits: `max_file_bytes` for `model.json` and each weight file,
    /// `max_tensor_bytes` per weight, `max_total_bytes` for all weights together,
    /// `max_nodes` for the number of layers and of weight files.
    pub limits: cellgraph_ir::onnx::Limits,
    /// Build a model whose folder has no `weights/` with freshly initialised weights
    /// (otherwise that is an error: a model without its weights predicts nothing useful).
    pub random_weights: bool,
}

/// Reads `dir/model.json` (or the given `.json` file) and the weights in
/// `weights/NNN.npy` next to it, within the default limits; a model without weights is an
/// error (see [`load_model_with`]).
pub fn load_model(path: &Path) -> R<Model> {
    load_model_with(path, &LoadOptions::default())
}

/// [`load_model`] with limits, and optionally fresh weights for a model that has none.
pub fn load_model_with(path: &Path, o: &LoadOptions) -> R<Model> {
    let (json, dir) = if path.is_dir() {
        (path.join("model.json"), path.to_path_buf())
    } else {
        (
            path.to_path_buf(),
            path.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    };
    let io = |p: &Path, source| KerasError::Io {
        path: p.display().to_string(),
        source,
    };
    if path.is_dir() && !json.is_file() {
        return Err(KerasError::Config {
            path: path.display().to_string(),
            msg: "a Keras model folder holds model.json (and weights/NNN.npy); this one has no model.json".into(),
        });
    }
    let len = std::fs::metadata(&json).map_err(|e| io(&json, e))?.len();
    if len > o.limits.max_file_bytes {
        return Err(KerasError::Config {
            path: json.display().to_string(),
            msg: format!(
                "the file has {len} bytes, more than the limit of {} (--max-file-bytes)",
                o.limits.max_file_bytes
            ),
        });
    }
    let text = std::fs::read_to_string(&json).map_err(|e| io(&json, e))?;
    let wdir = dir.join("weights");
    let fresh = !wdir.is_dir() && o.random_weights;
    let mut model = model_from_json_with(&text, &json.display().to_string(), fresh)?;
    if !wdir.is_dir() && !o.random_weights {
        return Err(KerasError::Weights(format!(
            "{}: no weights folder next to {} (a saved model has weights/000.npy, ...); \
             to build the model with fresh random weights, ask for it (--random-weights)",
            wdir.display(),
            json.display()
        )));
    }
    if wdir.is_dir() {
        let values = read_weight_dir_with(&wdir, &o.limits)?;
        model.set_weights(values)?;
    }
    Ok(model)
}

/// Reads every `NNN.npy` of a folder, in name order, as float32 arrays.
pub fn read_weight_dir(dir: &Path) -> R<Vec<ndarray::ArrayD<f32>>> {
    read_weight_dir_with(dir, &cellgraph_ir::onnx::Limits::default())
}

/// [`read_weight_dir`] within `limits` (each file, each array, all arrays together, the
/// number of files).
pub fn read_weight_dir_with(
    dir: &Path,
    limits: &cellgraph_ir::onnx::Limits,
) -> R<Vec<ndarray::ArrayD<f32>>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| KerasError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .collect();
    if files.len() > limits.max_nodes {
        return Err(KerasError::Weights(format!(
            "{}: {} weight files, more than the limit of {} (--max-nodes)",
            dir.display(),
            files.len(),
            limits.max_nodes
        )));
    }
    files.sort();
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(files.len());
    for f in &files {
        let a = read_f32_with(f, limits)?;
        total = total.saturating_add(a.len() as u64 * 4);
        if total > limits.max_total_bytes {
            return Err(KerasError::Weights(format!(
                "{}: the weights up to {} take {total} bytes, more than the limit of {} (--max-total-bytes)",
                dir.display(),
                f.display(),
                limits.max_total_bytes
            )));
        }
        out.push(a);
    }
    Ok(out)
}

/// Reads one `.npy` file as float32.
pub fn read_f32(path: &Path) -> R<ndarray::ArrayD<f32>> {
    read_f32_with(path, &cellgraph_ir::onnx::Limits::default())
}

/// [`read_f32`] within `limits`.
pub fn read_f32_with(path: &Path, limits: &cellgraph_ir::onnx::Limits) -> R<ndarray::ArrayD<f32>> {
    match crate::npy::read_with(path, None, limits) {
        Ok(cellgraph_ir::Tensor::F32(a)) => Ok(a),
        Ok(other) => Err(KerasError::Weights(format!(
            "{}: dtype {} (weights are float32)",
            path.display(),
            other.dtype().name()
        ))),
        // The message names the file already.
        Err(msg) => Err(KerasError::Weights(msg)),
    }
}

/// Builds a model from the text of a Keras 3 `model.json`; weights are freshly
/// initialised (use [`Model::set_weights`]). `source` names the file in errors.
pub fn model_from_json(text: &str, source: &str) -> R<Model> {
    model_from_json_with(text, source, true)
}

/// [`model_from_json`], with the weights left at zero when `initialize` is false (for
/// files whose weights are loaded next: no initialisation cost).
pub fn model_from_json_with(text: &str, source: &str, initialize: bool) -> R<Model> {
    let v: Value = serde_json::from_str(text).map_err(|e| KerasError::Config {
        path: source.to_string(),
        msg: format!("not JSON: {e}"),
    })?;
    let cx = Cx {
        file: source.to_string(),
        initialize,
    };
    let class = cx.str(&v, "class_name", "model")?;
    let config = cx.get(&v, "config", "model")?;
    let cx = Cx {
        file: cx.file,
        initialize,
    };
    let mut model = match class {
        "Sequential" => cx.sequential(config)?,
        "Functional" | "Model" => cx.functional(config)?,
        other => {
            return Err(cx.err(
                "model",
                format!("model class {other:?} (Sequential and Functional are supported)"),
            ))
        }
    };
    if let Some(name) = config.get("name").and_then(Value::as_str) {
        model.name = name.to_string();
    }
    Ok(model)
}

struct Cx {
    file: String,
    initialize: bool,
}

impl Cx {
    fn err(&self, at: &str, msg: String) -> KerasError {
        KerasError::Config {
            path: format!("{} ({at})", self.file),
            msg,
        }
    }

    fn get<'v>(&self, v: &'v Value, key: &str, at: &str) -> R<&'v Value> {
        v.get(key)
            .ok_or_else(|| self.err(at, format!("missing {key:?}")))
    }

    fn str<'v>(&self, v: &'v Value, key: &str, at: &str) -> R<&'v str> {
        self.get(v, key, at)?
            .as_str()
            .ok_or_else(|| self.err(at, format!("{key:?} is not a string")))
    }

    fn bool(&self, v: &Value, key: &str, default: bool, at: &str) -> R<bool> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(at, format!("{key:?} = {other} is not a boolean"))),
        }
    }

    fn usize(&self, v: &Value, key: &str, at: &str) -> R<usize> {
        let x = self.get(v, key, at)?;
        x.as_u64()
            .filter(|&n| n <= (1 << 31))
            .map(|n| n as usize)
            .ok_or_else(|| self.err(at, format!("{key:?} = {x} is not a size")))
    }

    fn f32(&self, v: &Value, key: &str, default: f32, at: &str) -> R<f32> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f as f32)
                .ok_or_else(|| self.err(at, format!("{key:?} = {x} is not a number"))),
        }
    }

    fn activation(&self, v: &Value, key: &str, default: Activation, at: &str) -> R<Activation> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => s.parse().map_err(|e| match e {
                KerasError::Unsupported { what, .. } => KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("{key} {what}"),
                },
                other => other,
            }),
            Some(other) => Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("{key} given as {other} (a string is expected)"),
            }),
        }
    }

    /// Options whose non-default values change the computation or training and are not
    /// implemented.
    fn refuse(&self, cfg: &Value, at: &str, keys: &[&str]) -> R<()> {
        for k in keys {
            match cfg.get(*k) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(v) => {
                    return Err(KerasError::Unsupported {
                        layer: at.to_string(),
                        what: format!("option {k} = {v}"),
                    })
                }
            }
        }
        Ok(())
    }

    fn dtype_ok(&self, cfg: &Value, at: &str) -> R<()> {
        let name = match cfg.get("dtype") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(s)) => s.as_str(),
            Some(obj) => obj
                .get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("?"),
        };
        if name == "float32" {
            Ok(())
        } else {
            Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("dtype policy {name:?} (float32 is supported)"),
            })
        }
    }

    fn layer(&self, entry: &Value) -> R<Layer> {
        let class = self.str(entry, "class_name", "layer")?;
        let cfg = self.get(entry, "config", class)?;
        let name = cfg
            .get("name")
            .and_then(Value::as_str)
            .or_else(|| entry.get("name").and_then(Value::as_str))
            .unwrap_or(class)
            .to_string();
        let at = name.as_str();
        let module = entry.get("module").and_then(Value::as_str).unwrap_or("");
        if let Some(kind) =
            TensorOpKind::from_class(class).filter(|_| module.starts_with("keras.src.ops"))
        {
            let axis = match cfg.get("axis") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_i64().ok_or_else(|| KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("{class} over axis {v}"),
                })?),
            };
            return Ok(TensorOp {
                kind,
                scalar: None,
                axis,
                keepdims: self.bool(cfg, "keepdims", false, at)?,
                name: Some(at.to_string()),
            }
            .into());
        }
        if class != "InputLayer" {
            self.dtype_ok(cfg, at)?;
        }
        let layer: Layer = match class {
            "InputLayer" => {
                let shape = cfg
                    .get("batch_shape")
                    .or_else(|| cfg.get("batch_input_shape"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| self.err(at, "InputLayer without batch_shape".into()))?;
                let dims = shape
                    .iter()
                    .map(|d| match d {
                        Value::Null => Ok(None),
                        d => d
                            .as_u64()
                            .filter(|&n| n <= (1 << 31))
                            .map(|n| Some(n as usize))
                            .ok_or_else(|| self.err(at, format!("batch_shape entry {d}"))),
                    })
                    .collect::<R<Vec<_>>>()?;
                self.refuse(cfg, at, &["sparse", "ragged", "optional"])?;
                let dtype = match cfg.get("dtype") {
                    Some(Value::String(s)) => s.clone(),
                    _ => "float32".into(),
                };
                Input::batch_shape(&dims).name(at).dtype(&dtype).into()
            }
            "Embedding" => {
                self.refuse(
                    cfg,
                    at,
                    &[
                        "embeddings_regularizer",
                        "activity_regularizer",
                        "embeddings_constraint",
                        "lora_rank",
                    ],
                )?;
                Embedding::new(
                    self.usize(cfg, "input_dim", at)?,
                    self.usize(cfg, "output_dim", at)?,
                )
                .mask_zero(self.bool(cfg, "mask_zero", false, at)?)
                .name(at)
                .into()
            }
            "Dense" => {
                self.refuse(
                    cfg,
                    at,
                    &[
                        "kernel_regularizer",
                        "bias_regularizer",
                        "activity_regularizer",
                        "kernel_constraint",
                        "bias_constraint",
                        "lora_rank",
                        "quantization_config",
                    ],
                )?;
                Dense::new(self.usize(cfg, "units", at)?)
                    .activation(self.activation(cfg, "activation", Activation::Linear, at)?)
                    .use_bias(self.bool(cfg, "use_bias", true, at)?)
                    .name(at)
                    .into()
            }
            "RNN" if self.custom_cell_class(cfg).is_some() => self.custom_rnn(cfg, at)?.into(),
            "LSTM" | "GRU" | "SimpleRNN" | "RNN" => self.recurrent(class, cfg, at)?.into(),
            "Bidirectional" => {
                let fwd = self.get(cfg, "layer", at)?;
                let forward = self.inner_rnn(fwd, at)?;
                let mut b = Bidirectional::new(forward.clone());
                // Keep the inner configs exactly as given (names, zero_output_for_mask).
                b.forward = forward;
                if let Some(bw) = cfg.get("backward_layer").filter(|v| !v.is_null()) {
                    b.backward = self.inner_rnn(bw, at)?;
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
                    Some(other) => return Err(self.err(at, format!("merge_mode = {other}"))),
                };
                b.name(at).into()
            }
            "BatchNormalization" => {
                let axis_ok = match cfg.get("axis") {
                    None => true,
                    Some(Value::Number(n)) => n.as_i64() == Some(-1),
                    Some(Value::Array(a)) => a.len() == 1 && a[0].as_i64() == Some(-1),
                    _ => false,
                };
                if !axis_ok {
                    return Err(KerasError::Unsupported {
                        layer: at.to_string(),
                        what: format!("axis = {} (the last axis, -1, is supported)", cfg["axis"]),
                    });
                }
                self.refuse(
                    cfg,
                    at,
                    &[
                        "renorm",
                        "beta_regularizer",
                        "gamma_regularizer",
                        "beta_constraint",
                        "gamma_constraint",
                    ],
                )?;
                let mut bn = BatchNormalization::new()
                    .epsilon(self.f32(cfg, "epsilon", 1e-3, at)?)
                    .center(self.bool(cfg, "center", true, at)?)
                    .scale(self.bool(cfg, "scale", true, at)?)
                    .name(at);
                bn.momentum = self.f32(cfg, "momentum", 0.99, at)?;
                bn.into()
            }
            "Dropout" => {
                self.refuse(cfg, at, &["noise_shape"])?;
                Dropout::new(self.f32(cfg, "rate", 0.0, at)?)
                    .name(at)
                    .into()
            }
            "Masking" => Masking::new(self.f32(cfg, "mask_value", 0.0, at)?)
                .name(at)
                .into(),
            "TimeDistributed" => {
                let inner = self.layer(self.get(cfg, "layer", at)?)?;
                TimeDistributed::new(inner).name(at).into()
            }
            other => {
                return Err(KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("layer class {other:?}"),
                })
            }
        };
        Ok(layer)
    }

    fn inner_rnn(&self, entry: &Value, at: &str) -> R<Recurrent> {
        match self.layer(entry)? {
            Layer::Recurrent(r) => Ok(r),
            other => Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("Bidirectional around {}", other.class_name()),
            }),
        }
    }

    fn cell(&self, entry: &Value, at: &str) -> R<Vec<Cell>> {
        let class = self.str(entry, "class_name", at)?;
        let cfg = self.get(entry, "config", at)?;
        let units = || self.usize(cfg, "units", at);
        let cell = match class {
            "LSTMCell" => LSTMCell::new(units()?),
            "GRUCell" => GRUCell::new(units()?),
            "SimpleRNNCell" => SimpleRNNCell::new(units()?),
            "StackedRNNCells" => {
                let cells = self
                    .get(cfg, "cells", at)?
                    .as_array()
                    .ok_or_else(|| self.err(at, "StackedRNNCells.cells is not a list".into()))?;
                let mut out = Vec::new();
                for c in cells {
                    out.extend(self.cell(c, at)?);
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
        self.cell_options(cell, cfg, at).map(|c| vec![c])
    }

    fn cell_options(&self, mut cell: Cell, cfg: &Value, at: &str) -> R<Cell> {
        self.refuse(
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
            return Err(self.err(at, "implementation must be 1 or 2".into()));
        }
        cell.activation = self.activation(cfg, "activation", Activation::Tanh, at)?;
        cell.recurrent_activation =
            self.activation(cfg, "recurrent_activation", Activation::Sigmoid, at)?;
        cell.use_bias = self.bool(cfg, "use_bias", true, at)?;
        cell.unit_forget_bias = self.bool(cfg, "unit_forget_bias", true, at)?;
        cell.reset_after = self.bool(cfg, "reset_after", true, at)?;
        cell.dropout = self.f32(cfg, "dropout", 0.0, at)?;
        cell.recurrent_dropout = self.f32(cfg, "recurrent_dropout", 0.0, at)?;
        if let Some(n) = cfg.get("name").and_then(Value::as_str) {
            cell.name = Some(n.to_string());
        }
        Ok(cell)
    }

    /// The class of an `RNN` layer's cell when it is not one of Keras's own.
    fn custom_cell_class<'v>(&self, cfg: &'v Value) -> Option<&'v str> {
        let class = cfg.get("cell")?.get("class_name")?.as_str()?;
        (!matches!(
            class,
            "LSTMCell" | "GRUCell" | "SimpleRNNCell" | "StackedRNNCells"
        ))
        .then_some(class)
    }

    /// `RNN` around a registered custom cell, rebuilt by its factory from its config.
    fn custom_rnn(&self, cfg: &Value, at: &str) -> R<CustomRnn> {
        let class = self.custom_cell_class(cfg).unwrap_or_default();
        let factory = registered_cell(class).ok_or_else(|| {
            self.err(
                at,
                format!(
                    "cell class {class:?} is not registered (register it with \
                     cellgraph::keras::register_cell; registered: {:?})",
                    registered_cells()
                ),
            )
        })?;
        let cell_cfg = cfg
            .get("cell")
            .and_then(|c| c.get("config"))
            .cloned()
            .unwrap_or(Value::Null);
        let cell =
            factory(&cell_cfg).map_err(|msg| self.err(at, format!("cell {class}: {msg}")))?;
        for k in ["stateful", "unroll"] {
            if self.bool(cfg, k, false, at)? {
                return Err(KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("{k}=True with a custom cell"),
                });
            }
        }
        self.refuse(cfg, at, &["time_major"])?;
        Ok(CustomRnn::from_arc(cell)
            .return_sequences(self.bool(cfg, "return_sequences", false, at)?)
            .return_state(self.bool(cfg, "return_state", false, at)?)
            .go_backwards(self.bool(cfg, "go_backwards", false, at)?)
            .zero_output_for_mask(self.bool(cfg, "zero_output_for_mask", false, at)?)
            .name(at))
    }

    /// A call's positional argument as a nested structure of tensor references: lists
    /// (and Keras's `__tuple__`) and maps of `__keras_tensor__` leaves.
    fn tensor_nest(&self, v: &Value, at: &str) -> R<Nest<(String, usize, usize)>> {
        match v {
            Value::Array(items) => Ok(Nest::List(
                items
                    .iter()
                    .map(|i| self.tensor_nest(i, at))
                    .collect::<R<_>>()?,
            )),
            Value::Object(m) => match m.get("class_name").and_then(Value::as_str) {
                Some("__tuple__") => self.tensor_nest(
                    m.get("config")
                        .and_then(|c| c.get("value"))
                        .unwrap_or(&Value::Null),
                    at,
                ),
                Some(_) => Ok(Nest::Leaf(self.tensor_ref(v, at)?)),
                None => Ok(Nest::Dict(
                    m.iter()
                        .map(|(k, x)| Ok((k.clone(), self.tensor_nest(x, at)?)))
                        .collect::<R<_>>()?,
                )),
            },
            other => Err(self.err(
                at,
                format!("{other} is not a tensor or a structure of tensors"),
            )),
        }
    }

    fn recurrent(&self, class: &str, cfg: &Value, at: &str) -> R<Recurrent> {
        let mut r = match class {
            "LSTM" => LSTM::new(self.usize(cfg, "units", at)?),
            "GRU" => GRU::new(self.usize(cfg, "units", at)?),
            "SimpleRNN" => SimpleRNN::new(self.usize(cfg, "units", at)?),
            _ => {
                let cell = self.get(cfg, "cell", at)?;
                let cells = match cell {
                    Value::Array(list) => {
                        let mut v = Vec::new();
                        for c in list {
                            v.extend(self.cell(c, at)?);
                        }
                        v
                    }
                    one => self.cell(one, at)?,
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
            let mut c = self.cell_options(c, cfg, at)?;
            c.name = None;
            r.cells = vec![c];
        }
        self.refuse(cfg, at, &["time_major"])?;
        r.return_sequences = self.bool(cfg, "return_sequences", false, at)?;
        r.return_state = self.bool(cfg, "return_state", false, at)?;
        r.go_backwards = self.bool(cfg, "go_backwards", false, at)?;
        r.stateful = self.bool(cfg, "stateful", false, at)?;
        r.unroll = self.bool(cfg, "unroll", false, at)?;
        r.zero_output_for_mask = self.bool(cfg, "zero_output_for_mask", false, at)?;
        r.name = Some(at.to_string());
        Ok(r)
    }

    fn sequential(&self, config: &Value) -> R<Model> {
        let layers = self
            .get(config, "layers", "config")?
            .as_array()
            .ok_or_else(|| self.err("config", "\"layers\" is not a list".into()))?;
        let mut model = Sequential::new();
        model.skip_init = !self.initialize;
        let first_is_input = layers
            .first()
            .and_then(|l| l.get("class_name"))
            .and_then(Value::as_str)
            == Some("InputLayer");
        if !first_is_input {
            // Keras keeps the input shape of a model built without an Input here.
            let shape = config
                .get("build_input_shape")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    self.err(
                        "config",
                        "a Sequential model without InputLayer or build_input_shape".into(),
                    )
                })?;
            let dims: Vec<Option<usize>> = shape
                .iter()
                .map(|d| d.as_u64().map(|n| n as usize))
                .collect();
            model.add(Input::batch_shape(&dims))?;
        }
        for entry in layers {
            let layer = self.layer(entry)?;
            model.add(layer)?;
        }
        Ok(model)
    }

    fn tensor_ref(&self, v: &Value, at: &str) -> R<(String, usize, usize)> {
        let h = v
            .get("config")
            .and_then(|c| c.get("keras_history"))
            .and_then(Value::as_array)
            .filter(|h| h.len() == 3)
            .ok_or_else(|| self.err(at, format!("not a keras tensor: {v}")))?;
        let layer = h[0]
            .as_str()
            .ok_or_else(|| self.err(at, "keras_history layer is not a string".into()))?;
        let idx = |x: &Value| {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.err(at, format!("keras_history index {x}")))
        };
        Ok((layer.to_string(), idx(&h[1])?, idx(&h[2])?))
    }

    fn tensor_list(&self, v: &Value, at: &str) -> R<Vec<(String, usize, usize)>> {
        match v {
            Value::Array(items) => {
                let mut out = Vec::new();
                for i in items {
                    out.extend(self.tensor_list(i, at)?);
                }
                Ok(out)
            }
            // Constant operands (`NotEqual(x, 0.0)`) are read by the op itself.
            Value::Null | Value::Number(_) | Value::Bool(_) => Ok(Vec::new()),
            one => Ok(vec![self.tensor_ref(one, at)?]),
        }
    }

    fn endpoints(&self, v: &Value, at: &str) -> R<Vec<(String, usize, usize)>> {
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(at, format!("{v} is not a list")))?;
        let one = |t: &Value| -> R<(String, usize, usize)> {
            let t = t
                .as_array()
                .filter(|t| t.len() == 3)
                .ok_or_else(|| self.err(at, format!("{t} is not [layer, node, tensor]")))?;
            Ok((
                t[0].as_str().unwrap_or_default().to_string(),
                t[1].as_u64().unwrap_or(0) as usize,
                t[2].as_u64().unwrap_or(0) as usize,
            ))
        };
        if arr.first().is_some_and(Value::is_string) {
            Ok(vec![one(v)?])
        } else {
            arr.iter().map(one).collect()
        }
    }

    /// Why the layers of a functional model that have not run cannot run: a tensor
    /// they read names a layer the model does not have, or a call of it that does not
    /// exist, or they wait on each other (a cycle).
    #[allow(clippy::type_complexity)]
    fn stuck(
        &self,
        entries: &[(String, Option<LayerId>, Vec<Value>, bool)],
        done: &[usize],
        made: &HashMap<(String, usize, usize), KerasTensor>,
    ) -> KerasError {
        let mut waiting: Vec<String> = Vec::new();
        for ((name, _, nodes, _), &d) in entries.iter().zip(done) {
            let Some(node) = nodes.get(d) else { continue };
            let kwargs = node.get("kwargs").cloned().unwrap_or(Value::Null);
            let mut refs = self
                .tensor_list(&node.get("args").cloned().unwrap_or(Value::Null), name)
                .unwrap_or_default();
            for key in ["initial_state", "mask"] {
                refs.extend(
                    self.tensor_list(kwargs.get(key).unwrap_or(&Value::Null), name)
                        .unwrap_or_default(),
                );
            }
            for r in refs.iter().filter(|r| !made.contains_key(*r)) {
                let j = entries.iter().position(|e| e.0 == r.0);
                if j.is_some_and(|j| done[j] > r.1 || (entries[j].3 && r.1 == 0)) {
                    return self.err(
                        &format!("config.layers[{name:?}].inbound_nodes"),
                        format!(
                            "reads output {} of call {} of layer {:?}, which has no such output",
                            r.2, r.1, r.0
                        ),
                    );
                }
                match j.map(|j| &entries[j]) {
                    None => {
                        return self.err(
                            &format!("config.layers[{name:?}].inbound_nodes"),
                            format!(
                                "reads a tensor of layer {:?}, which this model does not have",
                                r.0
                            ),
                        )
                    }
                    Some(e) if r.1 >= e.2.len().max(1) => {
                        return self.err(
                            &format!("config.layers[{name:?}].inbound_nodes"),
                            format!(
                                "reads call {} of layer {:?}, which is called {} time(s)",
                                r.1,
                                r.0,
                                e.2.len()
                            ),
                        )
                    }
                    Some(_) => waiting.push(format!("{name:?} reads {:?}", r.0)),
                }
            }
        }
        self.err(
            "config.layers",
            format!(
                "the layers wait on each other's outputs (a cycle; a functional model must be \
                 acyclic): {}",
                waiting.join(", ")
            ),
        )
    }

    fn functional(&self, config: &Value) -> R<Model> {
        let layers = self
            .get(config, "layers", "config")?
            .as_array()
            .ok_or_else(|| self.err("config", "\"layers\" is not a list".into()))?;
        let mut f = Functional::new();
        f.skip_init(!self.initialize);
        // (layer name) → its slot and inbound nodes.
        let mut entries: Vec<(String, Option<LayerId>, Vec<Value>, bool)> = Vec::new();
        let mut made: HashMap<(String, usize, usize), KerasTensor> = HashMap::new();
        let mut custom: Vec<LayerId> = Vec::new();
        for entry in layers {
            let mut layer = self.layer(entry)?;
            if let Layer::Op(op) = &mut layer {
                // A constant operand (`NotEqual(x, 0.0)`) sits among the positional args.
                let args = entry
                    .get("inbound_nodes")
                    .and_then(|n| n.get(0))
                    .and_then(|n| n.get("args"))
                    .and_then(Value::as_array);
                op.scalar = args.and_then(|a| a.iter().find_map(Value::as_f64));
            }
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .or(layer.given_name())
                .unwrap_or_default()
                .to_string();
            let nodes = entry
                .get("inbound_nodes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if let Layer::Input(i) = layer {
                let t = f.input(i)?;
                made.insert((name.clone(), 0, 0), t);
                entries.push((name, None, Vec::new(), true));
            } else {
                let is_custom = matches!(layer, Layer::Custom(_));
                let id = f.layer(layer)?;
                if is_custom {
                    custom.push(id);
                }
                entries.push((name, Some(id), nodes, false));
            }
        }
        // Calls in dependency order: repeat until every inbound node has run.
        let mut done: Vec<usize> = vec![0; entries.len()];
        loop {
            let mut progress = false;
            let mut pending = false;
            for (k, (name, id, nodes, _)) in entries.iter().enumerate() {
                let Some(id) = id else { continue };
                while done[k] < nodes.len() {
                    let node = &nodes[done[k]];
                    let args = node.get("args").cloned().unwrap_or(Value::Null);
                    let kwargs = node.get("kwargs").cloned().unwrap_or(Value::Null);
                    let inputs = self.tensor_list(&args, name)?;
                    let init = self
                        .tensor_list(kwargs.get("initial_state").unwrap_or(&Value::Null), name)?;
                    let mask =
                        self.tensor_list(kwargs.get("mask").unwrap_or(&Value::Null), name)?;
                    let all: Vec<&(String, usize, usize)> =
                        inputs.iter().chain(&init).chain(&mask).collect();
                    if !all.iter().all(|r| made.contains_key(*r)) {
                        pending = true;
                        break;
                    }
                    let get = |r: &(String, usize, usize)| made[r];
                    let call = CallArgs {
                        initial_state: init.iter().map(get).collect(),
                        mask: mask.first().map(get),
                    };
                    let ins: Vec<KerasTensor> = inputs.iter().map(get).collect();
                    let outs = if custom.contains(id) {
                        // One positional argument: the nested structure of the inputs.
                        let first = args.as_array().and_then(|a| a.first()).unwrap_or(&args);
                        let nest = self.tensor_nest(first, name)?;
                        f.call_nested(*id, &nest.map(&mut |r| made[r]), call)?
                    } else {
                        f.call_with(*id, &ins, call)?
                    };
                    for (i, t) in outs.into_iter().enumerate() {
                        made.insert((name.clone(), done[k], i), t);
                    }
                    done[k] += 1;
                    progress = true;
                }
            }
            if !pending {
                break;
            }
            if !progress {
                return Err(self.stuck(&entries, &done, &made));
            }
        }
        let lookup = |refs: Vec<(String, usize, usize)>, what: &str| -> R<Vec<KerasTensor>> {
            refs.into_iter()
                .map(|r| {
                    made.get(&r).copied().ok_or_else(|| {
                        self.err(what, format!("{:?} names no tensor of the model", r))
                    })
                })
                .collect()
        };
        let ins = lookup(
            self.endpoints(self.get(config, "input_layers", "config")?, "input_layers")?,
            "input_layers",
        )?;
        let outs = lookup(
            self.endpoints(
                self.get(config, "output_layers", "config")?,
                "output_layers",
            )?,
            "output_layers",
        )?;
        f.build(&ins, &outs)
    }
}
