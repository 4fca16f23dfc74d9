//! Keras models round-trip through `Model::save` / `load_model` and predict identically;
//! their exported inference ONNX files import back and predict the same on the CPU
//! backend, and run in onnxruntime with Keras's outputs (tests/python/check_keras_onnx.py;
//! needs `CELLGRAPH_PYTHON` with onnx and onnxruntime, else skips with the reason unless
//! `CELLGRAPH_REQUIRE_PYTHON=1`).

use cellgraph::backends::cpu::{CpuBackend, Recurrent};
use cellgraph::backends::{Backend, Data, Plan};
use cellgraph::ir::Tensor;
use cellgraph::keras::conformance::find_cases;
use cellgraph::keras::load_model;
use cellgraph_tests::conformance_dir;
use std::path::{Path, PathBuf};
use std::process::Command;

fn inference_cases() -> Vec<PathBuf> {
    let root = conformance_dir();
    let mut cases = find_cases(&root.join("keras"));
    cases.extend(find_cases(&root.join("keras-options")));
    cases
        .into_iter()
        .filter(|c| {
            let meta = std::fs::read_to_string(c.join("meta.json")).unwrap_or_default();
            !meta.contains("\"call_training\": true") && meta.contains("\"stateful_steps\": null")
        })
        .collect()
}

fn inputs(case: &Path) -> Vec<Tensor> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("meta.json")).unwrap()).unwrap();
    meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| cellgraph::npy::read(&case.join(e["file"].as_str().unwrap()), None).unwrap())
        .collect()
}

#[test]
fn saved_models_load_back_and_predict_identically() {
    let cases = inference_cases();
    assert!(cases.len() >= 19, "{}", cases.len());
    for case in cases {
        let mut m = load_model(&case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let x = inputs(&case);
        let a = m.predict(&x).unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let mut back =
            load_model(dir.path()).unwrap_or_else(|e| panic!("{}: reload: {e}", case.display()));
        assert_eq!(back.summary(), m.summary(), "{}", case.display());
        let b = back.predict(&x).unwrap();
        assert_eq!(a, b, "{}", case.display());
    }
}

#[test]
fn exported_onnx_imports_back_and_predicts_the_same() {
    for case in inference_cases() {
        let mut m = load_model(&case).unwrap();
        let x = inputs(&case);
        let want = m.predict(&x).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        m.save_onnx(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let onnx = cellgraph::ir::onnx::Model::load(&path).unwrap();
        let mut plan = CpuBackend::new(Recurrent::Fused)
            .compile(&onnx.graph)
            .unwrap();
        let dts = m.input_dtypes();
        let data: Vec<Data> = x
            .iter()
            .zip(dts)
            .map(|(t, dt)| {
                Data::Tensor(Tensor::from_f64_vec(dt, t.shape(), &t.to_f64_vec()).unwrap())
            })
            .collect();
        let got = plan.run(data).unwrap();
        for (g, w) in got.iter().zip(&want) {
            let g = g.tensor().unwrap();
            assert_eq!(g.shape(), w.shape(), "{}", case.display());
            let d = g
                .to_f64_vec()
                .iter()
                .zip(w.to_f64_vec())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-6, "{}: {d}", case.display());
        }
    }
}

#[test]
fn exported_onnx_runs_in_onnxruntime_with_kerass_outputs() {
    let Some(py) = cellgraph_tests::python_or_skip("keras onnx interop") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let cases = inference_cases();
    for case in &cases {
        let m = load_model(case).unwrap();
        let dst = out.path().join(case.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        m.save_onnx(&dst.join("model.onnx")).unwrap();
    }
    let root = conformance_dir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_keras_onnx.py");
    let res = Command::new(&py)
        .arg(&script)
        .arg(out.path())
        .arg(root.join("keras"))
        .arg(root.join("keras-options"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        text.lines().last(),
        Some(format!("{} passed, 0 failed", cases.len()).as_str()),
        "{text}"
    );
}

#[test]
fn a_trained_model_saves_loads_and_runs_in_onnxruntime_with_the_same_predictions() {
    use cellgraph::keras::{FitOptions, Loss, Metric, Optimizer};
    use cellgraph::mnist::{guide_model, Mnist};
    // Train the guide's MNIST model briefly on real digits.
    let data = Mnist::bundled().unwrap();
    let idx: Vec<usize> = (0..128).collect();
    let x = Tensor::F32(data.train_images.select(ndarray::Axis(0), &idx));
    let y = Tensor::U8(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[128]), data.train_labels[..128].to_vec())
            .unwrap(),
    );
    let mut m = guide_model(false, 4).unwrap();
    m.compile(
        Optimizer::adam(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[Metric::Accuracy],
    );
    let opts = FitOptions {
        batch_size: 64,
        epochs: 1,
        verbose: false,
        ..Default::default()
    };
    m.fit(std::slice::from_ref(&x), &y, &opts).unwrap();
    let probe: Vec<usize> = (0..8).collect();
    let px = Tensor::F32(data.test_images.select(ndarray::Axis(0), &probe));
    let want = m.predict(std::slice::from_ref(&px)).unwrap();
    // Save and load: identical predictions.
    let dir = tempfile::tempdir().unwrap();
    m.save(&dir.path().join("model")).unwrap();
    let mut back = load_model(&dir.path().join("model")).unwrap();
    assert_eq!(back.predict(std::slice::from_ref(&px)).unwrap(), want);
    // The inference ONNX in onnxruntime, through the same checker as the Keras cases.
    let Some(py) = cellgraph_tests::python_or_skip("trained-model onnxruntime check") else {
        return;
    };
    let case = dir.path().join("cases/trained_mnist");
    std::fs::create_dir_all(case.join("inputs")).unwrap();
    std::fs::create_dir_all(case.join("outputs")).unwrap();
    cellgraph::npy::write(&case.join("inputs/000.npy"), &px).unwrap();
    cellgraph::npy::write(&case.join("outputs/000.npy"), &want[0]).unwrap();
    std::fs::write(
        case.join("meta.json"),
        r#"{"tolerance": 1e-5, "inputs": [{"file": "inputs/000.npy"}], "outputs": [{"file": "outputs/000.npy"}]}"#,
    )
    .unwrap();
    let exported = dir.path().join("exported/trained_mnist");
    std::fs::create_dir_all(&exported).unwrap();
    m.save_onnx(&exported.join("model.onnx")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_keras_onnx.py");
    let res = Command::new(&py)
        .arg(&script)
        .arg(dir.path().join("exported"))
        .arg(dir.path().join("cases"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(text.lines().last(), Some("1 passed, 0 failed"), "{text}");
}
