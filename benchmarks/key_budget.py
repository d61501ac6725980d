#!/usr/bin/env python3
"""Key budget: evaluation-key bundle against predicted time, per network, with and without
``compile(..., key_budget_bytes=...)``; prints a markdown table (docs/benchmarks.md, "Key budget").

For each network: the default compile (its costs measured, or read from this machine's cost
cache), then budgets of 90% and 80% of its bundle, and the smallest bundle the compiler finds (the
``KeyBudgetError`` of a 1-byte budget), all priced with the default's cost table.  With
``--measure`` the programs at N=2^14 also run encrypted (keys generated, one warm-up, then
``--runs`` timed runs of 8 images: the median).

    .venv/bin/python benchmarks/key_budget.py [--measure] [--runs 5] [convnet lola lenet5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from h33_bento import compile, datasets, zoo
from h33_bento.compiler.rotation_keys import RUNS_PER_UPLOAD, UPLOAD_MBIT_S
from h33_bento.errors import KeyBudgetError

NETWORKS = {"convnet": ("convnet", "ConvNet"), "lola": ("lola_mnist", "LoLA"), "lenet5": ("lenet5", "LeNet-5")}


def measured_ms(compiled, x: np.ndarray, runs: int) -> float:
    """Median server ms per 8-image ciphertext over ``runs`` runs after one warm-up."""
    from h33_bento.client import FHEInferenceClient

    client = FHEInferenceClient(compiled)
    enc = client.encrypt(x[:compiled.lanes])
    client.infer(enc)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        client.infer(enc)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("networks", nargs="*", default=list(NETWORKS))
    ap.add_argument("--measure", action="store_true", help="also run the N=2^14 programs encrypted")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, _ = datasets.mnist_train5k()
    xt, _ = datasets.mnist_test()
    print(f"load average at start {os.getloadavg()[0]:.2f}; upload times at {UPLOAD_MBIT_S:g} Mbit/s; the default "
          f"prices a key at its upload time over {RUNS_PER_UPLOAD} runs")
    print("| network | budget | rotation keys | key bundle MiB | upload s | predicted ms / 8 images | vs default "
          "| measured ms / 8 images | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        recipe, label = NETWORKS[name]
        model, _ = zoo.train_recipe(recipe, epochs=1)
        t0 = time.perf_counter()
        default = compile(model, (1, 28, 28), calibration_data=x[:128])
        rows = [("none (default)", default, time.perf_counter() - t0)]
        base = default.predicted_key_bundle_bytes
        try:
            compile(model, (1, 28, 28), calibration_data=x[:128], costs=default.costs, key_budget_bytes=1)
        except KeyBudgetError as err:
            smallest = err.smallest_bytes
        for budget in sorted({int(0.9 * base), int(0.8 * base), smallest}, reverse=True):
            t0 = time.perf_counter()
            try:
                compiled = compile(model, (1, 28, 28), calibration_data=x[:128], costs=default.costs,
                                   key_budget_bytes=budget)
            except KeyBudgetError:
                rows.append((f"{budget / 2**20:.0f} MiB: does not fit", None, time.perf_counter() - t0))
                continue
            rows.append((f"{budget / 2**20:.0f} MiB" + (" (smallest)" if budget == smallest else ""), compiled,
                         time.perf_counter() - t0))
        for what, compiled, seconds in rows:
            if compiled is None:
                print(f"| {label} | {what} | | | | | | | {seconds:.1f} |")
                continue
            s = compiled.summary()
            cost = s.get("key_budget_cost_ms")
            run = (f"{measured_ms(compiled, xt, args.runs):.0f}"
                   if args.measure and compiled.params.ring_dim <= 1 << 14 else "")
            print(f"| {label} | {what} | {s['rotation_keys']} | {s['key_bundle_bytes'] / 2**20:.1f} "
                  f"| {s['key_bundle_bytes'] * 8 / (UPLOAD_MBIT_S * 1e6):.1f} | {s['predicted_latency_ms']:.0f} "
                  f"| {'' if cost is None else f'{cost:+.1f} ms'} | {run} | {seconds:.1f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
