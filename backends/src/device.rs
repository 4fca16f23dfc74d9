//! Backends as objects, and values that stay on them.
//!
//! [`crate::Backend`]/[`crate::Plan`] compile a whole graph for one backend and run it
//! on host arrays. A [`Device`] is the object-safe form that a plan spanning several
//! backends needs ([`crate::placed::PlacedPlan`], as onnxruntime's execution providers):
//! - it says per node, with the node's input types, whether it runs it and, if not, why;
//! - it compiles the part of a graph placed on it;
//! - it moves values between the host and its own memory.
//!
//! A [`Value`] is either host data or a [`DeviceValue`] in one backend's memory. Only
//! that backend reads a device value; [`Device::download`] brings it to the host. A
//! plan part receives its inputs on its own backend and returns its outputs there, so
//! values cross only where the caller or another backend needs them.

use crate::data::Data;
use crate::error::{Error, Result};
use cellgraph_ir::{Graph, Op, ValueType};
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A value held by a plan: on the host, or in one backend's memory.
#[derive(Clone, Debug)]
pub enum Value {
    /// Host data (what the CPU backend computes on).
    Host(Data),
    /// A buffer in a backend's own memory.
    Device(DeviceValue),
}

impl Value {
    /// The backend whose memory holds the value (`None`: the host).
    pub fn device(&self) -> Option<&'static str> {
        match self {
            Value::Host(_) => None,
            Value::Device(d) => Some(d.backend),
        }
    }
}

impl From<Data> for Value {
    fn from(d: Data) -> Value {
        Value::Host(d)
    }
}

/// A value in one backend's memory: the backend's own buffer type behind `Any`, shared
/// (cloning a value does not copy the buffer).
#[derive(Clone)]
pub struct DeviceValue {
    /// The backend ([`Device::name`]) that made it and alone reads it.
    pub backend: &'static str,
    /// Its size in bytes (for reports and budgets).
    pub bytes: u64,
    /// The backend's buffer.
    pub buf: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for DeviceValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceValue({}, {} bytes)", self.backend, self.bytes)
    }
}

impl DeviceValue {
    /// The buffer as the backend's type `T`; an error naming both backends when the
    /// value belongs to another one.
    pub fn get<T: Any + Send + Sync>(&self, backend: &'static str) -> Result<&T> {
        if self.backend != backend {
            return Err(Error::Compile(format!(
                "a value on backend {} was given to backend {backend}",
                self.backend
            )));
        }
        self.buf.downcast_ref::<T>().ok_or_else(|| {
            Error::Compile(format!(
                "a value of backend {backend} has another buffer type"
            ))
        })
    }
}

/// A backend as an object: per-node capability, compiling its part of a graph, and
/// moving values between the host and its memory.
pub trait Device: Send + Sync + fmt::Debug {
    /// The backend's name (`cpu`, `subset`, `cuda`).
    fn name(&self) -> &'static str;

    /// Whether this backend runs `op` with these input types (`None`: an omitted
    /// optional input); `Err` says why not, in words a user reads in `inspect`.
    fn supports(&self, op: &Op, inputs: &[Option<&ValueType>]) -> std::result::Result<(), String>;

    /// Whether values computed here are host data (the CPU): no upload or download is
    /// needed to hand them to the host.
    fn host_resident(&self) -> bool {
        false
    }

    /// Compiles a graph whose every node this backend [`supports`](Device::supports).
    fn compile_part(&self, graph: &Graph) -> Result<Box<dyn DevicePlan>>;

    /// Copies host data into this backend's memory (a host-resident backend returns it
    /// as it is).
    fn upload(&self, data: Data) -> Result<Value>;

    /// Copies a value of this backend to the host.
    fn download(&self, value: &Value) -> Result<Data>;
}

/// A compiled part of a graph on one backend.
pub trait DevicePlan: Send {
    /// Runs on values already on this backend (host data for a host-resident one), in
    /// the part's input order; returns its outputs on this backend.
    fn run(&mut self, inputs: Vec<Value>) -> Result<Vec<Value>>;
}
