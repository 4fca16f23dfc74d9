//! Tensor encodings of ONNX initializers and a sample of the shape rules.

use cellgraph_ir::onnx::proto;
use cellgraph_ir::onnx::{tensor_from_proto, tensor_to_proto, Limits};
use cellgraph_ir::ops::infer::broadcast;
use cellgraph_ir::ops::nn::{matmul_shape, parse_einsum};
use cellgraph_ir::ops::shape::{reshape_dims, slice_len};
use cellgraph_ir::{DType, Dim, Graph, Op, Tensor, ValueRef, ValueType};

fn typed(dtype: DType, dims: &[i64], f: impl FnOnce(&mut proto::TensorProto)) -> Tensor {
    let mut t = proto::TensorProto {
        dims: dims.to_vec(),
        data_type: Some(dtype.onnx_code()),
        ..Default::default()
    };
    f(&mut t);
    tensor_from_proto(&t, "t", None, &Limits::default()).expect("valid tensor")
}

#[test]
fn typed_fields_decode_like_raw_data() {
    let f = typed(DType::F32, &[2], |t| t.float_data = vec![1.5, -2.0]);
    assert_eq!(f.to_f64_vec(), vec![1.5, -2.0]);
    let d = typed(DType::F64, &[1], |t| t.double_data = vec![0.25]);
    assert_eq!(d.to_f64_vec(), vec![0.25]);
    let i = typed(DType::I64, &[3], |t| t.int64_data = vec![-1, 0, 7]);
    assert_eq!(i.as_i64_vec(), Some(vec![-1, 0, 7]));
    let b = typed(DType::Bool, &[2], |t| t.int32_data = vec![1, 0]);
    assert_eq!(b.to_f64_vec(), vec![1.0, 0.0]);
    let u8t = typed(DType::U8, &[2], |t| t.int32_data = vec![255, 3]);
    assert_eq!(u8t.as_i64_vec(), Some(vec![255, 3]));
    // f16 bit patterns in int32_data: 0x3C00 = 1.0, 0xC000 = -2.0.
    let h = typed(DType::F16, &[2], |t| t.int32_data = vec![0x3C00, 0xC000]);
    assert_eq!(h.to_f64_vec(), vec![1.0, -2.0]);
    let u64t = typed(DType::U64, &[1], |t| t.uint64_data = vec![u64::MAX]);
    assert_eq!(u64t.to_le_bytes(), u64::MAX.to_le_bytes().to_vec());
    // Scalars have no dims.
    let s = typed(DType::I32, &[], |t| t.int32_data = vec![42]);
    assert_eq!((s.shape(), s.as_i64_vec()), (&[][..], Some(vec![42])));
    // Raw and typed agree, and the writer's raw form reads back identically.
    for t in [f, d, i, b, u8t, h, u64t, s] {
        let back = tensor_from_proto(&tensor_to_proto("x", &t), "x", None, &Limits::default())
            .expect("round trip");
        assert_eq!(back, t);
    }
}

#[test]
fn wrong_typed_field_lengths_name_the_field() {
    let t = proto::TensorProto {
        dims: vec![3],
        data_type: Some(1),
        float_data: vec![1.0],
        ..Default::default()
    };
    let e =
        tensor_from_proto(&t, "initializer \"w\"", None, &Limits::default()).expect_err("short");
    assert!(
        e.to_string()
            .contains("float_data holds 1 values, the shape [3] needs 3"),
        "{e}"
    );
    let t = proto::TensorProto {
        dims: vec![2],
        data_type: Some(8),
        ..Default::default()
    };
    assert!(tensor_from_proto(&t, "s", None, &Limits::default())
        .expect_err("string")
        .to_string()
        .contains("data type code 8"));
}

fn k(d: &[u64]) -> Vec<Dim> {
    d.iter().map(|&x| Dim::Known(x)).collect()
}

#[test]
fn shape_rule_helpers() {
    let b = broadcast(&[Some(k(&[2, 1, 3])), Some(k(&[4, 1]))]).expect("broadcast");
    assert_eq!(b, Some(k(&[2, 4, 3])));
    assert!(broadcast(&[Some(k(&[2])), Some(k(&[3]))]).is_err());
    let sym = broadcast(&[
        Some(vec![Dim::Sym("batch".into()), Dim::Known(1)]),
        Some(k(&[5])),
    ])
    .expect("sym");
    assert_eq!(sym, Some(vec![Dim::Sym("batch".into()), Dim::Known(5)]));
    assert_eq!(
        matmul_shape(&k(&[7, 2, 3]), &k(&[3, 4])).expect("mm"),
        k(&[7, 2, 4])
    );
    assert_eq!(
        matmul_shape(&k(&[3]), &k(&[3, 4])).expect("vec-mat"),
        k(&[4])
    );
    assert_eq!(slice_len(10, 2, 8, 3), 2);
    assert_eq!(slice_len(10, -1, i64::MIN, -1), 10);
    assert_eq!(slice_len(10, 0, i64::MAX, 1), 10);
    assert_eq!(slice_len(5, 4, 1, 1), 0);
    assert_eq!(
        reshape_dims(Some(&k(&[2, 3, 4])), &[0, -1], false).expect("reshape"),
        k(&[2, 12])
    );
    assert!(reshape_dims(Some(&k(&[2, 3])), &[4, -1], false).is_err());
    let e = parse_einsum("bij,ijkl->bkl").expect("einsum");
    assert_eq!(
        e.inputs,
        vec![vec!['b', 'i', 'j'], vec!['i', 'j', 'k', 'l']]
    );
    assert_eq!(e.output, vec!['b', 'k', 'l']);
    assert_eq!(
        parse_einsum("ij,jk").expect("implicit").output,
        vec!['i', 'k']
    );
    assert!(parse_einsum("ij->q").is_err());
}

#[test]
fn recurrent_rules_check_weights_and_give_every_output() {
    let mut g = Graph::new("lstm");
    let f = |d: &[u64]| ValueType::tensor(DType::F32, d);
    let x = g.add_input("x", f(&[7, 2, 3])).expect("x");
    let w = g.add_input("w", f(&[2, 16, 3])).expect("w");
    let r = g.add_input("r", f(&[2, 16, 4])).expect("r");
    let lstm = Op::LSTM {
        activation_alpha: None,
        activation_beta: None,
        activations: None,
        clip: None,
        direction: "bidirectional".into(),
        hidden_size: Some(4),
        input_forget: 0,
        layout: 0,
    };
    let n = g
        .add_node(
            "l",
            lstm.clone(),
            &[Some(x), Some(w), Some(r)],
            &["y", "yh", "yc"],
        )
        .expect("lstm");
    let tys: Vec<String> = (0..3)
        .map(|s| g.value(ValueRef { node: n, slot: s }).ty.to_string())
        .collect();
    assert_eq!(tys, ["f32[7,2,2,4]", "f32[2,2,4]", "f32[2,2,4]"]);
    let bad_r = g.add_input("r3", f(&[2, 12, 3])).expect("r3");
    let e = g
        .add_node("bad", lstm, &[Some(x), Some(w), Some(bad_r)], &["y2"])
        .expect_err("mismatched R");
    assert!(e.to_string().contains("hidden_size 4 but R is"), "{e}");
}
