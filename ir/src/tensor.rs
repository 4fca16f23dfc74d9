//! Dense tensors on ndarray, one variant per [`DType`].

use crate::dtype::DType;
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use std::fmt;

/// Errors building a tensor from raw parts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// The number of elements or bytes does not match the shape.
    #[error("tensor of shape {shape:?} and dtype {dtype} needs {want} {unit}, got {got}")]
    SizeMismatch {
        /// The declared shape.
        shape: Vec<usize>,
        /// The dtype.
        dtype: DType,
        /// What the shape needs.
        want: usize,
        /// What was given.
        got: usize,
        /// "bytes" or "elements".
        unit: &'static str,
    },
    /// The shape's element count overflows `usize`.
    #[error("tensor shape {0:?} has more elements than can be addressed")]
    Overflow(Vec<i64>),
}

macro_rules! tensor_enum {
    ($( $var:ident($ty:ty) = $dt:ident ),* $(,)?) => {
        /// A dense, row-major tensor. The variant is its dtype.
        #[derive(Clone, PartialEq)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub enum Tensor {
            $(
                #[doc = concat!("Elements of type `", stringify!($ty), "`.")]
                $var(ArrayD<$ty>),
            )*
        }

        impl Tensor {
            /// The element type.
            pub fn dtype(&self) -> DType {
                match self { $( Tensor::$var(_) => DType::$dt, )* }
            }

            /// The shape.
            pub fn shape(&self) -> &[usize] {
                match self { $( Tensor::$var(a) => a.shape(), )* }
            }

            /// A tensor of zeros (false for bool).
            pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
                match dtype { $( DType::$dt => Tensor::$var(ArrayD::from_elem(IxDyn(shape), <$ty as Element>::ZERO)), )* }
            }

            /// Decodes packed little-endian bytes (one byte per bool).
            pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, TensorError> {
                let n = element_count(shape)?;
                let want = n.checked_mul(dtype.size_of()).ok_or_else(|| TensorError::Overflow(shape.iter().map(|&d| d as i64).collect()))?;
                if bytes.len() != want {
                    return Err(TensorError::SizeMismatch { shape: shape.to_vec(), dtype, want, got: bytes.len(), unit: "bytes" });
                }
                Ok(match dtype {
                    $( DType::$dt => {
                        let v: Vec<$ty> = bytes.chunks_exact(dtype.size_of()).map(<$ty as Element>::from_le).collect();
                        Tensor::$var(ArrayD::from_shape_vec(IxDyn(shape), v).expect("length checked above"))
                    } )*
                })
            }

            /// Encodes as packed little-endian bytes in row-major order.
            pub fn to_le_bytes(&self) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.len() * self.dtype().size_of());
                match self { $( Tensor::$var(a) => for x in a.iter() { <$ty as Element>::write_le(*x, &mut out) }, )* }
                out
            }

            /// The elements converted to f64 (bool as 0/1), row-major.
            pub fn to_f64_vec(&self) -> Vec<f64> {
                match self { $( Tensor::$var(a) => a.iter().map(|x| <$ty as Element>::to_f64(*x)).collect(), )* }
            }

            /// Builds a tensor of `dtype` from f64 values (rounded/truncated as `as` casts do).
            pub fn from_f64_vec(dtype: DType, shape: &[usize], values: &[f64]) -> Result<Tensor, TensorError> {
                let n = element_count(shape)?;
                if values.len() != n {
                    return Err(TensorError::SizeMismatch { shape: shape.to_vec(), dtype, want: n, got: values.len(), unit: "elements" });
                }
                Ok(match dtype {
                    $( DType::$dt => Tensor::$var(ArrayD::from_shape_vec(IxDyn(shape), values.iter().map(|&x| <$ty as Element>::from_f64(x)).collect()).expect("length checked above")), )*
                })
            }
        }

        $( impl From<ArrayD<$ty>> for Tensor {
            fn from(a: ArrayD<$ty>) -> Tensor { Tensor::$var(a) }
        } )*
    };
}

tensor_enum! {
    F32(f32) = F32,
    F64(f64) = F64,
    F16(f16) = F16,
    BF16(bf16) = BF16,
    I8(i8) = I8,
    I16(i16) = I16,
    I32(i32) = I32,
    I64(i64) = I64,
    U8(u8) = U8,
    U16(u16) = U16,
    U32(u32) = U32,
    U64(u64) = U64,
    Bool(bool) = Bool,
}

/// The number of elements of `shape`, or an overflow error.
pub fn element_count(shape: &[usize]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TensorError::Overflow(shape.iter().map(|&d| d as i64).collect()))
}

/// Element types a [`Tensor`] can hold.
pub trait Element: Copy {
    /// Zero (false).
    const ZERO: Self;
    /// Decodes one element from little-endian bytes of exactly its size.
    fn from_le(b: &[u8]) -> Self;
    /// Appends the little-endian bytes of `self`.
    fn write_le(self, out: &mut Vec<u8>);
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Narrows from f64.
    fn from_f64(x: f64) -> Self;
}

macro_rules! prim_element {
    ($($t:ty),*) => { $(
        impl Element for $t {
            const ZERO: Self = 0 as $t;
            fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().expect("chunk has the element size")) }
            fn write_le(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()) }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(x: f64) -> Self { x as $t }
        }
    )* };
}
prim_element!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! half_element {
    ($($t:ty),*) => { $(
        impl Element for $t {
            const ZERO: Self = <$t>::ZERO;
            fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().expect("chunk has the element size")) }
            fn write_le(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()) }
            fn to_f64(self) -> f64 { self.to_f64() }
            fn from_f64(x: f64) -> Self { <$t>::from_f64(x) }
        }
    )* };
}
half_element!(f16, bf16);

impl Element for bool {
    const ZERO: Self = false;
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8)
    }
    fn to_f64(self) -> f64 {
        if self {
            1.0
        } else {
            0.0
        }
    }
    fn from_f64(x: f64) -> Self {
        x != 0.0
    }
}

impl Tensor {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A rank-0 f32 tensor.
    pub fn scalar_f32(x: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), x))
    }

    /// A rank-1 i64 tensor.
    pub fn vec_i64(v: &[i64]) -> Tensor {
        Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-D shape matches"),
        )
    }

    /// The elements as i64, for integer tensors (shape-like constants); `None` otherwise.
    pub fn as_i64_vec(&self) -> Option<Vec<i64>> {
        match self {
            Tensor::I64(a) => Some(a.iter().copied().collect()),
            Tensor::I32(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::I16(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::I8(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::U8(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::U16(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::U32(a) => Some(a.iter().map(|&x| x as i64).collect()),
            Tensor::U64(a) => Some(a.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }

    /// A 64-bit FNV-1a hash of dtype, shape and bytes: a content fingerprint for printers.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: u8| {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        eat(self.dtype().onnx_code() as u8);
        for &d in self.shape() {
            for b in (d as u64).to_le_bytes() {
                eat(b);
            }
        }
        for b in self.to_le_bytes() {
            eat(b);
        }
        h
    }

    /// A short, stable text form: dtype and shape, the values when there are at most 8,
    /// otherwise a content fingerprint.
    pub fn summary(&self) -> String {
        let dims: Vec<String> = self.shape().iter().map(|d| d.to_string()).collect();
        let head = format!("{}[{}]", self.dtype(), dims.join(","));
        if self.len() <= 8 {
            let vals: Vec<String> = match self {
                Tensor::Bool(a) => a.iter().map(|b| b.to_string()).collect(),
                Tensor::F32(a) => a.iter().map(|x| format!("{x:?}")).collect(),
                Tensor::F64(a) => a.iter().map(|x| format!("{x:?}")).collect(),
                t if t.dtype().is_float() => {
                    t.to_f64_vec().iter().map(|x| format!("{x:?}")).collect()
                }
                t => t
                    .as_i64_vec()
                    .unwrap_or_default()
                    .iter()
                    .map(|x| x.to_string())
                    .collect(),
            };
            format!("{head}{{{}}}", vals.join(","))
        } else {
            format!("{head}#{:016x}", self.fingerprint())
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}
