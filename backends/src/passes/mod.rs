//! Graph-to-graph passes no backend owns: every backend (and every frontend) uses them,
//! and they depend only on the IR (`cellgraph_ir`, whose `ops::rnn` holds the recurrent
//! ops' meaning) — never on a backend.
//!
//! - [`lower`] expands the fused recurrent ops (`LSTM`, `GRU`, `RNN` and their masked
//!   forms) into `Scan` loops over the cell's primitive ops: the loop path, and the
//!   reference the fused kernels are checked against.
//! - [`raise`] is its inverse: it recognises cells written as `Scan` loops (by the Keras
//!   frontend, by hand, in ONNX files) and replaces them with the fused op.
//! - [`select`] decides per recurrent node whether it runs on a backend's fused kernel or
//!   as a loop, and says why.

pub mod lower;
pub mod raise;
pub mod select;
