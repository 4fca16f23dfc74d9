//! The op set: one typed variant per op, attributes as typed fields.
//!
//! Ops follow the ONNX operator spec: names, attributes, input/output order and
//! semantics. Where ONNX moved an attribute to an input across opset versions
//! (`axes`, `split`, Clip's `min`/`max`, Dropout's `ratio`), the variant has both: the
//! attribute as an optional field, the input as an optional input. The op list below is
//! the single source of truth: attribute reading, writing and printing are generated
//! from it; each family module holds the shape and type rules of its ops.

mod attr;
pub mod control;
pub mod elementwise;
pub mod infer;
pub mod nn;
pub mod reduce;
pub mod rnn;
pub mod sequence;
pub mod shape;

pub use attr::{Attr, AttrField, AttrRef};
pub use infer::InferCtx;

use crate::graph::Graph;
use crate::tensor::Tensor;
use crate::types::ValueType;
use std::collections::BTreeMap;

/// Variadic arity bound.
pub const MANY: usize = usize::MAX;

/// The ONNX default domain.
pub const ONNX_DOMAIN: &str = "";

/// Static facts about an op kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpInfo {
    /// The ONNX op type.
    pub name: &'static str,
    /// The domain (`""` for ONNX).
    pub domain: &'static str,
    /// The oldest opset version of the domain whose semantics the variant implements.
    pub since: i64,
    /// Minimum and maximum number of input slots.
    pub inputs: (usize, usize),
    /// Minimum and maximum number of output slots.
    pub outputs: (usize, usize),
    /// The family module holding the shape rule.
    pub family: &'static str,
    /// How the gradient pass treats the op (declared in the op list: `vjp rule`,
    /// `vjp none`, or nothing for a differentiable op without a rule yet).
    pub vjp: Differentiability,
}

/// How the gradient pass treats an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Differentiability {
    /// It has a VJP rule.
    Rule,
    /// Its outputs carry no gradient (integer, boolean, shape, constant results).
    NonDifferentiable,
    /// It is differentiable but has no rule yet: the pass fails by name on it.
    Missing,
}

/// The differentiability an op declares in the list (`vjp rule`, `vjp none`, or none).
macro_rules! op_vjp {
    () => {
        Differentiability::Missing
    };
    (rule) => {
        Differentiability::Rule
    };
    (none) => {
        Differentiability::NonDifferentiable
    };
}

/// The domain an op is declared in: ONNX's default unless the list names one.
macro_rules! op_domain {
    () => {
        ONNX_DOMAIN
    };
    ($d:literal) => {
        $d
    };
}

/// Expands `..rnn,` at the head of an op's attribute list into the attributes every
/// recurrent op (ONNX's `LSTM`/`GRU`/`RNN`, their masked forms and their backward ops)
/// has, so the list is written once; then hands the whole op list to `define_ops!`.
macro_rules! ops_with_shared_attrs {
    (@out [$($done:tt)*]) => {
        define_ops! { $($done)* }
    };
    (@out [$($done:tt)*]
        $(#[doc = $doc:literal])* $var:ident [$($meta:tt)*] { ..rnn, $($rest:tt)* }
        $($tail:tt)*
    ) => {
        ops_with_shared_attrs! {
            @out [$($done)* $(#[doc = $doc])* $var [$($meta)*] {
                activation_alpha: Option<Vec<f32>>, activation_beta: Option<Vec<f32>>,
                activations: Option<Vec<String>>, clip: Option<f32>,
                direction: String = String::from("forward"), hidden_size: Option<i64>,
                $($rest)*
            }]
            $($tail)*
        }
    };
    (@out [$($done:tt)*]
        $(#[doc = $doc:literal])* $var:ident [$($meta:tt)*] { $($fields:tt)* }
        $($tail:tt)*
    ) => {
        ops_with_shared_attrs! {
            @out [$($done)* $(#[doc = $doc])* $var [$($meta)*] { $($fields)* }]
            $($tail)*
        }
    };
}

/// cellgraph's own domain, for ops ONNX does not have (fused recurrent backward ops).
pub const CELLGRAPH_DOMAIN: &str = "com.cellgraph";

macro_rules! define_ops {
    ($(
        $(#[doc = $doc:literal])*
        $var:ident [$family:ident $(@ $dom:literal)?, since $since:literal, in $imin:literal..=$imax:expr, out $omin:literal..=$omax:expr $(, vjp $vjp:ident)?]
        { $( $field:ident : $fty:ty $(= $default:expr)? ),* $(,)? }
    )*) => {
        /// An op instance: the kind and its typed attributes.
        #[derive(Clone, Debug, PartialEq)]
        #[allow(non_snake_case)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub enum Op {
            $(
                $(#[doc = $doc])*
                #[allow(missing_docs)]
                $var { $( $field: $fty ),* },
            )*
        }

        /// The op kinds, without attributes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind {
            $( $(#[doc = $doc])* $var, )*
        }

        impl OpKind {
            /// Every op kind the IR knows.
            pub const ALL: &'static [OpKind] = &[ $( OpKind::$var ),* ];

            /// Static facts: name, domain, versions, arity, family.
            pub fn info(self) -> OpInfo {
                match self {
                    $( OpKind::$var => OpInfo {
                        name: stringify!($var),
                        domain: op_domain!($($dom)?),
                        since: $since,
                        inputs: ($imin, $imax),
                        outputs: ($omin, $omax),
                        family: stringify!($family),
                        vjp: op_vjp!($($vjp)?),
                    }, )*
                }
            }

            /// The kind for an ONNX op type in the default domain.
            pub fn from_onnx(op_type: &str) -> Option<OpKind> {
                OpKind::from_domain(ONNX_DOMAIN, op_type)
            }

            /// The kind for an op type in a domain (`""` is ONNX's default domain).
            pub fn from_domain(domain: &str, op_type: &str) -> Option<OpKind> {
                $(
                    if op_type == stringify!($var) && domain == op_domain!($($dom)?) {
                        return Some(OpKind::$var);
                    }
                )*
                None
            }
        }

        impl Op {
            /// The kind of this op.
            pub fn kind(&self) -> OpKind {
                match self { $( Op::$var { .. } => OpKind::$var, )* }
            }

            /// Builds a typed op from its kind and its attributes. Leftover attributes,
            /// missing required ones and kind mismatches are errors naming the attribute.
            #[allow(unused_mut, unused_variables)]
            pub fn from_attrs(kind: OpKind, mut attrs: BTreeMap<String, Attr>) -> Result<Op, AttrError> {
                let op = match kind {
                    $( OpKind::$var => Op::$var { $(
                        $field: {
                            let default: Option<$fty> = None $( .or(Some($default)) )?;
                            <$fty as AttrField>::take(attrs.remove(stringify!($field)), default)
                                .map_err(|why| AttrError::Invalid { attr: stringify!($field).to_string(), why })?
                        },
                    )* }, )*
                };
                if let Some(name) = attrs.keys().next() {
                    return Err(AttrError::Unknown { attr: name.clone() });
                }
                Ok(op)
            }

            /// The attributes to write: those that are present and differ from their default.
            #[allow(unused_mut)]
            pub fn attrs(&self) -> Vec<(&'static str, AttrRef<'_>)> {
                let mut out = Vec::new();
                match self { $( Op::$var { $( $field ),* } => { $(
                    let default: Option<$fty> = None $( .or(Some($default)) )?;
                    if let Some(v) = <$fty as AttrField>::put($field, default.as_ref()) {
                        out.push((stringify!($field), v));
                    }
                )* } )* }
                out
            }

            /// Shape and type inference: the output types for the given input facts.
            pub fn infer(&self, cx: &InferCtx<'_>) -> Result<Vec<ValueType>, String> {
                match self.kind().info().family {
                    $( stringify!($family) => $family::infer(self, cx), )*
                    other => Err(format!("no shape rule family {other}")),
                }
            }
        }
    };
}

/// Why an op's attributes could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttrError {
    /// The op does not have this attribute (in the versions cellgraph implements).
    #[error("unknown attribute `{attr}`")]
    Unknown {
        /// Attribute name.
        attr: String,
    },
    /// The attribute is missing, of the wrong kind, or out of range.
    #[error("attribute `{attr}`: {why}")]
    Invalid {
        /// Attribute name.
        attr: String,
        /// What is wrong.
        why: String,
    },
}

ops_with_shared_attrs! {
    @out []
    // ---- elementwise: numpy-broadcast binary ops, unary maths and activations ----
    /// `A + B`.
    Add [elementwise, since 7, in 2..=2, out 1..=1, vjp rule] {}
    /// `A - B`.
    Sub [elementwise, since 7, in 2..=2, out 1..=1, vjp rule] {}
    /// `A * B`.
    Mul [elementwise, since 7, in 2..=2, out 1..=1, vjp rule] {}
    /// `A / B` (integer division truncates).
    Div [elementwise, since 7, in 2..=2, out 1..=1, vjp rule] {}
    /// `A ^ B`.
    Pow [elementwise, since 7, in 2..=2, out 1..=1, vjp rule] {}
    /// Logical and.
    And [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// Logical or.
    Or [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// Logical xor.
    Xor [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// `A == B`.
    Equal [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// `A < B`.
    Less [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// `A <= B`.
    LessOrEqual [elementwise, since 12, in 2..=2, out 1..=1, vjp none] {}
    /// `A > B`.
    Greater [elementwise, since 7, in 2..=2, out 1..=1, vjp none] {}
    /// `A >= B`.
    GreaterOrEqual [elementwise, since 12, in 2..=2, out 1..=1, vjp none] {}
    /// Elementwise sum of any number of inputs.
    Sum [elementwise, since 8, in 1..=MANY, out 1..=1, vjp rule] {}
    /// Elementwise mean of any number of inputs.
    Mean [elementwise, since 8, in 1..=MANY, out 1..=1, vjp rule] {}
    /// Elementwise minimum.
    Min [elementwise, since 8, in 1..=MANY, out 1..=1, vjp rule] {}
    /// Elementwise maximum.
    Max [elementwise, since 8, in 1..=MANY, out 1..=1, vjp rule] {}
    /// `cond ? X : Y`, broadcast.
    Where [elementwise, since 9, in 3..=3, out 1..=1, vjp rule] {}
    /// `-X`.
    Neg [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// `|X|`.
    Abs [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// `e^X`.
    Exp [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// Natural logarithm.
    Log [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// Square root.
    Sqrt [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// `1 / X`.
    Reciprocal [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// Round up.
    Ceil [elementwise, since 6, in 1..=1, out 1..=1, vjp none] {}
    /// Round down.
    Floor [elementwise, since 6, in 1..=1, out 1..=1, vjp none] {}
    /// Logical not.
    Not [elementwise, since 1, in 1..=1, out 1..=1, vjp none] {}
    /// The input unchanged.
    Identity [elementwise, since 1, in 1..=1, out 1..=1, vjp rule] {}
    /// `1 / (1 + e^-X)`.
    Sigmoid [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// Hyperbolic tangent.
    Tanh [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// `max(0, X)`.
    Relu [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] {}
    /// `X / (1 + |X|)`.
    Softsign [elementwise, since 1, in 1..=1, out 1..=1, vjp rule] {}
    /// `ln(1 + e^X)`.
    Softplus [elementwise, since 1, in 1..=1, out 1..=1, vjp rule] {}
    /// `X < 0 ? alpha·X : X`.
    LeakyRelu [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] { alpha: f32 = 0.01 }
    /// `X < 0 ? alpha·(e^X − 1) : X`.
    Elu [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] { alpha: f32 = 1.0 }
    /// `X > alpha ? X : 0`.
    ThresholdedRelu [elementwise, since 10, in 1..=1, out 1..=1, vjp rule] { alpha: f32 = 1.0 }
    /// `clip(alpha·X + beta, 0, 1)`.
    HardSigmoid [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] { alpha: f32 = 0.2, beta: f32 = 0.5 }
    /// Clamp to `[min, max]` (attributes before opset 11, optional inputs after).
    Clip [elementwise, since 6, in 1..=3, out 1..=1, vjp rule] { min: Option<f32>, max: Option<f32> }
    /// Convert to the dtype `to` (an ONNX dtype code).
    Cast [elementwise, since 6, in 1..=1, out 1..=1, vjp rule] { to: i64, saturate: Option<i64>, round_mode: Option<String> }
    /// Convert to the dtype of the second input.
    CastLike [elementwise, since 15, in 2..=2, out 1..=1, vjp rule] { saturate: Option<i64>, round_mode: Option<String> }

    // ---- nn: products, normalisation, softmax, dropout ----
    /// numpy matmul.
    MatMul [nn, since 1, in 2..=2, out 1..=1, vjp rule] {}
    /// `alpha·op(A)·op(B) + beta·C`.
    Gemm [nn, since 7, in 2..=3, out 1..=1, vjp rule] { alpha: f32 = 1.0, beta: f32 = 1.0, transA: i64 = 0, transB: i64 = 0 }
    /// Einstein summation.
    Einsum [nn, since 12, in 1..=MANY, out 1..=1, vjp rule] { equation: String }
    /// Batch normalisation over axis 1 (inference or training form).
    BatchNormalization [nn, since 9, in 5..=5, out 1..=3, vjp rule] { epsilon: f32 = 1e-5, momentum: f32 = 0.9, training_mode: i64 = 0 }
    /// Softmax along `axis` (opset < 13: over the flattened trailing axes).
    Softmax [nn, since 1, in 1..=1, out 1..=1, vjp rule] { axis: Option<i64> }
    /// Log-softmax along `axis` (opset < 13: over the flattened trailing axes).
    LogSoftmax [nn, since 1, in 1..=1, out 1..=1, vjp rule] { axis: Option<i64> }
    /// Dropout (ratio as attribute before opset 12, as input after).
    Dropout [nn, since 7, in 1..=3, out 1..=2, vjp rule] { seed: Option<i64>, ratio: Option<f32> }

    // ---- shape: data movement and shape computation ----
    /// Concatenate along `axis`.
    Concat [shape, since 4, in 1..=MANY, out 1..=1, vjp rule] { axis: i64 }
    /// Split along `axis` (sizes from the `split` attribute, the second input, or `num_outputs`).
    Split [shape, since 2, in 1..=2, out 1..=MANY, vjp rule] { axis: i64 = 0, split: Option<Vec<i64>>, num_outputs: Option<i64> }
    /// Slice with starts, ends, axes and steps inputs.
    Slice [shape, since 10, in 3..=5, out 1..=1, vjp rule] {}
    /// Gather along `axis`.
    Gather [shape, since 1, in 2..=2, out 1..=1, vjp rule] { axis: i64 = 0 }
    /// Reshape to the shape given as the second input.
    Reshape [shape, since 5, in 2..=2, out 1..=1, vjp rule] { allowzero: i64 = 0 }
    /// Permute axes (reverse when `perm` is absent).
    Transpose [shape, since 1, in 1..=1, out 1..=1, vjp rule] { perm: Option<Vec<i64>> }
    /// Remove size-1 axes.
    Squeeze [shape, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>> }
    /// Insert size-1 axes.
    Unsqueeze [shape, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>> }
    /// Flatten to 2-D at `axis`.
    Flatten [shape, since 1, in 1..=1, out 1..=1, vjp rule] { axis: i64 = 1 }
    /// Broadcast to a shape.
    Expand [shape, since 8, in 2..=2, out 1..=1, vjp rule] {}
    /// Repeat along each axis.
    Tile [shape, since 6, in 2..=2, out 1..=1, vjp rule] {}
    /// The shape of the input as an i64 vector (optionally a `start..end` slice of it).
    Shape [shape, since 1, in 1..=1, out 1..=1, vjp none] { start: Option<i64>, end: Option<i64> }
    /// A tensor of the given shape filled with `value`'s single element.
    ConstantOfShape [shape, since 9, in 1..=1, out 1..=1, vjp none] { value: Option<Tensor> }
    /// `start, start+delta, ...` below `limit`.
    Range [shape, since 11, in 3..=3, out 1..=1, vjp none] {}
    /// A constant tensor.
    Constant [shape, since 1, in 0..=0, out 1..=1, vjp none] {
        value: Option<Tensor>, value_float: Option<f32>, value_floats: Option<Vec<f32>>,
        value_int: Option<i64>, value_ints: Option<Vec<i64>>
    }

    // ---- reduce ----
    /// Sum over axes.
    ReduceSum [reduce, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>>, keepdims: i64 = 1, noop_with_empty_axes: i64 = 0 }
    /// Mean over axes.
    ReduceMean [reduce, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>>, keepdims: i64 = 1, noop_with_empty_axes: i64 = 0 }
    /// Maximum over axes.
    ReduceMax [reduce, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>>, keepdims: i64 = 1, noop_with_empty_axes: i64 = 0 }
    /// Minimum over axes.
    ReduceMin [reduce, since 1, in 1..=2, out 1..=1, vjp rule] { axes: Option<Vec<i64>>, keepdims: i64 = 1, noop_with_empty_axes: i64 = 0 }
    /// Index of the maximum along `axis`.
    ArgMax [reduce, since 1, in 1..=1, out 1..=1, vjp none] { axis: i64 = 0, keepdims: i64 = 1, select_last_index: i64 = 0 }

    // ---- rnn: the ONNX recurrent ops ----
    /// ONNX LSTM (gates i, o, f, c; peepholes [i, o, f]).
    LSTM [rnn, since 7, in 3..=8, out 0..=3, vjp rule] {
        ..rnn,
        input_forget: i64 = 0, layout: i64 = 0
    }
    /// ONNX GRU (gates z, r, h).
    GRU [rnn, since 7, in 3..=6, out 0..=2, vjp rule] {
        ..rnn,
        layout: i64 = 0, linear_before_reset: i64 = 0
    }
    /// ONNX simple RNN.
    RNN [rnn, since 7, in 3..=6, out 0..=2, vjp rule] {
        ..rnn,
        layout: i64 = 0
    }
    /// An `LSTM` with a per-step mask (cellgraph domain; what Keras masks raise to): the
    /// LSTM's eight inputs, then `mask` bool `[T, N]` (`[N, T]` with `layout=1`). A row
    /// whose mask is false at step t keeps its states; `Y` there is zero, or with
    /// `hold_output=1` the held hidden state. Masks may have holes and left padding.
    LSTMMasked [rnn @ "com.cellgraph", since 1, in 9..=9, out 0..=3, vjp rule] {
        ..rnn,
        input_forget: i64 = 0, layout: i64 = 0, hold_output: i64 = 0
    }
    /// A `GRU` with a per-step mask (cellgraph domain): the GRU's six inputs, then `mask`;
    /// masked steps as for `LSTMMasked`.
    GRUMasked [rnn @ "com.cellgraph", since 1, in 7..=7, out 0..=2, vjp rule] {
        ..rnn,
        layout: i64 = 0, linear_before_reset: i64 = 0, hold_output: i64 = 0
    }
    /// An `RNN` with a per-step mask (cellgraph domain): the RNN's six inputs, then
    /// `mask`; masked steps as for `LSTMMasked`.
    RNNMasked [rnn @ "com.cellgraph", since 1, in 7..=7, out 0..=2, vjp rule] {
        ..rnn,
        layout: i64 = 0, hold_output: i64 = 0
    }
    /// The backward of a fused LSTM (cellgraph domain): the LSTM's attributes; inputs
    /// the LSTM's eight (X, W, R, B, sequence_lens, initial_h, initial_c, P) then the
    /// cotangents dY, dY_h, dY_c, then (for `LSTMMasked`) the mask; outputs dX, dW, dR,
    /// dB, d initial_h, d initial_c, dP.
    LSTMGrad [rnn @ "com.cellgraph", since 1, in 3..=12, out 1..=7] {
        ..rnn,
        input_forget: i64 = 0, layout: i64 = 0, hold_output: i64 = 0
    }
    /// The backward of a fused GRU (cellgraph domain): inputs X, W, R, B, sequence_lens,
    /// initial_h, then dY, dY_h, then (for `GRUMasked`) the mask; outputs dX, dW, dR, dB,
    /// d initial_h.
    GRUGrad [rnn @ "com.cellgraph", since 1, in 3..=9, out 1..=5] {
        ..rnn,
        layout: i64 = 0, linear_before_reset: i64 = 0, hold_output: i64 = 0
    }
    /// The backward of a fused RNN (cellgraph domain): inputs X, W, R, B, sequence_lens,
    /// initial_h, then dY, dY_h, then (for `RNNMasked`) the mask; outputs dX, dW, dR, dB,
    /// d initial_h.
    RNNGrad [rnn @ "com.cellgraph", since 1, in 3..=9, out 1..=5] {
        ..rnn,
        layout: i64 = 0, hold_output: i64 = 0
    }

    // ---- control: ops with body graphs ----
    /// Scan: state variables first, then scanned inputs (opset 8: a leading
    /// `sequence_lens` input and a batch axis on every value).
    Scan [control, since 8, in 1..=MANY, out 1..=MANY, vjp rule] {
        body: Box<Graph>, num_scan_inputs: i64,
        scan_input_axes: Option<Vec<i64>>, scan_input_directions: Option<Vec<i64>>,
        scan_output_axes: Option<Vec<i64>>, scan_output_directions: Option<Vec<i64>>,
        directions: Option<Vec<i64>>
    }
    /// Loop with an optional trip count and condition.
    Loop [control, since 1, in 2..=MANY, out 1..=MANY, vjp rule] { body: Box<Graph> }
    /// Conditional.
    If [control, since 1, in 1..=1, out 1..=MANY, vjp rule] { then_branch: Box<Graph>, else_branch: Box<Graph> }

    // ---- sequence: ONNX sequence and optional values ----
    /// A sequence of the inputs.
    SequenceConstruct [sequence, since 11, in 1..=MANY, out 1..=1, vjp none] {}
    /// An empty sequence of dtype `dtype` (default f32).
    SequenceEmpty [sequence, since 11, in 0..=0, out 1..=1, vjp none] { dtype: Option<i64> }
    /// Insert a tensor at a position (default: the end).
    SequenceInsert [sequence, since 11, in 2..=3, out 1..=1, vjp none] {}
    /// The element at a position.
    SequenceAt [sequence, since 11, in 2..=2, out 1..=1, vjp none] {}
    /// The number of elements.
    SequenceLength [sequence, since 11, in 1..=1, out 1..=1, vjp none] {}
    /// Concatenate (or stack, with `new_axis`) the elements.
    ConcatFromSequence [sequence, since 11, in 1..=1, out 1..=1, vjp none] { axis: i64, new_axis: i64 = 0 }
    /// Whether an optional holds a value.
    OptionalHasElement [sequence, since 15, in 0..=1, out 1..=1, vjp none] {}
    /// The value held by an optional (identity on a plain tensor from opset 18).
    OptionalGetElement [sequence, since 15, in 1..=1, out 1..=1, vjp none] {}
}

impl Op {
    /// The op's name, as in ONNX.
    pub fn name(&self) -> &'static str {
        self.kind().info().name
    }

    /// A `Constant` holding `value`.
    pub fn constant(value: Tensor) -> Op {
        Op::Constant {
            value: Some(value),
            value_float: None,
            value_floats: None,
            value_int: None,
            value_ints: None,
        }
    }

    /// The fused backward op of a recurrent forward op (same attributes), or the forward
    /// op of a backward one: `LSTM`/`LSTMMasked` → `LSTMGrad` → `LSTM` (likewise GRU,
    /// RNN). `None` for other ops. The backward op of a masked forward takes the mask as
    /// its last input and keeps `hold_output`.
    pub fn recurrent_pair(&self) -> Option<Op> {
        macro_rules! swap {
            ($from:ident => $to:ident { $($f:ident),* } $(+ $extra:ident)?) => {
                if let Op::$from { $($f,)* .. } = self.clone() {
                    return Some(Op::$to { $($f,)* $($extra: 0)? });
                }
            };
        }
        macro_rules! keep {
            ($from:ident => $to:ident { $($f:ident),* }) => {
                if let Op::$from { $($f),* } = self.clone() {
                    return Some(Op::$to { $($f),* });
                }
            };
        }
        swap!(LSTM => LSTMGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout } + hold_output);
        keep!(LSTMMasked => LSTMGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout, hold_output });
        swap!(LSTMGrad => LSTM { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout });
        swap!(GRU => GRUGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset } + hold_output);
        keep!(GRUMasked => GRUGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset, hold_output });
        swap!(GRUGrad => GRU { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset });
        swap!(RNN => RNNGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout } + hold_output);
        keep!(RNNMasked => RNNGrad { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, hold_output });
        swap!(RNNGrad => RNN { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout });
        None
    }

    /// For `LSTMMasked`/`GRUMasked`/`RNNMasked` and the backward ops: the ONNX op with the
    /// same attributes and `hold_output`. For `LSTM`/`GRU`/`RNN`: a clone and 0.
    pub fn unmasked_recurrent(&self) -> Option<(Op, i64)> {
        macro_rules! base {
            ($from:ident => $to:ident { $($f:ident),* }) => {
                if let Op::$from { $($f,)* hold_output, .. } = self.clone() {
                    return Some((Op::$to { $($f),* }, hold_output));
                }
            };
        }
        if matches!(self, Op::LSTM { .. } | Op::GRU { .. } | Op::RNN { .. }) {
            return Some((self.clone(), 0));
        }
        base!(LSTMMasked => LSTM { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout });
        base!(LSTMGrad => LSTM { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout });
        base!(GRUMasked => GRU { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset });
        base!(GRUGrad => GRU { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset });
        base!(RNNMasked => RNN { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout });
        base!(RNNGrad => RNN { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout });
        None
    }

    /// The masked form of an `LSTM`/`GRU`/`RNN` (same attributes, `hold_output`).
    pub fn masked_recurrent(&self, hold_output: i64) -> Option<Op> {
        macro_rules! to {
            ($from:ident => $to:ident { $($f:ident),* }) => {
                if let Op::$from { $($f),* } = self.clone() {
                    return Some(Op::$to { $($f,)* hold_output });
                }
            };
        }
        to!(LSTM => LSTMMasked { activation_alpha, activation_beta, activations, clip, direction, hidden_size, input_forget, layout });
        to!(GRU => GRUMasked { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout, linear_before_reset });
        to!(RNN => RNNMasked { activation_alpha, activation_beta, activations, clip, direction, hidden_size, layout });
        None
    }

    /// The nested graphs this op carries (Scan/Loop bodies, If branches), by attribute.
    pub fn subgraphs(&self) -> Vec<(&'static str, &Graph)> {
        self.attrs()
            .into_iter()
            .flat_map(|(n, a)| match a {
                AttrRef::Graph(g) => vec![(n, g)],
                AttrRef::Graphs(gs) => gs.iter().map(|g| (n, g)).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Mutable access to the nested graphs.
    pub fn subgraphs_mut(&mut self) -> Vec<&mut Graph> {
        match self {
            Op::Scan { body, .. } | Op::Loop { body } => vec![&mut **body],
            Op::If {
                then_branch,
                else_branch,
            } => vec![&mut **then_branch, &mut **else_branch],
            _ => Vec::new(),
        }
    }
}
