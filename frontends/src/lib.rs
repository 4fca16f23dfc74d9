//! cellgraph: recurrent neural networks in Rust.
//!
//! This facade re-exports the workspace crates. Today it offers the IR and ONNX files
//! ([`ir`]); the backends, autodiff and the Keras-style frontend land in later issues.

pub use cellgraph_autodiff as autodiff;
pub use cellgraph_backends as backends;
pub use cellgraph_ir as ir;
