//! `.npy` files in and out of [`Tensor`]s.

use crate::ir::onnx::Limits;
use crate::ir::{DType, Tensor};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::io::Cursor;
use std::path::Path;

/// Reads a `.npy` file within the default [`Limits`]. With `want`, the file must hold
/// that dtype; otherwise the dtype is whatever the file holds (numbers of 1 to 8 bytes,
/// float16 and booleans; strings and objects are refused).
pub fn read(path: &Path, want: Option<DType>) -> Result<Tensor, String> {
    read_with(path, want, &Limits::default())
}

/// [`read`] within `limits`: the file's size (`max_file_bytes`) is checked before it is
/// read, the array's (`max_tensor_bytes`) before anything is allocated for it.
pub fn read_with(path: &Path, want: Option<DType>, limits: &Limits) -> Result<Tensor, String> {
    let what = path.display().to_string();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{what}: {e}"))?
        .len();
    if path.is_dir() {
        return Err(format!("{what}: is a folder, expected a .npy file"));
    }
    if len > limits.max_file_bytes {
        return Err(format!(
            "{what}: the file has {len} bytes, more than the limit of {} (--max-file-bytes)",
            limits.max_file_bytes
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{what}: {e}"))?;
    let (shape, item) = check_header(&bytes).map_err(|e| format!("{what}: {e}"))?;
    let total = shape
        .iter()
        .fold(item as u64, |a, &d| a.saturating_mul(d as u64));
    if total > limits.max_tensor_bytes {
        return Err(format!(
            "{what}: the array {shape:?} has {total} bytes, more than the limit of {} (--max-tensor-bytes)",
            limits.max_tensor_bytes
        ));
    }
    parse(&bytes, want, &what)
}

/// The largest `.npy` payload accepted (bytes).
pub const MAX_NPY_BYTES: u64 = 4 << 30;

/// Checks the header's shape and item size against the bytes that follow it, before
/// anything is allocated: `(shape, item size)` of a little-endian, C-order array.
pub fn check_header(bytes: &[u8]) -> Result<(Vec<usize>, usize), String> {
    header_fields(bytes).map(|(shape, item, _)| (shape, item))
}

/// [`check_header`], also returning the header's `descr` (`'<f4'`, ...).
fn header_fields(bytes: &[u8]) -> Result<(Vec<usize>, usize, String), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("format version {v}")),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or("the header is longer than the file")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let i = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no '{key}'"))?;
        Ok(header[i + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("descr is not a string")?;
    // numpy's type codes: only numbers and booleans are tensors.
    match descr.as_bytes().get(1) {
        Some(b'f' | b'i' | b'u' | b'b' | b'?') => {}
        Some(b'U' | b'S' | b'a') => {
            return Err(format!(
                "holds strings (descr {descr:?}); cellgraph reads arrays of numbers or booleans"
            ))
        }
        Some(b'O') => {
            return Err(format!(
            "holds Python objects (descr {descr:?}); cellgraph reads arrays of numbers or booleans"
        ))
        }
        _ => {
            return Err(format!(
                "unsupported descr {descr:?}; cellgraph reads arrays of numbers or booleans"
            ))
        }
    }
    let item: usize = descr
        .get(2..)
        .and_then(|n| n.parse().ok())
        .filter(|&n: &usize| (1..=16).contains(&n))
        .ok_or_else(|| format!("unsupported descr {descr:?}"))?;
    if descr.starts_with('>') && item > 1 {
        return Err(format!("big-endian data ({descr})"));
    }
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("shape is not a tuple")?;
    let mut shape = Vec::new();
    for part in shape_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        shape.push(
            part.parse::<usize>()
                .map_err(|_| format!("shape entry {part:?}"))?,
        );
    }
    let total = shape
        .iter()
        .try_fold(item as u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&t| t <= MAX_NPY_BYTES)
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    if total != (bytes.len() - end) as u64 {
        return Err(format!(
            "shape {shape:?} of {item}-byte items needs {total} bytes, the file has {}",
            bytes.len() - end
        ));
    }
    Ok((shape, item, descr.to_string()))
}

/// Parses `.npy` bytes (`what` names them in errors); see [`read`].
pub fn parse(bytes: &[u8], want: Option<DType>, what: &str) -> Result<Tensor, String> {
    let (shape, _, descr) = header_fields(bytes).map_err(|e| format!("{what}: {e}"))?;
    let path = Path::new(what);
    if descr == "<f2" || descr == "=f2" {
        return match want {
            None | Some(DType::F16) => {
                let data = &bytes[bytes.len() - shape.iter().product::<usize>() * 2..];
                let v: Vec<half::f16> = data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                ArrayD::from_shape_vec(shape, v)
                    .map(Tensor::F16)
                    .map_err(|e| format!("{what}: {e}"))
            }
            Some(d) => Err(format!(
                "{what}: holds float16 ({descr:?}), expected {d} (convert it, e.g. numpy's x.astype({:?}))",
                numpy_name(d)
            )),
        };
    }
    macro_rules! try_as {
        ($t:ty, $v:ident) => {
            ArrayD::<$t>::read_npy(Cursor::new(bytes)).map(Tensor::$v)
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
                None => format!(
                    "{}: holds {descr:?}, expected {d}: {e} (float16/bfloat16 .npy files are not supported)",
                    path.display()
                ),
            }),
            None => Err(format!(
                "{}: {d} .npy files are not supported",
                path.display()
            )),
        },
        None => found()
            .and_then(attempt)
            .and_then(Result::ok)
            .ok_or_else(|| {
                format!(
                    "{}: dtype {descr:?} is not supported (float16/bfloat16 .npy files are not supported)",
                    path.display()
                )
            }),
    }
}

/// numpy's name of a dtype (`float32`, `int64`, `bool`).
fn numpy_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::I8 => "int8",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::U64 => "uint64",
        DType::Bool => "bool",
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
