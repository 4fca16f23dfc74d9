//! ONNX has no "trainable" flag on initializers: export lists the non-trainable ones under
//! a metadata key and import reads it back (Keras's BatchNormalization moving statistics
//! stay non-trainable through an ONNX file).

use cellgraph_ir::onnx::{export_model, import_model, ImportOptions, Model, FROZEN_KEY};
use cellgraph_ir::{DType, Graph, NodeKind, Op, Tensor, ValueRef, ValueType};
use ndarray::ArrayD;

fn graph() -> Graph {
    let mut g = Graph::new("g");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[3]))
        .expect("input");
    let t = |v: f32| Tensor::F32(ArrayD::from_elem(vec![3], v));
    let w = g.add_initializer("w", t(2.0), true).expect("w");
    let m = g.add_initializer("moving_mean", t(0.5), false).expect("m");
    let a = g
        .add_node("mul", Op::Mul {}, &[Some(x), Some(w)], &["a"])
        .expect("mul");
    let b = g
        .add_node(
            "sub",
            Op::Sub {},
            &[Some(ValueRef { node: a, slot: 0 }), Some(m)],
            &["b"],
        )
        .expect("sub");
    g.set_outputs(vec![ValueRef { node: b, slot: 0 }])
        .expect("outputs");
    g
}

fn flags(g: &Graph) -> Vec<(String, bool)> {
    g.initializers()
        .iter()
        .map(|&n| match &g.node(n).kind {
            NodeKind::Initializer { trainable, .. } => (g.node(n).name.clone(), *trainable),
            _ => unreachable!("an initializer"),
        })
        .collect()
}

fn reimport(p: &cellgraph_ir::onnx::proto::ModelProto) -> Result<Model, cellgraph_ir::Error> {
    use prost::Message;
    import_model(&p.encode_to_vec(), &ImportOptions::default())
}

#[test]
fn non_trainable_initializers_survive_export_and_import() {
    let mut model = Model::new(graph());
    model.metadata.push(("author".into(), "test".into()));
    let p = export_model(&model);
    let keys: Vec<(&str, &str)> = p
        .metadata_props
        .iter()
        .map(|e| (e.key(), e.value()))
        .collect();
    assert_eq!(keys, [("author", "test"), (FROZEN_KEY, "moving_mean")]);
    let back = reimport(&p).expect("import");
    assert_eq!(
        flags(&back.graph),
        [("w".to_string(), true), ("moving_mean".to_string(), false)]
    );
    // The key is the flag's carrier, not metadata a caller sees (or would write twice).
    assert_eq!(back.metadata, [("author".to_string(), "test".to_string())]);
    assert_eq!(export_model(&back), p);
}

#[test]
fn a_model_whose_initializers_all_train_writes_no_key() {
    let mut g = graph();
    let m = g.initializers()[1];
    assert!(g.set_trainable(m, true));
    let p = export_model(&Model::new(g));
    assert!(p.metadata_props.is_empty(), "{:?}", p.metadata_props);
    let back = reimport(&p).expect("import");
    assert!(flags(&back.graph).iter().all(|(_, t)| *t));
}

#[test]
fn the_key_naming_no_initializer_is_refused_by_name() {
    let mut p = export_model(&Model::new(graph()));
    p.metadata_props[0].value = Some("moving_mean\nnot_there".into());
    let e = reimport(&p).expect_err("refused").to_string();
    assert!(
        e.contains(FROZEN_KEY) && e.contains("\"not_there\"") && e.contains("not an initializer"),
        "{e}"
    );
}
