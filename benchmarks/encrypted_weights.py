"""Benchmark: the ConvNet and LeNet-5 with plaintext weights and with encrypted weights, side by side (issue 14).

Each network is trained and compiled once; each mode then runs in its own process (peak RSS is
per process) on the same program and the same 8 real MNIST test images: the server time of one
8-image pass (median of --repeat after one warm-up run), the model owner's provisioning time and
the encrypted weights' size (encrypted mode), peak RSS, and the max |logit error| against simulate.
The model owner provisions in a process of its own, writing the encrypted weights to a file, and
the engine reads them from it a ciphertext at a time (``WeightsFile``), as a server does.

Before running a network its encrypted weights' size (``predicted_weights_bytes``) and the peak
memory of the server (``peak_memory``, plus the weights as ciphertexts in encrypted mode) and of
the model owner (the weights) are predicted; a network whose prediction does not fit --memory-gib
(default: what the machine has available now, less 2 GiB) is reported with its numbers and not run.

    .venv/bin/python benchmarks/encrypted_weights.py [--networks convnet,lenet5] [--repeat 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
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
GiB = 1 << 30
#: the learning rates benchmarks/peers trains these networks with
LR = {"convnet": 2e-3, "lenet5": 1e-3}


def run_mode(mode: str, artifact: str, repeat: int) -> dict[str, float]:
    """One mode in this process, the server's side: what the parent tabulates.  In encrypted mode
    the model owner's provisioning runs in a process of its own (``provision``), as it would."""
    from h33_bento.runtime.weights import WeightsFile

    compiled = CompiledModel.load(artifact)
    images = datasets.mnist_test()[0][:8]
    result: dict[str, float] = {}
    if mode == "plaintext":
        client = FHEInferenceClient(compiled)
    else:
        client = FHEInferenceClient(compiled.without_weights(), weight_mode="encrypted")
        client.save_keys(f"{artifact}.keys")  # the owner reads only its public key
        done = subprocess.run([sys.executable, __file__, "--child", "provision", artifact],
                              capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
        client.install_weights(WeightsFile(f"{artifact}.h33w"))
    enc = client.encrypt(images)
    t0 = time.perf_counter()
    out = client.infer(enc)  # warm-up: builds the engine (and in plaintext mode caches the diagonals)
    result["first_ms"] = (time.perf_counter() - t0) * 1000.0
    result["server_ms"] = _median_ms(lambda: client.infer(enc), repeat)
    result["max_err"] = float(np.abs(client.decrypt_logits(out) - simulate(compiled, images)).max())
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def provision(artifact: str) -> dict[str, float]:
    """The model owner, in this process: the full model and the client's public key only, the
    weights written to a file as a server would receive them."""
    from h33_bento.ckks.keys import KeyChain
    from h33_bento.runtime.weights import provision_weights

    compiled = CompiledModel.load(artifact)
    public = KeyChain.load(f"{artifact}.keys", only="public")
    t0 = time.perf_counter()
    weights = provision_weights(compiled, public)
    seconds = time.perf_counter() - t0
    path = weights.write(f"{artifact}.h33w")
    return {"provision_s": seconds, "weights_mib": path.stat().st_size / 2**20,
            "owner_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def predict(compiled: CompiledModel) -> dict[str, float]:
    """The encrypted weights' size, the server's peak RSS in each mode (plaintext: ``peak_memory``;
    encrypted: that plus the weights as ciphertexts), the model owner's, and one pass's server time."""
    from h33_bento.program.report import PROCESS_BYTES, peak_memory
    from h33_bento.runtime.weights import predicted_weights_bytes

    weights = predicted_weights_bytes(compiled)
    server = peak_memory(compiled)["server"]
    return {"weights_mib": weights / 2**20, "plaintext_rss_mib": server / 2**20,
            "encrypted_rss_mib": (server + weights) / 2**20, "owner_rss_mib": (PROCESS_BYTES + weights) / 2**20,
            "server_ms": compiled.summary()["predicted_latency_ms"]}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default="convnet,lenet5")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--memory-gib", type=float, help="run a network only if its predicted peak RSS fits")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ARTIFACT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, artifact = args.child
        print(json.dumps(provision(artifact) if mode == "provision" else run_mode(mode, artifact, args.repeat)))
        return

    import torch

    from h33_bento import compile, zoo

    torch.set_num_threads(2)
    budget = args.memory_gib * GiB if args.memory_gib else available_bytes() - 2 * GiB
    nets = {"convnet": zoo.ConvNet, "lenet5": zoo.LeNet5}
    x_train, y_train = datasets.mnist_train5k()
    results: dict[str, dict] = {}
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"memory budget {budget / GiB:.1f} GiB", flush=True)
    for net in args.networks.split(","):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = zoo.train(nets[net](), x_train, y_train, epochs=args.epochs, lr=LR[net])
        compiled = compile(model, (1, 28, 28), calibration_data=x_train[:256])
        p = compiled.params
        results[net] = {"params": f"N=2^{p.ring_dim.bit_length() - 1}, depth {p.multiplicative_depth}",
                        "diagonals": sum(len(s.linear.terms) for s in compiled.steps if s.linear is not None),
                        "compile_s": time.perf_counter() - t0, "predicted": predict(compiled)}
        predicted = results[net]["predicted"]
        print(f"{net}: {results[net]['params']}, {results[net]['diagonals']} diagonals; predicted: "
              + ", ".join(f"{k} {v:.0f}" for k, v in predicted.items()), flush=True)
        if max(predicted["encrypted_rss_mib"], predicted["owner_rss_mib"]) * 2**20 > budget:
            results[net]["skipped"] = (f"predicted encrypted-mode peak RSS {predicted['encrypted_rss_mib'] / 1024:.1f} "
                                       f"GiB exceeds the {budget / GiB:.1f} GiB budget")
            print(f"{net}: not run: {results[net]['skipped']}", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            artifact = str(compiled.save(Path(tmp) / net))
            for mode in MODES:
                done = subprocess.run([sys.executable, __file__, "--repeat", str(args.repeat), "--child", mode,
                                       artifact], capture_output=True, text=True, check=True)
                results[net][mode] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{net} {mode}: {results[net][mode]} (load average {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\n8 images per pass, median of {args.repeat}; load average at end {os.getloadavg()[0]:.2f}")
    print("| network | mode | server ms (8 images) | first pass ms (engine build) | provisioning s "
          "| encrypted weights MiB | owner peak RSS MiB | server peak RSS MiB | max abs err |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for net, r in results.items():
        for mode in MODES:
            if mode not in r:
                continue
            m = r[mode]
            owner = (f"{m['provision_s']:.1f} | {m['weights_mib']:.0f} | {m['owner_rss_mib']:.0f}"
                     if "provision_s" in m else "- | - | -")
            print(f"| {net} ({r['params']}) | {mode} | {m['server_ms']:.0f} | {m['first_ms']:.0f} | {owner} "
                  f"| {m['peak_rss_mib']:.0f} | {m['max_err']:.1e} |")
        if "encrypted" in r:
            print(f"{net}: encrypted / plaintext server time {r['encrypted']['server_ms'] / r['plaintext']['server_ms']:.2f}x "
                  "(target: at most 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
