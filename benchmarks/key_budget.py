#!/usr/bin/env python3
"""Key budget: evaluation-key bundle against predicted time, per network, with and without
``compile(..., key_budget_bytes=...)``; prints a markdown table (docs/benchmarks.md, "Key budget").

For each network: the schedules that are fastest when keys cost nothing, the default compile
(its costs measured, or read from this machine's cost cache), then a budget halfway between its bundle and the smallest bundle the compiler finds (the
``KeyBudgetError`` of a 1-byte budget), that smallest, and one byte less, all priced with the
default's cost table; at N=2^14 also the default with a 38-bit scale (2 key-switching digits
instead of 3: smaller keys, 4x the CKKS error; its own costs).  With ``--measure`` the programs at N=2^14 also run encrypted (keys
generated, one warm-up each, then ``--runs`` rounds running every variant once in turn: the
median per variant).

    .venv/bin/python benchmarks/key_budget.py [--measure] [--runs 5] [--remeasure-costs] [convnet lola lenet5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from h33_bento import compile, datasets, zoo
from h33_bento.compiler import rotation_keys
from h33_bento.compiler.rotation_keys import RUNS_PER_UPLOAD, UPLOAD_MBIT_S
from h33_bento.errors import KeyBudgetError

NETWORKS = {"convnet": ("convnet", "ConvNet"), "lola": ("lola_mnist", "LoLA"), "lenet5": ("lenet5", "LeNet-5")}


def measured(variants: list, x: np.ndarray, runs: int) -> list[tuple[float, float]]:
    """(median server ms per 8-image ciphertext, max abs logit error vs ``simulate``) of each
    compiled variant: one warm-up each, then ``runs`` rounds that run every variant once in turn
    (so a load change hits them all alike)."""
    from h33_bento import simulate
    from h33_bento.client import FHEInferenceClient

    clients = [FHEInferenceClient(compiled) for compiled in variants]
    encs = [client.encrypt(x[:client.lanes]) for client in clients]
    times: list[list[float]] = [[] for _ in variants]
    errors = [float(np.abs(client.decrypt_logits(client.infer(enc)) - simulate(client.model, x[:client.lanes])).max())
              for client, enc in zip(clients, encs)]
    for _ in range(runs):
        for i, (client, enc) in enumerate(zip(clients, encs)):
            t0 = time.perf_counter()
            client.infer(enc)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [(statistics.median(t), e) for t, e in zip(times, errors)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("networks", nargs="*", default=list(NETWORKS))
    ap.add_argument("--measure", action="store_true", help="also run the N=2^14 programs encrypted")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--remeasure-costs", action="store_true", help="measure the primitive costs again first")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, _ = datasets.mnist_train5k()
    xt, _ = datasets.mnist_test()
    print(f"load average at start {os.getloadavg()[0]:.2f}; upload times at {UPLOAD_MBIT_S:g} Mbit/s; the default "
          f"prices a key at its upload time over {RUNS_PER_UPLOAD} runs")
    print("| network | budget | rotation keys | key bundle MiB | upload s | predicted ms / 8 images | vs default ms "
          "| measured ms / 8 images "
          "| max abs error vs simulate | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        recipe, label = NETWORKS[name]
        model, _ = zoo.train_recipe(recipe, epochs=1)
        t0 = time.perf_counter()
        default = compile(model, (1, 28, 28), calibration_data=x[:128], remeasure_costs=args.remeasure_costs)
        rows = [("none (default)", default, time.perf_counter() - t0)]
        rotation_keys.UPLOAD_MBIT_S = float("inf")  # keys free: the fastest schedules, fewest keys among equals
        t0 = time.perf_counter()
        fastest = compile(model, (1, 28, 28), calibration_data=x[:128], costs=default.costs)
        rotation_keys.UPLOAD_MBIT_S = UPLOAD_MBIT_S
        rows.insert(0, ("none, keys free (time-optimal)", fastest, time.perf_counter() - t0))
        if default.params.ring_dim <= 1 << 14:  # a 38-bit scale lets this ring take 2 key-switching digits, not 3
            t0 = time.perf_counter()
            rows.append(("none, scale 2^38, first modulus 58 bits",
                         compile(model, (1, 28, 28), calibration_data=x[:128], scale_bits=38, first_mod_bits=58),
                         time.perf_counter() - t0))
        base = default.predicted_key_bundle_bytes
        try:
            compile(model, (1, 28, 28), calibration_data=x[:128], costs=default.costs, key_budget_bytes=1)
        except KeyBudgetError as err:
            smallest = err.smallest_bytes
        # halfway to the smallest bundle found, the smallest, and one byte less (which must fail)
        for budget in sorted({(base + smallest) // 2, smallest, smallest - 1}, reverse=True):
            t0 = time.perf_counter()
            try:
                compiled = compile(model, (1, 28, 28), calibration_data=x[:128], costs=default.costs,
                                   key_budget_bytes=budget)
            except KeyBudgetError:
                rows.append((f"{budget} B: KeyBudgetError", None, time.perf_counter() - t0))
                continue
            rows.append((f"{budget / 2**20:.1f} MiB" + (" (smallest)" if budget == smallest else ""), compiled,
                         time.perf_counter() - t0))
        runnable = [compiled for _, compiled, _ in rows if compiled is not None]
        ms = (dict(zip(map(id, runnable), measured(runnable, xt, args.runs)))
              if args.measure and default.params.ring_dim <= 1 << 14 else {})
        for what, compiled, seconds in rows:
            if compiled is None:
                print(f"| {label} | {what} | | | | | | | | {seconds:.1f} |")
                continue
            s = compiled.summary()
            cost = s["predicted_latency_ms"] - default.summary()["predicted_latency_ms"]  # = key_budget_cost_ms
            run = f"{ms[id(compiled)][0]:.0f} | {ms[id(compiled)][1]:.1e}" if id(compiled) in ms else " | "
            print(f"| {label} | {what} | {s['rotation_keys']} | {s['key_bundle_bytes'] / 2**20:.1f} "
                  f"| {s['key_bundle_bytes'] * 8 / (UPLOAD_MBIT_S * 1e6):.1f} | {s['predicted_latency_ms']:.0f} "
                  f"| {cost:+.1f} | {run} | {seconds:.1f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
