//! Compiled plans of a model: `ModelPlan` (the CPU's own plan or one placed over
//! several backends), the backend and recurrent-mode settings, the selector, and what
//! the compiled plans report (placements, graphs).

use super::*;
/// How recurrent layers run (the CPU backend's fused kernels or loops).
pub(crate) use cellgraph_backends::cpu::Recurrent as RecurrentMode;
use cellgraph_backends::cpu::{CpuBackend, CpuPlan};

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

/// Runs a plan and unwraps its tensors.
pub(crate) fn run_plan(plan: &mut ModelPlan, data: Vec<Data>) -> R<Vec<Tensor>> {
    plan.run(data)?
        .into_iter()
        .map(|d| d.into_tensor().map_err(KerasError::Internal))
        .collect()
}

impl Model {
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
}

/// Input signature, the heads' losses, the optimizer and clipping (compiled into the
/// graph as constants).
pub(crate) type StepKey = (Vec<(DType, Vec<usize>)>, String, String);

/// Which optimizer moment a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Moment {
    /// The first moment / momentum slot (`OptSlot::m`).
    M,
    /// The second moment (`OptSlot::v`).
    V,
}

/// A weight by (layer slot, index in the slot).
pub(crate) type WeightId = (usize, usize);

/// A compiled training step (`train::step` builds and runs it).
pub(crate) struct StepPlan {
    pub(crate) plan: ModelPlan,
    /// The lowered model's feeds (the first graph inputs).
    pub(crate) feeds: Vec<Feed>,
    /// Stateful layers whose final states follow the model outputs.
    pub(crate) states: Vec<(usize, usize)>,
    /// Weights read by the step that the lowered forward does not read (BatchNorm
    /// moving statistics in training mode): graph inputs after the targets.
    pub(crate) extra_weights: Vec<WeightId>,
    /// Moment inputs (after the extra weights), and in the same order the new moments
    /// among the outputs.
    pub(crate) moments: Vec<(WeightId, Moment)>,
    /// How many scalar inputs follow the moments ([`Optimizer::step_scalars`]).
    pub(crate) n_scalars: usize,
    /// The weight each new-weight output replaces, in output order.
    pub(crate) writes: Vec<WeightId>,
    /// Model outputs.
    pub(crate) n_model: usize,
    /// Loss heads.
    pub(crate) n_heads: usize,
    /// Each head's output shape (how its targets are prepared).
    pub(crate) head_shapes: Vec<Vec<usize>>,
}

impl StepPlan {
    /// The compiled plan.
    pub(crate) fn plan(&self) -> &ModelPlan {
        &self.plan
    }
}
