#!/usr/bin/env python3
"""Times cellgraph and onnxruntime on the same recurrent models in one run.

Usage: ort_compare.py [--cellgraph PATH] [--runs N] [--threads N] [--rounds N]

1. `cellgraph bench --step inference --export-dir DIR` writes the standard workloads W1-W4
   (see `cellgraph bench --help`) as ONNX files;
2. per workload, in alternating rounds: `cellgraph bench FILE` and onnxruntime (CPU, N
   intra-op threads) time the same file on the same input shape;
3. prints both medians over rounds and the median of the per-round ratios
   cellgraph/onnxruntime (> 1 means cellgraph is slower), with every round's ratio.
Checks the 1-minute load average first and says so when the machine is busy.
bench/compare.py is the fuller comparison (training steps, Keras/JAX and PyTorch too).
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


def ort_median(path, runs, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    x = (np.arange(np.prod(shape)) * 2654435761 % 1000 / 500.0 - 1.0).astype(np.float32).reshape(shape)
    feeds = {sess.get_inputs()[0].name: x}
    sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def cellgraph_median(exe, path, runs):
    out = subprocess.run([exe, "bench", path, "--runs", str(runs)], check=True, capture_output=True, text=True).stdout
    last = [line for line in out.splitlines() if line.startswith("median_ms:")][-1]
    return float(last.split()[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cellgraph", default="target/release/cellgraph")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating cellgraph/onnxruntime rounds per workload; the ratio is the median over rounds")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, 1-minute load average {load:.2f}" + ("  (BUSY: numbers are unreliable)" if load > 0.5 * cores else ""))
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads; {args.rounds} alternating rounds of {args.runs} runs")

    with tempfile.TemporaryDirectory() as d:
        # Export the standard workloads (and get their names) with one quick run.
        out = subprocess.run([args.cellgraph, "bench", "--json", "--runs", "1", "--step", "inference", "--export-dir", d], check=True, capture_output=True, text=True).stdout
        names = [json.loads(line)["workload"] for line in out.splitlines() if line.startswith("{")]
        print(f"{'workload':<26}{'cellgraph ms':>14}{'onnxruntime ms':>16}{'ratio':>8}   (per round: ratios)")
        for name in names:
            path = os.path.join(d, name + ".onnx")
            cg, rt, ratios = [], [], []
            # Alternate the two tools so both see the same machine conditions.
            for _ in range(args.rounds):
                cg.append(cellgraph_median(args.cellgraph, path, args.runs))
                rt.append(ort_median(path, args.runs, args.threads))
                ratios.append(cg[-1] / rt[-1])
            per = " ".join(f"{r:.2f}" for r in ratios)
            print(f"{name:<26}{np.median(cg):>14.3f}{np.median(rt):>16.3f}{np.median(ratios):>8.2f}   ({per})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
