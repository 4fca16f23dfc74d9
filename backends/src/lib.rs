//! cellgraph backends: compile a [`Graph`] into a plan once, run the plan many times.
//!
//! Today there is the CPU backend ([`cpu::CpuBackend`]): a kernel for every op of the IR
//! with ONNX semantics, `Scan`/`Loop`/`If` run as loops over their compiled bodies, and
//! fused kernels for ONNX `LSTM`/`GRU`/`RNN`. The backend-neutral passes live in
//! [`passes`]: [`passes::lower`] expands the recurrent ops into `Scan` loops over the
//! cell's primitive ops (the reference the fused kernels are checked against),
//! [`passes::raise`] is its inverse, recognising cells written as `Scan` loops (by the
//! Keras frontend, by hand, in ONNX files), and [`passes::select`] decides per recurrent
//! node whether it runs on a backend's fused kernel or as a loop, and why. The passes
//! import nothing from a backend; only `cpu/` imports `cpu::` (checked by
//! `scripts/check-layout.sh`). Of the workspace this crate depends only on `cellgraph-ir`.

#![warn(missing_docs)]

pub mod budget;
pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod gemm;
pub mod num;
pub mod packed;
pub mod passes;
pub mod placed;
pub mod schedule;
pub mod subset;

pub use budget::Budget;
pub use data::Data;
pub use device::{Device, DevicePlan, Value};
pub use error::{Error, Result};
pub use placed::PlacedPlan;

use cellgraph_ir::Graph;

/// A backend compiles graphs into runnable plans.
pub trait Backend {
    /// The compiled form of a graph.
    type Plan: Plan;
    /// The backend's name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// Compiles `graph` (verified by the caller) into a plan.
    fn compile(&self, graph: &Graph) -> Result<Self::Plan>;
}

/// A compiled graph.
pub trait Plan {
    /// Runs the plan on values for the graph inputs, in order; returns the graph outputs.
    fn run(&mut self, inputs: Vec<Data>) -> Result<Vec<Data>>;
}
