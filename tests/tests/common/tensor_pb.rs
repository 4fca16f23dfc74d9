//! A minimal reader for the `.pb` files of ONNX backend-test cases: one serialized
//! `onnx.TensorProto` with its payload in `raw_data` (FLOAT, DOUBLE or INT32), as the
//! generators under `tests/python/` write them. Protobuf wire format by hand, because the
//! tests crate has no protobuf dependency (the project's own reader is private to
//! `cellgraph::conformance`).

use std::path::Path;

/// A decoded tensor: name, dimensions and elements as f64.
#[derive(Clone, Debug)]
pub struct PbTensor {
    /// `name`.
    pub name: String,
    /// `dims`.
    pub dims: Vec<usize>,
    /// The elements, converted to f64.
    pub values: Vec<f64>,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// Decodes a serialized `TensorProto` (fields 1 `dims`, 2 `data_type`, 8 `name`,
/// 9 `raw_data`; other fields are skipped, and typed data fields are refused).
pub fn decode_tensor(buf: &[u8]) -> Result<PbTensor, String> {
    let (mut dims, mut dtype, mut name, mut raw) = (Vec::new(), 0u64, String::new(), None);
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(buf, &mut pos)?;
                match field {
                    1 => dims.push(v as usize),
                    2 => dtype = v,
                    _ => {}
                }
            }
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let body = buf.get(pos..pos + len).ok_or("truncated field")?;
                pos += len;
                match field {
                    1 => {
                        let mut p = 0;
                        while p < body.len() {
                            dims.push(varint(body, &mut p)? as usize);
                        }
                    }
                    8 => name = String::from_utf8_lossy(body).into_owned(),
                    9 => raw = Some(body.to_vec()),
                    4 | 5 | 7 | 10 | 11 => {
                        return Err(format!("typed data field {field} is not supported"))
                    }
                    _ => {}
                }
            }
            1 => pos += 8,
            5 => pos += 4,
            other => return Err(format!("wire type {other}")),
        }
    }
    let raw = raw.ok_or("no raw_data")?;
    let values: Vec<f64> = match dtype {
        1 => raw
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        6 => raw
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        11 => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => return Err(format!("data_type {other} is not supported")),
    };
    if values.len() != dims.iter().product::<usize>() {
        return Err(format!("{} values for dims {dims:?}", values.len()));
    }
    Ok(PbTensor { name, dims, values })
}

/// Reads and decodes a `.pb` file.
pub fn read_tensor(path: &Path) -> Result<PbTensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_tensor(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}
