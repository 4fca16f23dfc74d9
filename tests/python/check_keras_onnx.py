#!/usr/bin/env python3
"""Runs ONNX files exported from Keras reference cases in onnxruntime.

Usage: check_keras_onnx.py EXPORTED_ROOT CASES_ROOT...

For every EXPORTED_ROOT/<case>/model.onnx: onnx.checker.check_model(full_check=True),
load it in onnxruntime (CPU), feed the case's inputs (meta.json `inputs`, cast to the
graph inputs' element types) and compare every output with the outputs Keras computed
(meta.json `outputs`): same shape, |got - keras| <= tolerance (meta.json, 1e-5) + 1e-5.
Prints PASS/FAIL per case and `N passed, M failed`; exits 1 on failure.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(3)
TYPES = {1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64}


def check(exported, case):
    meta = json.load(open(os.path.join(case, "meta.json")))
    path = os.path.join(exported, "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp, entry in zip(model.graph.input, meta["inputs"]):
        x = np.load(os.path.join(case, entry["file"]))
        feeds[inp.name] = x.astype(TYPES[inp.type.tensor_type.elem_type])
    outs = sess.run(None, feeds)
    tol = meta.get("tolerance", 1e-5) + 1e-5
    if len(outs) != len(meta["outputs"]):
        return f"{len(outs)} outputs, Keras {len(meta['outputs'])}"
    for got, entry in zip(outs, meta["outputs"]):
        want = np.load(os.path.join(case, entry["file"]))
        if got.shape != want.shape:
            return f"{entry['file']}: shape {got.shape}, Keras {want.shape}"
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        if not err <= tol:
            return f"{entry['file']}: max |onnxruntime - keras| = {err:.3g} > {tol:.3g}"
    return None


def main():
    exported_root, roots = sys.argv[1], sys.argv[2:]
    passed = failed = 0
    for name in sorted(os.listdir(exported_root)):
        case = next((os.path.join(r, name) for r in roots if os.path.isdir(os.path.join(r, name))), None)
        if case is None:
            continue
        try:
            why = check(os.path.join(exported_root, name), case)
        except Exception as e:  # noqa: BLE001 - report every failure by case
            why = f"{type(e).__name__}: {e}"
        if why is None:
            passed += 1
            print(f"PASS {name}")
        else:
            failed += 1
            print(f"FAIL {name}: {why}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
