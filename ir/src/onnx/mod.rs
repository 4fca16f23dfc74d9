//! ONNX files: `ModelProto` read into a [`Graph`] and written back, with prost types
//! generated from the vendored official `onnx.proto`.

mod export;
mod import;

pub use export::{export_model, model_to_bytes, tensor_to_proto};
pub use import::{
    decode_stored_value, import_model, tensor_from_proto, ImportOptions, Limits, StoredKind,
    StoredValue,
};

use crate::error::{Error, Result};
use crate::graph::Graph;
use std::path::Path;

/// The model metadata key (`metadata_props`) under which export lists the top-level
/// float initializers that training does not update (Keras's non-trainable weights, e.g.
/// BatchNormalization's moving statistics), one name per line. ONNX has no such flag;
/// import reads the key back into each initializer's `trainable` and does not keep it in
/// [`Model::metadata`], so a round trip gives the same model and the same bytes.
pub const FROZEN_KEY: &str = "cellgraph.non_trainable_initializers";

/// The prost types generated from `onnx.proto` and `onnx-data.proto` (package `onnx`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// The newest default-domain opset version the IR implements.
pub const MAX_ONNX_OPSET: i64 = 28;

/// The IR version written for graphs that were not read from a file.
pub const DEFAULT_IR_VERSION: i64 = 10;

/// A model: the main graph plus the `ModelProto` fields cellgraph keeps.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Model {
    /// ONNX IR version.
    pub ir_version: i64,
    /// Producer name.
    pub producer_name: String,
    /// Producer version.
    pub producer_version: String,
    /// Model domain.
    pub domain: String,
    /// Model version.
    pub model_version: i64,
    /// Documentation.
    pub doc: String,
    /// Metadata key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// The main graph (its opset imports are the model's).
    pub graph: Graph,
}

impl Model {
    /// A model around a graph built through the API.
    pub fn new(graph: Graph) -> Model {
        Model {
            ir_version: DEFAULT_IR_VERSION,
            producer_name: "cellgraph".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 0,
            doc: String::new(),
            metadata: Vec::new(),
            graph,
        }
    }

    /// Reads an `.onnx` file; external data is read from the file's folder only.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Model::load_with(path, &Limits::default())
    }

    /// Reads an `.onnx` file with the given limits.
    pub fn load_with(path: impl AsRef<Path>, limits: &Limits) -> Result<Model> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.len() > limits.max_file_bytes {
            return Err(Error::Limit {
                what: format!(
                    "{} is {} bytes, more than the limit of {}",
                    path.display(),
                    meta.len(),
                    limits.max_file_bytes
                ),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .map(Path::to_path_buf);
        import_model(
            &bytes,
            &ImportOptions {
                base_dir: base,
                limits: limits.clone(),
                ..ImportOptions::default()
            },
        )
    }

    /// Reads a model from bytes (external data is refused: there is no folder).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        import_model(bytes, &ImportOptions::default())
    }

    /// The serialized `ModelProto`.
    pub fn to_bytes(&self) -> Vec<u8> {
        model_to_bytes(self)
    }

    /// The serde (JSON) form of the model, for debugging and diffs.
    #[cfg(feature = "serde")]
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Json(e.to_string()))
    }

    /// Reads the serde (JSON) form written by [`Model::to_json`]; the graph is verified.
    #[cfg(feature = "serde")]
    pub fn from_json(text: &str) -> Result<Model> {
        let mut m: Model = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        m.graph.reindex();
        crate::verify::verify(&m.graph)?;
        Ok(m)
    }

    /// Writes an `.onnx` file (all tensors inline).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
