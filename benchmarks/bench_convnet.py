"""Benchmark: the ConvNet (conv 1->4 k7 s3 -> x^2 -> fc 256->64 -> x^2 -> fc 64->10) on 8 real
MNIST test images, encrypted at 128-bit security.

Prints compile time, key-bundle size, encrypt / server / decrypt times, single-request latency,
amortized ms/image at 8 lanes, the plan's predicted time per layer next to the measured one, and
the end-to-end time over the plan's sum of primitive operations (target: at most 1.1), with the
primitive costs measured again just before the timed runs.

    .venv/bin/python benchmarks/bench_convnet.py [--repeat 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from h33_bento import FHEInferenceClient, compile, datasets, zoo


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)

    x_train, y_train = datasets.mnist_train5k()
    x_test, y_test = datasets.mnist_test()
    model = zoo.train(zoo.ConvNet(), x_train, y_train, epochs=args.epochs)
    images, labels = x_test[:8], y_test[:8]

    t0 = time.perf_counter()
    compiled = compile(model, (1, 28, 28), calibration_data=x_train[:256])
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    client = FHEInferenceClient(compiled)
    bundle = client.keys.evaluation_keys().to_bytes()
    keygen_s = time.perf_counter() - t0

    enc8 = client.encrypt(images)
    enc1 = client.encrypt(images[0])
    encrypt_ms = _median_ms(lambda: client.encrypt(images), args.repeat)
    client.infer(enc8)  # warm-up: encodes and caches the plaintext diagonals
    priced = compiled.repriced()  # the program priced with primitive costs measured just before the runs
    engine = client._engine
    runs: list[dict[str, float]] = []

    def run8() -> None:
        client.infer(enc8)
        runs.append(dict(engine.last_timings))

    server8_ms = _median_ms(run8, args.repeat)
    layer_ms = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    server1_ms = _median_ms(lambda: client.infer(enc1), args.repeat)
    out = client.infer(enc8)
    decrypt_ms = _median_ms(lambda: client.decrypt_logits(out), args.repeat)
    logits = client.decrypt_logits(out)
    ref = zoo.predict_logits(model, images)
    total8 = encrypt_ms + server8_ms + decrypt_ms

    p = compiled.params
    predicted = priced.summary()
    predicted_e2e = predicted["predicted_latency_ms"] + predicted["predicted_client_ms"]
    result = {
        "network": "ConvNet conv1->4 k7 s3, x^2, fc256->64, x^2, fc64->10",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "params": f"N={p.ring_dim}, depth={p.multiplicative_depth}, scale 2^{p.scale_bits}, {p.security_level}",
        "compile_s": round(compile_s, 2),
        "keygen_s": round(keygen_s, 2),
        "key_bundle_mib": round(len(bundle) / 2**20, 1),
        "rotation_keys": len(p.rotation_indices),
        "encrypt_ms": round(encrypt_ms, 1),
        "server_ms_8_images": round(server8_ms, 1),
        "server_ms_1_image": round(server1_ms, 1),
        "decrypt_ms": round(decrypt_ms, 1),
        "end_to_end_ms_8_images": round(total8, 1),
        "amortized_server_ms_per_image": round(server8_ms / 8, 1),
        "amortized_end_to_end_ms_per_image": round(total8 / 8, 1),
        "max_abs_logit_error": float(np.abs(logits - ref).max()),
        "correct": int((logits.argmax(1) == labels).sum()),
        "predicted_server_ms": predicted["predicted_latency_ms"],
        "predicted_server_ms_at_compile": compiled.summary()["predicted_latency_ms"],
        "predicted_end_to_end_ms": round(predicted_e2e, 1),
        "end_to_end_over_prediction": round(total8 / predicted_e2e, 3),
        "layers": {s.name: {"predicted_ms": round(priced.predicted_ms(s), 1),
                            "measured_ms": round(layer_ms[s.name], 1)} for s in compiled.steps},
    }
    print(compiled.report)
    print()
    for k, v in result.items():
        if k != "layers":
            print(f"{k:<36} {v}")
    print(f"\nper layer: predicted (costs measured just before the runs) vs measured (ms, median of {args.repeat} runs)")
    for name, row in result["layers"].items():
        print(f"  {name:<28} {row['predicted_ms']:>8} {row['measured_ms']:>8}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
