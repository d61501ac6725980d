#!/usr/bin/env python3
"""How far repeated cost measurements move, with and without a busy loop on the machine, and
which statistic of the samples to record: the fastest (what ``measure_primitives`` records) or
the median (what it recorded before).

One fixed ConvNet program (``measure_costs=False``: the schedule never depends on the costs), so
only its price changes: ``--rounds`` times, quiet then busy (one extra ``while True`` process),
the primitives are measured, the program priced with the fastest and with the median of the
very same samples, and then run 5 times under the same load.  Prints one JSON line per round.

    .venv/bin/python benchmarks/cost_spread.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from h33_bento import FHEInferenceClient, compile, datasets, zoo
from h33_bento.ckks import timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, y = datasets.mnist_train5k()
    x_test, _ = datasets.mnist_test()
    model = zoo.train(zoo.ConvNet(), x, y, epochs=3)
    compiled = compile(model, (1, 28, 28), calibration_data=x[:256], measure_costs=False)
    client = FHEInferenceClient(compiled)
    enc = client.encrypt(x_test[:8])
    client.infer(enc)

    samples: list[list[float]] = []
    fastest = timing._estimate

    def keep(s: list[float]) -> float:  # every primitive's samples, in the order they are measured
        samples.append(list(s))
        return fastest(s)

    timing._estimate = keep
    for busy in [False, True] * args.rounds:
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        time.sleep(0.5)
        samples.clear()
        t0 = time.perf_counter()
        costs = timing.measure_primitives(compiled.params, compiled.chebyshev_degrees)
        took = time.perf_counter() - t0
        medians = iter(statistics.median(s) for s in samples)
        ms = {name: list(v) for name, v in costs.ms.items() if isinstance(v, list) and name != "levels"}
        median_ms = dict(costs.ms)
        for k in range(len(costs.ms["levels"])):
            for name in timing.PER_LEVEL:
                ms[name][k] = next(medians)
        median_ms.update(ms)
        median_ms.update({name: next(medians) for name in (*timing.ONCE, *(f"{timing.CHEBYSHEV}{d}" for d in
                                                                           sorted(set(compiled.chebyshev_degrees))))})
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            client.infer(enc)
            runs.append((time.perf_counter() - t0) * 1000.0)
        if loop is not None:
            loop.kill()
            loop.wait()
        print(json.dumps({
            "busy": busy, "measure_s": round(took, 1),
            "predicted_fastest_ms": compiled.with_costs(costs).summary()["predicted_latency_ms"],
            "predicted_median_ms": compiled.with_costs(
                timing.PrimitiveCosts(costs.params, median_ms, costs.key_bytes)).summary()["predicted_latency_ms"],
            "run_ms": round(statistics.median(runs), 1), "load": os.getloadavg()[0],
        }), flush=True)


if __name__ == "__main__":
    main()
