//! `.npy` files in and out of [`Tensor`]s.

use crate::ir::{DType, Tensor};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::io::Cursor;
use std::path::Path;

/// Reads a `.npy` file. With `want`, the file must hold that dtype; otherwise the dtype
/// is whatever the file holds (f16/bf16 files are not supported by the reader).
pub fn read(path: &Path, want: Option<DType>) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    macro_rules! try_as {
        ($t:ty, $v:ident) => {
            ArrayD::<$t>::read_npy(Cursor::new(&bytes)).map(Tensor::$v)
        };
    }
    let attempt = |d: DType| -> Option<Result<Tensor, ndarray_npy::ReadNpyError>> {
        Some(match d {
            DType::F32 => try_as!(f32, F32),
            DType::F64 => try_as!(f64, F64),
            DType::I8 => try_as!(i8, I8),
            DType::I16 => try_as!(i16, I16),
            DType::I32 => try_as!(i32, I32),
            DType::I64 => try_as!(i64, I64),
            DType::U8 => try_as!(u8, U8),
            DType::U16 => try_as!(u16, U16),
            DType::U32 => try_as!(u32, U32),
            DType::U64 => try_as!(u64, U64),
            DType::Bool => try_as!(bool, Bool),
            DType::F16 | DType::BF16 => return None,
        })
    };
    let found = || {
        DType::ALL
            .into_iter()
            .find(|&d| matches!(attempt(d), Some(Ok(_))))
    };
    match want {
        Some(d) => match attempt(d) {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(match found() {
                Some(other) => format!("{}: holds {other}, expected {d}", path.display()),
                None => format!("{}: {e}", path.display()),
            }),
            None => Err(format!(
                "{}: {d} .npy files are not supported",
                path.display()
            )),
        },
        None => found()
            .and_then(attempt)
            .and_then(Result::ok)
            .ok_or_else(|| format!("{}: not a .npy file of a supported dtype", path.display())),
    }
}

/// Writes a tensor as `.npy` (f16/bf16 are written as f32).
pub fn write(path: &Path, t: &Tensor) -> Result<(), String> {
    let mut buf = Vec::new();
    let r = match t {
        Tensor::F32(a) => a.write_npy(&mut buf),
        Tensor::F64(a) => a.write_npy(&mut buf),
        Tensor::F16(_) | Tensor::BF16(_) => {
            let v: Vec<f32> = t.to_f64_vec().into_iter().map(|x| x as f32).collect();
            ArrayD::from_shape_vec(t.shape(), v)
                .map_err(|e| e.to_string())?
                .write_npy(&mut buf)
        }
        Tensor::I8(a) => a.write_npy(&mut buf),
        Tensor::I16(a) => a.write_npy(&mut buf),
        Tensor::I32(a) => a.write_npy(&mut buf),
        Tensor::I64(a) => a.write_npy(&mut buf),
        Tensor::U8(a) => a.write_npy(&mut buf),
        Tensor::U16(a) => a.write_npy(&mut buf),
        Tensor::U32(a) => a.write_npy(&mut buf),
        Tensor::U64(a) => a.write_npy(&mut buf),
        Tensor::Bool(a) => a.write_npy(&mut buf),
    };
    r.map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, buf).map_err(|e| format!("{}: {e}", path.display()))
}
