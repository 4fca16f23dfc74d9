//! The Keras conformance cases: the 8 seed cases of the guide and the option cases from
//! real Keras (`tests/conformance/keras-options`) all pass: summary, outputs, stateful
//! sequences, losses and the gradient of every trainable weight.

use cellgraph::keras::conformance::{find_cases, run_case};
use cellgraph_tests::conformance_dir;

fn check(folder: &str, expected: usize) {
    let cases = find_cases(&conformance_dir().join(folder));
    assert_eq!(cases.len(), expected, "the shipped cases in {folder}");
    let mut failures = Vec::new();
    for case in &cases {
        match run_case(case) {
            Ok(report) => {
                assert!(
                    report
                        .checked
                        .iter()
                        .any(|c| c.contains("output") || c.contains("stateful")),
                    "{}: nothing compared: {report:?}",
                    case.display()
                );
                assert!(report.checked.contains(&"summary".to_string()));
                assert!(
                    report.skipped.is_empty(),
                    "{}: skipped {report:?}",
                    case.display()
                );
                let meta = std::fs::read_to_string(case.join("meta.json")).expect("meta.json");
                if meta.contains("\"grads/000.npy\"") {
                    assert!(
                        report.checked.iter().any(|c| c.ends_with("gradients")),
                        "{}: gradients not compared: {report:?}",
                        case.display()
                    );
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn seed_cases_pass() {
    check("keras", 8);
}

#[test]
fn option_cases_from_real_keras_pass() {
    check("keras-options", 15);
}

#[test]
fn a_wrong_stored_output_fails_the_case() {
    // Copy a case, perturb one stored output value by 1e-3 (above the 1e-5 tolerance).
    let src = conformance_dir().join("keras/seed_mnist_lstm");
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join("seed_mnist_lstm");
    copy_dir(&src, &dst);
    let out = dst.join("outputs/000.npy");
    let mut bytes = std::fs::read(&out).expect("read output");
    let n = bytes.len();
    let mut v = f32::from_le_bytes([bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]]);
    v += 1e-3;
    bytes[n - 4..].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&out, bytes).expect("write output");
    let err = run_case(&dst).expect_err("a perturbed output must fail");
    assert!(err.contains("outputs/000.npy"), "{err}");
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir").flatten() {
        let p = e.path();
        let to = dst.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).expect("copy");
        }
    }
}
