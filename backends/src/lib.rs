//! cellgraph backends: the CPU backend, pattern rules and the selector, and later CUDA.
//!
//! Not implemented yet: this crate reserves its place in the workspace (it depends only
//! on `cellgraph-ir`, never on `autodiff` or the frontends). Kernels land with the CPU
//! backend issue.
