//! The Keras-style frontend: layers, `Sequential` and functional models, `summary()`,
//! Keras 3 `model.json` import, and running models on the CPU backend.
//!
//! Names, options, defaults and numbers follow Keras 3: a model built here with the
//! weights of a Keras model computes what Keras computes (checked against real Keras by
//! `cellgraph conformance keras`). Models lower to the IR: every recurrent layer becomes a
//! `Scan` over its cell written with primitive ops ([`Model::to_graph`]).
//!
//! ```
//! use cellgraph::keras::{Dense, Input, Sequential, LSTM};
//! use cellgraph::ir::Tensor;
//! # fn main() -> Result<(), cellgraph::keras::KerasError> {
//! let mut model = Sequential::new();
//! model.add(Input::new(&[None, Some(28)]))?;
//! model.add(LSTM::new(64))?;
//! model.add(Dense::new(10))?;
//! let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 28, 28]));
//! let y = model.predict(&[Tensor::F32(x)])?;
//! assert_eq!(y[0].shape(), &[2, 10]);
//! println!("{}", model.summary());
//! # Ok(()) }
//! ```

mod activation;
pub mod checkpoint;
mod config;
pub mod conformance;
pub mod custom;
mod emit;
mod export;
pub mod import;
pub mod init;
pub mod layers;

pub mod model;
pub mod summary;
pub mod train;

pub use checkpoint::{CheckpointOptions, Resumed, RunConfig};
pub use custom::{
    register_cell, registered_cell, registered_cells, CellBuilder, CellFactory, CellOps,
    CustomCell, CustomRnn, Nest, Sym,
};
pub use import::{load_model, load_model_with, model_from_json, model_from_json_with, LoadOptions};
pub use init::Init;
pub use layers::{
    Activation, BatchNormalization, Bidirectional, Cell, CellKind, Dense, Dropout, Embedding,
    GRUCell, Input, LSTMCell, Layer, Masking, MergeMode, Recurrent, RnnClass, Shape, SimpleRNN,
    SimpleRNNCell, StackedRNNCells, TimeDistributed, GRU, LSTM, RNN,
};
pub use model::{CallArgs, Functional, KerasTensor, LayerId, Model, Sequential, Weight};
pub use train::{
    Clipping, Evaluation, FitOptions, Gradients, History, Loss, Metric, Optimizer, OptimizerState,
};

/// Errors of the Keras frontend; each names the layer, input or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum KerasError {
    /// A layer option or value this frontend does not support.
    #[error("layer {layer:?}: {what} is not supported")]
    Unsupported {
        /// The layer's name.
        layer: String,
        /// The option and value.
        what: String,
    },
    /// A layer used wrongly (shapes, call arguments).
    #[error("layer {layer:?}: {msg}")]
    Layer {
        /// The layer's name.
        layer: String,
        /// What is wrong.
        msg: String,
    },
    /// A model input of the wrong shape, count or content.
    #[error("input {input:?}: {msg}")]
    Input {
        /// The input's name.
        input: String,
        /// What is wrong.
        msg: String,
    },
    /// Weights of the wrong number or shape.
    #[error("weights: {0}")]
    Weights(String),
    /// A malformed Keras model file.
    #[error("{path}: {msg}")]
    Config {
        /// The file and the place in it.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The lowered graph was rejected by the IR.
    #[error(transparent)]
    Ir(#[from] cellgraph_ir::Error),
    /// The backend failed to compile or run the graph.
    #[error(transparent)]
    Backend(#[from] cellgraph_backends::Error),
    /// `fit` options or data that leave nothing to train or validate on (no samples, a
    /// batch size of 0, a validation split leaving an empty side).
    #[error("fit: {0}")]
    Fit(String),
    /// A folder or file that training would write to cannot be written; found before
    /// training starts.
    #[error("{path}: cannot be written ({source}); checked before training starts")]
    NotWritable {
        /// The folder or file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint was written by another training configuration (model, optimizer,
    /// loss, batch size, shuffling, seed or data); nothing in its folder was changed.
    #[error(
        "checkpoint {file} was written by another configuration: {}; use another \
         --checkpoint-dir, or remove the folder {dir} to start over (nothing in it was \
         changed)",
        .differences.join("; ")
    )]
    CheckpointMismatch {
        /// The checkpoint file.
        file: String,
        /// Its folder.
        dir: String,
        /// One entry per field that differs: `batch_size 32 here, 64 in the checkpoint`.
        differences: Vec<String>,
    },
    /// A checkpoint of the first format (`CGCKPT01`), which records no training
    /// configuration and so cannot be checked against this run.
    #[error(
        "checkpoint {file} has cellgraph's first checkpoint format (CGCKPT01), which \
         records no training configuration, so it cannot be checked against this run; use \
         another --checkpoint-dir, or remove the folder {dir} to start over (nothing in it \
         was changed)"
    )]
    OldCheckpoint {
        /// The checkpoint file.
        file: String,
        /// Its folder.
        dir: String,
    },
    /// A run without `resume` found checkpoints in its folder; it refuses to overwrite
    /// them.
    #[error(
        "{dir} already holds checkpoints ({detail}); pass --resume to continue from them, \
         or use another --checkpoint-dir, or remove the folder to start over (nothing in \
         it was changed)"
    )]
    CheckpointsExist {
        /// The folder.
        dir: String,
        /// What they are: the newest, and whether it is of this configuration.
        detail: String,
    },
    /// `resume` found checkpoints but none of them loads; it refuses to start again from
    /// epoch 1.
    #[error(
        "cannot resume: none of the {} checkpoints in {dir} loads ({}); refusing to start \
         again from epoch 1: remove the folder (or use another --checkpoint-dir) to start \
         over",
        .failures.len(),
        .failures.join("; ")
    )]
    NoCheckpointLoads {
        /// The folder.
        dir: String,
        /// Each file with why it did not load (the message names the file).
        failures: Vec<String>,
    },
    /// A bug in cellgraph.
    #[error("internal error: {0}")]
    Internal(String),
}
