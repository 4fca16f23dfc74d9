//! `cellgraph conformance keras`: Keras reference cases (model.json, weights, inputs,
//! outputs, states, loss) in the layout of `tests/conformance/keras/README.md`.

use super::import::{model_from_json_with, read_f32};
use super::layers::Shape;
use super::model::Model;
use super::summary::SummaryRow;
use crate::conformance::{compare_tensors, Tolerance};
use cellgraph_backends::Device;
use cellgraph_ir::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The outcome of one case.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseReport {
    /// What was compared: `"summary, 1 output, loss"`.
    pub checked: Vec<String>,
    /// What was not checked, and why (never counted as passed).
    pub skipped: Vec<String>,
}

/// Case folders under `path`: `path` itself when it holds a `meta.json` and a
/// `model.json`, otherwise every folder below it that does, sorted.
pub fn find_cases(path: &Path) -> Vec<PathBuf> {
    crate::conformance::find_folders_with(path, &["meta.json", "model.json"])
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_tensor(path: &Path) -> Result<Tensor, String> {
    crate::npy::read(path, None).map_err(|e| format!("{}: {e}", path.display()))
}

fn files_of(list: &Value, what: &str) -> Result<Vec<String>, String> {
    list.as_array()
        .ok_or_else(|| format!("meta.json: {what} is not a list"))?
        .iter()
        .map(|e| {
            e.get("file")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("meta.json: an entry of {what} has no file"))
        })
        .collect()
}

fn load(
    dir: &Path,
    json: &str,
    weights: &[String],
    backends: &[Arc<dyn Device>],
) -> Result<Model, String> {
    let path = dir.join(json);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut model = model_from_json_with(&text, &path.display().to_string(), false)
        .map_err(|e| e.to_string())?;
    let values = weights
        .iter()
        .map(|f| read_f32(&dir.join(f)).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    model.set_weights(values).map_err(|e| e.to_string())?;
    model.set_backends(backends.to_vec());
    Ok(model)
}

fn shape_of(v: &Value) -> Option<Shape> {
    v.as_array()?
        .iter()
        .map(|d| match d {
            Value::Null => Some(None),
            d => d.as_u64().map(|n| Some(n as usize)),
        })
        .collect()
}

/// Compares the summary against `meta.summary`: totals, and per layer the name, class,
/// output shape(s) and parameter count.
fn check_summary(model: &Model, want: &Value) -> Result<(), String> {
    let (total, trainable, frozen) = model.param_counts();
    for (key, got) in [
        ("total_params", total),
        ("trainable_params", trainable),
        ("non_trainable_params", frozen),
    ] {
        let w = want.get(key).and_then(Value::as_u64);
        if w != Some(got as u64) {
            return Err(format!("summary {key}: {got}, Keras {w:?}"));
        }
    }
    let rows: Vec<SummaryRow> = model.summary_rows();
    let layers = want
        .get("layers")
        .and_then(Value::as_array)
        .ok_or("meta.json: summary.layers is not a list")?;
    if rows.len() != layers.len() {
        return Err(format!(
            "summary has {} layers ({:?}), Keras {}",
            rows.len(),
            rows.iter().map(|r| &r.name).collect::<Vec<_>>(),
            layers.len()
        ));
    }
    for (r, l) in rows.iter().zip(layers) {
        let name = l.get("name").and_then(Value::as_str).unwrap_or("?");
        let class = l.get("class_name").and_then(Value::as_str).unwrap_or("?");
        if r.name != name || r.class_name != class {
            return Err(format!(
                "summary layer {} ({}), Keras {name} ({class})",
                r.name, r.class_name
            ));
        }
        let params = l.get("params").and_then(Value::as_u64);
        if params != Some(r.params as u64) {
            return Err(format!(
                "summary {name}: {} params, Keras {params:?}",
                r.params
            ));
        }
        if let Some(os) = l.get("output_shape") {
            let nested = os
                .as_array()
                .is_some_and(|a| a.first().is_some_and(Value::is_array));
            let want_shapes: Option<Vec<Shape>> = if nested {
                os.as_array().and_then(|a| a.iter().map(shape_of).collect())
            } else {
                shape_of(os).map(|s| vec![s])
            };
            if want_shapes.as_ref() != Some(&r.output_shapes) {
                return Err(format!(
                    "summary {name}: output shape {:?}, Keras {os}",
                    r.output_shapes
                ));
            }
        }
    }
    Ok(())
}

fn check_outputs(got: &[Tensor], files: &[String], dir: &Path, tol: f64) -> Result<(), String> {
    if got.len() != files.len() {
        return Err(format!("{} outputs, Keras {}", got.len(), files.len()));
    }
    for (g, f) in got.iter().zip(files) {
        let want = read_tensor(&dir.join(f))?;
        compare_tensors(
            g,
            &want,
            Tolerance {
                rtol: 0.0,
                atol: tol,
            },
        )
        .map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(())
}

/// The loss of `output` against `targets`, as meta.json defines it.
pub fn loss_value(name: &str, output: &Tensor, targets: &Tensor) -> Result<f64, String> {
    let y = output.to_f64_vec();
    let t = targets.to_f64_vec();
    match name {
        "mse" => {
            if output.shape() != targets.shape() {
                return Err(format!(
                    "mse: output {:?} and targets {:?} differ in shape",
                    output.shape(),
                    targets.shape()
                ));
            }
            Ok(y.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / y.len().max(1) as f64)
        }
        "sparse_categorical_crossentropy_from_logits" => {
            let c = *output.shape().last().ok_or("scce: scalar output")?;
            if c == 0 || y.len() / c != t.len() {
                return Err(format!(
                    "scce: output {:?} does not fit targets {:?}",
                    output.shape(),
                    targets.shape()
                ));
            }
            let mut sum = 0.0;
            for (row, &k) in y.chunks(c).zip(&t) {
                let k = k as usize;
                if k >= c {
                    return Err(format!("scce: class {k} out of range 0..{c}"));
                }
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                sum += lse - row[k];
            }
            Ok(sum / t.len().max(1) as f64)
        }
        other => Err(format!("loss {other:?} is not known")),
    }
}

/// Runs one case folder on the CPU backend.
pub fn run_case(dir: &Path) -> Result<CaseReport, String> {
    run_case_on(dir, &[])
}

/// Runs one case folder with `backends` placed before the CPU ([`Model::set_backends`]).
pub fn run_case_on(dir: &Path, backends: &[Arc<dyn Device>]) -> Result<CaseReport, String> {
    let meta = read_json(&dir.join("meta.json"))?;
    let tol = meta
        .get("tolerance")
        .and_then(Value::as_f64)
        .unwrap_or(1e-5);
    let weights = files_of(meta.get("weights").unwrap_or(&Value::Null), "weights")?;
    let mut report = CaseReport {
        checked: Vec::new(),
        skipped: Vec::new(),
    };
    let mut models = vec![load(dir, "model.json", &weights, backends)?];
    if let Some(summary) = meta.get("summary") {
        check_summary(&models[0], summary)?;
        report.checked.push("summary".into());
    }
    let steps = meta.get("stateful_steps").filter(|v| !v.is_null());
    if let Some(steps) = steps {
        if let Some(extra) = steps.get("models").and_then(Value::as_array) {
            for m in extra.iter().skip(1) {
                let json = m
                    .get("json")
                    .and_then(Value::as_str)
                    .ok_or("model without json")?;
                let w = files_of(m.get("weights").unwrap_or(&Value::Null), "models[].weights")?;
                let model = load(dir, json, &w, backends)?;
                if let Some(s) = m.get("summary") {
                    check_summary(&model, s).map_err(|e| format!("{json}: {e}"))?;
                }
                models.push(model);
            }
        }
        let list = steps
            .get("steps")
            .and_then(Value::as_array)
            .ok_or("stateful_steps.steps is not a list")?;
        let (mut calls, mut states) = (0, 0);
        for (i, step) in list.iter().enumerate() {
            let k = step.get("model").and_then(Value::as_u64).unwrap_or(0) as usize;
            let model = models
                .get_mut(k)
                .ok_or_else(|| format!("step {i}: no model {k}"))?;
            match step.get("op").and_then(Value::as_str) {
                Some("reset_states") => model.reset_states(),
                Some("call") => {
                    let ins = files_of(step.get("inputs").unwrap_or(&Value::Null), "inputs")?
                        .iter()
                        .map(|f| read_tensor(&dir.join(f)))
                        .collect::<Result<Vec<_>, _>>()?;
                    let outs = model.predict(&ins).map_err(|e| format!("step {i}: {e}"))?;
                    let files = files_of(step.get("outputs").unwrap_or(&Value::Null), "outputs")?;
                    check_outputs(&outs, &files, dir, tol).map_err(|e| format!("step {i}: {e}"))?;
                    calls += 1;
                    for s in step
                        .get("states_after")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let layer = s.get("layer").and_then(Value::as_str).unwrap_or("?");
                        let got = model
                            .layer_states(layer)
                            .or_else(|_| inner_states(model, layer))
                            .map_err(|e| format!("step {i}: {e}"))?;
                        let files = files_of(s.get("files").unwrap_or(&Value::Null), "files")?;
                        let got: Vec<Tensor> = got.into_iter().map(Tensor::F32).collect();
                        check_outputs(&got, &files, dir, tol)
                            .map_err(|e| format!("step {i}: states of {layer}: {e}"))?;
                        states += got.len();
                    }
                }
                other => return Err(format!("step {i}: unknown op {other:?}")),
            }
        }
        report
            .checked
            .push(format!("{calls} stateful calls, {states} states"));
        return Ok(report);
    }
    let ins = files_of(meta.get("inputs").unwrap_or(&Value::Null), "inputs")?
        .iter()
        .map(|f| read_tensor(&dir.join(f)))
        .collect::<Result<Vec<_>, _>>()?;
    // `call_training` (an extension of the seed layout): outputs of model(x, training=True).
    let training = meta.get("call_training").and_then(Value::as_bool) == Some(true);
    let outs = models[0].call(&ins, training).map_err(|e| e.to_string())?;
    let files = files_of(meta.get("outputs").unwrap_or(&Value::Null), "outputs")?;
    check_outputs(&outs, &files, dir, tol)?;
    report.checked.push(format!(
        "{} outputs{}",
        outs.len(),
        if training { " (training=True)" } else { "" }
    ));
    if let Some(loss) = meta.get("loss").filter(|v| !v.is_null()) {
        check_loss_and_grads(
            &mut models[0],
            &meta,
            loss,
            dir,
            &ins,
            &outs,
            training,
            &mut report,
        )?;
    }
    if let Some(other) = meta.get("expect_equal_to").and_then(Value::as_str) {
        let sibling = dir.parent().map(|p| p.join(other));
        if let Some(s) = sibling.filter(|s| s.is_dir()) {
            let meta2 = read_json(&s.join("meta.json"))?;
            let files2 = files_of(meta2.get("outputs").unwrap_or(&Value::Null), "outputs")?;
            check_outputs(&outs, &files2, &s, tol).map_err(|e| format!("vs {other}: {e}"))?;
            report.checked.push(format!("equal to {other}"));
        } else {
            report
                .skipped
                .push(format!("equality with {other} (case not present)"));
        }
    }
    Ok(report)
}

/// The loss heads of `meta.loss`: `(output index, targets file)` per head. The loss is
/// the sum over the heads (`outputs` and `targets` lists), or one head (`output_index`,
/// `targets`) in the seed layout.
fn loss_heads(loss: &Value) -> Result<Vec<(usize, String)>, String> {
    let targets = loss.get("targets").cloned().unwrap_or(Value::Null);
    let files = match &targets {
        Value::String(s) => vec![s.clone()],
        Value::Array(_) => files_of(&targets, "loss.targets")?,
        _ => return Err("loss.targets names no file".into()),
    };
    let outputs: Vec<usize> = match loss.get("outputs") {
        Some(list) => list
            .as_array()
            .ok_or("loss.outputs is not a list")?
            .iter()
            .map(|v| v.as_u64().map(|k| k as usize))
            .collect::<Option<_>>()
            .ok_or("loss.outputs holds a non-index")?,
        None => vec![loss
            .get("output_index")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize],
    };
    if outputs.len() != files.len() || outputs.is_empty() {
        return Err(format!(
            "loss: {} outputs and {} target files",
            outputs.len(),
            files.len()
        ));
    }
    Ok(outputs.into_iter().zip(files).collect())
}

/// `max|got − want| ≤ atol + rtol·max|want|` over the tensor (one scale per tensor, so
/// small elements of a large gradient are held to the tensor's own scale, and a tensor
/// of small gradients is not passed by a loose absolute bound).
fn compare_scaled(got: &Tensor, want: &Tensor, atol: f64, rtol: f64) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let bound = atol + rtol * scale;
    let mut worst = (0usize, 0.0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d.is_nan() || d > worst.1 {
            worst = (i, if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    if worst.1 > bound {
        let i = worst.0;
        return Err(format!(
            "max |difference| {:.3e} > {atol:.0e} + {rtol:.0e}·{scale:.3e} (max |expected|); at flat index {i}: got {}, expected {}",
            worst.1, g[i], w[i]
        ));
    }
    Ok(())
}

/// The default per-tensor gradient tolerances when a case's meta gives none (the seed
/// layout's `grad_tolerance` is an absolute bound, looser than these).
const GRAD_RTOL: f64 = 1e-4;
const GRAD_ATOL: f64 = 1e-7;

#[allow(clippy::too_many_arguments)]
fn check_loss_and_grads(
    model: &mut Model,
    meta: &Value,
    loss: &Value,
    dir: &Path,
    ins: &[Tensor],
    outs: &[Tensor],
    training: bool,
    report: &mut CaseReport,
) -> Result<(), String> {
    let name = loss
        .get("name")
        .and_then(Value::as_str)
        .ok_or("loss without name")?;
    let heads = loss_heads(loss)?;
    let targets = heads
        .iter()
        .map(|(_, f)| read_tensor(&dir.join(f)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut got = 0.0;
    for ((k, _), t) in heads.iter().zip(&targets) {
        let out = outs.get(*k).ok_or_else(|| {
            format!(
                "loss.outputs: output {k} out of range ({} outputs)",
                outs.len()
            )
        })?;
        got += loss_value(name, out, t)?;
    }
    let want = loss
        .get("value")
        .and_then(Value::as_f64)
        .ok_or("loss without value")?;
    let ltol = 1e-4 * want.abs().max(1.0);
    if (got - want).abs() > ltol {
        return Err(format!("loss {name}: {got}, Keras {want}"));
    }
    report.checked.push(if heads.len() == 1 {
        format!("loss {name}")
    } else {
        format!("loss {name} over {} outputs", heads.len())
    });
    let Some(grads) = meta.get("grads").filter(|g| !g.is_null()) else {
        return Ok(());
    };
    let files = files_of(grads, "grads")?;
    let kind = match name {
        "mse" => super::Loss::MeanSquaredError,
        "sparse_categorical_crossentropy_from_logits" => {
            super::Loss::SparseCategoricalCrossentropy { from_logits: true }
        }
        other => return Err(format!("gradients for loss {other:?} are not known")),
    };
    let kinds: Vec<(usize, super::Loss)> = heads.iter().map(|(k, _)| (*k, kind)).collect();
    let gr = model
        .gradients_of_heads(ins, &targets, &kinds, training)
        .map_err(|e| format!("gradients: {e}"))?;
    if (gr.loss as f64 - want).abs() > ltol {
        return Err(format!(
            "loss in the gradient graph: {}, Keras {want}",
            gr.loss
        ));
    }
    if gr.grads.len() != files.len() {
        return Err(format!(
            "{} gradients, Keras {} (trainable weights)",
            gr.grads.len(),
            files.len()
        ));
    }
    let rtol = meta
        .get("grad_rtol")
        .and_then(Value::as_f64)
        .unwrap_or(GRAD_RTOL);
    let atol = meta
        .get("grad_atol")
        .and_then(Value::as_f64)
        .unwrap_or(GRAD_ATOL);
    // A stored gradient that is identically zero hides the weight's backward pass (any
    // gradient near zero would pass): it must be declared disconnected, with a reason.
    let disconnected = meta.get("disconnected_grads").and_then(Value::as_object);
    for (g, f) in gr.grads.into_iter().zip(&files) {
        let want = read_tensor(&dir.join(f))?;
        let declared = disconnected.is_some_and(|d| d.contains_key(f.as_str()));
        let all_zero = want.to_f64_vec().iter().all(|v| *v == 0.0);
        if all_zero && !declared {
            return Err(format!(
                "gradient {f} is identically zero in the case and not declared in meta.disconnected_grads: it checks nothing"
            ));
        }
        if declared && !all_zero {
            return Err(format!(
                "gradient {f} is declared disconnected but is not zero"
            ));
        }
        compare_scaled(&Tensor::F32(g), &want, atol, rtol)
            .map_err(|e| format!("gradient {f}: {e}"))?;
    }
    report.checked.push(format!("{} gradients", files.len()));
    Ok(())
}

/// States of a `Bidirectional`'s inner layer (`forward_lstm`): half of the wrapper's.
fn inner_states(model: &Model, layer: &str) -> Result<Vec<ndarray::ArrayD<f32>>, String> {
    for name in model.layer_names() {
        if let Some(super::Layer::Bidirectional(b)) = model.layer(name) {
            let fw = b.forward.name.as_deref() == Some(layer);
            let bw = b.backward.name.as_deref() == Some(layer);
            if fw || bw {
                let all = model.layer_states(name).map_err(|e| e.to_string())?;
                let nf = b.forward.state_sizes().len();
                return Ok(if fw {
                    all[..nf].to_vec()
                } else {
                    all[nf..].to_vec()
                });
            }
        }
    }
    Err(format!("no stateful layer {layer:?} in the model"))
}
