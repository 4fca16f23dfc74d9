//! Training checkpoints: weights, optimizer state, epoch and history, written atomically
//! (temporary file, fsync, rename, fsync of the folder) so that a crash at any moment
//! leaves the newest complete checkpoint loadable.
//!
//! File layout (`ckpt-EEEEE.cgckpt`): the magic `CGCKPT01`, a little-endian u64 length
//! and that many bytes of JSON metadata, the raw little-endian f32 data of every weight
//! (in `get_weights()` order) and of the optimizer's moments (per trainable weight: m then
//! v), and a trailing FNV-1a 64 hash of everything before it. The random streams need no
//! state: `fit` derives each epoch's shuffling and dropout streams from the seeds.

use super::model::Model;
use super::train::History;
use super::KerasError;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

type R<T> = Result<T, KerasError>;

const MAGIC: &[u8; 8] = b"CGCKPT01";

/// Where and how `fit` writes checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    /// The folder (created if missing).
    pub dir: PathBuf,
    /// How many of the newest checkpoints to keep (at least 1).
    pub keep: usize,
    /// Resume from the newest complete checkpoint in `dir` before training.
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

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
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

impl Model {
    /// Serialises the training state after `epoch` completed epochs.
    fn checkpoint_bytes(&self, epoch: usize, history: &History) -> R<Vec<u8>> {
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
    ) -> R<PathBuf> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| io(&opts.dir, e))?;
        let bytes = self.checkpoint_bytes(epoch, history)?;
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
    /// (weight names and shapes) and its hash.
    pub fn load_checkpoint(&mut self, path: &Path, history: &mut History) -> R<usize> {
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
        let mut data = &body[16 + mlen..];
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
        self.set_weights(values)?;
        let iterations = meta["iterations"].as_u64().unwrap_or(0);
        let st = self.training.as_mut().ok_or_else(|| KerasError::Layer {
            layer: self.name.clone(),
            msg: "call compile() before loading a checkpoint".into(),
        })?;
        st.state = super::train::OptimizerState::from_parts(moments, iterations);
        history.history = serde_json::from_value(meta["history"].clone()).unwrap_or_default();
        history.epoch_seconds =
            serde_json::from_value(meta["epoch_seconds"].clone()).unwrap_or_default();
        Ok(meta["epoch"].as_u64().unwrap_or(0) as usize)
    }

    /// Loads the newest checkpoint of `dir` that is complete and matches the model;
    /// damaged or partial ones are skipped. `None` when there is none.
    pub(crate) fn restore_latest_checkpoint(
        &mut self,
        dir: &Path,
        history: &mut History,
    ) -> R<Option<(usize, PathBuf)>> {
        for (_, p) in list_checkpoints(dir).into_iter().rev() {
            let mut h = History::default();
            if let Ok(epoch) = self.load_checkpoint(&p, &mut h) {
                *history = h;
                return Ok(Some((epoch, p)));
            }
        }
        Ok(None)
    }
}
