//! cellgraph: recurrent neural networks in Rust.
//!
//! This facade re-exports the workspace crates and holds the `cellgraph` command line:
//! the IR and ONNX files ([`ir`]), the CPU backend with its fused LSTM/GRU/RNN kernels,
//! the raise rules and the selector ([`backends`]), reverse-mode autodiff ([`autodiff`]),
//! and the Keras-style frontend with training ([`keras`]).
//!
//! ```
//! use cellgraph::ir::onnx::Model;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/conformance/onnx-node/test_lstm_defaults/model.onnx");
//! let model = Model::load(path)?;
//! cellgraph::ir::verify(&model.graph)?;
//! println!("{}", cellgraph::ir::print_graph(&model.graph));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod conformance;
pub mod keras;
pub mod mnist;
pub mod npy;
pub mod plot;

pub use cellgraph_autodiff as autodiff;
pub use cellgraph_backends as backends;
pub use cellgraph_ir as ir;
