//! Keras 3 `model.json` import (`model.to_json()`), with weights as `.npy` files in
//! `get_weights()` order.
//!
//! `Sequential` and `Functional` models of the layers in [`super::layers`] are read;
//! `RNN` cells (`LSTMCell`, `GRUCell`, `SimpleRNNCell`, `StackedRNNCells`) and
//! `Bidirectional` (with its explicit `backward_layer`) too. Any other layer class, and
//! any option that would change the computation and is not implemented, is an error naming
//! the layer and the option.

use super::config::Cx;
use super::custom::Nest;
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

impl Cx {
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
            let layer = Layer::from_config(self, entry)?;
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
            let mut layer = Layer::from_config(self, entry)?;
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
