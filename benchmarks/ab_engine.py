#!/usr/bin/env python3
"""One engine pass of a fixed ConvNet program, for A/B runs of two checkouts on one machine.

``measure_costs=False`` makes the program deterministic (no measured costs steer the schedule),
so two checkouts run the same program and only the engine's code differs; the printed schedule
hash shows it.  Interleave the two, e.g. against the commit before the program-format redesign:

    git worktree add /tmp/h33-old 9605b81
    for r in 1 2 3; do
      (cd /tmp/h33-old && PYTHONPATH=/tmp/h33-old $PWD/.venv/bin/python $PWD/benchmarks/ab_engine.py)
      .venv/bin/python benchmarks/ab_engine.py
    done

``--measure-costs`` compiles as ``make bench`` does, to see which schedule each checkout picks.
Prints one JSON line: which checkout, the schedule hash, the predicted ms, the median and minimum ms per 8-image
pass over ``--repeat`` runs, and the median per layer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import torch

import h33_bento
from h33_bento import FHEInferenceClient, compile, datasets, zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--measure-costs", action="store_true",
                    help="compile with costs measured now, as make bench does (the schedule may then differ)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x_train, y_train = datasets.mnist_train5k()
    x_test, _ = datasets.mnist_test()
    model = zoo.train(zoo.ConvNet(), x_train, y_train, epochs=3)
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:256],
                       measure_costs=args.measure_costs)
    schedule = [(s.name, s.linear.schedule()[0].tolist() if getattr(s, "linear", None) is not None else None)
                for s in compiled.steps]
    client = FHEInferenceClient(compiled)
    enc = client.encrypt(x_test[:8])
    client.infer(enc)  # warm-up: encodes and caches the plaintext diagonals
    engine = client._engine
    times, layers = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        client.infer(enc)
        times.append((time.perf_counter() - t0) * 1000.0)
        layers.append(dict(engine.last_timings))
    print(json.dumps({
        "code": h33_bento.__file__,
        "schedule": hashlib.sha256(json.dumps(schedule).encode()).hexdigest()[:12],
        "predicted_ms": (compiled.summary() if hasattr(compiled, "summary") else compiled.plan_summary()  # 9605b81
                         )["predicted_latency_ms"],
        "median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
        "layers": {k: round(statistics.median(r[k] for r in layers), 1) for k in layers[0]},
    }))


if __name__ == "__main__":
    main()
