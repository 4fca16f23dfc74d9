#!/usr/bin/env python3
"""Checks ONNX files written by `cellgraph convert` against onnx and onnxruntime.

Usage: check_onnx_exports.py EXPORTED_ROOT ORIGINAL_ROOT

For every EXPORTED_ROOT/<suite>/<case>/model.onnx:
  1. onnx.checker.check_model(path, full_check=True);
  2. onnxruntime (CPU) loads it;
  3. it runs on ORIGINAL_ROOT/<suite>/<case>/test_data_set_*/input_<j>.pb and each output
     matches output_<j>.pb: same count, shape and dtype, then
     |got - want| <= atol + rtol * |want| (rtol 1e-3, atol 1e-7), NaNs in the same places.
Prints `PASS <suite>/<case>` or `FAIL <suite>/<case>: <reason>` per case, then
`N passed, M failed`; exits 1 if anything failed.
"""
import glob
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

RTOL, ATOL = 1e-3, 1e-7
ort.set_default_logger_severity(3)

# Cases whose inputs onnxruntime cannot be fed from numpy (bfloat16 inputs): they are
# still checked and loaded, but not run. Reported as PASS only for what was checked.
NOT_RUNNABLE = {
    "test_range_bfloat16_type_positive_delta": "bfloat16 inputs cannot be fed from numpy",
    "test_range_bfloat16_type_positive_delta_expanded": "bfloat16 inputs cannot be fed from numpy",
}


def read_value(path, type_proto):
    kind = type_proto.WhichOneof("value")
    data = open(path, "rb").read()
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return numpy_helper.to_array(t)


def compare(got, want, what):
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{what}: sequence of {len(got) if isinstance(got, list) else type(got)} vs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            r = compare(g, w, f"{what}[{i}]")
            if r:
                return r
        return None
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype != want.dtype:
        return f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.dtype.kind in "fc":
        try:
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            return f"{what}: values differ: {str(e).strip().splitlines()[-3:]}"
    elif not np.array_equal(got, want):
        return f"{what}: values differ"
    return None


def check_case(exported, original):
    onnx.checker.check_model(exported, full_check=True)
    model = onnx.load(exported)
    sess = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    name = os.path.basename(os.path.dirname(exported))
    if name in NOT_RUNNABLE:
        return None, f"checked and loaded; not run: {NOT_RUNNABLE[name]}"
    sets = sorted(glob.glob(os.path.join(original, "test_data_set_*")))
    if not sets:
        return "no test data sets", None
    for ds in sets:
        feeds = {}
        for j, vi in enumerate(model.graph.input):
            feeds[vi.name] = read_value(os.path.join(ds, f"input_{j}.pb"), vi.type)
        outs = sess.run(None, feeds)
        if len(outs) != len(model.graph.output):
            return f"{len(outs)} outputs, expected {len(model.graph.output)}", None
        for j, vi in enumerate(model.graph.output):
            want = read_value(os.path.join(ds, f"output_{j}.pb"), vi.type)
            r = compare(outs[j], want, f"{os.path.basename(ds)} output {j} ({vi.name})")
            if r:
                return r, None
    return None, None


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    exported_root, original_root = sys.argv[1], sys.argv[2]
    models = sorted(glob.glob(os.path.join(exported_root, "*", "*", "model.onnx")))
    passed = failed = 0
    for m in models:
        rel = os.path.relpath(os.path.dirname(m), exported_root)
        try:
            err, note = check_case(m, os.path.join(original_root, rel))
        except Exception as e:  # checker, loader or runtime error
            err, note = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", None
        if err:
            failed += 1
            print(f"FAIL {rel}: {err}")
        else:
            passed += 1
            print(f"PASS {rel}" + (f" ({note})" if note else ""))
    print(f"onnx-exports: {passed} passed, {failed} failed")
    return 1 if failed or not models else 0


if __name__ == "__main__":
    sys.exit(main())
