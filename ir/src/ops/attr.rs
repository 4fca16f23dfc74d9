//! Attribute values and the conversions between them and typed op fields.

use crate::graph::Graph;
use crate::tensor::Tensor;
use crate::types::ValueType;
use std::fmt::Write as _;

/// An attribute value as read from a file, before it is moved into a typed op field.
#[derive(Clone, Debug)]
pub enum Attr {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `STRING`.
    String(String),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRINGS`.
    Strings(Vec<String>),
    /// `TENSOR`.
    Tensor(Tensor),
    /// `GRAPH`.
    Graph(Box<Graph>),
    /// `TENSORS`.
    Tensors(Vec<Tensor>),
    /// `GRAPHS`.
    Graphs(Vec<Graph>),
    /// `TYPE_PROTO`.
    TypeProto(ValueType),
    /// `TYPE_PROTOS`.
    TypeProtos(Vec<ValueType>),
}

impl Attr {
    /// The ONNX name of this attribute's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Attr::Int(_) => "INT",
            Attr::Float(_) => "FLOAT",
            Attr::String(_) => "STRING",
            Attr::Ints(_) => "INTS",
            Attr::Floats(_) => "FLOATS",
            Attr::Strings(_) => "STRINGS",
            Attr::Tensor(_) => "TENSOR",
            Attr::Graph(_) => "GRAPH",
            Attr::Tensors(_) => "TENSORS",
            Attr::Graphs(_) => "GRAPHS",
            Attr::TypeProto(_) => "TYPE_PROTO",
            Attr::TypeProtos(_) => "TYPE_PROTOS",
        }
    }
}

/// A borrowed view of a typed op field, for writers and printers.
#[derive(Clone, Copy, Debug)]
pub enum AttrRef<'a> {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `STRING`.
    String(&'a str),
    /// `INTS`.
    Ints(&'a [i64]),
    /// `FLOATS`.
    Floats(&'a [f32]),
    /// `STRINGS`.
    Strings(&'a [String]),
    /// `TENSOR`.
    Tensor(&'a Tensor),
    /// `GRAPH`.
    Graph(&'a Graph),
    /// `TENSORS`.
    Tensors(&'a [Tensor]),
    /// `GRAPHS`.
    Graphs(&'a [Graph]),
    /// `TYPE_PROTO`.
    TypeProto(&'a ValueType),
    /// `TYPE_PROTOS`.
    TypeProtos(&'a [ValueType]),
}

impl AttrRef<'_> {
    /// The stable printed form (graphs print as `<graph NAME>`; the printer adds the body).
    pub fn to_text(&self) -> String {
        fn floats(v: &[f32]) -> String {
            v.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(",")
        }
        match self {
            AttrRef::Int(i) => i.to_string(),
            AttrRef::Float(x) => format!("{x:?}"),
            AttrRef::String(s) => format!("{s:?}"),
            AttrRef::Ints(v) => format!(
                "[{}]",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            AttrRef::Floats(v) => format!("[{}]", floats(v)),
            AttrRef::Strings(v) => {
                let mut s = String::from("[");
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    let _ = write!(s, "{x:?}");
                }
                s.push(']');
                s
            }
            AttrRef::Tensor(t) => t.summary(),
            AttrRef::Graph(g) => format!("<graph {}>", g.name),
            AttrRef::Tensors(v) => format!(
                "[{}]",
                v.iter().map(Tensor::summary).collect::<Vec<_>>().join(",")
            ),
            AttrRef::Graphs(v) => format!(
                "<graphs {}>",
                v.iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            AttrRef::TypeProto(t) => t.to_string(),
            AttrRef::TypeProtos(v) => format!(
                "[{}]",
                v.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// A type that can be an op's attribute field. `Option<T>` fields are optional;
/// other fields are required unless the op list gives them a default.
pub trait AttrField: Sized {
    /// Builds the field from the file's attribute (`None` when absent) and the default.
    fn take(value: Option<Attr>, default: Option<Self>) -> Result<Self, String>;
    /// The value to write, or `None` when it is absent or equal to the default.
    fn put<'a>(&'a self, default: Option<&Self>) -> Option<AttrRef<'a>>;
}

macro_rules! attr_field {
    ($ty:ty, $var:ident, $kind:literal, |$v:ident| $as_ref:expr) => {
        impl AttrField for $ty {
            fn take(value: Option<Attr>, default: Option<Self>) -> Result<Self, String> {
                match value {
                    Some(Attr::$var(x)) => Ok(x),
                    Some(other) => Err(format!("expected {}, found {}", $kind, other.kind())),
                    None => default.ok_or_else(|| "required attribute is missing".to_string()),
                }
            }
            fn put<'a>(&'a self, default: Option<&Self>) -> Option<AttrRef<'a>> {
                if default == Some(self) {
                    None
                } else {
                    let $v = self;
                    Some($as_ref)
                }
            }
        }
    };
}

attr_field!(i64, Int, "INT", |v| AttrRef::Int(*v));
attr_field!(f32, Float, "FLOAT", |v| AttrRef::Float(*v));
attr_field!(String, String, "STRING", |v| AttrRef::String(v));
attr_field!(Vec<i64>, Ints, "INTS", |v| AttrRef::Ints(v));
attr_field!(Vec<f32>, Floats, "FLOATS", |v| AttrRef::Floats(v));
attr_field!(Vec<String>, Strings, "STRINGS", |v| AttrRef::Strings(v));
attr_field!(Tensor, Tensor, "TENSOR", |v| AttrRef::Tensor(v));
attr_field!(Vec<Tensor>, Tensors, "TENSORS", |v| AttrRef::Tensors(v));
attr_field!(Vec<Graph>, Graphs, "GRAPHS", |v| AttrRef::Graphs(v));
attr_field!(ValueType, TypeProto, "TYPE_PROTO", |v| AttrRef::TypeProto(
    v
));
attr_field!(Vec<ValueType>, TypeProtos, "TYPE_PROTOS", |v| {
    AttrRef::TypeProtos(v)
});

impl AttrField for Box<Graph> {
    fn take(value: Option<Attr>, _default: Option<Self>) -> Result<Self, String> {
        match value {
            Some(Attr::Graph(g)) => Ok(g),
            Some(other) => Err(format!("expected GRAPH, found {}", other.kind())),
            None => Err("required attribute is missing".to_string()),
        }
    }
    fn put<'a>(&'a self, _default: Option<&Self>) -> Option<AttrRef<'a>> {
        Some(AttrRef::Graph(self))
    }
}

impl<T: AttrField> AttrField for Option<T> {
    fn take(value: Option<Attr>, _default: Option<Self>) -> Result<Self, String> {
        match value {
            Some(v) => T::take(Some(v), None).map(Some),
            None => Ok(None),
        }
    }
    fn put<'a>(&'a self, _default: Option<&Self>) -> Option<AttrRef<'a>> {
        self.as_ref().and_then(|v| v.put(None))
    }
}
