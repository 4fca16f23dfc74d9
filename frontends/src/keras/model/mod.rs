//! Models: `Sequential`, the functional `Model`, weights, states, and running them.

mod layer_build;
mod lowering;

use layer_build::*;
use lowering::*;

use super::custom::Nest;
use super::emit::Emit;
use super::init::{init_tensor, weight_seed, Init};
use super::layers::{shape_str, Input, Layer, Recurrent, Shape};
use super::lower;
use super::KerasError;
use cellgraph_backends::cpu::{CpuBackend, CpuPlan, Recurrent as RecurrentMode};
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

/// A compiled plan of a model: the CPU backend's own, or one placed over several
/// backends (those of [`Model::set_backends`], then the CPU for every node they
/// refuse).
pub(crate) enum ModelPlan {
    /// The whole graph on the CPU.
    Cpu(Box<CpuPlan>),
    /// Placed over a backend list.
    Placed(Box<PlacedPlan>),
}

impl ModelPlan {
    /// Compiles `graph` on `before` (in order of preference) and the CPU.
    pub(crate) fn compile(graph: &Graph, before: &[Arc<dyn Device>]) -> R<ModelPlan> {
        let cpu = CpuBackend::new(RecurrentMode::Fused);
        if before.is_empty() {
            return Ok(ModelPlan::Cpu(Box::new(cpu.compile(graph)?)));
        }
        let mut list = before.to_vec();
        list.push(Arc::new(cpu));
        Ok(ModelPlan::Placed(Box::new(PlacedPlan::compile(
            graph, list,
        )?)))
    }

    /// The graph the plan runs.
    pub(crate) fn graph(&self) -> &Graph {
        match self {
            ModelPlan::Cpu(p) => p.graph(),
            ModelPlan::Placed(p) => p.graph(),
        }
    }

    /// Where each node runs (`None` for a CPU-only plan).
    pub(crate) fn placement(&self) -> Option<&[cellgraph_backends::placed::NodePlace]> {
        match self {
            ModelPlan::Cpu(_) => None,
            ModelPlan::Placed(p) => Some(p.placement()),
        }
    }

    /// Runs on values wherever they are; outputs stay where they were computed (see
    /// [`PlacedPlan::run_values`]). A CPU-only plan takes host values only.
    pub(crate) fn run_values(&mut self, values: Vec<Value>) -> R<Vec<Value>> {
        match self {
            ModelPlan::Cpu(p) => {
                let data = values
                    .into_iter()
                    .map(|v| match v {
                        Value::Host(d) => Ok(d),
                        Value::Device(d) => Err(KerasError::Internal(format!(
                            "a value on backend {} given to a CPU plan",
                            d.backend
                        ))),
                    })
                    .collect::<R<Vec<_>>>()?;
                Ok(p.run(data)?.into_iter().map(Value::Host).collect())
            }
            ModelPlan::Placed(p) => Ok(p.run_values(values)?),
        }
    }

    /// Brings one value of this plan to the host.
    pub(crate) fn download(&mut self, v: Value) -> R<Data> {
        match (self, v) {
            (_, Value::Host(d)) => Ok(d),
            (ModelPlan::Placed(p), v) => Ok(p.to_host(v)?),
            (ModelPlan::Cpu(_), Value::Device(d)) => Err(KerasError::Internal(format!(
                "a value on backend {} in a CPU plan",
                d.backend
            ))),
        }
    }

    fn run(&mut self, data: Vec<Data>) -> R<Vec<Data>> {
        Ok(match self {
            ModelPlan::Cpu(p) => p.run(data)?,
            ModelPlan::Placed(p) => p.run(data)?,
        })
    }
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
    pub(crate) step_plans: HashMap<super::train::step::StepKey, super::train::step::StepPlan>,
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

    /// Restarts the dropout stream for an epoch of `fit` (derived from the model seed).
    pub(crate) fn reseed_dropout(&mut self, epoch: usize) {
        self.rng = rand::SeedableRng::seed_from_u64(super::init::weight_seed(
            self.seed ^ 0x5EED_D80F,
            epoch,
            2,
        ));
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

    /// How recurrent layers run from now on. `Fused` (the default): the selector raises
    /// each layer's `Scan` loop to the fused `LSTM`/`GRU`/`RNN` op (masked forms for
    /// masks) when its cell is one the rules recognise, for inference and training (the
    /// gradient of a fused op is the fused backward op). `Loop`: every layer runs as its
    /// `Scan` loop. Compiled plans are dropped.
    pub fn set_recurrent(&mut self, mode: RecurrentMode) {
        self.recurrent = mode;
        self.plans.clear();
        self.grad_plans.clear();
        self.step_plans.clear();
    }

    /// The backends this model's plans run on, in order of preference, before the CPU
    /// (which runs every node they refuse). Empty (the default): the CPU alone. Each
    /// node of the inference and training graphs runs on the first backend that accepts
    /// it, with copies only at the edges between backends (`backends::placed`); the
    /// results are the CPU's. Compiled plans are dropped.
    ///
    /// ```
    /// use cellgraph::backends::subset::SubsetBackend;
    /// use cellgraph::keras::{Dense, Input, Sequential};
    /// use std::sync::Arc;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut m = Sequential::new();
    /// m.add(Input::new(&[Some(3)]))?;
    /// m.add(Dense::new(2))?;
    /// m.set_backends(vec![Arc::new(SubsetBackend)]);
    /// let x = cellgraph::ir::Tensor::zeros(cellgraph::ir::DType::F32, &[4, 3]);
    /// let y = m.predict(&[x])?;
    /// assert_eq!(y[0].shape(), &[4, 2]);
    /// assert!(m.placements().iter().flatten().any(|p| p.backend == "subset"));
    /// # Ok(()) }
    /// ```
    pub fn set_backends(&mut self, backends: Vec<Arc<dyn Device>>) {
        self.backends = backends;
        self.plans.clear();
        self.grad_plans.clear();
        self.step_plans.clear();
    }

    /// Where each node of every plan compiled so far runs (inference and training
    /// plans), one line per node: `dense/matmul (MatMul) → subset`. Empty when the
    /// model runs on the CPU alone.
    pub fn placements(&self) -> Vec<Vec<cellgraph_backends::placed::NodePlace>> {
        self.plans
            .values()
            .map(|c| &c.plan)
            .chain(self.grad_plans.values().map(|p| &p.plan))
            .chain(self.step_plans.values().map(|p| p.plan()))
            .filter_map(|p| p.placement().map(<[_]>::to_vec))
            .collect()
    }

    /// What the selector decides for each recurrent layer for inputs of this signature
    /// (inference form): fused on the CPU, or a loop and why.
    pub fn recurrent_choices(
        &self,
        sig: &[(DType, Vec<usize>)],
    ) -> R<Vec<cellgraph_backends::passes::select::Choice>> {
        let lowered = self.lower(sig, false, true)?;
        Ok(self.select(&lowered.graph)?.choices)
    }

    /// The graphs of every plan compiled so far (inference and training), as they run.
    pub fn compiled_graphs(&self) -> Vec<&Graph> {
        self.plans
            .values()
            .map(|c| c.plan.graph())
            .chain(self.grad_plans.values().map(|p| p.plan.graph()))
            .chain(self.step_plans.values().map(|p| p.plan().graph()))
            .collect()
    }

    /// The selector over a lowered graph: this model's backends, then the CPU in this
    /// model's recurrent mode.
    pub(crate) fn select(&self, g: &Graph) -> R<cellgraph_backends::passes::select::Selected> {
        let mut list = self.backends.clone();
        list.push(Arc::new(CpuBackend::new(self.recurrent)));
        Ok(cellgraph_backends::passes::select::select(
            &list,
            g,
            self.recurrent == RecurrentMode::Fused,
        )?)
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
        validate(&mut layer, &name)?;
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
                output_shapes(&layer, &shape).map_err(err)?
            }
        };
        if self.slots[slot].calls > 0 && is_stateful(&layer) {
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

    /// The names of the layers, in order (Sequential models include their Input).
    pub fn layer_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// A layer by name.
    pub fn layer(&self, name: &str) -> Option<&Layer> {
        self.slots.iter().find(|s| s.name == name).map(|s| &s.layer)
    }

    /// The weight variables in Keras's `model.weights` order.
    pub fn weights(&self) -> Vec<&Weight> {
        self.slots.iter().flat_map(|s| &s.weights).collect()
    }

    /// `get_weights()`: the values in Keras order.
    pub fn get_weights(&self) -> Vec<ArrayD<f32>> {
        self.weights()
            .into_iter()
            .map(|w| w.value.clone())
            .collect()
    }

    /// `set_weights(...)`: values in Keras order; every shape must match.
    pub fn set_weights(&mut self, values: Vec<ArrayD<f32>>) -> R<()> {
        let n = self.weights().len();
        if values.len() != n {
            return Err(KerasError::Weights(format!(
                "the model has {n} weights, got {}",
                values.len()
            )));
        }
        for (w, v) in self.weights().into_iter().zip(&values) {
            if w.value.shape() != v.shape() {
                return Err(KerasError::Weights(format!(
                    "{}: expected shape {:?}, got {:?}",
                    w.name,
                    w.value.shape(),
                    v.shape()
                )));
            }
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                return Err(KerasError::Weights(format!(
                    "{}: holds the non-finite value {bad}",
                    w.name
                )));
            }
        }
        let mut it = values.into_iter();
        for s in &mut self.slots {
            for w in &mut s.weights {
                if let Some(v) = it.next() {
                    w.value = v;
                }
            }
        }
        Ok(())
    }

    /// Total, trainable and non-trainable parameter counts.
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let (mut t, mut n) = (0, 0);
        for w in self.weights() {
            if w.trainable {
                t += w.value.len();
            } else {
                n += w.value.len();
            }
        }
        (t + n, t, n)
    }

    /// `count_params()`.
    pub fn count_params(&self) -> usize {
        self.param_counts().0
    }

    /// The shapes of the model outputs, batch first.
    pub fn output_shapes(&self) -> Vec<Shape> {
        self.outputs
            .iter()
            .map(|t| self.tensors[t.0].shape.clone())
            .collect()
    }

    /// The declared shapes of the model inputs, batch first.
    pub fn input_shapes(&self) -> Vec<Shape> {
        self.inputs
            .iter()
            .map(|t| self.tensors[t.0].shape.clone())
            .collect()
    }

    /// The current states of a stateful recurrent layer (`layer.states`): LSTM `[h, c]`,
    /// GRU/SimpleRNN `[h]`; a stateful `Bidirectional` gives forward then backward states.
    /// Zeros before the first call when the batch size is declared.
    pub fn layer_states(&self, layer: &str) -> R<Vec<ArrayD<f32>>> {
        let slot =
            self.slots
                .iter()
                .find(|s| s.name == layer)
                .ok_or_else(|| KerasError::Layer {
                    layer: layer.to_string(),
                    msg: "no layer of this name in the model".into(),
                })?;
        if !is_stateful(&slot.layer) {
            return Err(KerasError::Layer {
                layer: layer.to_string(),
                msg: "is not stateful: it keeps no states between calls".into(),
            });
        }
        if let Some(s) = &slot.states {
            return Ok(s.clone());
        }
        let batch = slot
            .built
            .as_ref()
            .and_then(|s| s.first().copied().flatten())
            .ok_or_else(|| KerasError::Layer {
                layer: layer.to_string(),
                msg: "has no states yet: the batch size is unknown until the first call".into(),
            })?;
        Ok(state_sizes(&slot.layer)
            .into_iter()
            .map(|s| ArrayD::zeros(IxDyn(&[batch, s])))
            .collect())
    }

    /// `reset_states()`: every state of every stateful layer back to zeros.
    pub fn reset_states(&mut self) {
        for s in &mut self.slots {
            if let Some(st) = &mut s.states {
                for a in st {
                    a.fill(0.0);
                }
            }
        }
    }

    /// Lowers the model to an IR graph for inputs of the given dtypes and shapes, in
    /// inference mode. Weights are initializers; graph inputs are the model inputs, then
    /// the states of stateful layers (`<layer>/state_k`); outputs are the model outputs,
    /// then those layers' final states.
    pub fn to_graph(&self, inputs: &[(DType, Vec<usize>)]) -> R<Graph> {
        Ok(self.lower(inputs, false, false)?.graph)
    }

    pub(crate) fn lower(
        &self,
        sig: &[(DType, Vec<usize>)],
        training: bool,
        weights_as_inputs: bool,
    ) -> R<Lowered> {
        let dims: Vec<(DType, Vec<Dim>)> = sig
            .iter()
            .map(|(dt, s)| (*dt, s.iter().map(|&d| Dim::Known(d as u64)).collect()))
            .collect();
        self.lower_dims(&dims, training, weights_as_inputs)
    }

    /// The names of the model's inputs (their Input layers).
    pub fn input_names(&self) -> Vec<String> {
        self.inputs
            .iter()
            .map(|t| {
                self.slots[self.nodes[self.tensors[t.0].node].slot]
                    .name
                    .clone()
            })
            .collect()
    }

    /// The dtypes the model's inputs declare (`float32` unless an Input says otherwise).
    pub fn input_dtypes(&self) -> Vec<DType> {
        self.inputs
            .iter()
            .map(
                |t| match &self.slots[self.nodes[self.tensors[t.0].node].slot].layer {
                    Layer::Input(i) => dtype_of(&i.dtype).unwrap_or(DType::F32),
                    _ => DType::F32,
                },
            )
            .collect()
    }

    pub(crate) fn lower_dims(
        &self,
        sig: &[(DType, Vec<Dim>)],
        training: bool,
        weights_as_inputs: bool,
    ) -> R<Lowered> {
        let mut g = Graph::new(self.name.clone());
        let mut feeds = Vec::new();
        let mut vals: HashMap<KerasTensor, (ValueRef, Option<ValueRef>)> = HashMap::new();
        for (i, (t, (dt, dims))) in self.inputs.iter().zip(sig).enumerate() {
            let slot = &self.slots[self.nodes[self.tensors[t.0].node].slot];
            let v = g.add_input(
                &slot.name,
                ValueType::Tensor(TensorType::with_dims(*dt, dims.clone())),
            )?;
            feeds.push(Feed::Input(i));
            let want = match &slot.layer {
                Layer::Input(i) => dtype_of(&i.dtype).ok_or_else(|| KerasError::Unsupported {
                    layer: slot.name.clone(),
                    what: format!("dtype {:?}", i.dtype),
                })?,
                _ => DType::F32,
            };
            let v = if *dt == want {
                v
            } else {
                Emit::new(&mut g, &slot.name).cast(v, want)?
            };
            vals.insert(*t, (v, None));
        }
        let mut wrefs: Vec<Vec<ValueRef>> = Vec::new();
        for (si, s) in self.slots.iter().enumerate() {
            let mut refs = Vec::new();
            for (k, w) in s.weights.iter().enumerate() {
                refs.push(if weights_as_inputs {
                    let d: Vec<u64> = w.value.shape().iter().map(|&d| d as u64).collect();
                    feeds.push(Feed::Weight(si, k));
                    g.add_input(&w.name, ValueType::tensor(DType::F32, &d))?
                } else {
                    g.add_initializer(&w.name, Tensor::F32(w.value.clone()), w.trainable)?
                });
            }
            wrefs.push(refs);
        }
        let mut state_outs: Vec<ValueRef> = Vec::new();
        let mut bn_outs: Vec<ValueRef> = Vec::new();
        let mut bindings = Vec::new();
        let mut bn = Vec::new();
        let batch = sig
            .first()
            .and_then(|(_, s)| s.first())
            .cloned()
            .unwrap_or(Dim::Unknown);
        for node in &self.nodes {
            let slot = &self.slots[node.slot];
            if matches!(slot.layer, Layer::Input(_)) {
                continue;
            }
            if let Layer::Op(op) = &slot.layer {
                let ins = node
                    .inputs
                    .iter()
                    .map(|t| vals.get(t).map(|v| v.0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| KerasError::Internal("op operand not computed".into()))?;
                let mut e = Emit::new(&mut g, &slot.name);
                let v = lower_op(&mut e, op, &ins)?;
                vals.insert(node.outputs[0], (v, None));
                continue;
            }
            let (x, in_mask) = *vals.get(&node.inputs[0]).ok_or_else(|| KerasError::Layer {
                layer: slot.name.clone(),
                msg: "reads a tensor that the model inputs do not determine".into(),
            })?;
            // The call's `mask`, else the (first) input's.
            let mask = match node.args.mask {
                Some(m) => {
                    let mv = vals
                        .get(&m)
                        .ok_or_else(|| KerasError::Internal("mask tensor not computed".into()))?
                        .0;
                    Some(Emit::new(&mut g, &slot.name).cast(mv, DType::Bool)?)
                }
                None => in_mask,
            };
            let mut init: Option<Vec<ValueRef>> = if node.args.initial_state.is_empty() {
                None
            } else {
                Some(
                    node.args
                        .initial_state
                        .iter()
                        .map(|t| vals.get(t).map(|v| v.0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| KerasError::Internal("initial state not computed".into()))?,
                )
            };
            if let Layer::Custom(c) = &slot.layer {
                let parts = node
                    .inputs
                    .iter()
                    .map(|t| vals.get(t).map(|v| v.0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| KerasError::Layer {
                        layer: slot.name.clone(),
                        msg: "reads a tensor that the model inputs do not determine".into(),
                    })?;
                let named: Vec<(String, ValueRef)> = c
                    .specs(c.built.as_ref().ok_or_else(|| {
                        KerasError::Internal("custom RNN lowered before it was built".into())
                    })?)
                    .map_err(|msg| KerasError::Layer {
                        layer: slot.name.clone(),
                        msg,
                    })?
                    .into_iter()
                    .map(|(w, ..)| w)
                    .zip(wrefs[node.slot].iter().copied())
                    .collect();
                let mut e = Emit::new(&mut g, &slot.name);
                e.training = training;
                let outs = super::custom::lower(&mut e, c, &named, &parts, mask, init)?;
                for (t, v) in node.outputs.iter().zip(outs) {
                    vals.insert(*t, v);
                }
                continue;
            }
            let stateful_here = is_stateful(&slot.layer) && init.is_none();
            if stateful_here {
                let mut v = Vec::new();
                for (k, s) in state_sizes(&slot.layer).into_iter().enumerate() {
                    feeds.push(Feed::State(node.slot, k));
                    v.push(g.add_input(
                        &format!("{}/state_{k}", slot.name),
                        ValueType::Tensor(TensorType::with_dims(
                            DType::F32,
                            vec![batch.clone(), Dim::Known(s as u64)],
                        )),
                    )?);
                }
                init = Some(v);
            }
            let w = &wrefs[node.slot];
            let mut e = Emit::new(&mut g, &slot.name);
            e.training = training;
            let mut extra = Vec::new();
            let outs: Vec<(ValueRef, Option<ValueRef>)> =
                lower_layer(&mut e, &slot.layer, w, x, mask, init, &mut extra)?;
            feeds.extend(e.randoms.drain(..).map(|(s, r)| Feed::Random(s, r)));
            if !extra.is_empty() {
                bn.push(node.slot);
                bn_outs.extend(extra);
            }
            if stateful_here {
                let n = state_sizes(&slot.layer).len();
                let finals: Vec<ValueRef> = outs[outs.len() - n..].iter().map(|o| o.0).collect();
                bindings.push((node.slot, n));
                state_outs.extend(finals);
            }
            for (t, v) in node.outputs.iter().zip(outs) {
                vals.insert(*t, v);
            }
        }
        let mut outs = Vec::new();
        for t in &self.outputs {
            outs.push(
                vals.get(t)
                    .ok_or_else(|| KerasError::Internal("output not computed".into()))?
                    .0,
            );
        }
        outs.extend(state_outs);
        outs.extend(bn_outs);
        // A graph output must be a named op output; wrap inputs/initializers in Identity.
        let outs = outs
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let id = g.add_node("", Op::Identity {}, &[Some(v)], &[&format!("output_{i}")])?;
                Ok(ValueRef { node: id, slot: 0 })
            })
            .collect::<Result<Vec<_>, cellgraph_ir::Error>>()?;
        g.set_outputs(outs)?;
        Ok(Lowered {
            graph: g,
            feeds,
            states: bindings,
            bn,
        })
    }

    /// Runs the model on tensors in inference mode (`model.predict`, `model(x,
    /// training=False)`): dropout off, BatchNormalization on its moving statistics.
    /// Inputs in model-input order; float32, or integer token ids. Stateful layers start
    /// from their stored states and keep their final states.
    pub fn predict(&mut self, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        self.call(inputs, false)
    }

    /// Calls the model (`model(x, training=...)`). In training mode `Dropout` layers and
    /// the `dropout`/`recurrent_dropout` of recurrent layers drop with fresh masks drawn
    /// from the model's seeded generator (one mask per call and sequence, as Keras), and
    /// `BatchNormalization` normalises with the batch statistics (masked steps excluded)
    /// and moves its moving mean and variance by `momentum`.
    pub fn call(&mut self, inputs: &[Tensor], training: bool) -> R<Vec<Tensor>> {
        self.prepare(inputs)?;
        let key = (signature(inputs), training);
        if !self.plans.contains_key(&key) {
            // Weights are graph inputs: set_weights and BatchNormalization updates need
            // no recompilation.
            let mut lowered = self.lower(&key.0, training, true)?;
            lowered.graph = self.select(&lowered.graph)?.graph;
            cellgraph_ir::verify(&lowered.graph)?;
            let plan = ModelPlan::compile(&lowered.graph, &self.backends)?;
            self.plans.insert(key.clone(), Compiled { plan, lowered });
        }
        let (feeds, states, bn) = {
            let c = &self.plans[&key].lowered;
            (c.feeds.clone(), c.states.clone(), c.bn.clone())
        };
        let data = self.feed(&feeds, inputs, &[])?;
        let plan = &mut self
            .plans
            .get_mut(&key)
            .ok_or_else(|| KerasError::Internal("plan missing".into()))?
            .plan;
        let mut outs = run_plan(plan, data)?;
        let rest = outs.split_off(self.outputs.len());
        self.absorb(&states, &bn, rest)?;
        Ok(outs)
    }

    /// Checks the inputs against the model's and prepares the state stores.
    pub(crate) fn prepare(&mut self, inputs: &[Tensor]) -> R<()> {
        if inputs.len() != self.inputs.len() {
            return Err(KerasError::Input {
                input: self.name.clone(),
                msg: format!(
                    "the model takes {} inputs, got {}",
                    self.inputs.len(),
                    inputs.len()
                ),
            });
        }
        for (t, x) in self.inputs.iter().zip(inputs) {
            let declared = &self.tensors[t.0].shape;
            let name = &self.slots[self.nodes[self.tensors[t.0].node].slot].name;
            let got = x.shape();
            let ok = declared.len() == got.len()
                && declared
                    .iter()
                    .zip(got)
                    .all(|(d, &g)| d.is_none_or(|d| d == g));
            if !ok {
                return Err(KerasError::Input {
                    input: name.clone(),
                    msg: format!(
                        "expected shape {}, got {}",
                        shape_str(declared),
                        shape_str(&got.iter().map(|&d| Some(d)).collect::<Vec<_>>())
                    ),
                });
            }
            if x.dtype().is_float() {
                if let Some(bad) = x.to_f64_vec().into_iter().find(|v| v.is_nan()) {
                    return Err(KerasError::Input {
                        input: name.clone(),
                        msg: format!("holds {bad}"),
                    });
                }
            }
        }
        let batch = inputs
            .first()
            .and_then(|x| x.shape().first())
            .copied()
            .unwrap_or(0);
        for s in &mut self.slots {
            if !is_stateful(&s.layer) {
                continue;
            }
            let sizes = state_sizes(&s.layer);
            match &s.states {
                Some(st) if st.first().map(|a| a.shape()[0]) != Some(batch) => {
                    return Err(KerasError::Layer {
                        layer: s.name.clone(),
                        msg: format!(
                            "is stateful with batch size {}, got a batch of {batch}",
                            st.first().map_or(0, |a| a.shape()[0])
                        ),
                    })
                }
                Some(_) => {}
                None => {
                    s.states = Some(
                        sizes
                            .iter()
                            .map(|&u| ArrayD::zeros(IxDyn(&[batch, u])))
                            .collect(),
                    )
                }
            }
        }
        Ok(())
    }

    /// The data for a plan's graph inputs: model inputs, weights, states, fresh dropout
    /// masks, then `extra` (loss targets).
    pub(crate) fn feed(
        &mut self,
        feeds: &[Feed],
        inputs: &[Tensor],
        extra: &[Tensor],
    ) -> R<Vec<Data>> {
        let mut data: Vec<Data> = Vec::with_capacity(feeds.len() + extra.len());
        for f in feeds {
            let t = match f {
                Feed::Input(i) => inputs[*i].clone(),
                Feed::Weight(s, k) => Tensor::F32(self.slots[*s].weights[*k].value.clone()),
                Feed::State(s, k) => Tensor::F32(
                    self.slots[*s]
                        .states
                        .as_ref()
                        .and_then(|st| st.get(*k))
                        .cloned()
                        .ok_or_else(|| KerasError::Internal("state store missing".into()))?,
                ),
                Feed::Random(shape, rate) => {
                    let keep = 1.0 - rate;
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = (0..n)
                        .map(|_| {
                            if rand::RngExt::random::<f32>(&mut self.rng) < keep {
                                1.0 / keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    Tensor::F32(
                        ArrayD::from_shape_vec(IxDyn(shape), v)
                            .map_err(|e| KerasError::Internal(e.to_string()))?,
                    )
                }
            };
            data.push(Data::Tensor(t));
        }
        data.extend(extra.iter().cloned().map(Data::Tensor));
        Ok(data)
    }

    /// Takes the final states and BatchNormalization batch statistics that follow the
    /// model outputs; returns what is left after them.
    pub(crate) fn absorb(
        &mut self,
        states: &[(usize, usize)],
        bn: &[usize],
        rest: Vec<Tensor>,
    ) -> R<Vec<Tensor>> {
        let mut rest = rest.into_iter();
        let mut f32_out = || match rest.next() {
            Some(Tensor::F32(a)) => Ok(a),
            _ => Err(KerasError::Internal("extra output missing".into())),
        };
        for &(slot, n) in states {
            let new = (0..n).map(|_| f32_out()).collect::<R<Vec<_>>>()?;
            self.slots[slot].states = Some(new);
        }
        for &slot in bn {
            let (mean, var) = (f32_out()?, f32_out()?);
            let momentum = match &self.slots[slot].layer {
                Layer::BatchNormalization(b) => b.momentum,
                _ => return Err(KerasError::Internal("BN update for a non-BN layer".into())),
            };
            let ws = &mut self.slots[slot].weights;
            let n = ws.len();
            for (w, batch_stat) in ws[n - 2..].iter_mut().zip([mean, var]) {
                w.value = &w.value * momentum
                    + &(batch_stat
                        .into_shape_with_order(w.value.raw_dim())
                        .map_err(|e| KerasError::Internal(e.to_string()))?
                        * (1.0 - momentum));
            }
        }
        Ok(rest.collect())
    }

    /// [`Model::predict`] on float32 arrays.
    pub fn predict_f32(&mut self, inputs: &[ArrayD<f32>]) -> R<Vec<ArrayD<f32>>> {
        let ts: Vec<Tensor> = inputs.iter().cloned().map(Tensor::F32).collect();
        self.predict(&ts)?
            .into_iter()
            .map(|t| match t {
                Tensor::F32(a) => Ok(a),
                other => Err(KerasError::Internal(format!(
                    "output of dtype {} is not float32",
                    other.dtype().name()
                ))),
            })
            .collect()
    }
}

/// Input dtypes and shapes.
pub(crate) fn signature(inputs: &[Tensor]) -> Vec<(DType, Vec<usize>)> {
    inputs
        .iter()
        .map(|x| (x.dtype(), x.shape().to_vec()))
        .collect()
}

/// Runs a plan and unwraps its tensors.
pub(crate) fn run_plan(plan: &mut ModelPlan, data: Vec<Data>) -> R<Vec<Tensor>> {
    plan.run(data)?
        .into_iter()
        .map(|d| d.into_tensor().map_err(KerasError::Internal))
        .collect()
}

pub(crate) fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "int32" => DType::I32,
        "int64" => DType::I64,
        _ => return None,
    })
}
