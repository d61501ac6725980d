"""Benchmark: the ConvNet with plaintext weights and with encrypted weights, side by side (issue 14).

The network is trained and compiled once; each mode then runs in its own process (peak RSS is
per process) on the same program and the same 8 real MNIST test images: the server time of one
8-image pass (median of --repeat after one warm-up run), the model owner's provisioning time and
the encrypted weights' size (encrypted mode), peak RSS, and the max |logit error| against simulate.

    .venv/bin/python benchmarks/encrypted_weights.py [--repeat 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_convnet import _median_ms
from h33_bento import CompiledModel, FHEInferenceClient, datasets, simulate

MODES = ("plaintext", "encrypted")


def run_mode(mode: str, artifact: str, repeat: int) -> dict[str, float]:
    """One mode in this process: what the parent tabulates."""
    from h33_bento.runtime.weights import provision_weights

    compiled = CompiledModel.load(artifact)
    images = datasets.mnist_test()[0][:8]
    result: dict[str, float] = {}
    if mode == "plaintext":
        client = FHEInferenceClient(compiled)
    else:
        client = FHEInferenceClient(compiled.without_weights(), weight_mode="encrypted")
        t0 = time.perf_counter()
        weights = provision_weights(compiled, client.keys.evaluation_keys())  # the model owner's step
        result["provision_s"] = time.perf_counter() - t0
        blob = weights.to_bytes()
        result["weights_mib"] = len(blob) / 2**20
        client.install_weights(blob)
    enc = client.encrypt(images)
    out = client.infer(enc)  # warm-up: builds the engine (and in plaintext mode caches the diagonals)
    result["server_ms"] = _median_ms(lambda: client.infer(enc), repeat)
    result["max_err"] = float(np.abs(client.decrypt_logits(out) - simulate(compiled, images)).max())
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ARTIFACT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child[0], args.child[1], args.repeat)))
        return

    import torch

    from h33_bento import compile, zoo

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x_train, y_train = datasets.mnist_train5k()
    model = zoo.train(zoo.ConvNet(), x_train, y_train, epochs=args.epochs)
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:256])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = str(compiled.save(Path(tmp) / "convnet"))
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--repeat", str(args.repeat), "--child", mode, artifact],
                                  capture_output=True, text=True, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    p = compiled.params
    print(f"ConvNet, N=2^{p.ring_dim.bit_length() - 1}, depth {p.multiplicative_depth}, 8 images per pass, "
          f"median of {args.repeat}")
    print("| mode | server ms (8 images) | provisioning s | encrypted weights MiB | peak RSS MiB | max abs err |")
    print("|---|--:|--:|--:|--:|--:|")
    for mode, r in results.items():
        provision = f"{r['provision_s']:.1f} | {r['weights_mib']:.0f}" if "provision_s" in r else "- | -"
        print(f"| {mode} | {r['server_ms']:.0f} | {provision} | {r['peak_rss_mib']:.0f} | {r['max_err']:.1e} |")
    ratio = results["encrypted"]["server_ms"] / results["plaintext"]["server_ms"]
    print(f"encrypted / plaintext server time: {ratio:.2f}x (target: at most 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
