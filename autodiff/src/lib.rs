//! Reverse-mode automatic differentiation over the cellgraph IR.
//!
//! Not implemented yet: this crate reserves its place in the workspace (it depends only
//! on `cellgraph-ir`). The gradient pass lands with the autodiff issue.
