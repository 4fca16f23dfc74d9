//! Shared helpers for cellgraph's cross-crate tests.

use std::path::{Path, PathBuf};

/// The shipped conformance folder (`tests/conformance`).
pub fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// Every `model.onnx` under `dir`, sorted.
pub fn onnx_models(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "onnx") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The case name of a model path (its folder's name).
pub fn case_name(model: &Path) -> String {
    model
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The Python interpreter for interop checks (`CELLGRAPH_PYTHON`, default `python3`) when
/// it has onnx, onnxruntime and numpy. Otherwise prints why `what` is skipped and returns
/// `None` — or panics when `CELLGRAPH_REQUIRE_PYTHON=1` (CI), so nothing is skipped there.
pub fn python_or_skip(what: &str) -> Option<String> {
    let py = std::env::var("CELLGRAPH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(py);
    }
    let why = format!(
        "SKIPPED {what}: no Python with onnx, onnxruntime and numpy (set CELLGRAPH_PYTHON)"
    );
    if std::env::var("CELLGRAPH_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("{why}, but CELLGRAPH_REQUIRE_PYTHON=1");
    }
    eprintln!("{why}");
    None
}
