#!/usr/bin/env python3
"""Times cellgraph and onnxruntime on the same recurrent models in one run.

Usage: ort_compare.py [--cellgraph PATH] [--runs N] [--threads N]

1. `cellgraph bench --export-dir DIR --json` times the standard workloads (LSTM B64 T28
   I28 H64, LSTM and GRU B64 T100 I512 H512) and writes them as ONNX files;
2. onnxruntime (CPU, N intra-op threads) times the same files on the same input shapes;
3. prints both medians and cellgraph/onnxruntime (> 1 means cellgraph is slower).
Checks the 1-minute load average first and says so when the machine is busy.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cellgraph", default="target/release/cellgraph")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, 1-minute load average {load:.2f}" + ("  (BUSY: numbers are unreliable)" if load > 0.5 * cores else ""))
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads")

    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([args.cellgraph, "bench", "--json", "--runs", str(args.runs), "--export-dir", d], check=True, capture_output=True, text=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        print(f"{'workload':<26}{'cellgraph ms':>14}{'onnxruntime ms':>16}{'ratio':>8}")
        for r in rows:
            path = os.path.join(d, r["workload"] + ".onnx")
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            shape = sess.get_inputs()[0].shape
            x = (np.arange(np.prod(shape)) * 2654435761 % 1000 / 500.0 - 1.0).astype(np.float32).reshape(shape)
            feeds = {sess.get_inputs()[0].name: x}
            sess.run(None, feeds)
            ts = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run(None, feeds)
                ts.append((time.perf_counter() - t) * 1e3)
            ort_ms = float(np.median(ts))
            print(f"{r['workload']:<26}{r['median_ms']:>14.3f}{ort_ms:>16.3f}{r['median_ms'] / ort_ms:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
