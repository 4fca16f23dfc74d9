//! [`Model`] → `ModelProto`. Tensors are written inline as `raw_data`; attributes equal to
//! their default are left out; declared value types are written as `value_info`.

use super::proto;
use super::Model;
use crate::graph::{Graph, NodeKind};
use crate::ops::AttrRef;
use crate::tensor::Tensor;
use crate::types::{Dim, ValueType};
use prost::Message;

/// The serialized `ModelProto` of a model.
pub fn model_to_bytes(m: &Model) -> Vec<u8> {
    export_model(m).encode_to_vec()
}

/// Builds the `ModelProto` of a model.
pub fn export_model(m: &Model) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(m.ir_version),
        opset_import: m
            .graph
            .opsets()
            .iter()
            .map(|(d, &v)| proto::OperatorSetIdProto {
                domain: Some(d.clone()),
                version: Some(v),
            })
            .collect(),
        producer_name: Some(m.producer_name.clone()),
        producer_version: Some(m.producer_version.clone()),
        domain: Some(m.domain.clone()),
        model_version: Some(m.model_version),
        doc_string: (!m.doc.is_empty()).then(|| m.doc.clone()),
        graph: Some(graph_to_proto(&m.graph)),
        metadata_props: m
            .metadata
            .iter()
            .filter(|(k, _)| k != super::FROZEN_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(frozen_initializers(&m.graph).map(|v| (super::FROZEN_KEY.to_string(), v)))
            .map(|(k, v)| proto::StringStringEntryProto {
                key: Some(k),
                value: Some(v),
            })
            .collect(),
        ..Default::default()
    }
}

/// The names of the top-level float initializers training does not update, one per line
/// (the value of [`super::FROZEN_KEY`]); `None` when every one is trainable.
fn frozen_initializers(g: &Graph) -> Option<String> {
    let names: Vec<&str> = g
        .initializers()
        .iter()
        .filter_map(|&n| match &g.node(n).kind {
            NodeKind::Initializer {
                tensor,
                trainable: false,
            } if tensor.dtype().is_float() => Some(g.node(n).name.as_str()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then(|| names.join("\n"))
}

/// A `TensorProto` with the data in `raw_data`.
pub fn tensor_to_proto(name: &str, t: &Tensor) -> proto::TensorProto {
    proto::TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx_code()),
        name: (!name.is_empty()).then(|| name.to_string()),
        raw_data: Some(t.to_le_bytes()),
        ..Default::default()
    }
}

fn type_to_proto(t: &ValueType) -> Option<proto::TypeProto> {
    use proto::type_proto as tp;
    let value = match t {
        ValueType::Unknown => return None,
        ValueType::Tensor(tt) => tp::Value::TensorType(tp::Tensor {
            elem_type: Some(tt.dtype.map(|d| d.onnx_code()).unwrap_or(0)),
            shape: tt.shape.as_ref().map(|dims| proto::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| proto::tensor_shape_proto::Dimension {
                        value: match d {
                            Dim::Known(n) => Some(
                                proto::tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                            ),
                            Dim::Sym(s) => Some(
                                proto::tensor_shape_proto::dimension::Value::DimParam(s.clone()),
                            ),
                            Dim::Unknown => None,
                        },
                        denotation: None,
                    })
                    .collect(),
            }),
        }),
        ValueType::Sequence(e) => tp::Value::SequenceType(Box::new(tp::Sequence {
            elem_type: type_to_proto(e).map(Box::new),
        })),
        ValueType::Optional(e) => tp::Value::OptionalType(Box::new(tp::Optional {
            elem_type: type_to_proto(e).map(Box::new),
        })),
    };
    Some(proto::TypeProto {
        value: Some(value),
        denotation: None,
    })
}

fn value_info(name: &str, t: &ValueType) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.to_string()),
        r#type: type_to_proto(t),
        ..Default::default()
    }
}

fn attr_to_proto(name: &str, a: AttrRef<'_>) -> proto::AttributeProto {
    use proto::attribute_proto::AttributeType as T;
    let mut p = proto::AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ty = match a {
        AttrRef::Int(i) => {
            p.i = Some(i);
            T::Int
        }
        AttrRef::Float(f) => {
            p.f = Some(f);
            T::Float
        }
        AttrRef::String(s) => {
            p.s = Some(s.as_bytes().to_vec());
            T::String
        }
        AttrRef::Ints(v) => {
            p.ints = v.to_vec();
            T::Ints
        }
        AttrRef::Floats(v) => {
            p.floats = v.to_vec();
            T::Floats
        }
        AttrRef::Strings(v) => {
            p.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            T::Strings
        }
        AttrRef::Tensor(t) => {
            p.t = Some(tensor_to_proto("", t));
            T::Tensor
        }
        AttrRef::Graph(g) => {
            p.g = Some(graph_to_proto(g));
            T::Graph
        }
        AttrRef::Tensors(v) => {
            p.tensors = v.iter().map(|t| tensor_to_proto("", t)).collect();
            T::Tensors
        }
        AttrRef::Graphs(v) => {
            p.graphs = v.iter().map(graph_to_proto).collect();
            T::Graphs
        }
        AttrRef::TypeProto(t) => {
            p.tp = type_to_proto(t);
            T::TypeProto
        }
        AttrRef::TypeProtos(v) => {
            p.type_protos = v
                .iter()
                .map(|t| type_to_proto(t).unwrap_or_default())
                .collect();
            T::TypeProtos
        }
    };
    p.r#type = Some(ty as i32);
    p
}

/// Builds the `GraphProto` of a graph (nodes in the printer's topological order).
pub fn graph_to_proto(g: &Graph) -> proto::GraphProto {
    let mut gp = proto::GraphProto {
        name: Some(g.name.clone()),
        doc_string: (!g.doc.is_empty()).then(|| g.doc.clone()),
        ..Default::default()
    };
    for &n in g.inputs() {
        let node = g.node(n);
        let v = &node.outputs[0];
        gp.input.push(value_info(&v.name, &v.ty));
        if let NodeKind::Input { default: Some(t) } = &node.kind {
            gp.initializer.push(tensor_to_proto(&v.name, t));
        }
    }
    for &n in g.initializers() {
        let node = g.node(n);
        if let NodeKind::Initializer { tensor, .. } = &node.kind {
            gp.initializer
                .push(tensor_to_proto(&node.outputs[0].name, tensor));
        }
    }
    let order = g.topo_order().unwrap_or_else(|_| {
        g.node_ids()
            .into_iter()
            .filter(|&n| g.node(n).op().is_some())
            .collect()
    });
    let out_set: std::collections::HashSet<_> = g.outputs().iter().copied().collect();
    // ONNX wants node names unique within a graph: a repeated one gets `_2`, `_3`, ...
    let mut taken: std::collections::HashSet<String> =
        order.iter().map(|&n| g.node(n).name.clone()).collect();
    let mut seen = std::collections::HashSet::new();
    for n in order {
        let node = g.node(n);
        let Some(op) = node.op() else { continue };
        let info = op.kind().info();
        let mut name = node.name.clone();
        if !name.is_empty() && !seen.insert(name.clone()) {
            let mut k = 2;
            while taken.contains(&format!("{}_{k}", node.name)) {
                k += 1;
            }
            name = format!("{}_{k}", node.name);
            taken.insert(name.clone());
            seen.insert(name.clone());
        }
        gp.node.push(proto::NodeProto {
            input: g
                .node_inputs(n)
                .into_iter()
                .map(|v| v.map(|v| g.value(v).name.clone()).unwrap_or_default())
                .collect(),
            output: node.outputs.iter().map(|v| v.name.clone()).collect(),
            name: (!name.is_empty()).then_some(name),
            op_type: Some(info.name.to_string()),
            domain: (!info.domain.is_empty()).then(|| info.domain.to_string()),
            attribute: op
                .attrs()
                .into_iter()
                .map(|(k, a)| attr_to_proto(k, a))
                .collect(),
            ..Default::default()
        });
        for (slot, v) in node.outputs.iter().enumerate() {
            if v.declared
                && !v.name.is_empty()
                && !out_set.contains(&crate::graph::ValueRef { node: n, slot })
            {
                gp.value_info.push(value_info(&v.name, &v.ty));
            }
        }
    }
    for &v in g.outputs() {
        let val = g.value(v);
        gp.output.push(value_info(&val.name, &val.ty));
    }
    gp
}
