//! Models: `Sequential`, the functional `Model`, weights, states, and running them.

mod layer_build;
mod lowering;
mod plan;
mod run;
mod state;

pub(crate) use plan::{run_plan, ModelPlan, Moment, RecurrentMode, StepKey, StepPlan, WeightId};
pub(crate) use run::signature;

use layer_build::*;
use lowering::*;

use super::custom::Nest;
use super::emit::Emit;
use super::init::{init_tensor, weight_seed, Init};
use super::layers::kind::LayerKind;
use super::layers::{dtype_of, op_shape, shape_str, Input, Layer, Shape};

use super::KerasError;

use cellgraph_backends::{Backend, Data, Device, PlacedPlan, Plan, Value};
use cellgraph_ir::{DType, Dim, Graph, Op, Tensor, TensorType, ValueRef, ValueType};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;
use std::sync::Arc;

type R<T> = Result<T, KerasError>;

/// A symbolic tensor of a functional model under construction (Keras's `KerasTensor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KerasTensor(pub(crate) usize);

/// A layer added to a functional model, callable several times (shared layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerId(usize);

/// Call-time arguments of a layer besides its input.
#[derive(Clone, Debug, Default)]
pub struct CallArgs {
    /// `initial_state`: the states a recurrent layer starts from (LSTM `[h, c]`;
    /// `Bidirectional`: forward states, then backward states).
    pub initial_state: Vec<KerasTensor>,
    /// `mask`: a `(batch, time)` tensor, nonzero/true where the step is valid.
    pub mask: Option<KerasTensor>,
}

/// One weight variable.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    /// The variable path, `lstm/lstm_cell/kernel`.
    pub name: String,
    /// The value.
    pub value: ArrayD<f32>,
    /// Whether training updates it (BatchNormalization's moving statistics do not).
    pub trainable: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub name: String,
    pub layer: Layer,
    pub weights: Vec<Weight>,
    pub built: Option<Shape>,
    /// The state store of a stateful recurrent layer (Bidirectional: forward, backward).
    pub states: Option<Vec<ArrayD<f32>>>,
    pub calls: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct CallNode {
    pub slot: usize,
    pub inputs: Vec<KerasTensor>,
    pub args: CallArgs,
    pub outputs: Vec<KerasTensor>,
}

#[derive(Clone, Debug)]
pub(crate) struct TensorInfo {
    pub shape: Shape,
    pub node: usize,
    pub index: usize,
}

/// What a graph input of a lowered model is fed with, in graph-input order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Feed {
    /// Model input `i`.
    Input(usize),
    /// Weight `k` of layer slot `slot` (when weights are graph inputs).
    Weight(usize, usize),
    /// State `k` of a stateful layer.
    State(usize, usize),
    /// A dropout mask: `bernoulli(1 − rate) / (1 − rate)` of this shape, drawn per call.
    Random(Vec<usize>, f32),
}

/// A model lowered to a graph, with what its extra inputs and outputs mean.
pub(crate) struct Lowered {
    pub graph: Graph,
    pub feeds: Vec<Feed>,
    /// Slots whose final states follow the model outputs, with their count.
    pub states: Vec<(usize, usize)>,
    /// BatchNormalization slots (training mode) whose batch mean and variance follow.
    pub bn: Vec<usize>,
}

/// The most work an orthogonal initialisation may take (about 16 s of a slow core):
/// `LSTM(2048)` fits, a file declaring far larger recurrent kernels is refused.
const MAX_ORTHOGONAL_COST: u128 = 1 << 36;

/// The most weight elements one layer may create (4 GiB of float32): far above any
/// real recurrent model, far below what would exhaust memory on a declared size.
pub const MAX_WEIGHT_ELEMENTS: usize = 1 << 30;

/// Input dtypes and shapes, and training mode.
type PlanKey = (Vec<(DType, Vec<usize>)>, bool);

struct Compiled {
    plan: ModelPlan,
    lowered: Lowered,
}

/// A compiled training graph: forward, loss and the gradient of every trainable weight.
pub(crate) struct GradPlan {
    pub(crate) plan: ModelPlan,
    pub(crate) lowered: Lowered,
    /// (slot, weight index) of each gradient output, in order.
    pub(crate) params: Vec<(usize, usize)>,
}

/// A Keras model: a sequential stack or a functional graph of layers.
pub struct Model {
    /// The model's name (`sequential`, `functional`).
    pub name: String,
    pub(crate) sequential: bool,
    pub(crate) slots: Vec<Slot>,
    pub(crate) nodes: Vec<CallNode>,
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) inputs: Vec<KerasTensor>,
    pub(crate) outputs: Vec<KerasTensor>,
    seed: u64,
    /// Create weights as zeros instead of drawing them (file imports whose weights
    /// follow).
    pub(crate) skip_init: bool,
    rng: rand::rngs::StdRng,
    plans: HashMap<PlanKey, Compiled>,
    /// How recurrent layers run: raised to fused kernels (default) or as loops.
    pub(crate) recurrent: RecurrentMode,
    /// Backends placed before the CPU ([`Model::set_backends`]).
    pub(crate) backends: Vec<Arc<dyn Device>>,
    pub(crate) grad_plans: HashMap<GradKey, GradPlan>,
    /// Compiled training steps (`train::step`).
    pub(crate) step_plans: HashMap<StepKey, StepPlan>,
    pub(crate) training: Option<super::train::optimizer::TrainState>,
}

/// Input signature, training mode, and the losses (`output:loss` per head).
pub(crate) type GradKey = (Vec<(DType, Vec<usize>)>, bool, String);

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("layers", &self.slots.len())
            .finish()
    }
}

/// `keras.Sequential`: layers applied one after the other. Start with an [`Input`].
///
/// ```
/// use cellgraph::keras::{Dense, Embedding, Input, Sequential, LSTM};
/// # fn main() -> Result<(), cellgraph::keras::KerasError> {
/// let mut model = Sequential::new();
/// model.add(Input::new(&[None]))?;
/// model.add(Embedding::new(1000, 64))?;
/// model.add(LSTM::new(128))?;
/// model.add(Dense::new(10))?;
/// assert_eq!(model.count_params(), 164_106);
/// # Ok(()) }
/// ```
pub struct Sequential;

impl Sequential {
    /// An empty sequential model named `sequential`, weights seeded with 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> Model {
        Model::empty("sequential", true, 0)
    }
    /// An empty sequential model whose weights are drawn with `seed`.
    pub fn with_seed(seed: u64) -> Model {
        Model::empty("sequential", true, seed)
    }
    /// A sequential model from a list of layers (the first an [`Input`]).
    pub fn from_layers(layers: Vec<Layer>) -> R<Model> {
        let mut m = Sequential::new();
        for l in layers {
            m.add(l)?;
        }
        Ok(m)
    }
}

/// Builds a functional model: inputs, layer calls, then [`Functional::build`].
///
/// ```
/// use cellgraph::keras::{CallArgs, Dense, Embedding, Functional, Input, LSTM};
/// # fn main() -> Result<(), cellgraph::keras::KerasError> {
/// let mut f = Functional::new();
/// let enc_in = f.input(Input::new(&[None]))?;
/// let x = f.apply(Embedding::new(1000, 64), &[enc_in])?[0];
/// let enc = f.apply(LSTM::new(64).return_state(true).name("encoder"), &[x])?;
/// let dec_in = f.input(Input::new(&[None]))?;
/// let y = f.apply(Embedding::new(2000, 64), &[dec_in])?[0];
/// let dec = f.layer(LSTM::new(64).name("decoder"))?;
/// let args = CallArgs { initial_state: vec![enc[1], enc[2]], mask: None };
/// let y = f.call_with(dec, &[y], args)?[0];
/// let out = f.apply(Dense::new(10), &[y])?[0];
/// let model = f.build(&[enc_in, dec_in], &[out])?;
/// assert_eq!(model.count_params(), 258_698);
/// # Ok(()) }
/// ```
pub struct Functional {
    model: Model,
}

impl Default for Functional {
    fn default() -> Self {
        Functional::new()
    }
}

impl Functional {
    /// A new builder; weights seeded with 0.
    pub fn new() -> Functional {
        Functional::with_seed(0)
    }
    /// A new builder whose weights are drawn with `seed`.
    pub fn with_seed(seed: u64) -> Functional {
        Functional {
            model: Model::empty("functional", false, seed),
        }
    }
    pub(crate) fn skip_init(&mut self, skip: bool) {
        self.model.skip_init = skip;
    }

    /// Declares an input.
    pub fn input(&mut self, input: Input) -> R<KerasTensor> {
        let slot = self.model.add_slot(Layer::Input(input))?;
        Ok(self.model.call_slot(slot, &[], CallArgs::default())?[0])
    }
    /// Adds a layer without calling it (to call it several times: shared weights).
    pub fn layer(&mut self, layer: impl Into<Layer>) -> R<LayerId> {
        let layer = layer.into();
        if matches!(layer, Layer::Input(_)) {
            return Err(KerasError::Layer {
                layer: layer.given_name().unwrap_or("input_layer").to_string(),
                msg: "declare inputs with Functional::input".into(),
            });
        }
        Ok(LayerId(self.model.add_slot(layer)?))
    }
    /// Calls a layer on tensors; returns its outputs (several with `return_state`).
    pub fn call(&mut self, layer: LayerId, inputs: &[KerasTensor]) -> R<Vec<KerasTensor>> {
        self.call_with(layer, inputs, CallArgs::default())
    }
    /// Calls a layer with `initial_state` / `mask`.
    pub fn call_with(
        &mut self,
        layer: LayerId,
        inputs: &[KerasTensor],
        args: CallArgs,
    ) -> R<Vec<KerasTensor>> {
        self.model.call_slot(layer.0, inputs, args)
    }
    /// Calls a layer on a nested structure of tensors (a [`super::CustomRnn`] whose cell
    /// takes lists or named maps of inputs); other layers take a single leaf.
    pub fn call_nested(
        &mut self,
        layer: LayerId,
        inputs: &super::custom::Nest<KerasTensor>,
        args: CallArgs,
    ) -> R<Vec<KerasTensor>> {
        self.model.call_nested_slot(layer.0, inputs, args)
    }
    /// Adds a layer and calls it once.
    pub fn apply(
        &mut self,
        layer: impl Into<Layer>,
        inputs: &[KerasTensor],
    ) -> R<Vec<KerasTensor>> {
        let id = self.layer(layer)?;
        self.call(id, inputs)
    }
    /// The shape of a tensor, batch first.
    pub fn shape(&self, t: KerasTensor) -> R<Shape> {
        Ok(self.model.tensor(t)?.shape.clone())
    }
    /// Finishes the model with its inputs and outputs.
    pub fn build(self, inputs: &[KerasTensor], outputs: &[KerasTensor]) -> R<Model> {
        self.build_named("functional", inputs, outputs)
    }
    /// Finishes the model and names it.
    pub fn build_named(
        mut self,
        name: &str,
        inputs: &[KerasTensor],
        outputs: &[KerasTensor],
    ) -> R<Model> {
        for &t in inputs {
            let info = self.model.tensor(t)?;
            let slot = self.model.nodes[info.node].slot;
            if !matches!(self.model.slots[slot].layer, Layer::Input(_)) {
                return Err(KerasError::Layer {
                    layer: self.model.slots[slot].name.clone(),
                    msg: "a model input must come from Functional::input".into(),
                });
            }
        }
        for &t in outputs {
            self.model.tensor(t)?;
        }
        if outputs.is_empty() {
            return Err(KerasError::Layer {
                layer: name.to_string(),
                msg: "a model needs at least one output".into(),
            });
        }
        let used: Vec<KerasTensor> = self
            .model
            .nodes
            .iter()
            .filter(|n| matches!(self.model.slots[n.slot].layer, Layer::Input(_)))
            .flat_map(|n| n.outputs.clone())
            .collect();
        for t in used {
            if !inputs.contains(&t) && self.model.reaches_outputs(t, outputs) {
                let slot = self.model.nodes[self.model.tensors[t.0].node].slot;
                return Err(KerasError::Layer {
                    layer: self.model.slots[slot].name.clone(),
                    msg: "the outputs depend on this input, which is not among the model inputs"
                        .into(),
                });
            }
        }
        self.model.inputs = inputs.to_vec();
        self.model.outputs = outputs.to_vec();
        self.model.name = name.to_string();
        Ok(self.model)
    }
}

impl Model {
    /// A model of one layer called on one input, for calling a layer eagerly on tensors
    /// (`lstm_layer(x)` in Keras): every output of the layer is a model output, and a
    /// stateful layer keeps its states between calls.
    ///
    /// ```
    /// use cellgraph::keras::{Input, Model, LSTM};
    /// # fn main() -> Result<(), cellgraph::keras::KerasError> {
    /// let mut lstm = Model::from_layer(Input::new(&[None, Some(3)]), LSTM::new(4).return_state(true))?;
    /// let out = lstm.predict_f32(&[ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 5, 3]))])?;
    /// assert_eq!(out.len(), 3); // output, h, c
    /// # Ok(()) }
    /// ```
    pub fn from_layer(input: Input, layer: impl Into<Layer>) -> R<Model> {
        let mut f = Functional::new();
        let x = f.input(input)?;
        let outs = f.apply(layer, &[x])?;
        f.build(&[x], &outs)
    }

    /// Keras's `keras_history` of a tensor: (layer name, call index, output index).
    pub(crate) fn history_of(&self, t: KerasTensor) -> (String, usize, usize) {
        let info = &self.tensors[t.0];
        let node = &self.nodes[info.node];
        let call = self.nodes[..info.node]
            .iter()
            .filter(|m| m.slot == node.slot)
            .count();
        (self.slots[node.slot].name.clone(), call, info.index)
    }

    pub(crate) fn empty(name: &str, sequential: bool, seed: u64) -> Model {
        Model {
            name: name.to_string(),
            sequential,
            slots: Vec::new(),
            nodes: Vec::new(),
            tensors: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            seed,
            skip_init: false,
            rng: rand::SeedableRng::seed_from_u64(seed ^ 0x5EED_D80F),
            plans: HashMap::new(),
            recurrent: RecurrentMode::Fused,
            backends: Vec::new(),
            grad_plans: HashMap::new(),
            step_plans: HashMap::new(),
            training: None,
        }
    }

    fn tensor(&self, t: KerasTensor) -> R<&TensorInfo> {
        self.tensors
            .get(t.0)
            .ok_or_else(|| KerasError::Internal(format!("tensor {} is not of this model", t.0)))
    }

    fn reaches_outputs(&self, t: KerasTensor, outputs: &[KerasTensor]) -> bool {
        let mut live: Vec<bool> = vec![false; self.tensors.len()];
        live[t.0] = true;
        for n in &self.nodes {
            let reads = n
                .inputs
                .iter()
                .chain(&n.args.initial_state)
                .chain(&n.args.mask)
                .any(|i| live[i.0]);
            if reads {
                for o in &n.outputs {
                    live[o.0] = true;
                }
            }
        }
        outputs.iter().any(|o| live[o.0])
    }

    /// Adds a layer to a sequential model and calls it on the previous output.
    pub fn add(&mut self, layer: impl Into<Layer>) -> R<&mut Model> {
        let layer = layer.into();
        if !self.sequential {
            return Err(KerasError::Layer {
                layer: self.name.clone(),
                msg: "add() is for Sequential models; use Functional for graphs".into(),
            });
        }
        let is_input = matches!(layer, Layer::Input(_));
        match (self.slots.is_empty(), is_input) {
            (true, false) => {
                return Err(KerasError::Layer {
                    layer: layer
                        .given_name()
                        .unwrap_or(layer.default_stem())
                        .to_string(),
                    msg: "a Sequential model starts with Input(shape) so that its weights \
                          can be built"
                        .into(),
                })
            }
            (false, true) => {
                return Err(KerasError::Layer {
                    layer: layer.given_name().unwrap_or("input_layer").to_string(),
                    msg: "an Input can only be the first layer of a Sequential model".into(),
                })
            }
            _ => {}
        }
        let slot = self.add_slot(layer)?;
        let inputs = self.outputs.clone();
        let outs = self.call_slot(slot, &inputs, CallArgs::default())?;
        if outs.len() != 1 {
            return Err(KerasError::Layer {
                layer: self.slots[slot].name.clone(),
                msg: format!(
                    "gives {} outputs; a Sequential model needs layers with one output \
                     (no return_state)",
                    outs.len()
                ),
            });
        }
        if is_input {
            self.inputs = outs.clone();
        }
        self.outputs = outs;
        self.plans.clear();
        Ok(self)
    }

    fn unique_name(&self, stem: &str) -> String {
        let taken = |n: &str| self.slots.iter().any(|s| s.name == n);
        if !taken(stem) {
            return stem.to_string();
        }
        (1..)
            .map(|i| format!("{stem}_{i}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| stem.to_string())
    }

    pub(crate) fn add_slot(&mut self, mut layer: Layer) -> R<usize> {
        let name = match layer.given_name() {
            Some(n) => {
                if self.slots.iter().any(|s| s.name == n) {
                    return Err(KerasError::Layer {
                        layer: n.to_string(),
                        msg: "a layer of this name is already in the model".into(),
                    });
                }
                n.to_string()
            }
            None => self.unique_name(layer.default_stem()),
        };
        LayerKind::check(&mut layer, &name)?;
        self.slots.push(Slot {
            name,
            layer,
            weights: Vec::new(),
            built: None,
            states: None,
            calls: 0,
        });
        Ok(self.slots.len() - 1)
    }

    pub(crate) fn call_slot(
        &mut self,
        slot: usize,
        inputs: &[KerasTensor],
        args: CallArgs,
    ) -> R<Vec<KerasTensor>> {
        for &t in inputs.iter().chain(&args.initial_state).chain(&args.mask) {
            self.tensor(t)?;
        }
        let name = self.slots[slot].name.clone();
        let err = |msg: String| KerasError::Layer {
            layer: name.clone(),
            msg,
        };
        let layer = self.slots[slot].layer.clone();
        let out_shapes = match &layer {
            Layer::Input(i) => {
                if !inputs.is_empty() {
                    return Err(err("an Input takes no inputs".into()));
                }
                vec![i.batch_shape.clone()]
            }
            Layer::Op(op) => {
                let want = if op.kind.is_binary() && op.scalar.is_none() {
                    2
                } else {
                    1
                };
                if inputs.len() != want {
                    return Err(err(format!(
                        "{} takes {want} tensor operands, got {}",
                        op.kind.class_name(),
                        inputs.len()
                    )));
                }
                let shape = self.tensors[inputs[0].0].shape.clone();
                vec![op_shape(op, &shape).map_err(err)?]
            }
            Layer::Custom(c) => {
                if inputs.is_empty() {
                    return Err(err("takes at least one input tensor".into()));
                }
                let mut c = c.clone();
                let structure = match &c.structure {
                    Some(st) => st.clone(),
                    None if inputs.len() == 1 => Nest::Leaf(()),
                    None => Nest::List(vec![Nest::Leaf(()); inputs.len()]),
                };
                let paths = structure.paths();
                if paths.len() != inputs.len() {
                    return Err(err(format!(
                        "was called on {} tensors before, now on {}",
                        paths.len(),
                        inputs.len()
                    )));
                }
                c.structure = Some(structure.clone());
                let shapes: Vec<Shape> = inputs
                    .iter()
                    .map(|t| self.tensors[t.0].shape.clone())
                    .collect();
                let steps = c.step_shapes(&shapes, &paths).map_err(err)?;
                if c.built.is_none() {
                    c.built = structure.pack(steps);
                    let as_layer = Layer::Custom(c.clone());
                    let seed = (!self.skip_init).then_some(self.seed);
                    let weights = build_weights(&as_layer, &name, &shapes[0], seed, slot)?;
                    self.slots[slot].weights = weights;
                    self.slots[slot].built = Some(shapes[0].clone());
                }
                self.slots[slot].layer = Layer::Custom(c.clone());
                self.check_call_args(&Layer::Custom(c.clone()), &shapes[0], &args)
                    .map_err(err)?;
                c.output_shapes(&shapes)
            }
            _ => {
                if inputs.len() != 1 {
                    return Err(err(format!("takes one input tensor, got {}", inputs.len())));
                }
                let shape = self.tensors[inputs[0].0].shape.clone();
                match &self.slots[slot].built {
                    Some(b) => check_same_width(b, &shape).map_err(err)?,
                    None => {
                        let seed = (!self.skip_init).then_some(self.seed);
                        let weights = build_weights(&layer, &name, &shape, seed, slot)?;
                        self.slots[slot].weights = weights;
                        self.slots[slot].built = Some(shape.clone());
                    }
                }
                self.check_call_args(&layer, &shape, &args).map_err(err)?;
                LayerKind::shapes(&layer, &shape).map_err(err)?
            }
        };
        if self.slots[slot].calls > 0 && layer.is_stateful() {
            return Err(err(
                "a stateful layer can be called only once in a model (it has one state store)"
                    .into(),
            ));
        }
        self.slots[slot].calls += 1;
        let node = self.nodes.len();
        let outputs: Vec<KerasTensor> = out_shapes
            .into_iter()
            .enumerate()
            .map(|(index, shape)| {
                self.tensors.push(TensorInfo { shape, node, index });
                KerasTensor(self.tensors.len() - 1)
            })
            .collect();
        self.nodes.push(CallNode {
            slot,
            inputs: inputs.to_vec(),
            args,
            outputs: outputs.clone(),
        });
        Ok(outputs)
    }

    /// Calls a layer on a nested structure of tensors (see [`Functional::call_nested`]).
    pub(crate) fn call_nested_slot(
        &mut self,
        slot: usize,
        inputs: &Nest<KerasTensor>,
        args: CallArgs,
    ) -> R<Vec<KerasTensor>> {
        let flat = inputs.flat();
        let name = self.slots[slot].name.clone();
        match &mut self.slots[slot].layer {
            Layer::Custom(c) => {
                let shape = inputs.map(&mut |_| ());
                match &c.structure {
                    Some(st) if !st.same_structure(&shape) => {
                        return Err(KerasError::Layer {
                            layer: name,
                            msg: format!(
                                "was called on inputs structured as {:?} before, now {:?}",
                                st.paths(),
                                shape.paths()
                            ),
                        })
                    }
                    Some(_) => {}
                    None => c.structure = Some(shape),
                }
            }
            _ => {
                if !matches!(inputs, Nest::Leaf(_)) {
                    return Err(KerasError::Layer {
                        layer: name,
                        msg: "takes one tensor, not a nested structure (only RNN layers around \
                              custom cells take nested inputs)"
                            .into(),
                    });
                }
            }
        }
        self.call_slot(slot, &flat, args)
    }

    /// Checks `initial_state` (one `(batch, *size)` tensor per state) and `mask`
    /// (`(batch, time)`) of a call on `input`.
    fn check_call_args(&self, layer: &Layer, input: &Shape, args: &CallArgs) -> Result<(), String> {
        let sizes: Vec<Vec<usize>> = match layer {
            Layer::Recurrent(r) => r.state_sizes().into_iter().map(|s| vec![s]).collect(),
            Layer::Bidirectional(b) => b
                .forward
                .state_sizes()
                .into_iter()
                .chain(b.backward.state_sizes())
                .map(|s| vec![s])
                .collect(),
            Layer::Custom(c) => c.cell.state_size(),
            _ => {
                if !args.initial_state.is_empty() {
                    return Err("only recurrent layers take an initial_state".into());
                }
                Vec::new()
            }
        };
        if !args.initial_state.is_empty() {
            if args.initial_state.len() != sizes.len() {
                let shown: Vec<String> = sizes.iter().map(|s| shape_str(&as_shape(s))).collect();
                return Err(format!(
                    "initial_state has {} tensors, the layer has {} states of sizes [{}]",
                    args.initial_state.len(),
                    sizes.len(),
                    shown.join(", ")
                ));
            }
            for (k, (t, size)) in args.initial_state.iter().zip(&sizes).enumerate() {
                let shape = &self.tensors[t.0].shape;
                let mut want = vec![input[0]];
                want.extend(as_shape(size));
                let ok = shape.len() == want.len()
                    && shape[1..] == want[1..]
                    && (shape[0].is_none() || input[0].is_none() || shape[0] == input[0]);
                if !ok {
                    return Err(format!(
                        "initial_state[{k}] has shape {}, expected {}",
                        shape_str(shape),
                        shape_str(&want)
                    ));
                }
            }
        }
        if let Some(m) = args.mask {
            let shape = &self.tensors[m.0].shape;
            if shape.len() != 2 || input.len() < 2 {
                return Err(format!(
                    "mask has shape {}, expected (batch, time)",
                    shape_str(shape)
                ));
            }
            if let (Some(a), Some(b)) = (shape[1], input[1]) {
                if a != b {
                    return Err(format!("mask has {a} steps, the input {b}"));
                }
            }
        }
        Ok(())
    }
}
