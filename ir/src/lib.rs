//! cellgraph's IR: dtypes, tensors, symbolic shapes, the ONNX-aligned op set, `Graph`
//! (on petgraph) with shape inference at node creation, the verifier, the text printer
//! and DOT output, and ONNX files in and out.
//!
//! ```
//! use cellgraph_ir::{DType, Graph, Op, ValueType, print_graph, verify};
//! let mut g = Graph::new("add");
//! let a = g.add_input("a", ValueType::tensor(DType::F32, &[2, 3])).unwrap();
//! let b = g.add_input("b", ValueType::tensor(DType::F32, &[3])).unwrap();
//! let n = g.add_node("", Op::Add {}, &[Some(a), Some(b)], &["c"]).unwrap();
//! g.set_outputs(vec![cellgraph_ir::ValueRef { node: n, slot: 0 }]).unwrap();
//! verify(&g).unwrap();
//! assert!(print_graph(&g).contains("%c = Add(%a, %b) : f32[2,3]"));
//! ```

#![warn(missing_docs)]

pub mod builder;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod onnx;
pub mod ops;
pub mod print;
pub mod tensor;
pub mod types;
pub mod verify;

pub use dtype::DType;
pub use error::{Error, Result};
pub use graph::{Edge, Graph, Node, NodeId, NodeKind, Value, ValueRef};
pub use ops::{Op, OpKind};
pub use print::{print_graph, to_dot};
pub use tensor::Tensor;
pub use types::{Dim, TensorType, ValueType};
pub use verify::verify;
