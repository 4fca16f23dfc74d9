//! The recurrent layers' configurations: cells (`LSTMCell`, `GRUCell`,
//! `SimpleRNNCell`, `StackedRNNCells`), [`Recurrent`] (`LSTM`, `GRU`, `SimpleRNN`,
//! `RNN(cell)`: one representation, as in Keras) and [`Bidirectional`].

use crate::keras::activation::{Activation, Shape};
use crate::keras::KerasError;

/// The kind of a recurrent cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellKind {
    /// `SimpleRNNCell`: `h = act(x·K + b + h·U)`.
    SimpleRNN,
    /// `GRUCell`, gate blocks z, r, h.
    GRU,
    /// `LSTMCell`, gate blocks i, f, c, o.
    LSTM,
}

impl CellKind {
    /// Keras's class name of the cell.
    pub fn class_name(self) -> &'static str {
        match self {
            CellKind::SimpleRNN => "SimpleRNNCell",
            CellKind::GRU => "GRUCell",
            CellKind::LSTM => "LSTMCell",
        }
    }

    /// Keras's default name of the cell (`lstm_cell`).
    pub fn default_name(self) -> &'static str {
        match self {
            CellKind::SimpleRNN => "simple_rnn_cell",
            CellKind::GRU => "gru_cell",
            CellKind::LSTM => "lstm_cell",
        }
    }

    /// Gate blocks in the kernel.
    pub fn gates(self) -> usize {
        match self {
            CellKind::SimpleRNN => 1,
            CellKind::GRU => 3,
            CellKind::LSTM => 4,
        }
    }
}

/// A recurrent cell: `LSTMCell`, `GRUCell` or `SimpleRNNCell` and their options.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The cell type.
    pub kind: CellKind,
    /// `units`.
    pub units: usize,
    /// `activation` (default tanh).
    pub activation: Activation,
    /// `recurrent_activation` (default sigmoid; unused by SimpleRNN).
    pub recurrent_activation: Activation,
    /// `use_bias` (default true).
    pub use_bias: bool,
    /// LSTM `unit_forget_bias` (default true): the bias starts with ones in the f block.
    pub unit_forget_bias: bool,
    /// GRU `reset_after` (default true): the reset gate applies after the recurrent product.
    pub reset_after: bool,
    /// `dropout` on the inputs (training only).
    pub dropout: f32,
    /// `recurrent_dropout` on the state (training only).
    pub recurrent_dropout: f32,
    /// The cell's name (weights are named `<layer>/<cell>/kernel`).
    pub name: Option<String>,
}

impl Cell {
    fn new(kind: CellKind, units: usize) -> Cell {
        Cell {
            kind,
            units,
            activation: Activation::Tanh,
            recurrent_activation: Activation::Sigmoid,
            use_bias: true,
            unit_forget_bias: true,
            reset_after: true,
            dropout: 0.0,
            recurrent_dropout: 0.0,
            name: None,
        }
    }

    /// Sets `activation`.
    pub fn activation(mut self, a: Activation) -> Cell {
        self.activation = a;
        self
    }
    /// Sets `recurrent_activation`.
    pub fn recurrent_activation(mut self, a: Activation) -> Cell {
        self.recurrent_activation = a;
        self
    }
    /// Sets `use_bias`.
    pub fn use_bias(mut self, b: bool) -> Cell {
        self.use_bias = b;
        self
    }
    /// Sets LSTM `unit_forget_bias`.
    pub fn unit_forget_bias(mut self, b: bool) -> Cell {
        self.unit_forget_bias = b;
        self
    }
    /// Sets GRU `reset_after`.
    pub fn reset_after(mut self, b: bool) -> Cell {
        self.reset_after = b;
        self
    }
    /// Sets `dropout`.
    pub fn dropout(mut self, rate: f32) -> Cell {
        self.dropout = rate;
        self
    }
    /// Sets `recurrent_dropout`.
    pub fn recurrent_dropout(mut self, rate: f32) -> Cell {
        self.recurrent_dropout = rate;
        self
    }
    /// Names the cell.
    pub fn name(mut self, name: &str) -> Cell {
        self.name = Some(name.to_string());
        self
    }

    /// The sizes of the cell's states: LSTM `[units, units]` (h, c), else `[units]`.
    pub fn state_sizes(&self) -> Vec<usize> {
        match self.kind {
            CellKind::LSTM => vec![self.units, self.units],
            _ => vec![self.units],
        }
    }

    /// The number of weights for an input of width `input_dim`.
    pub fn param_count(&self, input_dim: usize) -> usize {
        let g = self.kind.gates() * self.units;
        let bias = match (self.use_bias, self.kind) {
            (false, _) => 0,
            (true, CellKind::GRU) if self.reset_after => 2 * g,
            (true, _) => g,
        };
        input_dim * g + self.units * g + bias
    }

    /// The weight shapes `[kernel, recurrent_kernel, (bias)]` for an input width.
    pub fn weight_shapes(&self, input_dim: usize) -> Vec<(&'static str, Vec<usize>)> {
        let g = self.kind.gates() * self.units;
        let mut v = vec![
            ("kernel", vec![input_dim, g]),
            ("recurrent_kernel", vec![self.units, g]),
        ];
        if self.use_bias {
            if self.kind == CellKind::GRU && self.reset_after {
                v.push(("bias", vec![2, g]));
            } else {
                v.push(("bias", vec![g]));
            }
        }
        v
    }

    pub(crate) fn validate(&self, layer: &str) -> Result<(), KerasError> {
        let bad = |what: String| {
            Err(KerasError::Unsupported {
                layer: layer.to_string(),
                what,
            })
        };
        let invalid = |msg: String| {
            Err(KerasError::Layer {
                layer: layer.to_string(),
                msg,
            })
        };
        if self.units == 0 {
            return invalid("units = 0: a recurrent layer needs at least 1 unit".into());
        }
        for (opt, r) in [
            ("dropout", self.dropout),
            ("recurrent_dropout", self.recurrent_dropout),
        ] {
            if !(0.0..1.0).contains(&r) {
                return invalid(format!("{opt} = {r}: a rate must be in [0, 1)"));
            }
        }
        for a in [self.activation, self.recurrent_activation] {
            if matches!(a, Activation::Softmax | Activation::LogSoftmax) {
                return bad(format!("{a} as a cell activation"));
            }
        }
        Ok(())
    }
}

/// `LSTMCell(units)`.
pub struct LSTMCell;
impl LSTMCell {
    /// A new LSTM cell with Keras's defaults.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(units: usize) -> Cell {
        Cell::new(CellKind::LSTM, units)
    }
}

/// `GRUCell(units)`.
pub struct GRUCell;
impl GRUCell {
    /// A new GRU cell with Keras's defaults (`reset_after=True`).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(units: usize) -> Cell {
        Cell::new(CellKind::GRU, units)
    }
}

/// `SimpleRNNCell(units)`.
pub struct SimpleRNNCell;
impl SimpleRNNCell {
    /// A new simple RNN cell with Keras's defaults.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(units: usize) -> Cell {
        Cell::new(CellKind::SimpleRNN, units)
    }
}

/// `StackedRNNCells([...])`: cells applied one after the other at every step.
#[derive(Clone, Debug, PartialEq)]
pub struct StackedRNNCells {
    /// The cells, first to last.
    pub cells: Vec<Cell>,
}

impl StackedRNNCells {
    /// Stacks `cells`.
    pub fn new(cells: Vec<Cell>) -> StackedRNNCells {
        StackedRNNCells { cells }
    }
}

/// Which Keras class a recurrent layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RnnClass {
    /// `LSTM`.
    LSTM,
    /// `GRU`.
    GRU,
    /// `SimpleRNN`.
    SimpleRNN,
    /// The generic `RNN(cell)`.
    RNN,
}

impl RnnClass {
    /// The Keras class name.
    pub fn name(self) -> &'static str {
        match self {
            RnnClass::LSTM => "LSTM",
            RnnClass::GRU => "GRU",
            RnnClass::SimpleRNN => "SimpleRNN",
            RnnClass::RNN => "RNN",
        }
    }
}

/// A recurrent layer: `LSTM`, `GRU`, `SimpleRNN` or `RNN(cell)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Recurrent {
    /// The layer's class.
    pub class: RnnClass,
    /// The cells (one, or several for `StackedRNNCells`).
    pub cells: Vec<Cell>,
    /// Whether the cells came as `StackedRNNCells`.
    pub stacked: bool,
    /// `return_sequences`.
    pub return_sequences: bool,
    /// `return_state`.
    pub return_state: bool,
    /// `go_backwards`: read the sequence from its end; outputs are in processing order.
    pub go_backwards: bool,
    /// `stateful`: each call starts from the states the previous call left.
    pub stateful: bool,
    /// `unroll`: emit every step into the graph instead of a loop.
    pub unroll: bool,
    /// `zero_output_for_mask`: masked steps emit zeros instead of the previous output.
    pub zero_output_for_mask: bool,
    /// The layer's name.
    pub name: Option<String>,
}

macro_rules! rnn_ctor {
    ($ty:ident, $class:ident, $kind:ident, $doc:literal) => {
        #[doc = $doc]
        pub struct $ty;
        impl $ty {
            /// A new layer with Keras's defaults.
            #[allow(clippy::new_ret_no_self)]
            pub fn new(units: usize) -> Recurrent {
                Recurrent::with_cells(
                    RnnClass::$class,
                    vec![Cell::new(CellKind::$kind, units)],
                    false,
                )
            }
        }
    };
}
rnn_ctor!(
    LSTM,
    LSTM,
    LSTM,
    "`LSTM(units)`: `RNN(LSTMCell(units))` under its own name."
);
rnn_ctor!(
    GRU,
    GRU,
    GRU,
    "`GRU(units)`: `RNN(GRUCell(units))` under its own name."
);
rnn_ctor!(
    SimpleRNN,
    SimpleRNN,
    SimpleRNN,
    "`SimpleRNN(units)`: `RNN(SimpleRNNCell(units))` under its own name."
);

/// `RNN(cell)`: the generic recurrent layer around a cell or `StackedRNNCells`.
pub struct RNN;
impl RNN {
    /// `RNN(cell)`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cell: Cell) -> Recurrent {
        Recurrent::with_cells(RnnClass::RNN, vec![cell], false)
    }
    /// `RNN(StackedRNNCells([...]))`.
    pub fn stacked(cells: StackedRNNCells) -> Recurrent {
        Recurrent::with_cells(RnnClass::RNN, cells.cells, true)
    }
}

impl Recurrent {
    fn with_cells(class: RnnClass, cells: Vec<Cell>, stacked: bool) -> Recurrent {
        Recurrent {
            class,
            cells,
            stacked,
            return_sequences: false,
            return_state: false,
            go_backwards: false,
            stateful: false,
            unroll: false,
            zero_output_for_mask: false,
            name: None,
        }
    }

    fn cell_mut(mut self, f: impl Fn(Cell) -> Cell) -> Recurrent {
        self.cells = self.cells.into_iter().map(f).collect();
        self
    }

    /// Sets `activation` (of every cell).
    pub fn activation(self, a: Activation) -> Recurrent {
        self.cell_mut(|c| c.activation(a))
    }
    /// Sets `recurrent_activation`.
    pub fn recurrent_activation(self, a: Activation) -> Recurrent {
        self.cell_mut(|c| c.recurrent_activation(a))
    }
    /// Sets `use_bias`.
    pub fn use_bias(self, b: bool) -> Recurrent {
        self.cell_mut(|c| c.use_bias(b))
    }
    /// Sets LSTM `unit_forget_bias`.
    pub fn unit_forget_bias(self, b: bool) -> Recurrent {
        self.cell_mut(|c| c.unit_forget_bias(b))
    }
    /// Sets GRU `reset_after`.
    pub fn reset_after(self, b: bool) -> Recurrent {
        self.cell_mut(|c| c.reset_after(b))
    }
    /// Sets `dropout`.
    pub fn dropout(self, rate: f32) -> Recurrent {
        self.cell_mut(|c| c.dropout(rate))
    }
    /// Sets `recurrent_dropout`.
    pub fn recurrent_dropout(self, rate: f32) -> Recurrent {
        self.cell_mut(|c| c.recurrent_dropout(rate))
    }
    /// Sets `return_sequences`.
    pub fn return_sequences(mut self, b: bool) -> Recurrent {
        self.return_sequences = b;
        self
    }
    /// Sets `return_state`.
    pub fn return_state(mut self, b: bool) -> Recurrent {
        self.return_state = b;
        self
    }
    /// Sets `go_backwards`.
    pub fn go_backwards(mut self, b: bool) -> Recurrent {
        self.go_backwards = b;
        self
    }
    /// Sets `stateful`.
    pub fn stateful(mut self, b: bool) -> Recurrent {
        self.stateful = b;
        self
    }
    /// Sets `unroll`.
    pub fn unroll(mut self, b: bool) -> Recurrent {
        self.unroll = b;
        self
    }
    /// Sets `zero_output_for_mask`.
    pub fn zero_output_for_mask(mut self, b: bool) -> Recurrent {
        self.zero_output_for_mask = b;
        self
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Recurrent {
        self.name = Some(name.to_string());
        self
    }

    /// The width of the layer's output (the last cell's units).
    pub fn output_units(&self) -> usize {
        self.cells.last().map_or(0, |c| c.units)
    }

    /// The sizes of all states, cell after cell.
    pub fn state_sizes(&self) -> Vec<usize> {
        self.cells.iter().flat_map(|c| c.state_sizes()).collect()
    }

    /// Output shapes for an input shape `(batch, time, features)`.
    pub fn output_shapes(&self, input: &[Option<usize>]) -> Vec<Shape> {
        let b = input.first().copied().flatten();
        let u = Some(self.output_units());
        let mut v = vec![if self.return_sequences {
            vec![b, input.get(1).copied().flatten(), u]
        } else {
            vec![b, u]
        }];
        if self.return_state {
            v.extend(self.state_sizes().into_iter().map(|s| vec![b, Some(s)]));
        }
        v
    }
}

/// How `Bidirectional` merges the two directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMode {
    /// Concatenate on the last axis, forward first.
    Concat,
    /// Elementwise sum.
    Sum,
    /// Elementwise product.
    Mul,
    /// Elementwise mean.
    Ave,
}

impl MergeMode {
    /// The Keras name.
    pub fn name(self) -> &'static str {
        match self {
            MergeMode::Concat => "concat",
            MergeMode::Sum => "sum",
            MergeMode::Mul => "mul",
            MergeMode::Ave => "ave",
        }
    }
}

/// `Bidirectional(layer, merge_mode, backward_layer)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Bidirectional {
    /// The forward layer (named `forward_<x>`).
    pub forward: Recurrent,
    /// The backward layer (named `backward_<x>`, `go_backwards` flipped).
    pub backward: Recurrent,
    /// The merge mode; `None` returns both outputs.
    pub merge_mode: Option<MergeMode>,
    /// The layer's name.
    pub name: Option<String>,
}

impl Bidirectional {
    /// Wraps `layer`; the backward layer is a copy reading the sequence backwards.
    pub fn new(layer: Recurrent) -> Bidirectional {
        // Keras sets zero_output_for_mask = return_sequences on both inner layers.
        let mut forward = layer;
        forward.name = None;
        forward.zero_output_for_mask = forward.return_sequences;
        let mut backward = forward.clone();
        backward.go_backwards = !forward.go_backwards;
        Bidirectional {
            forward,
            backward,
            merge_mode: Some(MergeMode::Concat),
            name: None,
        }
    }
    /// Uses an explicit `backward_layer`; Keras requires it to read backwards relative to
    /// the forward layer and to agree on `return_sequences` and `return_state`.
    pub fn backward_layer(mut self, mut layer: Recurrent) -> Bidirectional {
        layer.zero_output_for_mask = layer.return_sequences;
        self.backward = layer;
        self
    }
    /// Sets `merge_mode` (`None` returns `[forward, backward]`).
    pub fn merge_mode(mut self, m: Option<MergeMode>) -> Bidirectional {
        self.merge_mode = m;
        self
    }
    /// Names the layer.
    pub fn name(mut self, name: &str) -> Bidirectional {
        self.name = Some(name.to_string());
        self
    }

    /// Output shapes for an input shape.
    pub fn output_shapes(&self, input: &[Option<usize>]) -> Vec<Shape> {
        let f = self.forward.output_shapes(input);
        let b = self.backward.output_shapes(input);
        let mut v = match self.merge_mode {
            Some(MergeMode::Concat) => {
                let mut s = f[0].clone();
                if let Some(last) = s.last_mut() {
                    *last = last.map(|u| u + self.backward.output_units());
                }
                vec![s]
            }
            Some(_) => vec![f[0].clone()],
            None => vec![f[0].clone(), b[0].clone()],
        };
        v.extend(f[1..].iter().cloned());
        v.extend(b[1..].iter().cloned());
        v
    }
}
