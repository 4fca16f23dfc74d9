//! `cellgraph conformance onnx`: runs ONNX backend-test cases (`model.onnx` plus
//! `test_data_set_*/input_<j>.pb`, `output_<j>.pb`) and compares every output.

use crate::backends::cpu::{CpuBackend, Recurrent};
use crate::backends::{Data, Device};
use crate::ir::onnx::{decode_stored_value, Limits, Model, StoredKind, StoredValue};
use crate::ir::{verify, Tensor, ValueType};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Comparison tolerances: `|got − want| ≤ atol + rtol·|want|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

impl Default for Tolerance {
    /// The ONNX backend-test defaults: rtol 1e-3, atol 1e-7.
    fn default() -> Tolerance {
        Tolerance {
            rtol: 1e-3,
            atol: 1e-7,
        }
    }
}

/// The case folders under `path`: `path` itself when it holds a `model.onnx`, otherwise
/// every folder below it that does, sorted.
pub fn find_cases(path: &Path) -> Vec<PathBuf> {
    find_folders_with(path, &["model.onnx"])
}

/// `path` itself when it holds every file in `markers`, otherwise every folder below it
/// that does, sorted.
pub fn find_folders_with(path: &Path, markers: &[&str]) -> Vec<PathBuf> {
    if markers.iter().all(|m| path.join(m).is_file()) {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(find_folders_with(&e.path(), markers));
            }
        }
    }
    out.sort();
    out
}

fn read_value(path: &Path, ty: &ValueType) -> Result<Data, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kind = match ty {
        ValueType::Sequence(_) => StoredKind::Sequence,
        ValueType::Optional(_) => StoredKind::Optional,
        _ => StoredKind::Tensor,
    };
    let what = path.display().to_string();
    let v =
        decode_stored_value(&bytes, kind, &what, &Limits::default()).map_err(|e| e.to_string())?;
    fn data(v: StoredValue) -> Data {
        match v {
            StoredValue::Tensor(t) => Data::Tensor(t),
            StoredValue::Sequence(s) => Data::Sequence(s),
            StoredValue::Optional(o) => Data::Optional(o.map(|v| Box::new(data(*v)))),
        }
    }
    Ok(data(v))
}

/// Compares two tensors: shape, dtype, then values within `tol` (NaNs must match).
pub fn compare_tensors(got: &Tensor, want: &Tensor, tol: Tolerance) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {}, expected {}", got.dtype(), want.dtype()));
    }
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut worst: Option<(usize, f64, f64)> = None;
    let mut bad = 0;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = if a.is_nan() || b.is_nan() {
            a.is_nan() && b.is_nan()
        } else if want.dtype().is_float() {
            (a - b).abs() <= tol.atol + tol.rtol * b.abs() || a == b
        } else {
            a == b
        };
        if !ok {
            bad += 1;
            if worst.is_none_or(|(_, x, y)| (a - b).abs() > (x - y).abs()) {
                worst = Some((i, *a, *b));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, a, b)) => Err(format!(
            "{bad} of {} values differ; worst at flat index {i}: got {a}, expected {b}",
            g.len()
        )),
    }
}

fn compare(got: &Data, want: &Data, tol: Tolerance) -> Result<(), String> {
    match (got, want) {
        (Data::Tensor(g), Data::Tensor(w)) => compare_tensors(g, w, tol),
        (Data::Sequence(g), Data::Sequence(w)) => {
            if g.len() != w.len() {
                return Err(format!("sequence of {}, expected {}", g.len(), w.len()));
            }
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                compare_tensors(a, b, tol).map_err(|e| format!("element {i}: {e}"))?;
            }
            Ok(())
        }
        (Data::Optional(g), Data::Optional(w)) => match (g, w) {
            (None, None) => Ok(()),
            (Some(a), Some(b)) => compare(a, b, tol),
            _ => Err("optional presence differs".into()),
        },
        (g, w) => Err(format!("got a {}, expected a {}", g.kind(), w.kind())),
    }
}

/// Runs one case folder on the CPU backend; `Ok` or the reason it failed.
pub fn run_case(dir: &Path, recurrent: Recurrent, tol: Tolerance) -> Result<(), String> {
    run_case_on(dir, recurrent, tol, &[])
}

/// Runs one case folder on `before` (backends in order of preference, e.g. the
/// test-only [`crate::backends::subset::SubsetBackend`]) with the CPU after them as the
/// fallback: a [`PlacedPlan`](crate::backends::PlacedPlan) over the list, each node on the first backend that accepts
/// it. With `before` empty, the CPU's own plan runs the whole graph.
pub fn run_case_on(
    dir: &Path,
    recurrent: Recurrent,
    tol: Tolerance,
    before: &[Arc<dyn Device>],
) -> Result<(), String> {
    let model = Model::load(dir.join("model.onnx")).map_err(|e| format!("import: {e}"))?;
    verify(&model.graph).map_err(|e| format!("verify: {e}"))?;
    let backend = CpuBackend::new(recurrent);
    // With fused recurrent ops the selector first raises Scan loops that compute a cell.
    let selected = crate::backends::passes::select::select(
        &backend.after(before),
        &model.graph,
        recurrent == Recurrent::Fused,
    )
    .map_err(|e| format!("select: {e}"))?;
    let mut plan = backend
        .compile_after(&selected.graph, before)
        .map_err(|e| format!("compile: {e}"))?;
    let g = &model.graph;
    let in_types = g.input_types();
    let out_types = g.output_types();
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_"))
        })
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test_data_set_* folder".into());
    }
    for set in sets {
        let name = set
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inputs: Vec<Data> = in_types
            .iter()
            .enumerate()
            .map(|(j, t)| read_value(&set.join(format!("input_{j}.pb")), t))
            .collect::<Result<_, _>>()?;
        let outputs = plan.run(inputs).map_err(|e| format!("{name}: run: {e}"))?;
        if outputs.len() != out_types.len() {
            return Err(format!(
                "{name}: {} outputs, expected {}",
                outputs.len(),
                out_types.len()
            ));
        }
        for (j, (got, t)) in outputs.iter().zip(&out_types).enumerate() {
            let want = read_value(&set.join(format!("output_{j}.pb")), t)?;
            compare(got, &want, tol).map_err(|e| {
                format!("{name}: output {j} ({}): {e}", g.value(g.outputs()[j]).name)
            })?;
        }
    }
    Ok(())
}
