//! Whole-graph rewrites that keep a graph's meaning: [`to_f64`] re-types a float32 graph
//! as float64 (for gradient checks against finite differences, which need the
//! precision).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeKind, ValueRef};
use crate::ops::Op;
use crate::tensor::Tensor;
use crate::types::ValueType;

/// A copy of `g` that computes in float64 wherever it computed in float32: float32
/// inputs, weights, values read from enclosing graphs, constants, `Cast` targets and
/// `ConstantOfShape` fills become float64, in nested bodies too. Names, node order and
/// every other dtype stay as they are; types are inferred afresh.
///
/// ```
/// use cellgraph_ir::{DType, Graph, Op, ValueType};
/// let mut g = Graph::new("g");
/// let x = g.add_input("x", ValueType::tensor(DType::F32, &[2])).unwrap();
/// let n = g.add_node("", Op::Relu {}, &[Some(x)], &["y"]).unwrap();
/// g.set_outputs(vec![cellgraph_ir::ValueRef { node: n, slot: 0 }]).unwrap();
/// let g64 = cellgraph_ir::convert::to_f64(&g).unwrap();
/// assert_eq!(g64.output_types()[0].dtype(), Some(DType::F64));
/// ```
pub fn to_f64(g: &Graph) -> Result<Graph> {
    let mut out = Graph::with_opsets(g.name.clone(), g.opsets().clone());
    out.doc = g.doc.clone();
    let mut map = g.copy_sources_into(&mut out, None, &retype, &widen)?;
    let order = g.topo_order().map_err(|cycle| Error::Cycle {
        graph: g.name.clone(),
        nodes: cycle.iter().map(|&n| g.node(n).display_name()).collect(),
    })?;
    for id in order {
        let node = g.node(id);
        let NodeKind::Op(op) = &node.kind else {
            continue;
        };
        let ins = g
            .node_inputs(id)
            .into_iter()
            .map(|i| {
                i.map(|v| {
                    map.get(&v).copied().ok_or_else(|| Error::Dangling {
                        graph: g.name.clone(),
                        user: node.display_name(),
                        name: g.value(v).name.clone(),
                    })
                })
                .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<&str> = node.outputs.iter().map(|v| v.name.as_str()).collect();
        let nid = out.add_node(&node.name, widen_op(op)?, &ins, &names)?;
        for slot in 0..node.outputs.len() {
            map.insert(ValueRef { node: id, slot }, ValueRef { node: nid, slot });
        }
    }
    let outs = g
        .outputs()
        .iter()
        .map(|v| {
            map.get(v).copied().ok_or_else(|| Error::Dangling {
                graph: g.name.clone(),
                user: "the graph outputs".into(),
                name: g.value(*v).name.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.set_outputs(outs)?;
    Ok(out)
}

fn retype(ty: &ValueType) -> ValueType {
    match ty {
        ValueType::Tensor(t) if t.dtype == Some(DType::F32) => {
            let mut t = t.clone();
            t.dtype = Some(DType::F64);
            ValueType::Tensor(t)
        }
        other => other.clone(),
    }
}

fn widen(t: &Tensor) -> Result<Tensor> {
    match t {
        Tensor::F32(a) => Ok(Tensor::F64(a.mapv(f64::from))),
        other => Ok(other.clone()),
    }
}

fn widen_op(op: &Op) -> Result<Op> {
    let f32_code = i64::from(DType::F32.onnx_code());
    let f64_code = i64::from(DType::F64.onnx_code());
    Ok(match op {
        Op::Constant {
            value_float: Some(v),
            ..
        } => Op::constant(Tensor::F64(ndarray::arr0(f64::from(*v)).into_dyn())),
        Op::Constant {
            value_floats: Some(v),
            ..
        } => Op::constant(Tensor::F64(
            ndarray::Array1::from_iter(v.iter().map(|&x| f64::from(x))).into_dyn(),
        )),
        Op::Constant { value: Some(t), .. } => Op::constant(widen(t)?),
        Op::Cast {
            to,
            saturate,
            round_mode,
        } if *to == f32_code => Op::Cast {
            to: f64_code,
            saturate: *saturate,
            round_mode: round_mode.clone(),
        },
        Op::ConstantOfShape { value: Some(t) } => Op::ConstantOfShape {
            value: Some(widen(t)?),
        },
        Op::Scan {
            body,
            num_scan_inputs,
            scan_input_axes,
            scan_input_directions,
            scan_output_axes,
            scan_output_directions,
            directions,
        } => Op::Scan {
            body: Box::new(to_f64(body)?),
            num_scan_inputs: *num_scan_inputs,
            scan_input_axes: scan_input_axes.clone(),
            scan_input_directions: scan_input_directions.clone(),
            scan_output_axes: scan_output_axes.clone(),
            scan_output_directions: scan_output_directions.clone(),
            directions: directions.clone(),
        },
        Op::Loop { body } => Op::Loop {
            body: Box::new(to_f64(body)?),
        },
        Op::If {
            then_branch,
            else_branch,
        } => Op::If {
            then_branch: Box::new(to_f64(then_branch)?),
            else_branch: Box::new(to_f64(else_branch)?),
        },
        other => other.clone(),
    })
}
