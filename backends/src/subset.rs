//! `subset`: a second backend for the tests. It runs a strict subset of the ops — f32
//! elementwise arithmetic and activations with numpy broadcasting, and 2-D `MatMul` —
//! in its own buffers ([`Buf`], held as [`DeviceValue`]s), with kernels of its own (plain
//! loops, no code shared with the CPU backend). Everything else it refuses with a reason,
//! and a [`crate::placed::PlacedPlan`] runs that on the next backend of its list.
//!
//! It exists to prove, without a GPU, what a device backend needs from the engine:
//! per-node placement, parts compiled per backend, copies at the edges, and values that
//! stay in a backend's memory between the parts that use them. It is not fast and not
//! meant for use.

use crate::data::Data;
use crate::device::{Device, DevicePlan, DeviceValue, Value};
use crate::error::{Error, Result};
use cellgraph_ir::{DType, Graph, Op, Tensor, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The backend's name.
pub const NAME: &str = "subset";

static NODES_RUN: AtomicUsize = AtomicUsize::new(0);

/// How many nodes the subset backend has run in this process (for tests that must show
/// it ran, not merely that the results were right).
pub fn nodes_run() -> usize {
    NODES_RUN.load(Ordering::Relaxed)
}

/// The test-only subset backend (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct SubsetBackend;

/// A buffer in the subset backend's memory: an f32 array, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Buf {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

#[derive(Clone, Copy, Debug)]
enum Unary {
    Neg,
    Abs,
    Relu,
    Tanh,
    Sigmoid,
    Exp,
    Sqrt,
    Identity,
}

#[derive(Clone, Copy, Debug)]
enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug)]
enum Kernel {
    Unary(Unary),
    Binary(Binary),
    MatMul,
}

fn kernel_of(op: &Op) -> Option<Kernel> {
    Some(match op {
        Op::Neg {} => Kernel::Unary(Unary::Neg),
        Op::Abs {} => Kernel::Unary(Unary::Abs),
        Op::Relu {} => Kernel::Unary(Unary::Relu),
        Op::Tanh {} => Kernel::Unary(Unary::Tanh),
        Op::Sigmoid {} => Kernel::Unary(Unary::Sigmoid),
        Op::Exp {} => Kernel::Unary(Unary::Exp),
        Op::Sqrt {} => Kernel::Unary(Unary::Sqrt),
        Op::Identity {} => Kernel::Unary(Unary::Identity),
        Op::Add {} => Kernel::Binary(Binary::Add),
        Op::Sub {} => Kernel::Binary(Binary::Sub),
        Op::Mul {} => Kernel::Binary(Binary::Mul),
        Op::Div {} => Kernel::Binary(Binary::Div),
        Op::MatMul {} => Kernel::MatMul,
        _ => return None,
    })
}

impl Device for SubsetBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn supports(&self, op: &Op, inputs: &[Option<&ValueType>]) -> std::result::Result<(), String> {
        let Some(k) = kernel_of(op) else {
            return Err(format!(
                "runs f32 elementwise ops and 2-D MatMul only, not {}",
                op.name()
            ));
        };
        for (i, t) in inputs.iter().enumerate() {
            match t {
                Some(ValueType::Tensor(tt)) if tt.dtype == Some(DType::F32) => {
                    if matches!(k, Kernel::MatMul) && tt.shape.as_ref().map(Vec::len) != Some(2) {
                        return Err(format!("MatMul input {i} is not known to be 2-D"));
                    }
                }
                Some(t) => return Err(format!("input {i} is {t}, not an f32 tensor")),
                None => return Err(format!("input {i} is omitted")),
            }
        }
        Ok(())
    }

    fn compile_part(&self, graph: &Graph) -> Result<Box<dyn DevicePlan>> {
        SubsetPlan::new(graph).map(|p| Box::new(p) as Box<dyn DevicePlan>)
    }

    fn upload(&self, data: Data) -> Result<Value> {
        let t = data
            .into_tensor()
            .map_err(|e| Error::Compile(format!("subset upload: {e}")))?;
        Ok(device_value(to_buf(&t)?))
    }

    fn download(&self, value: &Value) -> Result<Data> {
        match value {
            Value::Host(d) => Ok(d.clone()),
            Value::Device(dv) => {
                let b: &Buf = dv.get(NAME)?;
                let a = ArrayD::from_shape_vec(IxDyn(&b.shape), b.data.clone())
                    .map_err(|e| Error::Compile(format!("subset download: {e}")))?;
                Ok(Data::Tensor(Tensor::F32(a)))
            }
        }
    }
}

fn to_buf(t: &Tensor) -> Result<Buf> {
    match t {
        Tensor::F32(a) => Ok(Buf {
            shape: a.shape().to_vec(),
            data: a.iter().copied().collect(),
        }),
        other => Err(Error::Compile(format!(
            "subset holds f32 tensors only, not {}",
            other.dtype()
        ))),
    }
}

fn device_value(b: Buf) -> Value {
    Value::Device(DeviceValue {
        backend: NAME,
        bytes: 4 * b.data.len() as u64,
        buf: Arc::new(b),
    })
}

struct Step {
    node: String,
    op: &'static str,
    kernel: Kernel,
    inputs: Vec<usize>,
    output: usize,
}

/// A compiled part: its steps over value slots, its weights already in its memory.
struct SubsetPlan {
    steps: Vec<Step>,
    nslots: usize,
    input_slots: Vec<(usize, String, ValueType)>,
    consts: Vec<(usize, Arc<Buf>)>,
    output_slots: Vec<usize>,
}

impl SubsetPlan {
    fn new(graph: &Graph) -> Result<SubsetPlan> {
        let order = graph
            .topo_order()
            .map_err(|_| Error::Compile(format!("graph {:?} has a cycle", graph.name)))?;
        let mut slot: HashMap<ValueRef, usize> = HashMap::new();
        let mut next = 0;
        let mut slot_of = |v: ValueRef, slot: &mut HashMap<ValueRef, usize>| {
            *slot.entry(v).or_insert_with(|| {
                next += 1;
                next - 1
            })
        };
        let mut consts = Vec::new();
        for &n in graph.initializers() {
            if let cellgraph_ir::NodeKind::Initializer { tensor, .. } = &graph.node(n).kind {
                let s = slot_of(ValueRef { node: n, slot: 0 }, &mut slot);
                consts.push((s, Arc::new(to_buf(tensor)?)));
            }
        }
        let mut input_slots = Vec::new();
        for v in graph.input_values() {
            let s = slot_of(v, &mut slot);
            let val = graph.value(v);
            input_slots.push((s, val.name.clone(), val.ty.clone()));
        }
        let mut steps = Vec::new();
        for n in order {
            let node = graph.node(n);
            let Some(op) = node.op() else { continue };
            let kernel = kernel_of(op).ok_or_else(|| {
                Error::Compile(format!(
                    "node {:?}: the subset backend does not run {}",
                    node.display_name(),
                    op.name()
                ))
            })?;
            let inputs = graph
                .node_inputs(n)
                .into_iter()
                .map(|v| {
                    v.map(|v| slot_of(v, &mut slot)).ok_or_else(|| {
                        Error::Compile(format!("node {:?}: an omitted input", node.display_name()))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let output = slot_of(ValueRef { node: n, slot: 0 }, &mut slot);
            steps.push(Step {
                node: node.display_name(),
                op: op.name(),
                kernel,
                inputs,
                output,
            });
        }
        let output_slots = graph
            .outputs()
            .iter()
            .map(|&v| slot_of(v, &mut slot))
            .collect();
        Ok(SubsetPlan {
            steps,
            nslots: next,
            input_slots,
            consts,
            output_slots,
        })
    }
}

impl DevicePlan for SubsetPlan {
    fn run(&mut self, inputs: Vec<Value>) -> Result<Vec<Value>> {
        if inputs.len() != self.input_slots.len() {
            return Err(Error::Compile(format!(
                "subset part: {} inputs given, it has {}",
                inputs.len(),
                self.input_slots.len()
            )));
        }
        let mut slots: Vec<Option<Arc<Buf>>> = vec![None; self.nslots];
        for (s, b) in &self.consts {
            slots[*s] = Some(b.clone());
        }
        for ((s, name, ty), v) in self.input_slots.iter().zip(inputs) {
            // Only values already in this backend's memory: the plan around it copies.
            let Value::Device(dv) = v else {
                return Err(Error::Input {
                    name: name.clone(),
                    msg: "host data given to the subset backend (upload it first)".into(),
                });
            };
            let b: &Buf = dv.get(NAME)?;
            if let ValueType::Tensor(tt) = ty {
                if let Some(dims) = &tt.shape {
                    let fits = dims.len() == b.shape.len()
                        && dims.iter().zip(&b.shape).all(|(d, &n)| match d {
                            cellgraph_ir::Dim::Known(k) => *k as usize == n,
                            _ => true,
                        });
                    if !fits {
                        return Err(Error::Input {
                            name: name.clone(),
                            msg: format!("shape {:?}, the graph expects {ty}", b.shape),
                        });
                    }
                }
            }
            let b = dv
                .buf
                .clone()
                .downcast::<Buf>()
                .map_err(|_| Error::Compile("a subset value of another type".into()))?;
            slots[*s] = Some(b);
        }
        for st in &self.steps {
            let fail = |msg: String| Error::Kernel {
                node: st.node.clone(),
                op: st.op.to_string(),
                msg,
            };
            let ins: Vec<&Buf> = st
                .inputs
                .iter()
                .map(|&s| {
                    slots[s]
                        .as_deref()
                        .ok_or_else(|| fail(format!("input slot {s} is empty")))
                })
                .collect::<Result<_>>()?;
            let out = match st.kernel {
                Kernel::Unary(u) => unary(u, ins[0]),
                Kernel::Binary(b) => binary(b, ins[0], ins[1]).map_err(fail)?,
                Kernel::MatMul => matmul(ins[0], ins[1]).map_err(fail)?,
            };
            slots[st.output] = Some(Arc::new(out));
            NODES_RUN.fetch_add(1, Ordering::Relaxed);
        }
        self.output_slots
            .iter()
            .map(|&s| {
                let b = slots[s]
                    .clone()
                    .ok_or_else(|| Error::Compile("a subset output was not computed".into()))?;
                Ok(Value::Device(DeviceValue {
                    backend: NAME,
                    bytes: 4 * b.data.len() as u64,
                    buf: b,
                }))
            })
            .collect()
    }
}

fn unary(u: Unary, x: &Buf) -> Buf {
    let f = |v: f32| -> f32 {
        match u {
            Unary::Neg => -v,
            Unary::Abs => v.abs(),
            Unary::Relu => v.max(0.0),
            Unary::Tanh => v.tanh(),
            Unary::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Unary::Exp => v.exp(),
            Unary::Sqrt => v.sqrt(),
            Unary::Identity => v,
        }
    };
    Buf {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| f(v)).collect(),
    }
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            }
        })
        .collect()
}

/// The row-major offset in `shape` (broadcast to `out`) of the output index `idx`.
fn offset(idx: &[usize], shape: &[usize]) -> usize {
    let skip = idx.len() - shape.len();
    let mut off = 0;
    for (k, &n) in shape.iter().enumerate() {
        let i = if n == 1 { 0 } else { idx[skip + k] };
        off = off * n + i;
    }
    off
}

fn binary(op: Binary, a: &Buf, b: &Buf) -> std::result::Result<Buf, String> {
    let shape = broadcast(&a.shape, &b.shape)?;
    let total: usize = shape.iter().product();
    let f = |x: f32, y: f32| -> f32 {
        match op {
            Binary::Add => x + y,
            Binary::Sub => x - y,
            Binary::Mul => x * y,
            Binary::Div => x / y,
        }
    };
    let mut data = Vec::with_capacity(total);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..total {
        data.push(f(
            a.data[offset(&idx, &a.shape)],
            b.data[offset(&idx, &b.shape)],
        ));
        for k in (0..shape.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(Buf { shape, data })
}

fn matmul(a: &Buf, b: &Buf) -> std::result::Result<Buf, String> {
    let (&[m, k], &[k2, n]) = (&a.shape[..], &b.shape[..]) else {
        return Err(format!(
            "runs 2-D MatMul only, got {:?} × {:?}",
            a.shape, b.shape
        ));
    };
    if k != k2 {
        return Err(format!(
            "MatMul {:?} × {:?}: inner sizes differ",
            a.shape, b.shape
        ));
    }
    let mut data = vec![0f32; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a.data[i * k + p];
            for j in 0..n {
                data[i * n + j] += x * b.data[p * n + j];
            }
        }
    }
    Ok(Buf {
        shape: vec![m, n],
        data,
    })
}
