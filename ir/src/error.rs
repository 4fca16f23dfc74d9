//! The IR's error type: every variant names the place at fault.

use crate::ops::AttrError;
use std::path::PathBuf;

/// Errors building, checking, reading or writing graphs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape or type rule rejected a node.
    #[error("node {node:?} ({op}): {msg}")]
    Infer {
        /// Node name.
        node: String,
        /// Op name.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// The verifier found a violated rule.
    #[error("verify: graph {graph:?}, node {node:?} ({op}): {rule}")]
    Verify {
        /// The (sub)graph name.
        graph: String,
        /// Node name (or value name for graph-level rules).
        node: String,
        /// Op name, or the node kind.
        op: String,
        /// The violated rule.
        rule: String,
    },
    /// An op the IR does not support.
    #[error("unsupported op {op:?} (domain {domain:?}, opset version {version}) at node {node:?}")]
    UnsupportedOp {
        /// Op type.
        op: String,
        /// Domain.
        domain: String,
        /// The domain's opset version in the model.
        version: i64,
        /// Node name.
        node: String,
    },
    /// An opset import the IR does not support.
    #[error("unsupported opset: domain {domain:?} version {version} ({why})")]
    UnsupportedOpset {
        /// Domain.
        domain: String,
        /// Version.
        version: i64,
        /// Why.
        why: String,
    },
    /// A node attribute is unknown, missing or malformed.
    #[error("node {node:?} ({op}): {source}")]
    Attr {
        /// Node name.
        node: String,
        /// Op name.
        op: String,
        /// The attribute problem.
        source: AttrError,
    },
    /// Two values share a name.
    #[error("graph {graph:?}: value name {name:?} is defined twice")]
    DuplicateName {
        /// The (sub)graph name.
        graph: String,
        /// The value name.
        name: String,
    },
    /// A node or graph output reads a value nobody defines.
    #[error("graph {graph:?}: {user} reads {name:?}, which is not defined")]
    Dangling {
        /// The (sub)graph name.
        graph: String,
        /// The value name.
        name: String,
        /// Who reads it (`node "n"` or `graph output`).
        user: String,
    },
    /// The nodes form a cycle.
    #[error("graph {graph:?}: nodes form a cycle through {nodes:?}")]
    Cycle {
        /// The (sub)graph name.
        graph: String,
        /// Names of nodes on or behind the cycle.
        nodes: Vec<String>,
    },
    /// A tensor (initializer, attribute, data file) is malformed.
    #[error("tensor {name:?}: {msg}")]
    Tensor {
        /// Tensor name or place.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A resource limit would be exceeded.
    #[error("limit exceeded: {what}")]
    Limit {
        /// What and by how much.
        what: String,
    },
    /// A malformed file.
    #[error("malformed {what}: {msg}")]
    Malformed {
        /// The file part (`ModelProto`, `graph "g" input 2`, ...).
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// The protobuf bytes do not decode.
    #[error("not a valid ONNX protobuf: {}", short_decode_error(.0))]
    Decode(#[from] prost::DecodeError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(String),
}

/// The IR's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A protobuf decoding error as `cause at Outer.field: … : Inner.field`, its field path
/// shortened: a file nested 20,000 deep would print every level; the outermost three and
/// innermost three say where it is. (prost lists the fields innermost first.)
pub(crate) fn short_decode_error(e: &prost::DecodeError) -> String {
    let text = e.to_string();
    let text = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    // Leading `Message.field: ` segments are the path; the rest is the cause (which
    // may hold ": " itself).
    let is_field = |p: &str| {
        p.split_once('.').is_some_and(|(m, f)| {
            let ok =
                |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            ok(m) && ok(f)
        })
    };
    let mut parts: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some((head, tail)) = rest.split_once(": ") {
        if !is_field(head) {
            break;
        }
        parts.push(head);
        rest = tail;
    }
    let cause = rest;
    if parts.is_empty() {
        return cause.to_string();
    }
    parts.reverse();
    let n = parts.len();
    let at = if n <= 6 {
        parts.join(": ")
    } else {
        format!(
            "{}: … ({} more levels) …: {}",
            parts[..3].join(": "),
            n - 6,
            parts[n - 3..].join(": ")
        )
    };
    let cause = if cause == "recursion limit reached" {
        "nested deeper than the protobuf decoder's limit of 100 messages"
    } else {
        cause
    };
    format!("{cause}, at {at}")
}
