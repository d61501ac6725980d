#!/usr/bin/env python3
"""Deep networks, encrypted: ResNet-20 on CIFAR-10 and the four seed architectures at 32x32.

    .venv/bin/python benchmarks/deep.py --models resnet20 --weights artifacts/accuracy/resnet20-poly.pt
    .venv/bin/python benchmarks/deep.py --models resnet18 vgg16 mobilenet_v2 efficientnet_b0 --estimate-only
    .venv/bin/python benchmarks/deep.py --imagenet        # ResNet-18 at 224x224: an estimate only

Every network is compiled at 128-bit security with its bootstraps placed at measured costs
(``compile`` measures the primitives and the bootstraps; the bootstrap measurements are cached
per machine), then -- unless ``--estimate-only`` -- keys are generated and ``--images`` real
CIFAR-10 test images (8 = one 8-lane ciphertext per pass) run encrypted, and the outputs are
compared with ``simulate`` on the same program.  ResNet-20 uses trained weights when
``--weights`` is given (``benchmarks/accuracy.py --datasets resnet20 --save DIR`` writes them);
the seed architectures are untrained (only time and memory are measured; encrypted must equal
simulate).  Each network runs in its own process under an RSS watchdog (peers/run.py's).

Prints one markdown table and, with --json, the raw records.  ResNet-20 has run encrypted on
the 24 GB development VM (19.8 GiB peak with ``--cache-mib 256``); the seed architectures only
with ``--estimate-only`` (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))

from run import run_worker, tail  # noqa: E402  (the peer suite's watchdog)

MODELS = ("resnet20", "resnet18", "vgg16", "mobilenet_v2", "efficientnet_b0")
#: the engine's plaintext cache, MiB: with the default 2 GiB ResNet-20 does not fit in 24 GB
#: (peers/worker_h33.py runs bootstrapped networks with it too).
CACHE_MIB = 256


def _input_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    return (3, 224, 224) if args.imagenet else (3, 32, 32)


def _child(name: str, args: argparse.Namespace) -> dict:
    """Compile ``name`` and (unless estimating) run it encrypted; one JSON record."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    from h33_bento import FHEInferenceClient, compile, simulate, zoo
    from h33_bento.ckks.context import peak_rss_bytes
    from h33_bento.program.ops import Op
    from h33_bento.program.report import peak_memory
    from h33_bento.runtime.engine import Engine

    shape = _input_shape(args)
    from nets import poly_resnet20

    model = poly_resnet20(args.weights) if name == "resnet20" else zoo.CIFAR_ARCHITECTURES[name]().eval()
    x_te, y_te = zoo._data("cifar10", "test")
    calib = zoo._data("cifar10", "train")[0][:256]
    record: dict = {"name": name, "input": list(shape), "trained": bool(name == "resnet20" and args.weights),
                    "parameters": int(sum(p.numel() for p in model.parameters()))}
    t0 = time.perf_counter()
    compiled = compile(model, shape, calibration_data=None if args.imagenet else calib,
                       estimate_only=args.estimate_only or args.imagenet)
    record["compile_s"] = time.perf_counter() - t0
    s, p = compiled.summary(), compiled.params
    boots = [st for st in compiled.steps if st.op is Op.BOOTSTRAP]
    record.update(summary=s, ring_dim=p.ring_dim, depth=p.multiplicative_depth,
                  bootstrap_slots=list(p.bootstrapping.slots) if p.bootstrapping else [],
                  bootstrap_levels=sorted({int(b.attrs["level"]) for b in boots}),
                  bootstrap_ms={k: v for k, v in (compiled.costs.ms if compiled.costs else {}).items()
                                if k.startswith("bootstrap_")},
                  bootstrap_stats=(compiled.costs.ms.get("bootstraps") if compiled.costs else None),
                  compile_peak_gib=peak_rss_bytes() / 2**30)
    print(json.dumps({"phase": "compiled", "summary": s}), flush=True)
    if args.estimate_only or args.imagenet:
        return record
    images = x_te[:args.images]
    cache = args.cache_mib << 20
    record["predicted_peak_gib"] = peak_memory(compiled, cache_bytes=cache)["server"] / 2**30
    t0 = time.perf_counter()
    client = FHEInferenceClient(compiled)
    record["keygen_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = Engine(compiled, client.keys.evaluation_keys(), cache_bytes=cache)  # installed chunk by chunk
    record["install_s"] = time.perf_counter() - t0
    print(json.dumps({"phase": "installed", "keygen_s": record["keygen_s"], "install_s": record["install_s"]}),
          flush=True)
    lanes = client.lanes
    outs, passes = [], []
    for i in range(0, len(images), lanes):
        enc = client.encrypt(images[i:i + lanes])
        t0 = time.perf_counter()
        out = engine.run(enc)
        passes.append(time.perf_counter() - t0)
        outs.append(client.decrypt_logits(out))
        print(json.dumps({"phase": "pass", "seconds": passes[-1]}), flush=True)
    got = np.concatenate(outs)
    sim = simulate(compiled, images)
    timings = engine.last_timings
    record.update(
        server_s_per_pass=float(np.median(passes)), passes=passes,
        amortized_s_per_image=float(np.sum(passes)) / len(images),
        argmax_equal_simulate=int((got.argmax(1) == sim.argmax(1)).sum()), images=len(images),
        max_logit_error=float(np.abs(got - sim).max()), logit_span=float(sim.max() - sim.min()),
        encrypted_correct=int((got.argmax(1) == y_te[:len(images)]).sum()),
        bootstrap_s_measured=float(sum(timings[b.name] for b in boots)) / 1000.0,
        steps_s_measured=float(sum(timings.values())) / 1000.0,
        peak_gib=peak_rss_bytes() / 2**30,
    )
    return record


def _row(r: dict) -> str:
    s = r.get("summary") or {}
    gib = (s.get("key_bundle_bytes") or 0) / 2**30
    pred = s.get("predicted_latency_ms")
    cells = [
        r["name"] + ("" if r.get("trained", True) else " (untrained)"),
        "x".join(map(str, r["input"][1:])),
        str(s.get("bootstraps", "")), str(s.get("ciphertext_bootstraps", "")),
        ", ".join(map(str, r.get("bootstrap_slots", []))),
        str(s.get("rotation_keys", "")), f"{gib:.1f}",
        f"{pred / 1000:.0f}" if pred else "n/a",
        f"{r['server_s_per_pass']:.0f}" if "server_s_per_pass" in r else "-",
        f"{r['amortized_s_per_image']:.0f}" if "amortized_s_per_image" in r else "-",
        f"{r['argmax_equal_simulate']}/{r['images']}" if "images" in r else "-",
        f"{r['max_logit_error']:.1e}" if "max_logit_error" in r else "-",
        f"{r.get('peak_gib', r.get('compile_peak_gib', 0)):.1f}",
        f"{r['compile_s']:.0f}" if "compile_s" in r else "-",
        r.get("status", "ok"),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| network | input | bootstraps | ciphertext bootstraps | bootstrap slots | rotation keys | key bundle GiB | "
          "predicted s/pass | measured s/pass | s/image (8 lanes) | argmax = simulate | max logit error | "
          "peak GiB | compile s | status |\n|" + "---|" * 15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--weights", help="trained ResNet-20 state_dict (degree-2 PolyReLU)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--estimate-only", action="store_true", help="compile only (no keys, no encrypted run)")
    ap.add_argument("--imagenet", action="store_true", help="ResNet-18 at 224x224, an estimate only")
    ap.add_argument("--cache-mib", type=int, default=CACHE_MIB,
                    help="the engine's plaintext cache (the default 2 GiB does not fit ResNet-20 in 24 GB)")
    ap.add_argument("--mem-limit-gb", type=float, default=22.0)
    ap.add_argument("--timeout-h", type=float, default=6.0)
    ap.add_argument("--json", help="write the raw records here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(_child(args.child, args)))
        return
    models = ["resnet18"] if args.imagenet else args.models
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            out, log_path = Path(tmp) / f"{name}.json", Path(tmp) / f"{name}.log"
            cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--images", str(args.images)]
            cmd += ["--weights", args.weights] if args.weights else []
            cmd += ["--cache-mib", str(args.cache_mib)]
            cmd += ["--estimate-only"] if args.estimate_only else []
            cmd += ["--imagenet"] if args.imagenet else []
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            run = run_worker(cmd, str(log_path), int(args.mem_limit_gb * 2**20), 1 << 20, args.timeout_h * 3600)
            record = json.loads(out.read_text()) if out.is_file() else {"name": name, "input": list(_input_shape(args))}
            record.update(status=run["status"], wall_s=run["wall_s"], worker_peak_gib=run["peak_rss_kib"] / 2**20)
            if run["status"] != "ok":
                record["why"] = run.get("why") or tail(str(log_path))
                print(f"{name}: {run['status']}: {record['why']}\n{tail(str(log_path))}", flush=True)
            records.append(record)
            print(_row(record), flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; {' '.join(sys.argv)}\n\n{HEADER}")
    for r in records:
        print(_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
