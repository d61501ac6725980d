"""Throughput: server-side encrypted inference with 1 and 2 worker processes, one per core.

    .venv/bin/python benchmarks/throughput.py [--network convnet] [--runs 12] [--json out.json]

A client compiles the network, generates keys and encrypts real MNIST test images, 8 per
ciphertext.  Worker processes (``--worker``, started by this script) each load the compiled
model and the evaluation keys only, as a server process would, warm up (the first run encodes
and caches the plaintext diagonals), wait at a barrier and then run ``--runs`` ciphertexts each.
Reported per configuration: images/s over the common window (first start to last finish), ms
per ciphertext, and the scaling efficiency of 2 workers against 1 (throughput(2) / 2 x
throughput(1)).  Every output is decrypted and checked against ``simulate``.

Configurations: 1 worker with 1 OpenMP thread, 1 worker with 2 threads (the default single
process), 2 workers with 1 thread each (one process per core).  OMP_WAIT_POLICY=PASSIVE in all,
as in the Bento and Kubernetes manifests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _worker(args: argparse.Namespace) -> None:
    """One server process: load model + evaluation keys, warm up, barrier, run, report."""
    from h33_bento import CompiledModel
    from h33_bento.runtime.engine import Engine

    work = Path(args.dir)
    compiled = CompiledModel.load(work / "model")
    engine = Engine(compiled, (work / "evaluation_keys.h33k").read_bytes())
    inputs = [(work / f"in{i}.h33").read_bytes() for i in range(args.inputs)]
    engine.run(inputs[0])  # warm-up: encodes and caches the plaintext diagonals
    print("ready", flush=True)
    sys.stdin.readline()  # the barrier: every worker starts together
    start = time.time()
    for r in range(args.runs):
        out = engine.run(inputs[(args.index + r) % len(inputs)])
    end = time.time()
    (work / f"out{args.index}.h33").write_bytes(out.to_bytes())
    print(json.dumps({"start": start, "end": end, "runs": args.runs,
                      "last_input": (args.index + args.runs - 1) % len(inputs)}), flush=True)


def _run_config(work: Path, workers: int, threads: int, runs: int, inputs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--dir", str(work), "--index", str(i),
                               "--runs", str(runs), "--inputs", str(inputs)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for i in range(workers)]
    for p in procs:
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker failed to start: {line!r}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    reports = []
    for p in procs:
        reports.append(json.loads(p.stdout.readline()))
        p.wait()
        if p.returncode:
            raise RuntimeError(f"worker exited with {p.returncode}")
    window = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    ciphertexts = sum(r["runs"] for r in reports)
    return {"workers": workers, "omp_threads": threads, "ciphertexts": ciphertexts,
            "seconds": round(window, 3), "ms_per_ciphertext": round(window * 1000 / ciphertexts * workers, 1),
            "reports": reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="convnet", choices=["convnet", "lola"])
    ap.add_argument("--runs", type=int, default=12, help="ciphertexts per worker (8 images each)")
    ap.add_argument("--inputs", type=int, default=4, help="distinct encrypted batches")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    from h33_bento import FHEInferenceClient, compile, datasets, simulate, zoo

    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    from nets import LR, build  # the peer suite's definitions: the same networks as docs/benchmarks.md

    torch.set_num_threads(2)
    x_train, y_train = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    model, origin = build(args.network)
    zoo.train(model, x_train, y_train, epochs=3, lr=LR[args.network])
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:256])
    client = FHEInferenceClient(compiled)
    batches = [x_test[8 * i:8 * i + 8] for i in range(args.inputs)]
    results: dict = {"network": args.network, "torch_definition": origin,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "params": f"N={compiled.params.ring_dim}, depth {compiled.params.multiplicative_depth}",
                     "images_per_ciphertext": compiled.lanes, "configs": []}
    with tempfile.TemporaryDirectory(prefix="h33-throughput-") as tmp:
        work = Path(tmp)
        compiled.save(work / "model")
        (work / "evaluation_keys.h33k").write_bytes(client.keys.evaluation_keys().to_bytes())
        for i, batch in enumerate(batches):
            (work / f"in{i}.h33").write_bytes(client.encrypt(batch).to_bytes())
        expected = [simulate(compiled, b) for b in batches]
        for workers, threads in ((1, 1), (1, 2), (2, 1)):
            cfg = _run_config(work, workers, threads, args.runs, args.inputs)
            for r, rep in enumerate(cfg.pop("reports")):
                got = client.decrypt_logits((work / f"out{r}.h33").read_bytes())
                want = expected[rep["last_input"]]
                if not np.array_equal(got.argmax(1), want.argmax(1)) or np.abs(got - want).max() > 1e-2:
                    raise AssertionError(f"worker {r} returned wrong logits (max error {np.abs(got - want).max():.3g})")
            cfg["images_per_s"] = round(cfg["ciphertexts"] * compiled.lanes / cfg["seconds"], 1)
            results["configs"].append(cfg)
            print(f"{workers} worker(s) x {threads} thread(s): {cfg['images_per_s']} images/s, "
                  f"{cfg['ms_per_ciphertext']} ms per ciphertext per worker", flush=True)
    by = {(c["workers"], c["omp_threads"]): c["images_per_s"] for c in results["configs"]}
    results["scaling_efficiency_1_to_2_workers"] = round(by[2, 1] / (2 * by[1, 1]), 3)
    results["two_workers_vs_one_two_thread_process"] = round(by[2, 1] / by[1, 2], 3)
    print(f"scaling efficiency 1 -> 2 workers: {results['scaling_efficiency_1_to_2_workers']:.0%}; "
          f"2 single-thread workers vs 1 two-thread process: {results['two_workers_vs_one_two_thread_process']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
