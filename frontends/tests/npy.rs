//! `.npy` reading (docs/RELIABILITY.md, "malformed `.npy`"): every dtype round-trips, each
//! class of malformed file is refused with an error naming the file and the header field
//! at fault (checked before anything of the declared size is allocated), and random
//! damage to valid files never panics.

use cellgraph::ir::{DType, Tensor};
use cellgraph::npy;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// A version 1.0 `.npy` file with this header dictionary text and payload.
fn npy_v1(dict: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn f32_file(shape: &str, n: usize) -> Vec<u8> {
    npy_v1(
        &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
        &vec![0u8; 4 * n],
    )
}

fn written(t: &Tensor) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.npy");
    npy::write(&p, t).unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn every_dtype_round_trips() {
    let shape = [2usize, 3];
    for d in DType::ALL {
        let vals: Vec<f64> = (0..6).map(|k| (k % 2) as f64).collect();
        let t = Tensor::from_f64_vec(d, &shape, &vals).unwrap();
        let bytes = written(&t);
        let back = npy::parse(&bytes, None, "t.npy").unwrap();
        match d {
            // Written as f32 (the reader has no half-precision type).
            DType::F16 | DType::BF16 => {
                assert_eq!(back.dtype(), DType::F32);
                assert_eq!(back.to_f64_vec(), vals);
            }
            _ => assert_eq!(back, t, "{d}"),
        }
        assert_eq!(back.shape(), &shape);
    }
    // A 0-d array and an empty one.
    let scalar = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[]), vec![2.5]).unwrap());
    assert_eq!(npy::parse(&written(&scalar), None, "s").unwrap(), scalar);
    let empty = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[0, 4]), vec![]).unwrap());
    assert_eq!(npy::parse(&written(&empty), None, "e").unwrap(), empty);
}

#[test]
fn a_wrong_dtype_is_named() {
    let t = Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, 2]).unwrap());
    let e = npy::parse(&written(&t), Some(DType::F32), "labels.npy").unwrap_err();
    assert!(
        e.contains("labels.npy") && e.contains("i32") && e.contains("f32"),
        "{e}"
    );
}

#[test]
fn malformed_files_are_refused_naming_the_file_and_the_field() {
    let good = f32_file("(2, 3)", 6);
    assert!(npy::parse(&good, Some(DType::F32), "x.npy").is_ok());
    let mut v2_short = b"\x93NUMPY\x02\x00\x10\x00".to_vec();
    v2_short.push(0);
    let mut long_header = good.clone();
    long_header[8] = 0xff;
    long_header[9] = 0x7f;
    let mut not_text = good.clone();
    not_text[12] = 0xff;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "bad magic"),
        (
            "bad magic",
            b"\x93NUMPX\x01\x00\x00\x00".to_vec(),
            "bad magic",
        ),
        ("short", good[..9].to_vec(), "bad magic"),
        ("version 2 cut in its length", v2_short, "truncated header"),
        (
            "version 9",
            [&good[..6], &[9u8][..], &good[7..]].concat(),
            "format version 9",
        ),
        (
            "header longer than the file",
            long_header,
            "header is longer than the file",
        ),
        ("header not text", not_text, "header is not text"),
        (
            "no descr",
            npy_v1("{'fortran_order': False, 'shape': (2,), }", &[0; 8]),
            "no 'descr'",
        ),
        (
            "descr not a string",
            npy_v1(
                "{'descr': 4, 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            "descr is not a string",
        ),
        (
            "unknown descr",
            npy_v1(
                "{'descr': '<x99', 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            "unsupported descr",
        ),
        (
            "big-endian",
            npy_v1(
                "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
            "big-endian",
        ),
        (
            "Fortran order",
            npy_v1(
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                &[0; 16],
            ),
            "Fortran-order",
        ),
        (
            "no fortran_order",
            npy_v1("{'descr': '<f4', 'shape': (1,), }", &[0; 4]),
            "no 'fortran_order'",
        ),
        (
            "shape not a tuple",
            npy_v1(
                "{'descr': '<f4', 'fortran_order': False, 'shape': [1], }",
                &[0; 4],
            ),
            "shape is not a tuple",
        ),
        ("shape entry", f32_file("(2, -3)", 6), "shape entry"),
        (
            "shape overflowing",
            f32_file("(18446744073709551615, 2)", 0),
            "too large",
        ),
        (
            "shape of 2^40 elements",
            f32_file("(1048576, 1048576)", 1),
            "too large",
        ),
        (
            "data short",
            f32_file("(2, 3)", 5),
            "needs 24 bytes, the file has 20",
        ),
        (
            "data long",
            f32_file("(2, 3)", 7),
            "needs 24 bytes, the file has 28",
        ),
        (
            "strings",
            npy_v1(
                "{'descr': '<U1', 'fortran_order': False, 'shape': (2,), }",
                &[0; 8],
            ),
            "holds strings",
        ),
        (
            "objects",
            npy_v1(
                "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
                &[0; 16],
            ),
            "holds Python objects",
        ),
    ];
    for (what, bytes, why) in &cases {
        for want in [None, Some(DType::F32)] {
            let e = npy::parse(bytes, want, "dir/x.npy").expect_err(what);
            assert!(
                e.contains("dir/x.npy") && e.contains(why),
                "{what} (want {want:?}): expected the file and {why:?}, got: {e}"
            );
        }
    }
}

#[test]
fn half_precision_reads_as_f16_and_is_named_when_another_dtype_is_wanted() {
    // 1.0 and -2.0 in IEEE binary16.
    let mut data = 0x3c00u16.to_le_bytes().to_vec();
    data.extend_from_slice(&0xc000u16.to_le_bytes());
    let bytes = npy_v1(
        "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
        &data,
    );
    let t = npy::parse(&bytes, None, "dir/h.npy").expect("float16");
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(t.to_f64_vec(), vec![1.0, -2.0]);
    let t = npy::parse(&bytes, Some(DType::F16), "dir/h.npy").expect("float16 wanted");
    assert_eq!(t.to_f64_vec(), vec![1.0, -2.0]);
    let e = npy::parse(&bytes, Some(DType::F32), "dir/h.npy").unwrap_err();
    assert!(
        e.contains("dir/h.npy: holds float16") && e.contains("astype(\"float32\")"),
        "{e}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let e = npy::read(std::path::Path::new("/nonexistent/in.npy"), None).unwrap_err();
    assert!(e.contains("/nonexistent/in.npy"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random byte damage (overwrites, cuts, insertions) to valid files of every dtype:
    /// the reader returns a tensor whose bytes fit the file, or an error — never a panic.
    #[test]
    fn damaged_files_never_panic(
        dtype in 0usize..DType::ALL.len(),
        edits in prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..6),
        cut in prop::option::of(any::<u16>()),
    ) {
        let d = DType::ALL[dtype];
        let t = Tensor::from_f64_vec(d, &[3, 2], &[1.0, 0.0, 2.0, 1.0, 0.0, 1.0]).unwrap();
        let mut bytes = written(&t);
        for (at, b, kind) in edits {
            let at = at as usize % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] = b,
                1 => bytes.insert(at, b),
                _ if at < bytes.len() => { bytes.remove(at); }
                _ => {}
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c as usize % (bytes.len() + 1));
        }
        for want in [None, Some(DType::F32), Some(d)] {
            if let Ok(got) = npy::parse(&bytes, want, "p.npy") {
                let n: usize = got.shape().iter().product();
                prop_assert!(n * got.dtype().size_of() <= bytes.len());
            }
        }
    }
}
