//! Lowering: ONNX `LSTM`/`GRU`/`RNN` expanded into `Scan` loops over the cell's
//! primitive ops — the reference the fused kernels are tested against, and the inverse
//! of the later raise pass.

use crate::error::Result;
use cellgraph_ir::Graph;

/// Returns a copy of `graph` in which every recurrent op runs as a `Scan` loop.
pub fn lower_recurrent(graph: &Graph) -> Result<Graph> {
    Err(crate::error::Error::Compile(format!(
        "graph {:?}: lowering recurrent ops to loops is not implemented yet",
        graph.name
    )))
}
