//! The backends' error type.

/// Errors compiling or running a plan.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A kernel rejected its inputs at run time.
    #[error("node {node:?} ({op}): {msg}")]
    Kernel {
        /// Node name.
        node: String,
        /// Op name.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// The caller's inputs do not fit the graph.
    #[error("input {name:?}: {msg}")]
    Input {
        /// Graph input name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A run went over its budget ([`crate::budget::Budget`]): memory, loop trips or time.
    #[error("node {node:?} ({op}): asks for {}; the {} is {}", .overrun.asked, .overrun.exceeded.describe(), .overrun.limit)]
    Budget {
        /// Node name.
        node: String,
        /// Op name.
        op: String,
        /// Which limit, what was asked and the limit.
        overrun: crate::budget::Overrun,
    },
    /// The graph cannot be compiled.
    #[error("compile: {0}")]
    Compile(String),
    /// An IR error (from a rewrite).
    #[error(transparent)]
    Ir(#[from] std::sync::Arc<cellgraph_ir::Error>),
}

impl From<cellgraph_ir::Error> for Error {
    fn from(e: cellgraph_ir::Error) -> Error {
        Error::Ir(std::sync::Arc::new(e))
    }
}

/// The backends' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
