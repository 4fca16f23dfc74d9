#!/usr/bin/env python3
"""Times cellgraph and its peers on the workloads W1-W4 in one run and prints the ratios.

Usage:
  python bench/compare.py [--cellgraph target/release/cellgraph] [--workloads W1,W2,W3,W4]
                          [--steps inference,train] [--rounds 3] [--runs 20] [--big-runs 5]
                          [--threads 2] [--json FILE] [--baseline OLD_CELLGRAPH]

The workloads (float32, as `cellgraph bench` defines them): W1 LSTM batch 64, 28 steps,
input 28, units 64; W2 LSTM 64/100/512/512; W3 GRU (reset-after) at W2's size; W4
bidirectional W1. "inference" is the recurrent layer alone; "train" is one training step of
the layer plus a Dense(10) head: forward, sparse softmax cross-entropy from logits, backward,
SGD(0.01) update.

Peers, each used when importable (`pip install -r bench/requirements.txt`):
  inference: onnxruntime on the ONNX file cellgraph exports for the same layer, Keras 3 on
             JAX (`predict_on_batch`), PyTorch (`torch.nn.LSTM/GRU` under `no_grad`);
  train:     Keras 3 on JAX (`train_on_batch`, XLA-compiled), PyTorch (forward, backward,
             `optim.SGD.step`).
Every measurement is its own process, pinned to the first N cores (`--threads`); each peer
is timed with 1 thread and with N and the faster counts (as the issue's table does).
Rounds alternate the tools so they see the same machine. A ratio is cellgraph's median over
rounds divided by the fastest peer's: below 1 means cellgraph is faster. Each round's own
ratio is printed too, and `paired`, the median of those: when the machine drifts between
rounds (this VM moves the same binary by up to 1.9x), the two medians can land in different
rounds, and the paired figure compares runs that saw the same minute. Peak memory is each
process's peak resident set (Python processes include the interpreter and the framework).

With --baseline, another cellgraph binary (an older build) is timed as one more peer, `old`,
in the same alternating rounds with the same threads: its line's ratio is new/old (above 1:
the new build is slower). Without the Python peers installed, `old` is the only peer.

Before timing, the script samples the CPUs for a second and reads the load average, and says
BUSY when the machine is not idle: numbers taken then are unreliable.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

WORKLOADS = {
    # id: (cell, bidirectional, batch, steps, input, units)
    "W1": ("LSTM", False, 64, 28, 28, 64),
    "W2": ("LSTM", False, 64, 100, 512, 512),
    "W3": ("GRU", False, 64, 100, 512, 512),
    "W4": ("LSTM", True, 64, 28, 28, 64),
}


def inputs(np, b, t, i, time_major):
    """The deterministic batch cellgraph's bench feeds: x and integer labels."""
    x = (np.arange(b * t * i, dtype=np.int64) * 2654435761 % 1000 / 500.0 - 1.0).astype(np.float32)
    x = x.reshape((t, b, i) if time_major else (b, t, i))
    y = (np.arange(b) % 10).astype(np.int32)
    return x, y


def time_runs(f, runs):
    f()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def peak_mib():
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the
    process that forked it), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------- peer processes


def peer_ort(w, step, runs, threads, onnx_path):
    import numpy as np
    import onnxruntime as ort

    if step != "inference":
        raise SystemExit("onnxruntime times inference only")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    _, _, b, t, i, _ = w
    x, _ = inputs(np, b, t, i, time_major=True)
    feeds = {sess.get_inputs()[0].name: x}
    return time_runs(lambda: sess.run(None, feeds), runs)


def peer_keras(w, step, runs, threads):
    os.environ["KERAS_BACKEND"] = "jax"
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import keras
    import numpy as np

    cell, bi, b, t, i, h = w
    layer = (keras.layers.LSTM if cell == "LSTM" else keras.layers.GRU)(h)
    if bi:
        layer = keras.layers.Bidirectional(layer)
    model = keras.Sequential([keras.Input((t, i)), layer, keras.layers.Dense(10)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = inputs(np, b, t, i, time_major=False)
    if step == "train":
        return time_runs(lambda: model.train_on_batch(x, y), runs)
    return time_runs(lambda: np.asarray(model.predict_on_batch(x)), runs)


def peer_torch(w, step, runs, threads):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cell, bi, b, t, i, h = w
    kind = torch.nn.LSTM if cell == "LSTM" else torch.nn.GRU
    if step == "inference":
        rnn = kind(i, h, bidirectional=bi)  # time-major, as the ONNX layer
        x, _ = inputs(np, b, t, i, time_major=True)
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                rnn(xt)

        return time_runs(run, runs)
    rnn = kind(i, h, bidirectional=bi, batch_first=True)
    d = 2 if bi else 1
    head = torch.nn.Linear(d * h, 10)
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=0.01)
    x, y = inputs(np, b, t, i, time_major=False)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def step_():
        opt.zero_grad()
        _, hn = rnn(xt)
        hn = hn[0] if isinstance(hn, tuple) else hn  # LSTM: (h_n, c_n)
        last = torch.cat([hn[k] for k in range(d)], dim=1)  # Keras's concat of the final states
        loss = torch.nn.functional.cross_entropy(head(last), yt)
        loss.backward()
        opt.step()

    return time_runs(step_, runs)


def peer_main(args):
    os.sched_setaffinity(0, set(range(args.threads)))
    w = WORKLOADS[args.workload]
    base = peak_mib()
    if args.peer == "ort":
        ms = peer_ort(w, args.step, args.runs, args.threads, args.onnx)
    elif args.peer == "keras":
        ms = peer_keras(w, args.step, args.runs, args.threads)
    else:
        ms = peer_torch(w, args.step, args.runs, args.threads)
    print(json.dumps({"median_ms": ms, "peak_mib": peak_mib(), "start_mib": base}))


# ---------------------------------------------------------------- driver


def available(module):
    """Whether `module` is installed (found, not imported: the driver stays small)."""
    return importlib.util.find_spec(module) is not None


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_busy_fraction(seconds=1.0):
    """The share of CPU time spent busy (user, system, steal, ...) over `seconds`."""

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def run_json(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"no result from {' '.join(cmd)}")
    return rows[-1]


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cellgraph", default="target/release/cellgraph")
    ap.add_argument("--workloads", default="W1,W2,W3,W4")
    ap.add_argument("--steps", default="inference,train")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per measurement, W1 and W4")
    ap.add_argument("--big-runs", type=int, default=5, help="timed runs per measurement, W2 and W3")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--baseline", help="an older cellgraph binary, timed as the peer `old`")
    # internal: one peer measurement in this process
    ap.add_argument("--peer", choices=["ort", "keras", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer_main(args)

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    busy = cpu_busy_fraction()
    flag = "  (BUSY: numbers are unreliable)" if busy > 0.25 else ""
    print(f"machine: {cores} cores; 1-minute load average {load:.2f}; CPUs busy {busy:.0%} over 1 s before timing{flag}")
    peers_inf = [p for p, mods in (("ort", ["onnxruntime"]), ("keras", ["keras", "jax"]), ("torch", ["torch"])) if all(available(m) for m in mods)]
    peers_train = [p for p in peers_inf if p != "ort"]
    if args.baseline:
        peers_inf.append("old")
        peers_train.append("old")
        old_exe = os.path.abspath(args.baseline)
    versions = [f"{m} {version(m)}" if version(m) else f"{m}: not installed" for m in ("onnxruntime", "keras", "jax", "torch")]
    print("peers: " + ", ".join(versions) + f"; threads: 1 and {args.threads} (the faster counts)")
    exe = os.path.abspath(args.cellgraph)
    ids = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    thread_opts = sorted({1, args.threads})
    me = os.path.abspath(__file__)
    records = []
    with tempfile.TemporaryDirectory() as d:
        # The ONNX files onnxruntime times: cellgraph's own export of each layer.
        out = subprocess.run([exe, "bench", "--json", "--runs", "1", "--step", "inference", "--export-dir", d]
                             + sum((["--workload", w] for w in ids), []), check=True, capture_output=True, text=True).stdout
        names = {r["id"]: r["workload"] for r in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}
        print(f"\n{'':4}{'step':<10}{'cellgraph ms':>13}{'peer':>10}{'peer ms':>10}{'ratio':>7}  per round (cellgraph/peer; paired)   peak MiB cellgraph / peer")
        for wid in ids:
            w = WORKLOADS[wid]
            runs = args.big_runs if w[4] >= 256 else args.runs
            for step in steps:
                peers = peers_inf if step == "inference" else peers_train
                cg, cg_peak = [], []
                pm = {(p, t): [] for p in peers for t in thread_opts}
                pk = {}
                for _ in range(args.rounds):
                    r = run_json([exe, "bench", "--workload", wid, "--step", step, "--runs", str(runs), "--json", "--threads", str(args.threads)])
                    cg.append(r["median_ms"])
                    cg_peak.append(r.get("peak_mib") or 0.0)
                    for p in peers:
                        for t in thread_opts:
                            if p == "old" and t != args.threads:
                                continue
                            cmd = [sys.executable, me, "--peer", p, "--workload", wid, "--step", step, "--runs", str(runs), "--threads", str(t)]
                            if p == "old":
                                cmd = [old_exe, "bench", "--workload", wid, "--step", step, "--runs", str(runs), "--json", "--threads", str(t)]
                            if p == "ort":
                                cmd += ["--onnx", os.path.join(d, names[wid] + ".onnx")]
                            try:
                                r = run_json(cmd)
                            except (subprocess.CalledProcessError, RuntimeError) as e:
                                err = getattr(e, "stderr", "") or str(e)
                                print(f"  {p} {wid} {step} ({t} threads) failed: {err.strip().splitlines()[-1] if err.strip() else e}")
                                continue
                            pm[(p, t)].append(r["median_ms"])
                            pk[(p, t)] = max(pk.get((p, t), 0.0), r.get("peak_mib") or 0.0)
                timed = {k: median(v) for k, v in pm.items() if v}
                if not timed:
                    print(f"{wid:<4}{step:<10}{median(cg):>13.3f}   (no peer ran)")
                    continue
                best = min(timed, key=timed.get)
                ratio = median(cg) / timed[best]
                rounds = [a / b for a, b in zip(cg, pm[best])]
                per = " ".join(f"{x:.2f}" for x in rounds)
                paired = median(rounds)
                label = f"{best[0]}/{best[1]}t"
                print(f"{wid:<4}{step:<10}{median(cg):>13.3f}{label:>10}{timed[best]:>10.3f}{ratio:>7.2f}  ({per}; paired {paired:.2f})   {max(cg_peak):.0f} / {pk[best]:.0f}")
                for (p, t), v in sorted(timed.items()):
                    if (p, t) != best:
                        print(f"{'':14}{'':13}{p + '/' + str(t) + 't':>10}{v:>10.3f}{median(cg) / v:>7.2f}   peak {pk[(p, t)]:.0f} MiB")
                records.append({"workload": wid, "step": step, "cellgraph_ms": cg, "cellgraph_peak_mib": max(cg_peak),
                                "peers": {f"{p}/{t}t": {"ms": v, "peak_mib": pk.get((p, t))} for (p, t), v in pm.items()},
                                "fastest_peer": label, "ratio": ratio, "paired_ratio": paired})
    busy_after = cpu_busy_fraction()
    print(f"\nCPUs busy {busy_after:.0%} over 1 s after timing; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "load_before": load, "busy_before": busy, "busy_after": busy_after, "rows": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
