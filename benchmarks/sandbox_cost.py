"""What the sandbox costs: per ciphertext, per crash, per key bundle (h33_bento/ckks/sandbox.py).

    .venv/bin/python benchmarks/sandbox_cost.py [--calls 40]

For two models, an MLP of the BentoML service test's shape (784 -> 32 -> x^2 -> 10: N=2^14, depth
3, the ciphertext tests/test_service.py and tests/test_isolation.py send) and the ConvNet
(``zoo.ConvNet``: N=2^14, depth 5), with real keys and an 8-image ciphertext:

* the serving process's own deserialization of one ciphertext (``Engine.deserialize``: it does
  this with or without the sandbox);
* what the sandbox adds before it (``Sandbox.canonical_ciphertexts``: pipe both ways, the child's
  deserialization, checks and canonical re-serialization), median of ``--calls``, one at a time
  and with two concurrent callers (the default two children);
* a crash: the call that kills a child (the issue's byte flip), then the next honest call (served
  by the warm spare) and the time until the pool has two children again;
* a key bundle: learning the shape of honest keys (once per sandbox), validating one bundle, and
  installing a validated one again (a worker's cost per key after a flush of its key state).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()

    from h33_bento import compile, datasets, zoo
    from h33_bento.ckks.sandbox import Sandbox
    from h33_bento.client import FHEInferenceClient
    from h33_bento.errors import TamperedDataError
    from h33_bento.runtime.engine import Engine

    x, y = datasets.mnist_train5k()
    nets = {
        "service-test MLP (784-32-x^2-10)": (zoo.TabularMLP(784, 32, 10), (784,), x.reshape(len(x), -1), 302),
        "ConvNet": (zoo.ConvNet(), (1, 28, 28), x, 318),
    }
    rows, load = [], os.getloadavg()[0]
    for name, (net, shape, data, crash_byte) in nets.items():
        net = zoo.train(net, data, y, epochs=1)
        model = compile(net, shape, calibration_data=data[:128], measure_costs=False)
        p = model.params
        client = FHEInferenceClient(model)
        bundle = client.keys.evaluation_keys()
        engine = Engine(model, bundle)
        blob = client.encrypt(data[:8]).ciphertexts[0]
        tag = client.keys.key_tag
        with TemporaryDirectory() as tmp, Sandbox(p, scratch_dir=tmp) as sb:
            sb.canonical_ciphertexts([blob], tag)  # both children warm
            direct = median_ms(lambda: engine.deserialize(blob), args.calls)
            alone = median_ms(lambda: sb.canonical_ciphertexts([blob], tag), args.calls)
            with cf.ThreadPoolExecutor(2) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda _: sb.canonical_ciphertexts([blob], tag), range(2 * args.calls)))
                pair = (time.perf_counter() - t0) * 1000 / (2 * args.calls)
            bad = bytearray(blob)
            bad[crash_byte] ^= 1
            t0 = time.perf_counter()
            try:
                sb.canonical_ciphertexts([bytes(bad)], tag)
            except TamperedDataError:
                pass
            t_crash = time.perf_counter()
            sb.canonical_ciphertexts([blob], tag)
            t_next = time.perf_counter()
            while sb._idle.qsize() < sb.processes:  # the replacement is warm
                time.sleep(0.01)
            t_pool = time.perf_counter()
            src = Path(tmp) / "bundle.h33k"
            src.write_bytes(bundle.to_bytes())
            t1 = time.perf_counter()
            sb.learn_key_shapes()
            t2 = time.perf_counter()
            sb.canonical_bundle(src, Path(tmp) / "canonical.h33k")
            t3 = time.perf_counter()
            Engine(model, sb.load_bundle(Path(tmp) / "canonical.h33k"), keep_serialized_keys=False)
            t4 = time.perf_counter()  # what a worker pays to reinstall a key after a flush
        rows.append(
            f"| {name} | N=2^{p.ring_dim.bit_length() - 1}, depth {p.multiplicative_depth} | "
            f"{len(blob) / 2**20:.2f} | {direct:.1f} | **{alone:.1f}** | {pair:.1f} | "
            f"{(t_crash - t0) * 1000:.0f} / {(t_next - t_crash) * 1000:.0f} / {(t_pool - t_crash) * 1000:.0f} | "
            f"{bundle.size_bytes / 2**20:.0f} MiB, {len(p.rotation_indices)} rotation keys | "
            f"{t2 - t1:.1f} | **{t3 - t2:.1f}** | {t4 - t3:.1f} |")
        print(rows[-1], flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("\n| model | params | ciphertext MiB | deserialize here ms | + sandbox ms (one caller) | "
          "+ sandbox ms per call (2 callers) | crash: refused ms / next served ms / pool refilled ms | bundle | "
          "learn key shapes s (once) | validate bundle s | reinstall a validated bundle s |")
    print("|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
