//! MNIST in IDX format (gzip-compressed or raw), and the bundled 10,000-digit subset.
//!
//! The bundled files (`frontends/data/mnist-10k`, real MNIST digits; see its README and
//! licence) are compiled into the binary, so the main job needs no download. A folder
//! with the four standard file names (`train-images-idx3-ubyte[.gz]`, ...) reads the full
//! 60,000/10,000 MNIST the same way.

use flate2::read::GzDecoder;
use ndarray::{ArrayD, IxDyn};
use std::io::Read;
use std::path::Path;

/// An IDX or MNIST loading error, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct IdxError {
    /// The file (or bundled name).
    pub file: String,
    /// What is wrong.
    pub msg: String,
}

/// The largest IDX payload accepted (bytes): far above full MNIST (47 MB).
pub const MAX_IDX_BYTES: usize = 1 << 30;

/// A decoded IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Idx {
    /// The dimensions.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Parses an IDX file (ubyte data only), gunzipping it first when it starts with the
/// gzip magic.
pub fn parse_idx(bytes: &[u8], file: &str) -> Result<Idx, IdxError> {
    parse_idx_with(bytes, file, MAX_IDX_BYTES, "")
}

/// [`parse_idx`] with a smaller payload limit than [`MAX_IDX_BYTES`]; `which` names the
/// limit in errors (` (--max-tensor-bytes)`).
pub fn parse_idx_with(
    bytes: &[u8],
    file: &str,
    max_bytes: usize,
    which: &str,
) -> Result<Idx, IdxError> {
    let max_bytes = max_bytes.min(MAX_IDX_BYTES);
    let err = |msg: String| IdxError {
        file: file.to_string(),
        msg,
    };
    let raw: Vec<u8>;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .take(max_bytes as u64 + 4 + 4 * 255 + 1)
            .read_to_end(&mut out)
            .map_err(|e| err(format!("gzip: {e}")))?;
        if out.len() > max_bytes + 4 + 4 * 255 {
            return Err(err(format!(
                "more than {max_bytes} bytes uncompressed{which}"
            )));
        }
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    if bytes.len() < 4 {
        return Err(err("shorter than the 4-byte IDX magic".into()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(format!(
            "bad magic {:02x}{:02x}{:02x}{:02x} (IDX starts with two zero bytes)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "data type 0x{:02x} (only unsigned bytes, 0x08, are supported)",
            bytes[2]
        )));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(err(format!(
            "a header of rank {rank} does not fit the file"
        )));
    }
    let mut dims = Vec::with_capacity(rank);
    let mut total: usize = 1;
    for k in 0..rank {
        let b = &bytes[4 + 4 * k..8 + 4 * k];
        let d = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        total = total
            .checked_mul(d)
            .filter(|&t| t <= max_bytes)
            .ok_or_else(|| {
                err(format!(
                    "dimensions {dims:?} × {d} are more than the limit of {max_bytes} bytes{which}"
                ))
            })?;
        dims.push(d);
    }
    let payload = &bytes[header..];
    if payload.len() != total {
        return Err(err(format!(
            "dimensions {dims:?} need {total} bytes, the file has {}",
            payload.len()
        )));
    }
    Ok(Idx {
        dims,
        data: payload.to_vec(),
    })
}

/// A train/test split of MNIST: images as `(n, 28, 28)` floats in [0, 1], labels 0–9.
#[derive(Clone, Debug)]
pub struct Mnist {
    /// Training images.
    pub train_images: ArrayD<f32>,
    /// Training labels.
    pub train_labels: Vec<u8>,
    /// Test images.
    pub test_images: ArrayD<f32>,
    /// Test labels.
    pub test_labels: Vec<u8>,
}

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

static BUNDLED: [&[u8]; 4] = [
    include_bytes!("../data/mnist-10k/train-images-idx3-ubyte.gz"),
    include_bytes!("../data/mnist-10k/train-labels-idx1-ubyte.gz"),
    include_bytes!("../data/mnist-10k/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../data/mnist-10k/t10k-labels-idx1-ubyte.gz"),
];

impl Mnist {
    /// The bundled subset: 7,996 training and 2,004 test digits.
    pub fn bundled() -> Result<Mnist, IdxError> {
        let files: Vec<(String, Vec<u8>)> = Mnist::file_names(None)
            .into_iter()
            .zip(BUNDLED)
            .map(|(n, b)| (n, b.to_vec()))
            .collect();
        Mnist::from_files(files)
    }

    /// The names of the four files as loading and errors name them: the paths
    /// [`Mnist::load`] reads in `dir` (`<name>.gz` when it is a file, else `<name>`), or
    /// the bundled names; training images, training labels, test images, test labels.
    pub fn file_names(dir: Option<&Path>) -> [String; 4] {
        FILES.map(|n| match dir {
            Some(dir) => Mnist::file_in(dir, n).display().to_string(),
            None => format!("bundled {n}.gz"),
        })
    }

    fn file_in(dir: &Path, n: &str) -> std::path::PathBuf {
        let gz = dir.join(format!("{n}.gz"));
        if gz.is_file() {
            gz
        } else {
            dir.join(n)
        }
    }

    /// Reads the four files from `dir` (`<name>.gz` or `<name>`), within the default
    /// limits.
    pub fn load(dir: &Path) -> Result<Mnist, IdxError> {
        Mnist::load_with(dir, &crate::ir::onnx::Limits::default())
    }

    /// [`Mnist::load`] within `limits`: each file's size (`max_file_bytes`, before it is
    /// read), each array as float32 (`max_tensor_bytes`, before it is decoded) and all
    /// of them together (`max_total_bytes`).
    pub fn load_with(dir: &Path, limits: &crate::ir::onnx::Limits) -> Result<Mnist, IdxError> {
        let mut files = Vec::new();
        for n in FILES {
            let path = Mnist::file_in(dir, n);
            let err = |msg: String| IdxError {
                file: path.display().to_string(),
                msg,
            };
            let len = std::fs::metadata(&path)
                .map_err(|e| err(e.to_string()))?
                .len();
            if len > limits.max_file_bytes {
                return Err(err(format!(
                    "the file has {len} bytes, more than the limit of {} (--max-file-bytes)",
                    limits.max_file_bytes
                )));
            }
            let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
            files.push((path.display().to_string(), bytes));
        }
        Mnist::from_files_with(files, limits)
    }

    fn from_files(files: Vec<(String, Vec<u8>)>) -> Result<Mnist, IdxError> {
        Mnist::from_files_with(files, &crate::ir::onnx::Limits::default())
    }

    fn from_files_with(
        files: Vec<(String, Vec<u8>)>,
        limits: &crate::ir::onnx::Limits,
    ) -> Result<Mnist, IdxError> {
        // Every byte becomes a 4-byte float (images) or stays a byte (labels): the
        // per-tensor limit allows a quarter of it in bytes of the file.
        let max = usize::try_from(limits.max_tensor_bytes / 4).unwrap_or(usize::MAX);
        let mut parsed = Vec::new();
        let mut total: u64 = 0;
        for (name, bytes) in &files {
            let which = format!(
                " ({} bytes as float32: --max-tensor-bytes)",
                limits.max_tensor_bytes
            );
            let idx = parse_idx_with(bytes, name, max, &which)?;
            total = total.saturating_add(idx.data.len() as u64 * 4);
            if total > limits.max_total_bytes {
                return Err(IdxError {
                    file: name.clone(),
                    msg: format!(
                        "the data up to this file take {total} bytes as float32, more than the limit of {} (--max-total-bytes)",
                        limits.max_total_bytes
                    ),
                });
            }
            parsed.push((name.clone(), idx));
        }
        let images = |(name, idx): &(String, Idx)| -> Result<ArrayD<f32>, IdxError> {
            if idx.dims.len() != 3 {
                return Err(IdxError {
                    file: name.clone(),
                    msg: format!("images of shape {:?}, expected (n, rows, cols)", idx.dims),
                });
            }
            let v: Vec<f32> = idx.data.iter().map(|&b| b as f32 / 255.0).collect();
            ArrayD::from_shape_vec(IxDyn(&idx.dims), v).map_err(|e| IdxError {
                file: name.clone(),
                msg: e.to_string(),
            })
        };
        let labels = |(name, idx): &(String, Idx), n: usize| -> Result<Vec<u8>, IdxError> {
            if idx.dims != [n] {
                return Err(IdxError {
                    file: name.clone(),
                    msg: format!("labels of shape {:?}, expected ({n},)", idx.dims),
                });
            }
            if let Some(bad) = idx.data.iter().find(|&&l| l > 9) {
                return Err(IdxError {
                    file: name.clone(),
                    msg: format!("label {bad} is not a digit"),
                });
            }
            Ok(idx.data.clone())
        };
        let train_images = images(&parsed[0])?;
        let test_images = images(&parsed[2])?;
        Ok(Mnist {
            train_labels: labels(&parsed[1], train_images.shape()[0])?,
            test_labels: labels(&parsed[3], test_images.shape()[0])?,
            train_images,
            test_images,
        })
    }
}

/// A 28×28 digit drawn with characters, darkest pixels as `@`.
pub fn render_digit(img: &ndarray::ArrayView2<f32>) -> String {
    let ramp: &[u8] = b" .:-=+*#%@";
    let mut s = String::new();
    for row in img.rows() {
        for &v in row {
            let k = ((v.clamp(0.0, 1.0) * (ramp.len() - 1) as f32).round()) as usize;
            let c = ramp[k] as char;
            s.push(c);
            s.push(c);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_subset_has_the_documented_counts() {
        let m = Mnist::bundled().unwrap();
        assert_eq!(m.train_images.shape(), &[7996, 28, 28]);
        assert_eq!(m.test_images.shape(), &[2004, 28, 28]);
        let mut per = [0usize; 10];
        for &l in &m.train_labels {
            per[l as usize] += 1;
        }
        assert_eq!(per, [800, 901, 792, 825, 784, 690, 811, 856, 755, 782]);
        assert!(m.train_images.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn malformed_idx_is_a_clear_error() {
        let e = parse_idx(&[0, 0, 8], "x").unwrap_err().to_string();
        assert!(e.contains("x: shorter than"), "{e}");
        let e = parse_idx(&[1, 0, 8, 1, 0, 0, 0, 1, 5], "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad magic"), "{e}");
        let e = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 5], "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data type 0x0d"), "{e}");
        let e = parse_idx(&[0, 0, 8, 1, 0, 0, 0, 2, 5], "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need 2 bytes, the file has 1"), "{e}");
        // 2^32-ish dimensions are refused before allocating.
        let e = parse_idx(&[0, 0, 8, 2, 255, 255, 255, 255, 255, 255, 255, 255], "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the limit of"), "{e}");
        let e = parse_idx(&[0x1f, 0x8b, 0, 0], "x").unwrap_err().to_string();
        assert!(e.contains("gzip"), "{e}");
        let ok = parse_idx(&[0, 0, 8, 1, 0, 0, 0, 2, 5, 6], "x").unwrap();
        assert_eq!(ok.dims, vec![2]);
        assert_eq!(ok.data, vec![5, 6]);
    }
}

/// Options of the main job (`cellgraph mnist`).
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// A folder with the full MNIST files; `None` uses the bundled subset.
    pub data: Option<std::path::PathBuf>,
    /// Training epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// The optimizer.
    pub optimizer: crate::keras::Optimizer,
    /// `RNN(LSTMCell(64))` instead of `LSTM(64)`.
    pub rnn_lstmcell: bool,
    /// Weight initialisation, shuffling and dropout seed.
    pub seed: u64,
    /// Where the trained model, its ONNX graph and the curves go.
    pub out: std::path::PathBuf,
    /// Train on the first `n` training digits and validate on the first `n/4` test
    /// digits, at least one (quick runs); `n` must be at least 1.
    pub limit: Option<usize>,
    /// Write a checkpoint after every epoch here.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Resume from the newest checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// Test fault: abort while writing the checkpoint of this epoch.
    pub abort_in_checkpoint: Option<usize>,
    /// Size limits for the IDX files of `data` (file size, each array and all arrays
    /// as float32).
    pub limits: crate::ir::onnx::Limits,
    /// Backends placed before the CPU ([`crate::keras::Model::set_backends`]); empty:
    /// the CPU alone.
    pub backends: Vec<std::sync::Arc<dyn crate::backends::Device>>,
}

/// What the main job measured.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// The training history (loss, accuracy, val_loss, val_accuracy per epoch).
    pub history: crate::keras::History,
    /// The final validation accuracy.
    pub val_accuracy: f64,
}

/// The guide's MNIST model: rows of a digit as a sequence of 28 steps of 28 pixels,
/// `LSTM(64)` (or `RNN(LSTMCell(64))`) → `BatchNormalization` → `Dense(10)` logits.
pub fn guide_model(
    rnn_lstmcell: bool,
    seed: u64,
) -> Result<crate::keras::Model, crate::keras::KerasError> {
    use crate::keras::{BatchNormalization, Dense, Input, LSTMCell, Layer, Sequential, LSTM, RNN};
    let rnn: Layer = if rnn_lstmcell {
        RNN::new(LSTMCell::new(64)).into()
    } else {
        LSTM::new(64).into()
    };
    let mut m = Sequential::with_seed(seed);
    m.add(Input::new(&[None, Some(28)]))?;
    m.add(rnn)?;
    m.add(BatchNormalization::new())?;
    m.add(Dense::new(10))?;
    Ok(m)
}

/// An output file the job writes after training: an existing one must be a file that
/// can be opened for writing (it is not truncated here); a missing one needs its folder,
/// checked separately.
fn check_output_file(path: &Path) -> Result<(), String> {
    let fail = |why: String| {
        format!(
            "{}: cannot be written ({why}); checked before training starts",
            path.display()
        )
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(fail("it is a folder".into())),
        Ok(_) => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|err| fail(err.to_string())),
        Err(_) => Ok(()),
    }
}

/// The main job: trains the guide's model on MNIST rows as sequences, prints the
/// summary, a progress line per epoch and one test digit with its prediction, and
/// writes the model (`OUT/model/`), its inference ONNX graph (`OUT/mnist_lstm.onnx`)
/// and the loss/accuracy curves (`OUT/curves.png`).
///
/// Before loading data or training it refuses 0 epochs, a batch size of 0 and a limit
/// of 0, and checks that every output (the folder, the model folder, the ONNX and PNG
/// files, the checkpoint folder) can be written; after loading, an empty training or
/// test set is an error naming its file. The checkpoint folder's contents are checked
/// against the run by `fit` (see [`crate::keras::checkpoint`]).
pub fn main_job(o: &JobOptions) -> Result<JobReport, String> {
    use crate::ir::Tensor;
    use crate::keras::checkpoint::check_writable_dir;
    use crate::keras::{FitOptions, Loss, Metric};
    let e = |err: crate::keras::KerasError| err.to_string();
    if o.epochs == 0 {
        return Err("0 epochs: the job needs at least 1".into());
    }
    if o.batch_size == 0 {
        return Err("a batch size of 0: it must be at least 1".into());
    }
    if o.limit == Some(0) {
        return Err("a limit of 0 digits: it must be at least 1".into());
    }
    check_writable_dir(&o.out).map_err(e)?;
    let mdir = o.out.join("model");
    if mdir.exists() {
        check_writable_dir(&mdir).map_err(e)?;
    }
    let onnx = o.out.join("mnist_lstm.onnx");
    let png = o.out.join("curves.png");
    check_output_file(&onnx)?;
    check_output_file(&png)?;
    if let Some(dir) = &o.checkpoint_dir {
        check_writable_dir(dir).map_err(e)?;
    }
    let mut data = match &o.data {
        Some(dir) => Mnist::load_with(dir, &o.limits).map_err(|err| err.to_string())?,
        None => Mnist::bundled().map_err(|err| err.to_string())?,
    };
    let names = Mnist::file_names(o.data.as_deref());
    if data.train_labels.is_empty() {
        return Err(format!(
            "{}: 0 training images: there is nothing to train on",
            names[0]
        ));
    }
    if data.test_labels.is_empty() {
        return Err(format!(
            "{}: 0 test images: there is nothing to validate on",
            names[2]
        ));
    }
    if let Some(n) = o.limit {
        let nt = n.min(data.train_labels.len());
        let nv = (n / 4).clamp(1, data.test_labels.len());
        let ti: Vec<usize> = (0..nt).collect();
        let vi: Vec<usize> = (0..nv).collect();
        data.train_images = data.train_images.select(ndarray::Axis(0), &ti);
        data.train_labels.truncate(nt);
        data.test_images = data.test_images.select(ndarray::Axis(0), &vi);
        data.test_labels.truncate(nv);
    }
    println!(
        "MNIST: {} training and {} test digits ({})",
        data.train_labels.len(),
        data.test_labels.len(),
        o.data
            .as_ref()
            .map_or("bundled subset".to_string(), |d| d.display().to_string())
    );
    let mut model = guide_model(o.rnn_lstmcell, o.seed).map_err(e)?;
    model.set_backends(o.backends.clone());
    print!("{}", model.summary());
    model.compile(
        o.optimizer,
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[Metric::Accuracy],
    );
    let labels = |v: &[u8]| {
        Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("labels"))
    };
    let x = Tensor::F32(data.train_images.clone());
    let y = labels(&data.train_labels);
    let vx = Tensor::F32(data.test_images.clone());
    let vy = labels(&data.test_labels);
    let opts = FitOptions {
        batch_size: o.batch_size,
        epochs: o.epochs,
        validation_data: Some((vec![vx.clone()], vec![vy])),
        seed: o.seed,
        checkpoint: o
            .checkpoint_dir
            .as_ref()
            .map(|dir| crate::keras::CheckpointOptions {
                dir: dir.clone(),
                keep: 2,
                resume: o.resume,
                abort_while_writing: o.abort_in_checkpoint,
            }),
        ..Default::default()
    };
    let history = model.fit(&[x], &y, &opts).map_err(e)?;
    let series = |k: &str| history.get(k).map(<[f64]>::to_vec).unwrap_or_default();
    let val_accuracy = series("val_accuracy").last().copied().unwrap_or(0.0);

    std::fs::create_dir_all(&o.out).map_err(|err| format!("{}: {err}", o.out.display()))?;
    model.save(&mdir).map_err(e)?;
    model.save_onnx(&onnx).map_err(e)?;
    crate::plot::training_curves(
        &png,
        &series("loss"),
        &series("val_loss"),
        &series("accuracy"),
        &series("val_accuracy"),
    )?;
    println!(
        "saved {} (Keras model.json + weights), {} (inference ONNX), {} (curves)",
        mdir.display(),
        onnx.display(),
        png.display()
    );

    // One test digit, as the guide shows with matplotlib.
    let digit = data.test_images.index_axis(ndarray::Axis(0), 0);
    let digit2 = digit
        .clone()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|err| err.to_string())?;
    let one = digit.to_owned().insert_axis(ndarray::Axis(0));
    let logits = model.predict(&[Tensor::F32(one)]).map_err(e)?;
    let l = logits[0].to_f64_vec();
    let pred = (0..l.len())
        .max_by(|&a, &b| l[a].total_cmp(&l[b]))
        .unwrap_or(0);
    print!("{}", render_digit(&digit2));
    println!(
        "Predicted result is: {pred}, target result is: {}",
        data.test_labels[0]
    );
    println!("val_accuracy: {val_accuracy:.4}");
    Ok(JobReport {
        history,
        val_accuracy,
    })
}
