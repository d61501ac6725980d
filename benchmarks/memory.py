#!/usr/bin/env python3
"""Peak memory and wall time of the client and server steps for a deep model: a 5-conv BN-ReLU
network for 28x28 MNIST at N=2^16 (issue 17: its keys used to need 4x the bundle to generate).

    .venv/bin/python benchmarks/memory.py --workdir /tmp/h33-memory          # compile, then every step
    .venv/bin/python benchmarks/memory.py --workdir /tmp/h33-memory --steps keygen infer

The network is untrained (only memory and time are measured) and calibrated on 256 MNIST
training images.  Each step is one ``h33`` command in its own process, started by a fresh
intermediate process, so its peak RSS (``RUSAGE_CHILDREN``) is that command's alone; ``validate``
is what a server does with an uploaded bundle (``Sandbox.canonical_bundle``): its peak is the
largest of its children (the key-shape reference's, usually), and it prints the validating
child's own before and peak RSS (GiB).  Prints a
markdown table of predicted vs measured peaks; ``--json`` writes the raw records.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = ("keygen", "validate", "encrypt", "infer", "decrypt")
TARGETS = {"keygen": (12 << 30, None), "validate": (12 << 30, None), "infer": (12 << 30, None),
           "encrypt": (1 << 30, 5.0), "decrypt": (1 << 30, 5.0)}
#: a server's check of an uploaded bundle: the sandbox learns honest keys' shapes in one child,
#: then validates and re-serializes the bundle in another (printed: that child's own peak)
VALIDATE = """
import json, sys, tempfile
from h33_bento.ckks.sandbox import Sandbox
from h33_bento.program.model import CompiledModel
params = CompiledModel.load(sys.argv[1]).params
with tempfile.TemporaryDirectory(dir=sys.argv[3]) as tmp, Sandbox(params, processes=1, scratch_dir=tmp) as sb:
    sb.learn_key_shapes()
    sb.canonical_bundle(sys.argv[2], tmp + "/canonical.h33k")
    print(json.dumps({k: round(v / 2**30, 2) for k, v in sb.bundle_memory.items()}))
"""


def network():
    """conv 1->8 (28x28), 8->8 s2 (14x14), 8->16, 16->16 s2 (7x7), 16->16, each + BN + ReLU, then fc 784->10."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, c_in = [], 1
    for c_out, stride in ((8, 1), (8, 2), (16, 1), (16, 2), (16, 1)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    with torch.no_grad():  # running statistics that are not the identity, as a trained network's
        model.train()
        from h33_bento.datasets import mnist_train5k

        x, _ = mnist_train5k()
        model(torch.tensor(x[:512], dtype=torch.float32))
    return model.eval()


def compile_model(out: Path) -> dict:
    from h33_bento import compile as h33_compile
    from h33_bento.datasets import mnist_train5k
    from h33_bento.nn import polyfy

    x, _ = mnist_train5k()
    model = network()
    polyfy(model, x[:256])
    t0 = time.perf_counter()
    compiled = h33_compile(model, (1, 28, 28), x[:256], measure_costs=False)
    compiled.save(out)
    summ = compiled.summary()
    np_save(out.parent / "input.npy", x[:compiled.lanes])
    return {"compile_s": round(time.perf_counter() - t0, 1), "levels": summ["levels"],
            "ring_dim": compiled.params.ring_dim, "rotation_keys": summ["rotation_keys"],
            "key_bundle_bytes": summ["key_bundle_bytes"], "predicted_keygen_peak_bytes": summ["predicted_keygen_peak_bytes"],
            "predicted_server_peak_bytes": summ["predicted_server_peak_bytes"]}


def np_save(path: Path, array) -> None:
    import numpy as np

    np.save(path, array)


def commands(work: Path) -> dict[str, list[str]]:
    h33 = [sys.executable, "-m", "h33_bento.cli"]
    model, keys = str(work / "model"), str(work / "keys")
    return {
        "keygen": [*h33, "keygen", model, "--keys", keys],
        "validate": [sys.executable, "-c", VALIDATE, model, f"{keys}/evaluation_keys.h33k", str(work)],
        "encrypt": [*h33, "encrypt", model, "--keys", keys, "--input", str(work / "input.npy"),
                    "--out", str(work / "input.h33t")],
        "infer": [*h33, "infer", model, "--eval-keys", f"{keys}/evaluation_keys.h33k",
                  "--input", str(work / "input.h33t"), "--out", str(work / "output.h33t")],
        "decrypt": [*h33, "decrypt", model, "--keys", keys, "--input", str(work / "output.h33t")],
    }


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh intermediate process; its peak RSS and wall time."""
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t, "
             "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
             "'out': (r.stdout + r.stderr)[-2000:]}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    info_file = work / "compile.json"
    if not info_file.exists():
        info_file.write_text(json.dumps(compile_model(work / "model")))
    info = json.loads(info_file.read_text())
    print(f"compiled: {info}", flush=True)
    records = {}
    for step in args.steps:
        rec = measure(commands(work)[step])
        records[step] = rec
        print(f"{step}: rc {rec['rc']}, {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss'] / 2**30:.2f} GiB\n"
              f"{rec['out'].strip()[-600:]}", flush=True)
        if rec["rc"] != 0:
            break
    predicted = {"keygen": info["predicted_keygen_peak_bytes"], "infer": info["predicted_server_peak_bytes"]}
    print("\n| step | wall s | peak RSS GiB | predicted peak GiB | target |\n|---|---:|---:|---:|---|")
    for step, rec in records.items():
        rss, secs = TARGETS[step]
        target = f"< {rss / 2**30:.0f} GiB" + (f", < {secs:.0f} s" if secs else "")
        pred = f"{predicted[step] / 2**30:.2f}" if step in predicted else "-"
        print(f"| {step} | {rec['wall_s']:.1f} | {rec['peak_rss'] / 2**30:.2f} | {pred} | {target} |")
    bundle = work / "keys" / "evaluation_keys.h33k"
    if bundle.exists():
        print(f"\nbundle: {bundle.stat().st_size / 2**30:.2f} GiB on disk "
              f"(predicted {info['key_bundle_bytes'] / 2**30:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps({"compile": info, "steps": records}, indent=2))


if __name__ == "__main__":
    main()
