//! ONNX requires node names unique within a graph: the exporter suffixes repeats.

use cellgraph_ir::onnx::{export_model, Model};
use cellgraph_ir::{DType, Graph, Op, ValueType};

#[test]
fn repeated_node_names_are_made_unique_on_export() {
    let mut g = Graph::new("g");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2]))
        .expect("input");
    let a = g
        .add_node("relu", Op::Relu {}, &[Some(x)], &["a"])
        .expect("a");
    let a = cellgraph_ir::ValueRef { node: a, slot: 0 };
    // A later node already called `relu_2`: the repeat skips that name.
    let b = g
        .add_node("relu_2", Op::Relu {}, &[Some(a)], &["b"])
        .expect("b");
    let b = cellgraph_ir::ValueRef { node: b, slot: 0 };
    let c = g
        .add_node("relu", Op::Relu {}, &[Some(b)], &["c"])
        .expect("c");
    g.set_outputs(vec![cellgraph_ir::ValueRef { node: c, slot: 0 }])
        .expect("outputs");
    let proto = export_model(&Model::new(g));
    let names: Vec<String> = proto
        .graph
        .expect("graph")
        .node
        .iter()
        .map(|n| n.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["relu", "relu_2", "relu_3"]);
}
