//! Every file `cellgraph convert` writes from the shipped conformance models passes
//! `onnx.checker.check_model(full_check=True)`, loads in onnxruntime, and reproduces the
//! stored expected outputs there (tests/python/check_onnx_exports.py).
//!
//! Needs Python with `onnx`, `onnxruntime` and `numpy`: `CELLGRAPH_PYTHON` names the
//! interpreter (default `python3`). Without them the test prints why and skips, unless
//! `CELLGRAPH_REQUIRE_PYTHON=1` (set by `.ci/run`), which turns the skip into a failure.

use cellgraph::cli::{run, Cli};
use cellgraph_tests::{conformance_dir, onnx_models};
use clap::Parser;
use std::path::Path;
use std::process::Command;

#[test]
fn converted_models_pass_onnx_checker_and_run_in_onnxruntime() {
    let Some(py) = cellgraph_tests::python_or_skip("onnx interop") else {
        return;
    };
    let root = conformance_dir();
    let out = tempfile::tempdir().expect("temp dir");
    let models = onnx_models(&root);
    assert!(models.len() >= 360);
    for m in &models {
        let rel = m
            .parent()
            .and_then(|p| p.strip_prefix(&root).ok())
            .expect("model inside the conformance folder");
        let dst = out.path().join(rel);
        std::fs::create_dir_all(&dst).expect("create output folder");
        let target = dst.join("model.onnx");
        let cli = Cli::parse_from([
            "cellgraph",
            "convert",
            &m.to_string_lossy(),
            &target.to_string_lossy(),
        ]);
        run(cli).unwrap_or_else(|e| panic!("convert {}: {e}", m.display()));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_onnx_exports.py");
    let res = Command::new(&py)
        .arg(&script)
        .arg(out.path())
        .arg(&root)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&res.stdout);
    let failures: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    let summary = stdout.lines().last().unwrap_or("");
    eprintln!("{summary}");
    assert!(
        res.status.success(),
        "onnx/onnxruntime check failed:\n{}\n{summary}\n{}",
        failures.join("\n"),
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        summary.contains(&format!("{} passed, 0 failed", models.len())),
        "unexpected summary: {summary}"
    );
}
