//! Custom recurrent cells: a [`CustomCell`] written with the frontend's tensor operations
//! ([`CellOps`]), wrapped in [`CustomRnn`] (Keras's `RNN(cell)`), with nested inputs
//! ([`Nest`]: lists and named maps of tensors), states of any rank, several outputs, and a
//! registry of cell types for loading saved models ([`register_cell`]).
//!
//! The cell's `call` runs once, while the model is lowered: the operations it calls add
//! IR nodes to the body of the `Scan` that runs the sequence, so the cell trains (the
//! gradient pass differentiates the body) and exports to ONNX like the built-in cells.
//! A cell that computes an LSTM, GRU or simple RNN step is raised onto the fused kernels
//! by the selector; any other cell runs as a loop (`cellgraph inspect` says why).

use super::activation::{Activation, Shape};
use super::config::Cx;
use super::emit::Emit;
use super::init::Init;
use super::layers::kind::{layer_entry, CallIo, LayerKind, Out, Spec};
use super::layers::recurrent::custom_cell_class;
use super::KerasError;
use cellgraph_ir::{DType, Dim, Graph, Op, Tensor, TensorType, ValueRef, ValueType};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

type R<T> = Result<T, KerasError>;

/// A nested structure of values: a leaf, a list, or a named map (flattened in sorted key
/// order, as `keras.tree.flatten` does).
#[derive(Clone, Debug, PartialEq)]
pub enum Nest<T> {
    /// One value.
    Leaf(T),
    /// A list (or tuple) of structures.
    List(Vec<Nest<T>>),
    /// A named map of structures.
    Dict(BTreeMap<String, Nest<T>>),
}

impl<T> Nest<T> {
    /// A list of leaves.
    pub fn leaves(items: impl IntoIterator<Item = T>) -> Nest<T> {
        Nest::List(items.into_iter().map(Nest::Leaf).collect())
    }

    /// A named map, e.g. `Nest::dict([("location", Nest::leaves([x, y])), ("pressure",
    /// Nest::leaves([f]))])`.
    pub fn dict<K: Into<String>>(items: impl IntoIterator<Item = (K, Nest<T>)>) -> Nest<T> {
        Nest::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// The leaves in order (depth first; map entries by sorted key).
    pub fn flatten(&self) -> Vec<&T> {
        let mut out = Vec::new();
        self.visit(&mut |_, t| out.push(t), &mut String::new());
        out
    }

    /// Where each leaf sits, in [`Nest::flatten`] order: `[0]`, `[1]["pressure"][0]`.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |p, _| out.push(p.to_string()), &mut String::new());
        if out.len() == 1 && out[0].is_empty() {
            out[0] = "[0]".into();
        }
        out
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&str, &'a T), path: &mut String) {
        match self {
            Nest::Leaf(t) => f(path, t),
            Nest::List(v) => {
                for (i, n) in v.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    n.visit(f, path);
                    path.truncate(len);
                }
            }
            Nest::Dict(m) => {
                for (k, n) in m {
                    let len = path.len();
                    path.push_str(&format!("[{k:?}]"));
                    n.visit(f, path);
                    path.truncate(len);
                }
            }
        }
    }

    /// The same structure with each leaf mapped.
    pub fn map<U>(&self, f: &mut impl FnMut(&T) -> U) -> Nest<U> {
        match self {
            Nest::Leaf(t) => Nest::Leaf(f(t)),
            Nest::List(v) => Nest::List(v.iter().map(|n| n.map(f)).collect()),
            Nest::Dict(m) => Nest::Dict(m.iter().map(|(k, n)| (k.clone(), n.map(f))).collect()),
        }
    }

    /// This structure with `leaves` (in [`Nest::flatten`] order) as its leaves; `None`
    /// when the count differs.
    pub fn pack<U>(&self, leaves: Vec<U>) -> Option<Nest<U>> {
        let mut it = leaves.into_iter();
        let packed = self.pack_from(&mut it)?;
        it.next().is_none().then_some(packed)
    }

    fn pack_from<U>(&self, it: &mut impl Iterator<Item = U>) -> Option<Nest<U>> {
        Some(match self {
            Nest::Leaf(_) => Nest::Leaf(it.next()?),
            Nest::List(v) => Nest::List(v.iter().map(|n| n.pack_from(it)).collect::<Option<_>>()?),
            Nest::Dict(m) => Nest::Dict(
                m.iter()
                    .map(|(k, n)| n.pack_from(it).map(|n| (k.clone(), n)))
                    .collect::<Option<_>>()?,
            ),
        })
    }

    /// Whether two structures have the same shape (lists of the same lengths, maps with
    /// the same keys).
    pub fn same_structure<U>(&self, other: &Nest<U>) -> bool {
        match (self, other) {
            (Nest::Leaf(_), Nest::Leaf(_)) => true,
            (Nest::List(a), Nest::List(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_structure(y))
            }
            (Nest::Dict(a), Nest::Dict(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((ka, x), (kb, y))| ka == kb && x.same_structure(y))
            }
            _ => false,
        }
    }
}

impl<T: Copy> Nest<T> {
    /// The leaves by value, in [`Nest::flatten`] order.
    pub fn flat(&self) -> Vec<T> {
        self.flatten().into_iter().copied().collect()
    }
}

/// A symbolic tensor inside a cell's `call`: one value of the step being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sym(pub(crate) ValueRef);

/// The tensor operations a [`CustomCell::call`] is written with. Each adds IR nodes to
/// the step; shapes are checked as nodes are added, so a wrong shape is an error naming
/// the operation.
pub struct CellOps<'a, 'g> {
    e: &'a mut Emit<'g>,
    weights: &'a [(String, ValueRef)],
}

impl<'a, 'g> CellOps<'a, 'g> {
    /// The weight added in `build` under `name`.
    pub fn weight(&self, name: &str) -> R<Sym> {
        self.weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Sym(*v))
            .ok_or_else(|| KerasError::Layer {
                layer: self.e.prefix.clone(),
                msg: format!(
                    "the cell reads weight {name:?}, but build added only {:?}",
                    self.weights.iter().map(|(n, _)| n).collect::<Vec<_>>()
                ),
            })
    }

    /// The static shape of `x` (`None` where a size is known only at run time).
    pub fn shape(&self, x: Sym) -> Shape {
        self.e
            .dims(x.0)
            .iter()
            .map(|d| d.known().map(|n| n as usize))
            .collect()
    }

    fn op(&mut self, op: Op, ins: &[Sym], hint: &str) -> R<Sym> {
        let ins: Vec<ValueRef> = ins.iter().map(|s| s.0).collect();
        Ok(Sym(self.e.op(op, &ins, hint)?))
    }

    /// Matrix product with numpy broadcasting (`keras.ops.matmul`).
    pub fn matmul(&mut self, a: Sym, b: Sym) -> R<Sym> {
        Ok(Sym(self.e.matmul(a.0, b.0)?))
    }

    /// `keras.ops.einsum(equation, *operands)`, e.g. `"bij,ijkl->bkl"`.
    pub fn einsum(&mut self, equation: &str, operands: &[Sym]) -> R<Sym> {
        self.op(
            Op::Einsum {
                equation: equation.to_string(),
            },
            operands,
            "einsum",
        )
    }

    /// `a + b` (broadcasting).
    pub fn add(&mut self, a: Sym, b: Sym) -> R<Sym> {
        Ok(Sym(self.e.add(a.0, b.0)?))
    }

    /// `a - b` (broadcasting).
    pub fn sub(&mut self, a: Sym, b: Sym) -> R<Sym> {
        self.op(Op::Sub {}, &[a, b], "sub")
    }

    /// `a * b` (broadcasting).
    pub fn mul(&mut self, a: Sym, b: Sym) -> R<Sym> {
        Ok(Sym(self.e.mul(a.0, b.0)?))
    }

    /// `a / b` (broadcasting).
    pub fn div(&mut self, a: Sym, b: Sym) -> R<Sym> {
        self.op(Op::Div {}, &[a, b], "div")
    }

    /// A float32 scalar constant.
    pub fn scalar(&mut self, v: f32) -> R<Sym> {
        Ok(Sym(self.e.scalar(v)?))
    }

    /// A float32 constant tensor.
    pub fn constant(&mut self, t: ndarray::ArrayD<f32>) -> R<Sym> {
        Ok(Sym(self.e.constant(Tensor::F32(t), "const")?))
    }

    /// `keras.ops.sigmoid`.
    pub fn sigmoid(&mut self, x: Sym) -> R<Sym> {
        self.activation(Activation::Sigmoid, x)
    }

    /// `keras.ops.tanh`.
    pub fn tanh(&mut self, x: Sym) -> R<Sym> {
        self.activation(Activation::Tanh, x)
    }

    /// `keras.ops.relu`.
    pub fn relu(&mut self, x: Sym) -> R<Sym> {
        self.activation(Activation::Relu, x)
    }

    /// Any Keras activation by value.
    pub fn activation(&mut self, a: Activation, x: Sym) -> R<Sym> {
        Ok(Sym(self.e.activation(a, x.0)?))
    }

    /// Splits `axis` into `n` equal parts (`keras.ops.split(x, n, axis)`).
    pub fn split(&mut self, x: Sym, n: usize, axis: i64) -> R<Vec<Sym>> {
        let hints = vec!["split"; n];
        Ok(self
            .e
            .multi(
                Op::Split {
                    axis,
                    split: None,
                    num_outputs: Some(n as i64),
                },
                &[x.0],
                &hints,
            )?
            .into_iter()
            .map(Sym)
            .collect())
    }

    /// Joins tensors along `axis`.
    pub fn concat(&mut self, xs: &[Sym], axis: i64) -> R<Sym> {
        self.op(Op::Concat { axis }, xs, "concat")
    }

    /// `keras.ops.reshape` with ONNX's conventions: `-1` infers one size, `0` copies the
    /// input's size (use it for the batch axis).
    pub fn reshape(&mut self, x: Sym, shape: &[i64]) -> R<Sym> {
        let s = self.e.ints(shape)?;
        Ok(Sym(self.e.op(
            Op::Reshape { allowzero: 0 },
            &[x.0, s],
            "reshape",
        )?))
    }

    /// Permutes axes.
    pub fn transpose(&mut self, x: Sym, perm: &[i64]) -> R<Sym> {
        Ok(Sym(self.e.transpose(x.0, perm)?))
    }

    /// Sum over `axes`.
    pub fn sum(&mut self, x: Sym, axes: &[i64], keepdims: bool) -> R<Sym> {
        let a = self.e.ints(axes)?;
        Ok(Sym(self.e.op(
            Op::ReduceSum {
                axes: None,
                keepdims: i64::from(keepdims),
                noop_with_empty_axes: 0,
            },
            &[x.0, a],
            "sum",
        )?))
    }
}

/// One declared weight: name, shape, trainable, initializer.
pub(crate) type WeightSpec = (String, Vec<usize>, bool, Init);

/// What a cell's `build` declares: its weights, in order.
#[derive(Clone, Debug, Default)]
pub struct CellBuilder {
    pub(crate) weights: Vec<WeightSpec>,
}

impl CellBuilder {
    /// Adds a trainable weight (`self.add_weight(shape, initializer, name)`).
    pub fn add_weight(&mut self, name: &str, shape: &[usize], init: Init) {
        self.add_weight_with(name, shape, init, true);
    }

    /// Adds a weight, trainable or not.
    pub fn add_weight_with(&mut self, name: &str, shape: &[usize], init: Init, trainable: bool) {
        self.weights
            .push((name.to_string(), shape.to_vec(), trainable, init));
    }
}

/// A recurrent cell of your own (Keras's custom cell: any layer with `state_size` and
/// `call(inputs, states)`).
///
/// `inputs` of a step are the layer's inputs without the time axis, in the structure the
/// layer was called with; states and outputs are lists of tensors of any rank, each
/// `(batch, *size)`.
///
/// ```
/// use cellgraph::keras::{CellBuilder, CellOps, CustomCell, Init, KerasError, Nest, Sym};
///
/// /// `h' = tanh(x·W + h·U)`: a simple RNN written by hand.
/// #[derive(Debug)]
/// struct MinimalRnn {
///     units: usize,
/// }
///
/// impl CustomCell for MinimalRnn {
///     fn class_name(&self) -> &str {
///         "MinimalRnn"
///     }
///     fn state_size(&self) -> Vec<Vec<usize>> {
///         vec![vec![self.units]]
///     }
///     fn output_size(&self) -> Vec<Vec<usize>> {
///         vec![vec![self.units]]
///     }
///     fn build(&self, inputs: &Nest<Vec<usize>>, w: &mut CellBuilder) -> Result<(), String> {
///         let x = inputs.flatten();
///         let features = x.first().and_then(|s| s.first()).ok_or("expects one input")?;
///         w.add_weight("kernel", &[*features, self.units], Init::GlorotUniform);
///         w.add_weight("recurrent_kernel", &[self.units, self.units], Init::Orthogonal);
///         Ok(())
///     }
///     fn call(
///         &self,
///         ops: &mut CellOps,
///         inputs: &Nest<Sym>,
///         states: &[Sym],
///     ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError> {
///         let x = inputs.flat()[0];
///         let (w, u) = (ops.weight("kernel")?, ops.weight("recurrent_kernel")?);
///         let a = ops.matmul(x, w)?;
///         let b = ops.matmul(states[0], u)?;
///         let s = ops.add(a, b)?;
///         let h = ops.tanh(s)?;
///         Ok((vec![h], vec![h]))
///     }
///     fn get_config(&self) -> serde_json::Value {
///         serde_json::json!({ "units": self.units })
///     }
/// }
/// ```
pub trait CustomCell: Send + Sync + fmt::Debug {
    /// The class name saved models record and [`register_cell`] looks up.
    fn class_name(&self) -> &str;

    /// The shape of each state without the batch axis (`[[10], [20, 30]]`).
    fn state_size(&self) -> Vec<Vec<usize>>;

    /// The shape of each output without the batch axis.
    fn output_size(&self) -> Vec<Vec<usize>>;

    /// Declares the weights for step inputs of these shapes (without batch and time
    /// axes). An `Err` is reported naming the layer.
    fn build(
        &self,
        input_shapes: &Nest<Vec<usize>>,
        weights: &mut CellBuilder,
    ) -> Result<(), String>;

    /// One step: `(outputs, new_states)` from the step's inputs and the states.
    fn call(
        &self,
        ops: &mut CellOps,
        inputs: &Nest<Sym>,
        states: &[Sym],
    ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError>;

    /// The constructor arguments, saved as the cell's `config` (what the registered
    /// factory reads back).
    fn get_config(&self) -> serde_json::Value;

    /// The cell's name in weight paths (`rnn/<name>/kernel`); by default the class name
    /// in snake case, as Keras names layers.
    fn name(&self) -> String {
        snake_case(self.class_name())
    }
}

/// `NestedCell` → `nested_cell`.
pub fn snake_case(s: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if i > 0 && (prev_lower || (next_lower && chars[i - 1].is_uppercase())) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A factory that rebuilds a cell from its saved `config`.
pub type CellFactory =
    Arc<dyn Fn(&serde_json::Value) -> Result<Arc<dyn CustomCell>, String> + Send + Sync>;

fn registry() -> &'static RwLock<HashMap<String, CellFactory>> {
    static REG: OnceLock<RwLock<HashMap<String, CellFactory>>> = OnceLock::new();
    REG.get_or_init(|| RwLock::new(HashMap::new()))
}

/// Registers a cell type under its class name, so that [`super::load_model`] can rebuild
/// `RNN` layers whose cell has this class (Keras's `register_keras_serializable`).
/// Registering a name again replaces the factory.
pub fn register_cell(
    class_name: &str,
    factory: impl Fn(&serde_json::Value) -> Result<Arc<dyn CustomCell>, String> + Send + Sync + 'static,
) {
    if let Ok(mut reg) = registry().write() {
        reg.insert(class_name.to_string(), Arc::new(factory));
    }
}

/// The factory registered for `class_name`.
pub fn registered_cell(class_name: &str) -> Option<CellFactory> {
    registry().read().ok()?.get(class_name).cloned()
}

/// The class names registered so far, sorted.
pub fn registered_cells() -> Vec<String> {
    let mut v: Vec<String> = registry()
        .read()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `keras.layers.RNN(cell)` around a [`CustomCell`]: called on a nested structure of
/// `(batch, time, ...)` tensors; returns the cell's outputs (last step, or every step
/// with `return_sequences`), then with `return_state` the final states.
#[derive(Clone, Debug)]
pub struct CustomRnn {
    /// The cell.
    pub cell: Arc<dyn CustomCell>,
    /// Return every step's outputs `(batch, time, *size)`.
    pub return_sequences: bool,
    /// Also return the final states.
    pub return_state: bool,
    /// Process the sequence in reverse.
    pub go_backwards: bool,
    /// Masked steps output zeros (else the previous output).
    pub zero_output_for_mask: bool,
    /// The layer name.
    pub name: Option<String>,
    /// The input structure of the first call (leaves are the call's tensors in order).
    pub(crate) structure: Option<Nest<()>>,
    /// The step input shapes the weights were built for.
    pub(crate) built: Option<Nest<Vec<usize>>>,
}

impl PartialEq for CustomRnn {
    fn eq(&self, o: &CustomRnn) -> bool {
        self.cell.class_name() == o.cell.class_name()
            && self.cell.get_config() == o.cell.get_config()
            && self.return_sequences == o.return_sequences
            && self.return_state == o.return_state
            && self.go_backwards == o.go_backwards
            && self.zero_output_for_mask == o.zero_output_for_mask
            && self.name == o.name
            && self.structure == o.structure
            && self.built == o.built
    }
}

impl CustomRnn {
    /// `RNN(cell)`.
    pub fn new(cell: impl CustomCell + 'static) -> CustomRnn {
        CustomRnn::from_arc(Arc::new(cell))
    }

    /// `RNN(cell)` for a shared cell.
    pub fn from_arc(cell: Arc<dyn CustomCell>) -> CustomRnn {
        CustomRnn {
            cell,
            return_sequences: false,
            return_state: false,
            go_backwards: false,
            zero_output_for_mask: false,
            name: None,
            structure: None,
            built: None,
        }
    }

    /// Sets `return_sequences`.
    pub fn return_sequences(mut self, b: bool) -> CustomRnn {
        self.return_sequences = b;
        self
    }

    /// Sets `return_state`.
    pub fn return_state(mut self, b: bool) -> CustomRnn {
        self.return_state = b;
        self
    }

    /// Sets `go_backwards`.
    pub fn go_backwards(mut self, b: bool) -> CustomRnn {
        self.go_backwards = b;
        self
    }

    /// Sets `zero_output_for_mask`.
    pub fn zero_output_for_mask(mut self, b: bool) -> CustomRnn {
        self.zero_output_for_mask = b;
        self
    }

    /// Sets the layer name.
    pub fn name(mut self, name: &str) -> CustomRnn {
        self.name = Some(name.to_string());
        self
    }

    /// Checks the inputs of a call — `(batch, time, ...)` parts with one batch size and
    /// one number of steps, matching what the weights were built for — and returns the
    /// step shapes. Errors name the part.
    pub(crate) fn step_shapes(
        &self,
        parts: &[Shape],
        paths: &[String],
    ) -> Result<Vec<Vec<usize>>, String> {
        let mut steps = Vec::with_capacity(parts.len());
        // (size, the first part that showed it) of the batch and time axes.
        type Seen<'p> = Option<(usize, &'p str)>;
        let (mut batch, mut time): (Seen, Seen) = (None, None);
        let built: Option<Vec<&Vec<usize>>> = self.built.as_ref().map(|b| b.flatten());
        for (k, (shape, path)) in parts.iter().zip(paths).enumerate() {
            let want = built.as_ref().and_then(|b| b.get(k).copied());
            if shape.len() < 3 {
                let expect = match want {
                    Some(w) => format!(
                        "(batch, time{})",
                        w.iter().map(|d| format!(", {d}")).collect::<String>()
                    ),
                    None => "(batch, time, features...)".into(),
                };
                return Err(format!(
                    "input part {path} has shape {}; a recurrent layer's inputs are {expect}",
                    super::activation::shape_str(shape)
                ));
            }
            let feat: Option<Vec<usize>> = shape[2..].iter().copied().collect();
            let Some(feat) = feat else {
                return Err(format!(
                    "input part {path} has shape {}: the sizes after the time axis must be known",
                    super::activation::shape_str(shape)
                ));
            };
            if let Some(w) = want {
                if &feat != w {
                    let mut expect = vec![None, None];
                    expect.extend(w.iter().map(|&d| Some(d)));
                    return Err(format!(
                        "input part {path} has shape {}, the layer was built for {}",
                        super::activation::shape_str(shape),
                        super::activation::shape_str(&expect)
                    ));
                }
            }
            for (axis, seen, what) in [
                (0, &mut batch, "batch size"),
                (1, &mut time, "number of steps"),
            ] {
                if let Some(n) = shape[axis] {
                    match seen {
                        Some((m, first)) if *m != n => {
                            return Err(format!(
                                "input part {path} has {what} {n}, part {first} has {m}"
                            ))
                        }
                        None => *seen = Some((n, path.as_str())),
                        _ => {}
                    }
                }
            }
            steps.push(feat);
        }
        Ok(steps)
    }

    /// The output shapes for inputs of these shapes (parts `(batch, time, ...)`).
    pub(crate) fn output_shapes(&self, parts: &[Shape]) -> Vec<Shape> {
        let batch = parts.iter().find_map(|s| s.first().copied().flatten());
        let time = parts.iter().find_map(|s| s.get(1).copied().flatten());
        let with = |lead: &[Option<usize>], size: &[usize]| {
            let mut s = lead.to_vec();
            s.extend(size.iter().map(|&d| Some(d)));
            s
        };
        let mut out: Vec<Shape> = self
            .cell
            .output_size()
            .iter()
            .map(|o| {
                if self.return_sequences {
                    with(&[batch, time], o)
                } else {
                    with(&[batch], o)
                }
            })
            .collect();
        if self.return_state {
            out.extend(self.cell.state_size().iter().map(|s| with(&[batch], s)));
        }
        out
    }

    /// The weight declarations for these step shapes.
    pub(crate) fn specs(&self, steps: &Nest<Vec<usize>>) -> Result<Vec<WeightSpec>, String> {
        let mut b = CellBuilder::default();
        self.cell.build(steps, &mut b)?;
        let mut seen = std::collections::HashSet::new();
        for (n, _, _, _) in &b.weights {
            if !seen.insert(n.clone()) {
                return Err(format!("the cell's build adds weight {n:?} twice"));
            }
        }
        Ok(b.weights)
    }
}

fn check_part_shapes(e: &Emit, rnn: &CustomRnn, parts: &[ValueRef], paths: &[String]) -> R<()> {
    let shapes: Vec<Shape> = parts
        .iter()
        .map(|&p| {
            e.dims(p)
                .iter()
                .map(|d| d.known().map(|n| n as usize))
                .collect()
        })
        .collect();
    rnn.step_shapes(&shapes, paths)
        .map(|_| ())
        .map_err(|msg| KerasError::Layer {
            layer: e.prefix.clone(),
            msg,
        })
}

/// What lowering a custom RNN call produced: the layer's outputs with their masks.
pub(crate) fn lower(
    e: &mut Emit,
    rnn: &CustomRnn,
    weights: &[(String, ValueRef)],
    parts: &[ValueRef],
    mask: Option<ValueRef>,
    init: Option<Vec<ValueRef>>,
) -> R<Vec<(ValueRef, Option<ValueRef>)>> {
    let structure = rnn
        .structure
        .clone()
        .ok_or_else(|| KerasError::Internal("custom RNN lowered before it was called".into()))?;
    let paths = structure.paths();
    check_part_shapes(e, rnn, parts, &paths)?;
    let layer = e.prefix.clone();
    let cell = &rnn.cell;
    let state_size = cell.state_size();
    let output_size = cell.output_size();
    let x0 = parts[0];
    let init: Vec<ValueRef> = match init {
        Some(v) => v,
        None => state_size
            .iter()
            .map(|s| e.batch_zeros_of(x0, s))
            .collect::<R<_>>()?,
    };
    // Time-major parts; masks as (time, batch, 1) booleans.
    let mut parts_tm = Vec::with_capacity(parts.len());
    for &p in parts {
        let r = e.dims(p).len() as i64;
        let mut perm = vec![1, 0];
        perm.extend(2..r);
        parts_tm.push(e.transpose(p, &perm)?);
    }
    let m_tm = match mask {
        Some(m) => {
            let m3 = e.unsqueeze(m, &[2])?;
            Some(e.transpose(m3, &[1, 0, 2])?)
        }
        None => None,
    };
    let b = e.dims(parts_tm[0]).get(1).cloned().unwrap_or(Dim::Unknown);
    let f32_of = |dims: Vec<Dim>| ValueType::Tensor(TensorType::with_dims(DType::F32, dims));
    let with_batch = |size: &[usize]| {
        let mut d = vec![b.clone()];
        d.extend(size.iter().map(|&n| Dim::Known(n as u64)));
        d
    };

    // The body: states, carried outputs, the step's parts, the step's mask.
    let mut body = Graph::with_opsets("cell", e.g.opsets().clone());
    let mut st_in = Vec::new();
    for (i, s) in state_size.iter().enumerate() {
        st_in.push(body.add_input(&format!("state_{i}"), f32_of(with_batch(s)))?);
    }
    // Which outputs alias a state (an LSTM's h): their last value is that final state.
    // The others are carried as extra states when their last value is needed.
    let need_last = !rnn.return_sequences || (m_tm.is_some() && !rnn.zero_output_for_mask);
    // The aliasing is known only once the cell has run, and the carried inputs must be
    // declared before it runs: a probe step in a scratch graph finds it first.
    let aliases = probe_aliases(
        e,
        rnn,
        weights,
        parts_tm.as_slice(),
        &structure,
        &st_in
            .iter()
            .map(|&v| body.value(v).ty.clone())
            .collect::<Vec<_>>(),
    )?;
    let mut carried_in = Vec::new();
    for (k, o) in output_size.iter().enumerate() {
        if need_last && aliases[k].is_none() {
            carried_in.push((
                k,
                body.add_input(&format!("last_output_{k}"), f32_of(with_batch(o)))?,
            ));
        }
    }
    let mut x_in = Vec::new();
    for (k, &p) in parts_tm.iter().enumerate() {
        let d = e.dims(p);
        x_in.push(body.add_input(&format!("x_t_{k}"), f32_of(d[1..].to_vec()))?);
    }
    let m_in = match m_tm {
        Some(_) => Some(body.add_input(
            "mask_t",
            ValueType::Tensor(TensorType::with_dims(
                DType::Bool,
                vec![b.clone(), Dim::Known(1)],
            )),
        )?),
        None => None,
    };
    let mut body_w = Vec::new();
    for (name, v) in weights {
        let val = e.g.value(*v);
        body_w.push((name.clone(), body.add_outer(&val.name, val.ty.clone())?));
    }
    let (outs, news) = {
        let mut be = Emit::new(&mut body, &format!("{layer}/step"));
        let inputs = structure
            .pack(x_in.iter().map(|&v| Sym(v)).collect())
            .ok_or_else(|| KerasError::Internal("input structure and parts disagree".into()))?;
        let states: Vec<Sym> = st_in.iter().map(|&v| Sym(v)).collect();
        let mut ops = CellOps {
            e: &mut be,
            weights: &body_w,
        };
        let (o, n) = cell.call(&mut ops, &inputs, &states)?;
        check_step(&be, &layer, &o, &output_size, "output")?;
        check_step(&be, &layer, &n, &state_size, "state")?;
        (o, n)
    };
    let mut be = Emit::new(&mut body, &format!("{layer}/mask"));
    // Masks broadcast against (batch, *size): (batch, 1, ..., 1).
    let mask_for = |be: &mut Emit, rank: usize| -> R<Option<ValueRef>> {
        match m_in {
            None => Ok(None),
            Some(m) if rank <= 2 => Ok(Some(m)),
            Some(m) => {
                let axes: Vec<i64> = (2..rank as i64).collect();
                Ok(Some(be.unsqueeze(m, &axes)?))
            }
        }
    };
    let mut new_states = Vec::new();
    for (i, (&n, &old)) in news.iter().zip(&st_in).enumerate() {
        match mask_for(&mut be, state_size[i].len() + 1)? {
            Some(m) => new_states.push(be.op(Op::Where {}, &[m, n.0, old], "masked_state")?),
            None => new_states.push(n.0),
        }
    }
    let mut step_outs = Vec::new();
    let mut carried_out = Vec::new();
    for (k, &o) in outs.iter().enumerate() {
        let m = mask_for(&mut be, output_size[k].len() + 1)?;
        let prev = match aliases[k] {
            Some(j) => st_in[j],
            None => carried_in
                .iter()
                .find(|(c, _)| *c == k)
                .map(|(_, v)| *v)
                .unwrap_or(o.0),
        };
        let held = match m {
            Some(m) => be.op(Op::Where {}, &[m, o.0, prev], "masked_output")?,
            None => o.0,
        };
        if carried_in.iter().any(|(c, _)| *c == k) {
            carried_out.push(held);
        }
        let shown = match m {
            Some(m) if rnn.zero_output_for_mask => {
                let z = be.scalar(0.0)?;
                be.op(Op::Where {}, &[m, o.0, z], "zeroed_output")?
            }
            _ => held,
        };
        step_outs.push(shown);
    }
    let mut body_outs = new_states.clone();
    body_outs.extend(&carried_out);
    if rnn.return_sequences {
        body_outs.extend(&step_outs);
    }
    let mut seen = std::collections::HashSet::new();
    for o in &mut body_outs {
        if !seen.insert(*o) {
            *o = be.op(Op::Identity {}, &[*o], "copy")?;
        }
    }
    body.set_outputs(body_outs)?;

    let n_state = state_size.len();
    let n_carry = carried_in.len();
    let mut ins = init.clone();
    for (k, _) in &carried_in {
        ins.push(e.batch_zeros_of(x0, &output_size[*k])?);
    }
    ins.extend(&parts_tm);
    ins.extend(m_tm);
    let n_scan = parts_tm.len() + usize::from(m_tm.is_some());
    let mut hints: Vec<String> = (0..n_state).map(|i| format!("final_state_{i}")).collect();
    hints.extend(carried_in.iter().map(|(k, _)| format!("last_output_{k}")));
    if rnn.return_sequences {
        hints.extend((0..output_size.len()).map(|k| format!("sequence_{k}")));
    }
    let hint_refs: Vec<&str> = hints.iter().map(String::as_str).collect();
    let stem = format!("{layer}/scan");
    let taken = |name: &str| e.g.node_ids().iter().any(|&n| e.g.node(n).name == name);
    let mut scan_name = stem.clone();
    let mut k = 1;
    while taken(&scan_name) {
        k += 1;
        scan_name = format!("{stem}_{k}");
    }
    let n_out = output_size.len();
    let outs_v = e.node(
        &scan_name,
        Op::Scan {
            body: Box::new(body),
            num_scan_inputs: n_scan as i64,
            scan_input_axes: None,
            scan_input_directions: Some(vec![i64::from(rnn.go_backwards); n_scan]),
            scan_output_axes: rnn.return_sequences.then(|| vec![1; n_out]),
            scan_output_directions: None,
            directions: None,
        },
        &ins,
        &hint_refs,
    )?;
    let finals = &outs_v[..n_state];
    let mut result = Vec::new();
    for k in 0..n_out {
        if rnn.return_sequences {
            result.push((outs_v[n_state + n_carry + k], mask));
        } else {
            let v = match aliases[k] {
                Some(j) => finals[j],
                None => {
                    let pos = carried_in
                        .iter()
                        .position(|(c, _)| *c == k)
                        .ok_or_else(|| {
                            KerasError::Internal("a last output was not carried".into())
                        })?;
                    outs_v[n_state + pos]
                }
            };
            result.push((v, None));
        }
    }
    if rnn.return_state {
        result.extend(finals.iter().map(|&v| (v, None)));
    }
    Ok(result)
}

/// Builds the step once in a scratch graph to learn which outputs are states
/// (`output k` is `new_state j`), so that only the others are carried.
fn probe_aliases(
    e: &Emit,
    rnn: &CustomRnn,
    weights: &[(String, ValueRef)],
    parts_tm: &[ValueRef],
    structure: &Nest<()>,
    state_types: &[ValueType],
) -> R<Vec<Option<usize>>> {
    let mut g = Graph::with_opsets("probe", e.g.opsets().clone());
    let st: Vec<ValueRef> = state_types
        .iter()
        .enumerate()
        .map(|(i, t)| g.add_input(&format!("state_{i}"), t.clone()))
        .collect::<Result<_, _>>()?;
    let mut xs = Vec::new();
    for (k, &p) in parts_tm.iter().enumerate() {
        let d = e.dims(p);
        xs.push(g.add_input(
            &format!("x_t_{k}"),
            ValueType::Tensor(TensorType::with_dims(DType::F32, d[1..].to_vec())),
        )?);
    }
    let mut ws = Vec::new();
    for (name, v) in weights {
        let val = e.g.value(*v);
        ws.push((name.clone(), g.add_outer(&val.name, val.ty.clone())?));
    }
    let mut pe = Emit::new(&mut g, &e.prefix);
    let inputs = structure
        .pack(xs.iter().map(|&v| Sym(v)).collect())
        .ok_or_else(|| KerasError::Internal("input structure and parts disagree".into()))?;
    let states: Vec<Sym> = st.iter().map(|&v| Sym(v)).collect();
    let mut ops = CellOps {
        e: &mut pe,
        weights: &ws,
    };
    let (outs, news) = rnn.cell.call(&mut ops, &inputs, &states)?;
    Ok(outs
        .iter()
        .map(|o| news.iter().position(|n| n == o))
        .collect())
}

/// Checks the count and shapes of a step's outputs or new states against the sizes the
/// cell declares.
fn check_step(e: &Emit, layer: &str, got: &[Sym], sizes: &[Vec<usize>], what: &str) -> R<()> {
    let err = |msg: String| KerasError::Layer {
        layer: layer.to_string(),
        msg,
    };
    if got.len() != sizes.len() {
        return Err(err(format!(
            "the cell's call returned {} {what}s, its {what}_size declares {}",
            got.len(),
            sizes.len()
        )));
    }
    for (k, (s, size)) in got.iter().zip(sizes).enumerate() {
        let d = e.dims(s.0);
        let ok = d.len() == size.len() + 1
            && d[1..]
                .iter()
                .zip(size)
                .all(|(a, &b)| a.known().is_none_or(|a| a == b as u64));
        if !ok {
            let shown: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            return Err(err(format!(
                "the cell's {what} {k} has shape [{}], its {what}_size declares (batch, {})",
                shown.join(", "),
                size.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}

impl CustomRnn {
    /// `RNN` around a registered custom cell, rebuilt by its factory from its config.
    pub(crate) fn from_config(cx: &Cx, cfg: &Value, at: &str) -> R<CustomRnn> {
        let class = custom_cell_class(cfg).unwrap_or_default();
        let factory = registered_cell(class).ok_or_else(|| {
            cx.err(
                at,
                format!(
                    "cell class {class:?} is not registered (register it with \
                     cellgraph::keras::register_cell; registered: {:?})",
                    registered_cells()
                ),
            )
        })?;
        let cell_cfg = cfg
            .get("cell")
            .and_then(|c| c.get("config"))
            .cloned()
            .unwrap_or(Value::Null);
        let cell = factory(&cell_cfg).map_err(|msg| cx.err(at, format!("cell {class}: {msg}")))?;
        for k in ["stateful", "unroll"] {
            if cx.bool(cfg, k, false, at)? {
                return Err(KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("{k}=True with a custom cell"),
                });
            }
        }
        cx.refuse(cfg, at, &["time_major"])?;
        Ok(CustomRnn::from_arc(cell)
            .return_sequences(cx.bool(cfg, "return_sequences", false, at)?)
            .return_state(cx.bool(cfg, "return_state", false, at)?)
            .go_backwards(cx.bool(cfg, "go_backwards", false, at)?)
            .zero_output_for_mask(cx.bool(cfg, "zero_output_for_mask", false, at)?)
            .name(at))
    }
}

impl LayerKind for CustomRnn {
    fn class(&self) -> &'static str {
        "RNN"
    }
    fn stem(&self) -> &'static str {
        "rnn"
    }
    fn given(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn weight_specs(&self, name: &str, _: &Shape) -> Result<Vec<Spec>, String> {
        let steps = self
            .built
            .as_ref()
            .ok_or_else(|| "the layer was not called on inputs yet".to_string())?;
        let cell = self.cell.name();
        Ok(self
            .specs(steps)?
            .into_iter()
            .map(|(w, shape, trainable, init)| {
                (format!("{name}/{cell}/{w}"), shape, trainable, init)
            })
            .collect())
    }
    fn shapes(&self, input: &Shape) -> Result<Vec<Shape>, String> {
        Ok(self.output_shapes(std::slice::from_ref(input)))
    }
    /// A custom RNN is lowered with all its input parts by the model (`lower` here).
    fn lower_call(&self, _: &mut Emit, _: CallIo<'_>) -> R<Vec<Out>> {
        Err(KerasError::Internal(
            "custom RNN layers are lowered with all their input parts".into(),
        ))
    }
    fn config(&self, name: &str) -> serde_json::Value {
        let cell = serde_json::json!({"module": null, "class_name": self.cell.class_name(),
                                      "config": self.cell.get_config(),
                                      "registered_name": self.cell.class_name()});
        layer_entry(
            "RNN",
            name,
            serde_json::json!({"return_sequences": self.return_sequences,
                               "return_state": self.return_state,
                               "go_backwards": self.go_backwards, "stateful": false,
                               "unroll": false,
                               "zero_output_for_mask": self.zero_output_for_mask,
                               "cell": cell}),
        )
    }
}
