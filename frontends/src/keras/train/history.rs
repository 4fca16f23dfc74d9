//! What `fit` records per epoch.

use std::path::PathBuf;

/// `History.history`: one value per epoch for each logged quantity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// (name, per-epoch values), in the order Keras logs them.
    pub history: Vec<(String, Vec<f64>)>,
    /// Wall time of each epoch in seconds.
    pub epoch_seconds: Vec<f64>,
    /// Set by a `fit` that resumed from a checkpoint: which one, and the newer ones
    /// skipped because they did not load.
    pub resumed: Option<Resumed>,
}

impl History {
    pub(crate) fn push(&mut self, key: &str, v: f64) {
        match self.history.iter_mut().find(|(k, _)| k == key) {
            Some((_, vals)) => vals.push(v),
            None => self.history.push((key.to_string(), vec![v])),
        }
    }

    /// The values logged under `key` (`loss`, `val_accuracy`, ...).
    pub fn get(&self, key: &str) -> Option<&[f64]> {
        self.history
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Where a resumed `fit` started: in [`History::resumed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The checkpoint loaded.
    pub path: PathBuf,
    /// Its completed epochs.
    pub epoch: usize,
    /// Newer checkpoints that did not load and were skipped, each with the reason (also
    /// announced on standard error).
    pub skipped: Vec<(PathBuf, String)>,
}
