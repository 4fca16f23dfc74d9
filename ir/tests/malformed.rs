//! Targeted malformed-input tests: each is refused with a typed error naming the place.

use cellgraph_ir::onnx::proto::{self, attribute_proto::AttributeType, tensor_proto::DataLocation};
use cellgraph_ir::onnx::{import_model, ImportOptions, Model};
use cellgraph_ir::{DType, Error, Graph, Op, ValueRef, ValueType};
use prost::Message;
use std::time::Instant;

fn vi(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    use proto::type_proto;
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| proto::tensor_shape_proto::Dimension {
                            value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(d)),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn model(
    nodes: Vec<proto::NodeProto>,
    inits: Vec<proto::TensorProto>,
    outputs: &[&str],
) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(10),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(21),
        }],
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: vec![vi("x", &[2, 3])],
            output: outputs.iter().map(|o| vi(o, &[2, 3])).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn import(m: &proto::ModelProto) -> Result<Model, Error> {
    Model::from_bytes(&m.encode_to_vec())
}

#[test]
fn a_cycle_is_refused_naming_its_nodes() {
    let m = model(
        vec![
            node("Add", "first", &["x", "z"], &["y"]),
            node("Relu", "second", &["y"], &["z"]),
        ],
        vec![],
        &["z"],
    );
    match import(&m) {
        Err(Error::Cycle { graph, nodes }) => {
            assert_eq!(graph, "g");
            assert_eq!(nodes, vec!["first".to_string(), "second".to_string()]);
        }
        other => panic!("expected a cycle error, got {other:?}"),
    }
}

#[test]
fn a_dangling_value_name_is_refused_naming_reader_and_value() {
    let m = model(
        vec![node("Add", "adder", &["x", "nowhere"], &["y"])],
        vec![],
        &["y"],
    );
    let e = import(&m).expect_err("dangling input must fail");
    assert!(
        matches!(&e, Error::Dangling { name, user, .. } if name == "nowhere" && user.contains("adder")),
        "{e}"
    );
    let m = model(
        vec![node("Relu", "r", &["x"], &["y"])],
        vec![],
        &["not_there"],
    );
    let e = import(&m).expect_err("dangling output must fail");
    assert!(
        matches!(&e, Error::Dangling { name, user, .. } if name == "not_there" && user == "graph output"),
        "{e}"
    );
}

#[test]
fn a_2_pow_40_element_initializer_is_refused_before_allocation() {
    let huge = proto::TensorProto {
        name: Some("w".into()),
        dims: vec![1 << 20, 1 << 20],
        data_type: Some(1),
        raw_data: Some(vec![0; 16]),
        ..Default::default()
    };
    let m = model(
        vec![node("Add", "a", &["x", "w"], &["y"])],
        vec![huge],
        &["y"],
    );
    let t = Instant::now();
    let e = import(&m).expect_err("huge tensor must fail");
    assert!(t.elapsed().as_millis() < 500, "took {:?}", t.elapsed());
    match e {
        Error::Limit { what } => assert!(
            what.contains("initializer \"w\"") && what.contains("4398046511104 bytes"),
            "{what}"
        ),
        other => panic!("expected a limit error, got {other}"),
    }
    // Within the limit but with too little data: a tensor error, still no allocation.
    let short = proto::TensorProto {
        name: Some("w".into()),
        dims: vec![1 << 28],
        data_type: Some(1),
        raw_data: Some(vec![0; 16]),
        ..Default::default()
    };
    let m = model(
        vec![node("Add", "a", &["x", "w"], &["y"])],
        vec![short],
        &["y"],
    );
    assert!(matches!(import(&m), Err(Error::Tensor { name, .. }) if name.contains("\"w\"")));
}

#[test]
fn unknown_ops_domains_and_opsets_are_named() {
    let m = model(
        vec![node("FooBar", "mystery", &["x"], &["y"])],
        vec![],
        &["y"],
    );
    match import(&m) {
        Err(Error::UnsupportedOp {
            op,
            domain,
            version,
            node,
        }) => {
            assert_eq!(
                (op.as_str(), domain.as_str(), version, node.as_str()),
                ("FooBar", "", 21, "mystery")
            );
        }
        other => panic!("expected UnsupportedOp, got {other:?}"),
    }
    let mut n = node("Relu", "custom", &["x"], &["y"]);
    n.domain = Some("com.example".into());
    let mut m = model(vec![n], vec![], &["y"]);
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(3),
    });
    let e = import(&m).expect_err("custom domain op");
    assert!(
        matches!(&e, Error::UnsupportedOp { domain, version: 3, .. } if domain == "com.example"),
        "{e}"
    );
    // An op older than the semantics the IR implements.
    let mut m = model(
        vec![node("Slice", "old_slice", &["x"], &["y"])],
        vec![],
        &["y"],
    );
    m.opset_import[0].version = Some(9);
    let e = import(&m).expect_err("opset-9 Slice");
    assert!(
        e.to_string().contains("\"Slice\"") && e.to_string().contains("version 9"),
        "{e}"
    );
    let mut m = model(vec![node("Relu", "r", &["x"], &["y"])], vec![], &["y"]);
    m.opset_import[0].version = Some(99);
    assert!(matches!(
        import(&m),
        Err(Error::UnsupportedOpset { version: 99, .. })
    ));
}

#[test]
fn bad_attributes_are_named() {
    let mut n = node("Concat", "cat", &["x", "x"], &["y"]);
    n.attribute.push(proto::AttributeProto {
        name: Some("axis".into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(1.0),
        ..Default::default()
    });
    let e = import(&model(vec![n], vec![], &["y"])).expect_err("float axis");
    assert!(
        e.to_string().contains("cat")
            && e.to_string().contains("axis")
            && e.to_string().contains("expected INT"),
        "{e}"
    );
    let mut n = node("Relu", "r", &["x"], &["y"]);
    n.attribute.push(proto::AttributeProto {
        name: Some("alpha".into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(1.0),
        ..Default::default()
    });
    let e = import(&model(vec![n], vec![], &["y"])).expect_err("unknown attribute");
    assert!(e.to_string().contains("unknown attribute `alpha`"), "{e}");
}

fn external_model(location: &str, offset: Option<u64>) -> proto::ModelProto {
    let mut kv = vec![proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some(location.into()),
    }];
    if let Some(o) = offset {
        kv.push(proto::StringStringEntryProto {
            key: Some("offset".into()),
            value: Some(o.to_string()),
        });
    }
    let w = proto::TensorProto {
        name: Some("w".into()),
        dims: vec![2, 3],
        data_type: Some(1),
        data_location: Some(DataLocation::External as i32),
        external_data: kv,
        ..Default::default()
    };
    model(vec![node("Add", "a", &["x", "w"], &["y"])], vec![w], &["y"])
}

fn load_in(dir: &std::path::Path, m: &proto::ModelProto) -> Result<Model, Error> {
    let path = dir.join("model.onnx");
    std::fs::write(&path, m.encode_to_vec()).expect("write model");
    Model::load(&path)
}

#[test]
fn external_data_stays_inside_the_model_folder() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).expect("mkdir");
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(dir.join("w.bin"), &data).expect("write data");
    std::fs::write(root.path().join("secret.bin"), &data).expect("write secret");

    // Inside: loads, with the right values.
    let m = load_in(&dir, &external_model("w.bin", None)).expect("external data inside the folder");
    let w = m
        .graph
        .constant(m.graph.find("w").expect("w"))
        .expect("constant");
    assert_eq!(w.to_f64_vec(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

    for (loc, needle) in [
        ("../secret.bin", "leaves"),
        ("sub/../../secret.bin", "leaves"),
        ("/etc/passwd", "relative"),
    ] {
        let e = load_in(&dir, &external_model(loc, None)).expect_err(loc);
        assert!(
            matches!(&e, Error::Tensor { name, msg } if name.contains("\"w\"") && msg.contains(needle)),
            "{loc}: {e}"
        );
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.path().join("secret.bin"), dir.join("link.bin"))
            .expect("symlink");
        let e = load_in(&dir, &external_model("link.bin", None)).expect_err("symlink out");
        assert!(e.to_string().contains("outside the model's folder"), "{e}");
    }
    let e = load_in(&dir, &external_model("w.bin", Some(8))).expect_err("offset past the end");
    assert!(e.to_string().contains("past the end"), "{e}");
    // From bytes there is no folder at all.
    let e = import_model(
        &external_model("w.bin", None).encode_to_vec(),
        &ImportOptions::default(),
    )
    .expect_err("no folder");
    assert!(e.to_string().contains("not read from a folder"), "{e}");
}

#[test]
fn truncated_and_garbage_bytes_are_decode_errors() {
    let m = model(vec![node("Relu", "r", &["x"], &["y"])], vec![], &["y"]).encode_to_vec();
    assert!(Model::from_bytes(&m).is_ok());
    assert!(matches!(
        Model::from_bytes(&m[..m.len() - 3]),
        Err(Error::Decode(_))
    ));
    assert!(Model::from_bytes(b"\xff\xff\xff\xff\xff\xff").is_err());
    assert!(matches!(
        Model::from_bytes(b""),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn the_verifier_names_node_op_and_rule() {
    let mut g = Graph::new("v");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2]))
        .expect("input");
    let a = g
        .add_node("first", Op::Relu {}, &[Some(x)], &["a"])
        .expect("relu");
    let b = g
        .add_node(
            "second",
            Op::Neg {},
            &[Some(ValueRef { node: a, slot: 0 })],
            &["b"],
        )
        .expect("neg");
    g.set_outputs(vec![ValueRef { node: b, slot: 0 }])
        .expect("outputs");
    cellgraph_ir::verify(&g).expect("valid graph");
    // Rewire into a cycle.
    g.set_input(a, 0, Some(ValueRef { node: b, slot: 0 }));
    assert!(matches!(cellgraph_ir::verify(&g), Err(Error::Cycle { .. })));
    // Dtype mismatch at creation.
    let mut g = Graph::new("t");
    let x = g
        .add_input("x", ValueType::tensor(DType::F32, &[2]))
        .expect("input");
    let i = g
        .add_input("i", ValueType::tensor(DType::I64, &[2]))
        .expect("input");
    let e = g
        .add_node("mix", Op::Add {}, &[Some(x), Some(i)], &["y"])
        .expect_err("f32 + i64");
    assert!(
        matches!(&e, Error::Infer { node, op, msg } if node == "mix" && op == "Add" && msg.contains("dtype")),
        "{e}"
    );
    // Wrong arity.
    let e = g
        .add_node("one", Op::Add {}, &[Some(x)], &["z"])
        .expect_err("arity");
    assert!(
        e.to_string().contains("has 1 inputs, the op takes 2"),
        "{e}"
    );
    // Shape mismatch.
    let w = g
        .add_input("w", ValueType::tensor(DType::F32, &[3, 4]))
        .expect("input");
    let e = g
        .add_node("mm", Op::MatMul {}, &[Some(x), Some(w)], &["m"])
        .expect_err("2 vs 3");
    assert!(e.to_string().contains("inner dimensions differ"), "{e}");
    // Duplicate names.
    let e = g
        .add_node("dup", Op::Relu {}, &[Some(x)], &["x"])
        .expect_err("duplicate");
    assert!(matches!(e, Error::DuplicateName { .. }));
}
