//! `cellgraph mnist` refuses, before training and with exit status 2 (never a panic's
//! 101), what would lose or mix up a run (docs/RELIABILITY.md, "Durable training" and
//! "Input classes"): a checkpoint folder of another configuration (with or without
//! `--resume`; every file left byte-identical), a folder whose checkpoints all fail to
//! load, outputs it cannot write, meaningless numbers and empty data sets. A fallback from
//! a damaged newest checkpoint is announced on standard error.

use cellgraph::keras::checkpoint::list_checkpoints;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The quick run every case starts from (64 digits, 1 epoch).
const BASE: [(&str, &str); 4] = [
    ("--limit", "64"),
    ("--epochs", "1"),
    ("--batch-size", "32"),
    ("--seed", "1"),
];

/// `cellgraph mnist --out OUT` with BASE's flags, those in `change` replacing BASE's
/// values (`change`: flags, each followed by its value except `--resume`).
fn mnist(out: &Path, change: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["mnist".into()];
    for (flag, value) in BASE {
        if !change.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(change.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_cellgraph"))
        .args(&args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run cellgraph mnist")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn succeeded(o: &Output) -> (String, String) {
    let (out, err) = text(o);
    assert!(o.status.success(), "failed: {out}{err}");
    (out, err)
}

/// Exit status 2 with an `error:` line holding every part of `want`, and no training.
fn refused(o: &Output, want: &[&str]) -> String {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(err.starts_with("error: "), "{err}");
    for w in want {
        assert!(err.contains(w), "no {w:?} in the error: {err}");
    }
    assert!(
        !out.contains("Epoch 1/"),
        "it trained before refusing: {out}"
    );
    err
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_changed_configuration_is_refused_leaving_every_file_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeeded(&mnist(&out, &[]));
    let before = snapshot(&out);
    assert!(
        before
            .keys()
            .any(|p| p.ends_with("checkpoints/ckpt-00001.cgckpt")),
        "{:?}",
        before.keys()
    );
    let changes: [(&[&str], &[&str]); 6] = [
        (&["--cell", "rnn-lstmcell"], &["model Sequential[InputLayer, RNN, "]),
        (
            &["--optimizer", "sgd"],
            &["optimizer sgd(learning_rate=0.01, momentum=0.0, nesterov=false) here, adam(learning_rate=0.001, "],
        ),
        (
            &["--learning-rate", "0.002"],
            &["optimizer adam(learning_rate=0.002, "],
        ),
        (
            &["--batch-size", "16"],
            &["batch_size 16 here, 32 in the checkpoint"],
        ),
        (&["--seed", "2"], &["seed 2 here, 1 in the checkpoint"]),
        (
            &["--limit", "32"],
            &[
                "data 32 samples (fnv64 ",
                "validation data 8 samples (fnv64 ",
                "here, data 16 samples (fnv64 ",
            ],
        ),
    ];
    for (change, want) in changes {
        for resume in [true, false] {
            let mut args = change.to_vec();
            if resume {
                args.push("--resume");
            }
            let mut want = want.to_vec();
            want.extend([
                "ckpt-00001.cgckpt was written by another configuration: ",
                "use another --checkpoint-dir, or remove the folder",
            ]);
            refused(&mnist(&out, &args), &want);
            assert_eq!(snapshot(&out), before, "{args:?} changed files");
        }
    }
    // The same configuration without --resume is refused too: never overwritten.
    refused(
        &mnist(&out, &[]),
        &[
            "already holds checkpoints (of this configuration, the newest ",
            "pass --resume to continue",
        ],
    );
    assert_eq!(snapshot(&out), before);
    // With --resume it continues from epoch 1.
    let (text, _) = succeeded(&mnist(&out, &["--resume", "--epochs", "2"]));
    assert!(text.contains("resumed from "), "{text}");
    assert!(
        text.contains("Epoch 2/2") && !text.contains("Epoch 1/2"),
        "{text}"
    );
}

#[test]
fn a_damaged_newest_checkpoint_is_announced_and_none_loading_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    succeeded(&mnist(&out, &["--epochs", "2"]));
    let ck = list_checkpoints(&out.join("checkpoints"));
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
    let damage = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        let at = b.len() - 9;
        b[at] ^= 0x01;
        std::fs::write(p, b).unwrap();
    };
    damage(&ck[1].1);
    let (text, err) = succeeded(&mnist(&out, &["--epochs", "3", "--resume"]));
    let warning = format!(
        "warning: checkpoint {}: the checksum does not match (a partial or damaged file); \
         skipped it, resuming from the older {}",
        ck[1].1.display(),
        ck[0].1.display()
    );
    assert!(err.contains(&warning), "no {warning:?} in: {err}");
    assert!(
        text.contains("Epoch 2/3") && !text.contains("Epoch 1/3"),
        "{text}"
    );

    // Now every checkpoint is damaged: the resume refuses naming each.
    let ck = list_checkpoints(&out.join("checkpoints"));
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 3]);
    for (_, p) in &ck {
        damage(p);
    }
    let before = snapshot(&out);
    let n2 = format!("{}: the checksum does not match", ck[0].1.display());
    let n3 = format!("{}: the checksum does not match", ck[1].1.display());
    refused(
        &mnist(&out, &["--epochs", "3", "--resume"]),
        &[
            "cannot resume: none of the 2 checkpoints in ",
            &n2,
            &n3,
            "refusing to start again from epoch 1",
        ],
    );
    assert_eq!(snapshot(&out), before);
}

#[test]
fn unwritable_outputs_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("out");
    let why = "cannot be written (";
    let when = "checked before training starts";
    let name = format!("error: {}: {why}", under.display());
    refused(&mnist(&under, &[]), &[&name, when]);

    let out = tmp.path().join("out");
    let ck_name = format!("error: {}: {why}", under.display());
    refused(
        &mnist(&out, &["--checkpoint-dir", under.to_str().unwrap()]),
        &[&ck_name, when],
    );

    // Outputs written after training: the ONNX file and the curves as folders, the
    // model folder as a file.
    for (what, make_dir) in [
        ("mnist_lstm.onnx", true),
        ("curves.png", true),
        ("model", false),
    ] {
        let out = tmp.path().join(format!("out-{what}"));
        std::fs::create_dir_all(&out).unwrap();
        let p = out.join(what);
        if make_dir {
            std::fs::create_dir(&p).unwrap();
        } else {
            std::fs::write(&p, b"x").unwrap();
        }
        let name = format!("error: {}: {why}", p.display());
        refused(&mnist(&out, &[]), &[&name, when]);
        assert!(!out.join("checkpoints").join("ckpt-00001.cgckpt").exists());
    }

    // A read-only folder (only meaningful when permissions bind: not as root).
    use std::os::unix::fs::PermissionsExt;
    let ro = tmp.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let name = format!("error: {}: {why}", ro.display());
        refused(&mnist(&ro, &[]), &[&name, when]);
    } else {
        eprintln!("running as root: the read-only folder case is skipped");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn meaningless_numbers_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (flag, value, want) in [
        ("--epochs", "0", "error: --epochs 0: it must be at least 1"),
        (
            "--batch-size",
            "0",
            "error: --batch-size 0: it must be at least 1",
        ),
        ("--limit", "0", "error: --limit 0: it must be at least 1"),
        (
            "--learning-rate",
            "0",
            "error: --learning-rate 0: must be a positive number",
        ),
    ] {
        refused(&mnist(&out, &[flag, value]), &[want]);
        assert!(!out.exists(), "{flag} {value}: it wrote {}", out.display());
    }
}

/// Writes an IDX file of unsigned bytes.
fn idx(path: &Path, dims: &[u32], fill: u8) {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    let n: u32 = dims.iter().product();
    b.extend(std::iter::repeat_n(fill, n as usize));
    std::fs::write(path, b).unwrap();
}

#[test]
fn empty_training_or_test_sets_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (train, test, limit, bad, what) in [
        (0, 4, None, "train-images-idx3-ubyte", "0 training images"),
        (8, 0, None, "t10k-images-idx3-ubyte", "0 test images"),
        (8, 0, Some("4"), "t10k-images-idx3-ubyte", "0 test images"),
        (
            0,
            4,
            Some("4"),
            "train-images-idx3-ubyte",
            "0 training images",
        ),
    ] {
        let data = tmp.path().join(format!("data-{train}-{test}-{limit:?}"));
        std::fs::create_dir(&data).unwrap();
        idx(&data.join("train-images-idx3-ubyte"), &[train, 28, 28], 7);
        idx(&data.join("train-labels-idx1-ubyte"), &[train], 3);
        idx(&data.join("t10k-images-idx3-ubyte"), &[test, 28, 28], 7);
        idx(&data.join("t10k-labels-idx1-ubyte"), &[test], 3);
        let out = tmp.path().join("out");
        let mut args = vec!["--data", data.to_str().unwrap()];
        if let Some(l) = limit {
            args.extend(["--limit", l]);
        } else {
            args.extend(["--limit", "100000"]);
        }
        let name = format!("error: {}: {what}", data.join(bad).display());
        refused(&mnist(&out, &args), &[&name]);
    }
}
