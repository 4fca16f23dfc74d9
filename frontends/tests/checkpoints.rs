//! Damaged checkpoints (docs/RELIABILITY.md, "Durable training"): every kind of damage is
//! refused by `load_checkpoint` with a message naming the file and the part at fault, a
//! refused load leaves the model as it was, and `fit` with `resume` falls back to the
//! newest checkpoint that loads (announcing and reporting the skipped one) and ends
//! exactly where an uninterrupted run ends; with no checkpoint that loads it refuses.
//! Checkpoints record the run's configuration: a run of another configuration (or any
//! run without `resume`) is refused before training, leaving every file byte-identical.
//! `fit` refuses data and options that leave nothing to train or validate on, and a
//! checkpoint folder it cannot write.
//!
//! The checksum is recomputed here from the documented layout (magic, u64 metadata
//! length, metadata, data, FNV-1a 64 of everything before it), not with the crate's own
//! code, so crafted files that pass the checksum reach the checks behind it.

use cellgraph::ir::Tensor;
use cellgraph::keras::checkpoint::list_checkpoints;
use cellgraph::keras::{
    CheckpointOptions, FitOptions, History, KerasError, Loss, Metric, Model, Optimizer,
};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn model(units: usize) -> Model {
    use cellgraph::keras::{Dense, Input, Sequential, LSTM};
    let mut m = Sequential::with_seed(3);
    m.add(Input::new(&[Some(5), Some(4)])).unwrap();
    m.add(LSTM::new(units)).unwrap();
    m.add(Dense::new(3)).unwrap();
    m.compile(
        Optimizer::adam(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[Metric::Accuracy],
    );
    m
}

fn data() -> (Tensor, Tensor) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let x: Vec<f32> = (0..24 * 5 * 4)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let y: Vec<u8> = (0..24).map(|_| (next() % 3) as u8).collect();
    (
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[24, 5, 4]), x).unwrap()),
        Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[24]), y).unwrap()),
    )
}

fn fit(m: &mut Model, epochs: usize, ck: Option<CheckpointOptions>) -> History {
    let (x, y) = data();
    let opts = FitOptions {
        batch_size: 8,
        epochs,
        seed: 11,
        verbose: false,
        checkpoint: ck,
        ..Default::default()
    };
    m.fit(&[x], &y, &opts).unwrap()
}

/// Trains `epochs` epochs writing checkpoints into `dir` (the newest two kept).
fn trained_with_checkpoints(dir: &Path, epochs: usize) -> Model {
    let mut m = model(6);
    fit(&mut m, epochs, Some(CheckpointOptions::new(dir)));
    m
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `body` (everything before the hash) with a correct trailing hash.
fn sealed(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(&fnv(body).to_le_bytes());
    v
}

fn meta_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize
}

#[test]
fn the_file_layout_is_the_documented_one() {
    // The crafted damages below rely on it: if the layout changes, this says so first.
    let dir = tempfile::tempdir().unwrap();
    trained_with_checkpoints(dir.path(), 1);
    let (epoch, path) = list_checkpoints(dir.path()).pop().unwrap();
    assert_eq!(epoch, 1);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"CGCKPT02");
    let n = bytes.len();
    assert_eq!(fnv(&bytes[..n - 8]).to_le_bytes(), bytes[n - 8..]);
    let meta: serde_json::Value =
        serde_json::from_slice(&bytes[16..16 + meta_len(&bytes)]).unwrap();
    assert_eq!(meta["epoch"], 1);
    assert_eq!(meta["format"], 2);
    let c = &meta["config"];
    assert_eq!(c["batch_size"], 8);
    assert_eq!(c["seed"], 11);
    assert_eq!(c["shuffle"], true);
    assert_eq!(
        c["optimizer"],
        "adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)"
    );
    let model = c["model"].as_str().unwrap();
    assert!(
        model.starts_with("Sequential[InputLayer, LSTM, Dense] (config fnv64 "),
        "{model}"
    );
    assert!(c["data"]
        .as_str()
        .unwrap()
        .starts_with("24 samples (fnv64 "));
    assert_eq!(c["validation"], "none");
    assert!(c["loss"].as_str().unwrap().contains("accuracy"));
}

#[test]
fn every_kind_of_damage_is_refused_and_leaves_the_model_untouched() {
    let dir = tempfile::tempdir().unwrap();
    trained_with_checkpoints(dir.path(), 2);
    let (_, path) = list_checkpoints(dir.path()).pop().unwrap();
    let good = std::fs::read(&path).unwrap();
    let n = good.len();
    let ml = meta_len(&good);
    let data_at = 16 + ml;
    let flip = |at: usize| {
        let mut v = good.clone();
        v[at] ^= 0x10;
        v
    };
    let body = &good[..n - 8];
    let mut crafted_meta = body.to_vec();
    // Valid JSON of the same length that names other weights.
    let meta_text = String::from_utf8(good[16..data_at].to_vec()).unwrap();
    let renamed = meta_text.replacen("kernel", "kernxl", 1);
    assert_ne!(renamed, meta_text, "the metadata names a kernel");
    crafted_meta[16..data_at].copy_from_slice(renamed.as_bytes());
    let mut long_len = body.to_vec();
    long_len[8..16].copy_from_slice(&((n as u64) * 2).to_le_bytes());
    let mut not_json = body.to_vec();
    not_json[16] = b'#';
    let damages: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", Vec::new(), "shorter than any checkpoint"),
        ("7 bytes", good[..7].to_vec(), "shorter than any checkpoint"),
        (
            "23 bytes",
            good[..23].to_vec(),
            "shorter than any checkpoint",
        ),
        ("cut in the metadata", good[..40].to_vec(), "checksum"),
        ("cut in half", good[..n / 2].to_vec(), "checksum"),
        ("last byte missing", good[..n - 1].to_vec(), "checksum"),
        (
            "a byte appended",
            [good.clone(), vec![0]].concat(),
            "checksum",
        ),
        ("magic", flip(0), "bad magic"),
        ("metadata length", flip(9), "checksum"),
        ("metadata", flip(20), "checksum"),
        ("first weight", flip(data_at + 1), "checksum"),
        ("last data byte", flip(n - 9), "checksum"),
        ("hash", flip(n - 1), "checksum"),
        // Damage behind a valid checksum reaches the structural checks.
        (
            "metadata length beyond the file",
            sealed(&long_len),
            "metadata length",
        ),
        ("metadata not JSON", sealed(&not_json), "metadata"),
        (
            "weights of another model",
            sealed(&crafted_meta),
            "does not match",
        ),
        ("data cut short", sealed(&body[..n - 8 - 4]), "ends early"),
        (
            "data too long",
            sealed(&[body, &[0u8; 4][..]].concat()),
            "trailing bytes",
        ),
    ];
    let mut m = model(6);
    fit(&mut m, 1, None); // other weights than the checkpoint's
    let before = m.get_weights();
    let bad = dir.path().join("damaged.cgckpt");
    for (what, bytes, why) in &damages {
        std::fs::write(&bad, bytes).unwrap();
        let mut h = History::default();
        let err = m.load_checkpoint(&bad, &mut h).expect_err(what).to_string();
        assert!(
            err.contains("damaged.cgckpt") && err.contains(why),
            "{what}: expected a refusal naming the file and {why:?}, got: {err}"
        );
        assert_eq!(
            m.get_weights(),
            before,
            "{what}: a refused load moved weights"
        );
        assert!(
            h.history.is_empty(),
            "{what}: a refused load filled the history"
        );
    }
    // A checkpoint of a model with other shapes is refused the same way.
    let other = tempfile::tempdir().unwrap();
    let mut small = model(4);
    fit(&mut small, 1, Some(CheckpointOptions::new(other.path())));
    let (_, p) = list_checkpoints(other.path()).pop().unwrap();
    let err = m
        .load_checkpoint(&p, &mut History::default())
        .expect_err("another model's checkpoint")
        .to_string();
    assert!(err.contains("does not match"), "{err}");
    assert_eq!(m.get_weights(), before);
    // And the undamaged file loads.
    let mut h = History::default();
    assert_eq!(m.load_checkpoint(&path, &mut h).unwrap(), 2);
    assert_eq!(h.get("loss").map(<[f64]>::len), Some(2));
}

#[test]
fn resume_falls_back_to_the_newest_checkpoint_that_loads() {
    // Uninterrupted: 3 epochs.
    let mut reference = model(6);
    let want_history = fit(&mut reference, 3, None);
    let want = reference.get_weights();

    // Interrupted after 2 epochs; the newest checkpoint (epoch 2) is then damaged in its
    // weight data, so a resume must fall back to epoch 1 and train epochs 2 and 3.
    let dir = tempfile::tempdir().unwrap();
    let after_two = trained_with_checkpoints(dir.path(), 2).get_weights();
    let ck = list_checkpoints(dir.path());
    assert_eq!(
        ck.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![1, 2],
        "the two newest checkpoints are kept"
    );
    let newest = &ck[1].1;
    let mut bytes = std::fs::read(newest).unwrap();
    let at = 16 + meta_len(&bytes) + 8;
    bytes[at] ^= 0x01;
    std::fs::write(newest, &bytes).unwrap();

    let mut resumed = model(6);
    let mut opts = CheckpointOptions::new(dir.path());
    opts.resume = true;
    let history = fit(&mut resumed, 3, Some(opts));
    let r = history.resumed.clone().expect("the run resumed");
    assert_eq!((r.epoch, &r.path), (1, &ck[0].1));
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert_eq!(&r.skipped[0].0, newest);
    assert!(
        r.skipped[0].1.contains("the checksum does not match"),
        "{:?}",
        r.skipped
    );
    assert_eq!(
        resumed.get_weights(),
        want,
        "the resumed run did not end where the uninterrupted one ends"
    );
    assert_ne!(after_two, want);
    assert_eq!(history.get("loss"), want_history.get("loss"));
    // The damaged file was replaced by the resumed run's own epoch 2.
    let ck = list_checkpoints(dir.path());
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 3]);
    let mut h = History::default();
    assert_eq!(model(6).load_checkpoint(&ck[0].1, &mut h).unwrap(), 2);
}

#[test]
fn resume_with_no_loadable_checkpoint_is_refused_naming_each_file() {
    // Every checkpoint damaged: the resume refuses, naming each file and why, rather
    // than starting again from epoch 1; no file changes and the model is untouched.
    let dir = tempfile::tempdir().unwrap();
    trained_with_checkpoints(dir.path(), 2);
    let ck = list_checkpoints(dir.path());
    assert_eq!(ck.len(), 2);
    let mut b = std::fs::read(&ck[0].1).unwrap();
    let at = b.len() - 9;
    b[at] ^= 0x40;
    std::fs::write(&ck[0].1, b).unwrap();
    std::fs::write(&ck[1].1, b"CGCKPT02 cut short").unwrap();
    let before = snapshot(dir.path());
    let mut resumed = model(6);
    let weights = resumed.get_weights();
    let err =
        try_fit(&mut resumed, 2, Some(resuming(dir.path()))).expect_err("no checkpoint loads");
    let msg = err.to_string();
    assert!(matches!(err, KerasError::NoCheckpointLoads { .. }), "{msg}");
    for (what, (_, p)) in [
        "the checksum does not match",
        "18 bytes: shorter than any checkpoint",
    ]
    .iter()
    .zip(&ck)
    {
        let name = p.display().to_string();
        assert!(
            msg.contains(&format!("{name}: {what}")),
            "the refusal does not name {name} with {what:?}: {msg}"
        );
    }
    assert!(msg.contains("none of the 2 checkpoints"), "{msg}");
    assert!(
        msg.contains("refusing to start again from epoch 1"),
        "{msg}"
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused resume changed files"
    );
    assert_eq!(
        resumed.get_weights(),
        weights,
        "a refused resume moved weights"
    );
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

fn resuming(dir: &Path) -> CheckpointOptions {
    let mut o = CheckpointOptions::new(dir);
    o.resume = true;
    o
}

fn try_fit(
    m: &mut Model,
    epochs: usize,
    ck: Option<CheckpointOptions>,
) -> Result<History, KerasError> {
    let (x, y) = data();
    let opts = FitOptions {
        batch_size: 8,
        epochs,
        seed: 11,
        verbose: false,
        checkpoint: ck,
        ..Default::default()
    };
    m.fit(&[x], &y, &opts)
}

#[test]
fn a_changed_configuration_is_refused_leaving_every_file_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    trained_with_checkpoints(dir.path(), 2);
    // A leftover partial write is kept too.
    std::fs::write(dir.path().join(".ckpt-00003.1.tmp"), b"partial").unwrap();
    let before = snapshot(dir.path());
    assert_eq!(before.len(), 3);
    let (x, _) = data();
    let mut x2 = x.clone();
    if let Tensor::F32(a) = &mut x2 {
        a[[23, 4, 3]] += 0.5; // one value of the last sample
    }
    let first_16 =
        |t: &Tensor| cellgraph::keras::train::take_rows(t, &(0..16).collect::<Vec<_>>()).unwrap();
    type Change = Box<dyn Fn(&mut Model, &mut FitOptions, &mut Tensor, &mut Tensor)>;
    fn change(
        f: impl Fn(&mut Model, &mut FitOptions, &mut Tensor, &mut Tensor) + 'static,
    ) -> Change {
        Box::new(f)
    }
    let changes: Vec<(&str, Change, &[&str])> = vec![
        (
            "optimizer",
            change(|m, _, _, _| {
                m.compile(
                    Optimizer::sgd(),
                    Loss::SparseCategoricalCrossentropy { from_logits: true },
                    &[Metric::Accuracy],
                )
            }),
            &["optimizer sgd(learning_rate=0.01, momentum=0.0, nesterov=false) here, adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7) in the checkpoint"],
        ),
        (
            "learning rate",
            change(|m, _, _, _| {
                m.compile(
                    Optimizer::Adam {
                        learning_rate: 0.01,
                        beta_1: 0.9,
                        beta_2: 0.999,
                        epsilon: 1e-7,
                    },
                    Loss::SparseCategoricalCrossentropy { from_logits: true },
                    &[Metric::Accuracy],
                )
            }),
            &["optimizer adam(learning_rate=0.01, "],
        ),
        (
            "clipping",
            change(|m, _, _, _| {
                m.set_clipping(cellgraph::keras::Clipping {
                    clipnorm: Some(1.0),
                    ..Default::default()
                })
                .unwrap()
            }),
            &["clipnorm=1.0 here"],
        ),
        (
            "loss",
            change(|m, _, _, _| {
                m.compile(
                    Optimizer::adam(),
                    Loss::SparseCategoricalCrossentropy { from_logits: true },
                    &[],
                )
            }),
            &["loss SparseCategoricalCrossentropy { from_logits: true } metrics [] here, SparseCategoricalCrossentropy { from_logits: true } metrics [accuracy] in the checkpoint"],
        ),
        (
            "batch size",
            change(|_, o, _, _| o.batch_size = 4),
            &["batch_size 4 here, 8 in the checkpoint"],
        ),
        (
            "seed",
            change(|_, o, _, _| o.seed = 12),
            &["seed 12 here, 11 in the checkpoint"],
        ),
        (
            "shuffle",
            change(|_, o, _, _| o.shuffle = false),
            &["shuffle false here, true in the checkpoint"],
        ),
        (
            "validation split",
            change(|_, o, _, _| o.validation_split = 0.25),
            &["validation split 0.25 here, none in the checkpoint"],
        ),
        (
            "one input value",
            {
                let x2 = x2.clone();
                change(move |_, _, x, _| *x = x2.clone())
            },
            &["data 24 samples (fnv64 "],
        ),
        (
            "fewer samples",
            change(move |_, _, x, y| {
                *x = first_16(x);
                *y = first_16(y);
            }),
            &["data 16 samples (fnv64 ", "here, 24 samples (fnv64 "],
        ),
        (
            "model and batch size together",
            change(|m, o, _, _| {
                *m = model(4);
                o.batch_size = 6;
            }),
            &["model Sequential[InputLayer, LSTM, Dense] (config fnv64 ", "; batch_size 6 here, 8 in the checkpoint"],
        ),
    ];
    for (what, change, want) in &changes {
        for resume in [true, false] {
            let mut m = model(6);
            let (mut x, mut y) = data();
            let mut opts = FitOptions {
                batch_size: 8,
                epochs: 3,
                seed: 11,
                verbose: false,
                ..Default::default()
            };
            change(&mut m, &mut opts, &mut x, &mut y);
            let mut ck = CheckpointOptions::new(dir.path());
            ck.resume = resume;
            opts.checkpoint = Some(ck);
            let weights = m.get_weights();
            let err = m
                .fit(&[x], &y, &opts)
                .expect_err(&format!("{what} (resume {resume}) was not refused"));
            let msg = err.to_string();
            assert!(
                matches!(err, KerasError::CheckpointMismatch { .. }),
                "{what}: {msg}"
            );
            assert!(
                msg.contains("ckpt-00002.cgckpt was written by another configuration: "),
                "{what}: {msg}"
            );
            for w in *want {
                assert!(
                    msg.contains(w),
                    "{what} (resume {resume}): no {w:?} in: {msg}"
                );
            }
            assert!(
                msg.contains("use another --checkpoint-dir, or remove the folder"),
                "{what}: {msg}"
            );
            assert_eq!(
                snapshot(dir.path()),
                before,
                "{what} (resume {resume}): a refused run changed files"
            );
            assert_eq!(m.get_weights(), weights, "{what}: a refused run trained");
        }
    }
    // The same configuration without `resume` is refused too (never overwritten)...
    let mut m = model(6);
    let err = try_fit(&mut m, 3, Some(CheckpointOptions::new(dir.path()))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KerasError::CheckpointsExist { .. }), "{msg}");
    assert!(
        msg.contains("of this configuration, the newest")
            && msg.contains("ckpt-00002.cgckpt after epoch 2")
            && msg.contains("pass --resume"),
        "{msg}"
    );
    assert_eq!(snapshot(dir.path()), before);
    // ...and with `resume` it continues.
    let h = try_fit(&mut m, 3, Some(resuming(dir.path()))).unwrap();
    let r = h.resumed.clone().expect("resumed");
    assert_eq!(r.epoch, 2);
    assert!(r.skipped.is_empty());
    assert_eq!(h.get("loss").map(<[f64]>::len), Some(3));
}

#[test]
fn a_first_format_checkpoint_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    trained_with_checkpoints(dir.path(), 1);
    let (_, p) = list_checkpoints(dir.path()).pop().unwrap();
    // The first format: magic CGCKPT01 and metadata without "format" and "config".
    let bytes = std::fs::read(&p).unwrap();
    let ml = meta_len(&bytes);
    let mut meta: serde_json::Value = serde_json::from_slice(&bytes[16..16 + ml]).unwrap();
    meta.as_object_mut().unwrap().remove("format");
    meta.as_object_mut().unwrap().remove("config");
    let meta = serde_json::to_vec(&meta).unwrap();
    let mut old = b"CGCKPT01".to_vec();
    old.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    old.extend_from_slice(&meta);
    old.extend_from_slice(&bytes[16 + ml..bytes.len() - 8]);
    std::fs::write(&p, sealed(&old)).unwrap();
    let before = snapshot(dir.path());
    for resume in [true, false] {
        let mut ck = CheckpointOptions::new(dir.path());
        ck.resume = resume;
        let err = try_fit(&mut model(6), 2, Some(ck)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KerasError::OldCheckpoint { .. }), "{msg}");
        assert!(
            msg.contains(&format!(
                "checkpoint {} has cellgraph's first checkpoint format (CGCKPT01)",
                p.display()
            )),
            "{msg}"
        );
        assert_eq!(snapshot(dir.path()), before);
    }
    let err = model(6)
        .load_checkpoint(&p, &mut History::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("CGCKPT01"), "{err}");
}

#[test]
fn data_and_options_that_leave_nothing_to_train_on_are_typed_errors() {
    let (x, y) = data();
    let none: Vec<usize> = Vec::new();
    let take = |t: &Tensor, idx: &[usize]| cellgraph::keras::train::take_rows(t, idx).unwrap();
    let base = || FitOptions {
        batch_size: 8,
        epochs: 1,
        verbose: false,
        ..Default::default()
    };
    let cases: Vec<(&str, Tensor, Tensor, FitOptions, &str)> = vec![
        (
            "0 samples",
            take(&x, &none),
            take(&y, &none),
            base(),
            "the targets have 0 samples",
        ),
        (
            "batch size 0",
            x.clone(),
            y.clone(),
            FitOptions {
                batch_size: 0,
                ..base()
            },
            "batch_size 0: it must be at least 1",
        ),
        (
            "split leaving 0 for validation",
            x.clone(),
            y.clone(),
            FitOptions {
                validation_split: 0.01,
                ..base()
            },
            "validation_split 0.01 of 24 samples leaves 24 for training and 0 for validation",
        ),
        (
            "split of one sample",
            take(&x, &[0]),
            take(&y, &[0]),
            FitOptions {
                validation_split: 0.999,
                ..base()
            },
            "leaves 1 for training and 0 for validation",
        ),
        (
            "split of 1",
            x.clone(),
            y.clone(),
            FitOptions {
                validation_split: 1.0,
                ..base()
            },
            "validation_split 1: it must be at least 0 and below 1",
        ),
        (
            "negative split",
            x.clone(),
            y.clone(),
            FitOptions {
                validation_split: -0.5,
                ..base()
            },
            "validation_split -0.5",
        ),
        (
            "NaN split",
            x.clone(),
            y.clone(),
            FitOptions {
                validation_split: f32::NAN,
                ..base()
            },
            "validation_split NaN",
        ),
        (
            "empty validation data",
            x.clone(),
            y.clone(),
            FitOptions {
                validation_data: Some((vec![take(&x, &none)], vec![take(&y, &none)])),
                ..base()
            },
            "validation_data has 0 samples",
        ),
    ];
    for (what, x, y, opts, want) in cases {
        let mut m = model(6);
        let w = m.get_weights();
        let err = m.fit(&[x], &y, &opts).expect_err(what);
        let msg = err.to_string();
        assert!(matches!(err, KerasError::Fit(_)), "{what}: {msg}");
        assert!(msg.contains(want), "{what}: expected {want:?} in {msg}");
        assert_eq!(m.get_weights(), w, "{what}: weights moved");
    }
    // Two samples with a split of 0.5 leave one on each side: trains.
    let mut m = model(6);
    let opts = FitOptions {
        validation_split: 0.5,
        ..base()
    };
    let h = m
        .fit(&[take(&x, &[0, 1])], &take(&y, &[0, 1]), &opts)
        .unwrap();
    assert_eq!(h.get("val_loss").map(<[f64]>::len), Some(1));
    // 0 epochs is Keras's no-op: an empty history, the weights unchanged.
    let mut m = model(6);
    let w = m.get_weights();
    let h = m
        .fit(
            std::slice::from_ref(&x),
            &y,
            &FitOptions {
                epochs: 0,
                ..base()
            },
        )
        .unwrap();
    assert!(h.history.is_empty());
    assert_eq!(m.get_weights(), w);
}

#[test]
fn an_unwritable_checkpoint_folder_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("checkpoints");
    for resume in [false, true] {
        let mut m = model(6);
        let w = m.get_weights();
        let mut ck = CheckpointOptions::new(&under);
        ck.resume = resume;
        let err = try_fit(&mut m, 1, Some(ck)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KerasError::NotWritable { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!("{}: cannot be written (", under.display()))
                && msg.contains("checked before training starts"),
            "{msg}"
        );
        assert_eq!(m.get_weights(), w, "it trained before refusing");
    }
}
