"""Benchmark: what a network's shape costs under CKKS (docs/accuracy.md#designing-a-cheap-network).

Two MNIST CNNs with the same channels (8 then 16) and the same 784-input classifier, built as a
user would with ReLU: "conv-pool" (3x3 convolutions, each followed by a 2x2 MaxPool, which polyfy
turns into AvgPool) and "strided" (3x3 convolutions of stride 2, no pooling).  Each is trained,
polyfied with degree-2 or degree-4 trainable ReLU polynomials, fine-tuned from the ReLU model and
compiled; the table gives levels, ring, rotation keys, key bundle, predicted and measured server
ms/image (one ciphertext of 8 images, after a warm-up run), plaintext top-1 on the 10k test set and
the share of test images that leave a calibrated range.
The last row is the conv-pool network compiled straight from ReLU (the compiler's degree-15 fits,
no fine-tuning), predicted only.

    .venv/bin/python benchmarks/cheap_networks.py [--epochs 3] [--no-encrypted | --plan-only]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h33_bento import FHEInferenceClient, compile, datasets, simulate, zoo  # noqa: E402
from h33_bento import nn as hnn  # noqa: E402
from h33_bento.errors import AccuracyWarning, RangeWarning  # noqa: E402


def conv_pool() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def strided() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def _top1(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        return float((zoo.predict_logits(model, x).argmax(1) == y).mean())


def _measure(compiled, images: np.ndarray) -> float:
    """Server ms per image for one ciphertext of ``len(images)`` inputs, after a warm-up run."""
    client = FHEInferenceClient(compiled)
    enc = client.encrypt(images)
    client.infer(enc)  # encodes and caches the plaintext diagonals
    t0 = time.perf_counter()
    client.infer(enc)
    return (time.perf_counter() - t0) * 1000.0 / len(images)


def _row(name: str, degree: str, compiled, top1: float, measured: float | None, out: float | None) -> dict:
    summary = compiled.summary()
    return {"network": name, "activation": degree, "levels": compiled.depth,
            "ring": f"2^{compiled.params.ring_dim.bit_length() - 1}",
            "rotation keys": len(compiled.params.rotation_indices),
            "key bundle": f"{compiled.predicted_key_bundle_bytes / 2 ** 20:.0f} MiB",
            "rotations per run": summary["rotations_per_run"],
            "predicted ms/image": ("-" if compiled.costs is None
                                   else f"{summary['predicted_latency_ms'] / compiled.lanes:.0f}"),
            "measured ms/image": "-" if measured is None else f"{measured:.0f}",
            "top-1 (%)": f"{100 * top1:.2f}",
            "test images out of range": "-" if out is None else f"{out:.2%}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="ReLU training epochs (fine-tuning: the same)")
    ap.add_argument("--no-encrypted", action="store_true", help="skip the measured encrypted runs")
    ap.add_argument("--plan-only", action="store_true",
                    help="no cost measurement and no encrypted runs: levels, ring, keys and rotations only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, y = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    rows = []
    relus = {}
    for name, ctor in (("conv-pool", conv_pool), ("strided", strided)):
        torch.manual_seed(0)
        relus[name] = relu = zoo.train(ctor(), x, y, epochs=args.epochs)
        print(f"[{name}] ReLU top-1 {_top1(relu, x_test, y_test):.4f}", flush=True)
        for degree in (2, 4):
            model = copy.deepcopy(relu)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MaxPool -> AvgPool; ranges: counted in the table
                hnn.polyfy(model, x[:2000], degrees={"relu": degree}, trainable=True)
                hnn.finetune(model, (x, y), epochs=args.epochs, coeff_lr=1e-2, teacher=relu)
                compiled = compile(model, (1, 28, 28), calibration_data=x[:512], measure_costs=not args.plan_only)
            encrypted = not (args.no_encrypted or args.plan_only)
            measured = _measure(compiled, x_test[:compiled.lanes]) if encrypted else None
            rows.append(_row(name, f"degree {degree}", compiled, _top1(model, x_test, y_test), measured,
                             hnn.out_of_range(model, x_test).share))
            print(rows[-1], flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        warnings.simplefilter("ignore", UserWarning)
        compiled = compile(relus["conv-pool"], (1, 28, 28), calibration_data=x[:512], measure_costs=not args.plan_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        top1 = float((simulate(compiled, x_test).argmax(1) == y_test).mean())
    rows.append(_row("conv-pool", "ReLU, compiler's fit (degree 15)", compiled, top1, None, None))
    print(rows[-1], flush=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.2f} at the end), torch threads 2; "
          f"ReLU training and fine-tuning {args.epochs} epochs each on 5,000 MNIST images\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---" if k in ("network", "activation", "ring") else "---:" for k in keys) + " |")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
