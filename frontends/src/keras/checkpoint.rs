//! Training checkpoints: weights, optimizer state, epoch and history, written atomically
//! (temporary file, fsync, rename, fsync of the folder) so that a crash at any moment
//! leaves the newest complete checkpoint loadable.
//!
//! File layout (`ckpt-EEEEE.cgckpt`): the magic `CGCKPT02`, a little-endian u64 length
//! and that many bytes of JSON metadata, the raw little-endian f32 data of every weight
//! (in `get_weights()` order) and of the optimizer's moments (per trainable weight: m then
//! v), and a trailing FNV-1a 64 hash of everything before it. The random streams need no
//! state: `fit` derives each epoch's shuffling and dropout streams from the seeds.
//!
//! The metadata records the run's configuration ([`RunConfig`]: model, optimizer, loss,
//! batch size, shuffling, seed, data and validation fingerprints) under `"config"`, with
//! `"format": 2`. A run refuses, before training and without changing any file, to
//! resume from checkpoints of another configuration, to resume when checkpoints exist but
//! none loads, and (without `resume`) to write into a folder that already holds
//! checkpoints. The first format (`CGCKPT01`, no configuration) is refused by name.

use super::model::Model;
use super::train::history::History;
pub use super::train::history::Resumed;
use super::KerasError;
use cellgraph_ir::Tensor;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

type R<T> = Result<T, KerasError>;

const MAGIC: &[u8; 8] = b"CGCKPT02";
/// The first format's magic: no recorded configuration.
const MAGIC_V1: &[u8; 8] = b"CGCKPT01";
/// The `"format"` field of the metadata.
const FORMAT: u64 = 2;

/// Where and how `fit` writes checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    /// The folder (created if missing).
    pub dir: PathBuf,
    /// How many of the newest checkpoints to keep (at least 1).
    pub keep: usize,
    /// Resume from the newest complete checkpoint in `dir` before training (none: start
    /// at epoch 1). Refused when a checkpoint of another configuration is met, or when
    /// checkpoints exist and none loads. Without it, a `dir` that holds any checkpoint is
    /// refused (never overwritten).
    pub resume: bool,
    /// Fault injection for tests: abort the process halfway through writing the
    /// checkpoint of this epoch (1-based), leaving a partial temporary file.
    pub abort_while_writing: Option<usize>,
}

impl CheckpointOptions {
    /// Checkpoints in `dir`, keeping the newest two, not resuming.
    pub fn new(dir: impl Into<PathBuf>) -> CheckpointOptions {
        CheckpointOptions {
            dir: dir.into(),
            keep: 2,
            resume: false,
            abort_while_writing: None,
        }
    }
}

/// What a run's checkpoints must share with a run that continues them: everything that
/// changes the weights an epoch computes. Stored in every checkpoint's metadata; `fit`
/// builds it from the model, its `compile` settings, the [`super::FitOptions`] and the
/// data. The epoch count is not part of it: a resumed run may train more epochs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    /// The model's layer classes and an FNV-1a 64 hash of its `to_json()` config.
    pub model: String,
    /// The optimizer with all its settings and the gradient clipping.
    pub optimizer: String,
    /// The loss and the metrics.
    pub loss: String,
    /// Samples per gradient step.
    pub batch_size: usize,
    /// Whether the training samples are shuffled every epoch.
    pub shuffle: bool,
    /// The shuffling (and dropout) seed.
    pub seed: u64,
    /// The training data: sample count and an FNV-1a 64 hash of every input and target
    /// tensor (dtype, shape and bytes).
    pub data: String,
    /// The validation: `none`, the split, or the validation data's fingerprint.
    pub validation: String,
}

impl RunConfig {
    fn fields(&self) -> [(&'static str, String); 8] {
        [
            ("model", self.model.clone()),
            ("optimizer", self.optimizer.clone()),
            ("loss", self.loss.clone()),
            ("batch_size", self.batch_size.to_string()),
            ("shuffle", self.shuffle.to_string()),
            ("seed", self.seed.to_string()),
            ("data", self.data.clone()),
            ("validation", self.validation.clone()),
        ]
    }

    fn to_json(&self) -> Value {
        json!({
            "model": self.model,
            "optimizer": self.optimizer,
            "loss": self.loss,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "data": self.data,
            "validation": self.validation,
        })
    }

    /// Each field of `self` that differs from the configuration recorded in a
    /// checkpoint's metadata (`config`), as `name HERE here, THERE in the checkpoint`;
    /// a field the checkpoint lacks counts as different.
    fn differences(&self, stored: &Value) -> Vec<String> {
        self.fields()
            .into_iter()
            .filter_map(|(name, here)| {
                let there = match &stored[name] {
                    Value::String(s) => s.clone(),
                    Value::Null => "nothing".to_string(),
                    v => v.to_string(),
                };
                (here != there).then(|| format!("{name} {here} here, {there} in the checkpoint"))
            })
            .collect()
    }
}

/// The fingerprint of a list of tensors: `N samples (fnv64 HASH)`, N the first
/// dimension of the first tensor, the hash over every tensor's dtype, shape and
/// little-endian bytes.
pub fn data_fingerprint(ts: &[&Tensor]) -> String {
    let mut h = Fnv::new();
    for &t in ts {
        h.write(format!("{:?}{:?}", t.dtype(), t.shape()).as_bytes());
        match t {
            Tensor::F32(a) => {
                for x in a.iter() {
                    h.write(&x.to_le_bytes());
                }
            }
            Tensor::U8(a) => {
                for &x in a.iter() {
                    h.write(&[x]);
                }
            }
            other => h.write(&other.to_le_bytes()),
        }
    }
    let n = ts
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(0);
    format!("{n} samples (fnv64 {:016x})", h.0)
}

/// Creates `dir` if missing and writes and removes a probe file in it, so that a folder
/// training cannot write is found before training starts.
pub fn check_writable_dir(dir: &Path) -> R<()> {
    let fail = |path: &Path, source| KerasError::NotWritable {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    let probe = dir.join(format!(".cellgraph-probe-{}.tmp", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut f| f.write_all(b"probe"));
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| fail(dir, e))?;
    removed.map_err(|e| fail(dir, e))
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// A checkpoint read and checked (size, magic, checksum, metadata) but not applied.
struct Parsed {
    bytes: Vec<u8>,
    meta: Value,
    data_start: usize,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(bytes);
    h.0
}

fn io(path: &Path, source: std::io::Error) -> KerasError {
    KerasError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> KerasError {
    KerasError::Config {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The checkpoint files of a folder, newest epoch last.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let name = p.file_name()?.to_str()?.to_string();
            let epoch = name
                .strip_prefix("ckpt-")?
                .strip_suffix(".cgckpt")?
                .parse()
                .ok()?;
            Some((epoch, p))
        })
        .collect();
    v.sort();
    v
}

fn name_of(dir: &Path) -> String {
    dir.display().to_string()
}

/// The error's message, starting with the file's name when it does not name it.
fn naming(path: &Path, e: KerasError) -> String {
    let why = e.to_string();
    let name = path.display().to_string();
    if why.contains(&name) {
        why
    } else {
        format!("{name}: {why}")
    }
}

/// Reads `path` and checks its size, magic, checksum and metadata.
fn read_checkpoint(path: &Path) -> R<Parsed> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    if bytes.len() < 24 {
        return Err(bad(
            path,
            format!(
                "{} bytes: shorter than any checkpoint (24), a partial or damaged file",
                bytes.len()
            ),
        ));
    }
    if &bytes[..8] == MAGIC_V1 {
        return Err(KerasError::OldCheckpoint {
            file: path.display().to_string(),
            dir: name_of(path.parent().unwrap_or(Path::new("."))),
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(bad(path, "not a cellgraph checkpoint (bad magic)"));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let mut h = [0u8; 8];
    h.copy_from_slice(tail);
    if fnv(body) != u64::from_le_bytes(h) {
        return Err(bad(
            path,
            "the checksum does not match (a partial or damaged file)",
        ));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&body[8..16]);
    let mlen = usize::try_from(u64::from_le_bytes(l))
        .ok()
        .filter(|&m| 16 + m <= body.len())
        .ok_or_else(|| bad(path, "metadata length beyond the file"))?;
    let meta: Value = serde_json::from_slice(&body[16..16 + mlen])
        .map_err(|e| bad(path, format!("metadata: {e}")))?;
    if meta["format"].as_u64() != Some(FORMAT) || !meta["config"].is_object() {
        return Err(bad(
            path,
            format!("metadata: not format {FORMAT} with a recorded configuration"),
        ));
    }
    Ok(Parsed {
        bytes,
        meta,
        data_start: 16 + mlen,
    })
}

impl Model {
    /// Serialises the training state after `epoch` completed epochs.
    fn checkpoint_bytes(&self, epoch: usize, history: &History, config: &RunConfig) -> R<Vec<u8>> {
        let st = self.training.as_ref().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "checkpoints need a compiled model".into(),
        })?;
        let (moments, iterations) = st.state.parts();
        let weights: Vec<Value> = self
            .weights()
            .iter()
            .map(|w| json!([w.name, w.value.shape()]))
            .collect();
        let meta = json!({
            "format": FORMAT,
            "config": config.to_json(),
            "epoch": epoch,
            "iterations": iterations,
            "history": history.history,
            "epoch_seconds": history.epoch_seconds,
            "weights": weights,
            "moments": moments.len(),
        });
        let meta = serde_json::to_vec(&meta).map_err(|e| KerasError::Internal(e.to_string()))?;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        for w in self.weights() {
            for &x in w.value.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        for (m, v) in moments {
            for &x in m.iter().chain(v.iter()) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let h = fnv(&out);
        out.extend_from_slice(&h.to_le_bytes());
        Ok(out)
    }

    /// Writes the checkpoint of `epoch` atomically and prunes older ones.
    pub(crate) fn write_checkpoint(
        &self,
        opts: &CheckpointOptions,
        epoch: usize,
        history: &History,
        config: &RunConfig,
    ) -> R<PathBuf> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| io(&opts.dir, e))?;
        let bytes = self.checkpoint_bytes(epoch, history, config)?;
        let tmp = opts
            .dir
            .join(format!(".ckpt-{epoch:05}.{}.tmp", std::process::id()));
        let dst = opts.dir.join(format!("ckpt-{epoch:05}.cgckpt"));
        {
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            if opts.abort_while_writing == Some(epoch) {
                // Test fault: half the file written and flushed, then a hard stop.
                let _ = f.write_all(&bytes[..bytes.len() / 2]);
                let _ = f.sync_all();
                std::process::abort();
            }
            f.write_all(&bytes).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
        if let Ok(d) = std::fs::File::open(&opts.dir) {
            let _ = d.sync_all();
        }
        let all = list_checkpoints(&opts.dir);
        let keep = opts.keep.max(1);
        if all.len() > keep {
            for (_, p) in &all[..all.len() - keep] {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(dst)
    }

    /// Loads a checkpoint into this (compiled) model: weights, optimizer state and
    /// history; returns the number of completed epochs. The file must match the model
    /// (weight names and shapes) and its hash. The recorded run configuration is not
    /// compared here (`fit` with `resume` does that).
    pub fn load_checkpoint(&mut self, path: &Path, history: &mut History) -> R<usize> {
        let parsed = read_checkpoint(path)?;
        self.apply_checkpoint(path, &parsed, history)
    }

    fn apply_checkpoint(
        &mut self,
        path: &Path,
        parsed: &Parsed,
        history: &mut History,
    ) -> R<usize> {
        let meta = &parsed.meta;
        let body = &parsed.bytes[..parsed.bytes.len() - 8];
        let names = meta["weights"].as_array().cloned().unwrap_or_default();
        let ws = self.weights();
        if names.len() != ws.len() {
            return Err(bad(
                path,
                format!("{} weights, the model has {}", names.len(), ws.len()),
            ));
        }
        for (n, w) in names.iter().zip(&ws) {
            let shape: Vec<usize> = n[1]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .unwrap_or_default();
            if n[0].as_str() != Some(w.name.as_str()) || shape != w.value.shape() {
                return Err(bad(path, format!("weight {} does not match the model", n)));
            }
        }
        let mut data = &body[parsed.data_start..];
        let mut take = |n: usize| -> R<Vec<f32>> {
            if data.len() < 4 * n {
                return Err(bad(path, "the data ends early"));
            }
            let (now, rest) = data.split_at(4 * n);
            data = rest;
            Ok(now
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let shapes: Vec<Vec<usize>> = ws.iter().map(|w| w.value.shape().to_vec()).collect();
        let mut values = Vec::new();
        for s in &shapes {
            let v = take(s.iter().product())?;
            values.push(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(s), v)
                    .map_err(|e| KerasError::Internal(e.to_string()))?,
            );
        }
        let trainable: Vec<Vec<usize>> = self
            .weights()
            .iter()
            .filter(|w| w.trainable)
            .map(|w| w.value.shape().to_vec())
            .collect();
        let n_moments = meta["moments"].as_u64().unwrap_or(0) as usize;
        let mut moments = Vec::new();
        if n_moments > 0 {
            if n_moments != trainable.len() {
                return Err(bad(
                    path,
                    "optimizer state does not match the trainable weights",
                ));
            }
            for s in &trainable {
                let n: usize = s.iter().product();
                let m = take(n)?;
                let v = take(n)?;
                let arr = |x: Vec<f32>| {
                    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(s), x)
                        .map_err(|e| KerasError::Internal(e.to_string()))
                };
                moments.push((arr(m)?, arr(v)?));
            }
        }
        if !data.is_empty() {
            return Err(bad(path, "trailing bytes after the data"));
        }
        if self.training.is_none() {
            return Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: "call compile() before loading a checkpoint".into(),
            });
        }
        self.set_weights(values)?;
        let iterations = meta["iterations"].as_u64().unwrap_or(0);
        if let Some(st) = self.training.as_mut() {
            st.state = super::train::optimizer::OptimizerState::from_parts(moments, iterations);
        }
        history.history = serde_json::from_value(meta["history"].clone()).unwrap_or_default();
        history.epoch_seconds =
            serde_json::from_value(meta["epoch_seconds"].clone()).unwrap_or_default();
        Ok(meta["epoch"].as_u64().unwrap_or(0) as usize)
    }

    /// Before training: checks the checkpoint folder against this run's configuration
    /// and, with `resume`, loads the newest checkpoint that loads. Refuses (changing no
    /// file) when a checkpoint of another configuration or of the first format is found,
    /// when `resume` finds checkpoints of which none loads, and when a run without
    /// `resume` finds checkpoints at all; then checks that the folder can be written.
    /// Newer checkpoints skipped on the way are announced on standard error and listed
    /// in the returned [`Resumed`].
    pub(crate) fn prepare_checkpoints(
        &mut self,
        opts: &CheckpointOptions,
        config: &RunConfig,
        history: &mut History,
    ) -> R<Option<Resumed>> {
        let dir = &opts.dir;
        let all = list_checkpoints(dir);
        let mismatch = |p: &Path, parsed: &Parsed| -> Option<KerasError> {
            let differences = config.differences(&parsed.meta["config"]);
            (!differences.is_empty()).then(|| KerasError::CheckpointMismatch {
                file: p.display().to_string(),
                dir: name_of(dir),
                differences,
            })
        };
        if !opts.resume {
            if let Some((epoch, newest)) = all.last() {
                let detail = match read_checkpoint(newest) {
                    Ok(parsed) => {
                        if let Some(e) = mismatch(newest, &parsed) {
                            return Err(e);
                        }
                        format!(
                            "of this configuration, the newest {} after epoch {epoch}",
                            newest.display()
                        )
                    }
                    Err(e @ KerasError::OldCheckpoint { .. }) => return Err(e),
                    Err(e) => format!("the newest does not load: {e}"),
                };
                return Err(KerasError::CheckpointsExist {
                    dir: name_of(dir),
                    detail,
                });
            }
            check_writable_dir(dir)?;
            return Ok(None);
        }
        let mut skipped: Vec<(PathBuf, String)> = Vec::new();
        for (_, p) in all.iter().rev() {
            let parsed = match read_checkpoint(p) {
                Ok(parsed) => parsed,
                Err(e @ KerasError::OldCheckpoint { .. }) => return Err(e),
                Err(e) => {
                    skipped.push((p.clone(), naming(p, e)));
                    continue;
                }
            };
            if let Some(e) = mismatch(p, &parsed) {
                return Err(e);
            }
            let mut h = History::default();
            match self.apply_checkpoint(p, &parsed, &mut h) {
                Ok(epoch) => {
                    check_writable_dir(dir)?;
                    for (_, why) in &skipped {
                        eprintln!(
                            "warning: checkpoint {why}; skipped it, resuming from the older {}",
                            p.display()
                        );
                    }
                    *history = h;
                    return Ok(Some(Resumed {
                        path: p.clone(),
                        epoch,
                        skipped,
                    }));
                }
                Err(e) => skipped.push((p.clone(), naming(p, e))),
            }
        }
        if !skipped.is_empty() {
            return Err(KerasError::NoCheckpointLoads {
                dir: name_of(dir),
                failures: skipped.into_iter().map(|(_, why)| why).collect(),
            });
        }
        check_writable_dir(dir)?;
        Ok(None)
    }
}
