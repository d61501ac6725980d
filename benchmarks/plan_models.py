"""Compile plans of the four CIFAR-scale seed architectures (ResNet-18, VGG-16, MobileNet-V2,
EfficientNet-B0, all polynomial + average pooling) and write them to docs/models.md.

    python benchmarks/plan_models.py                 # print the summary table and plans
    python benchmarks/plan_models.py --write docs/models.md

Each model is compiled with ``compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)``
in its own process (so its peak memory is its own).  The primitive costs behind the predicted
latency and key sizes are measured once, here, at the parameters every plan lands on (N=2^16,
depth 30: the largest ring at 128-bit security), and attached to each plan.  Bootstraps are the
compiler's estimate; their cost is not included in the latency (the bootstrapping wave will
measure it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("resnet18", "vgg16", "mobilenet_v2", "efficientnet_b0")

NN_SECTION = """## Making a network FHE-friendly: `h33_bento.nn`

```python
from h33_bento import compile, nn as hnn
relu_model = ...                                     # any torch model, trained
model = copy.deepcopy(relu_model)
replaced = hnn.polyfy(model, x_calib)                # swap activations + pooling, calibrate ranges
hnn.finetune(model, (x_train, y_train), epochs=5, teacher=relu_model)
compiled = compile(model, input_shape)               # the trained polynomials, bit for bit
```

* `polyfy` replaces, in place, `nn.ReLU` -> `PolyReLU` (degree 4: a Chebyshev fit of the smooth ReLU
  x(1+erf(x/sqrt 2))/2), `nn.ReLU6` -> `PolyReLU6`, `nn.Sigmoid` -> `PolySigmoid`, `nn.Tanh` -> `PolyTanh`
  (degree 7, R^2 > 0.9998 on the range; wider ranges raise the degree up to 13 at the same 5 levels,
  and warn beyond), `nn.GELU` -> `PolyGELU`, `nn.SiLU` -> `PolySiLU`, `nn.Hardswish` / `nn.Hardsigmoid`
  -> `PolyHardSwish` / `PolyHardSigmoid` (degree 7), `MaxPool` -> `AvgPool` (same kernel, stride,
  padding) and `AdaptiveMaxPool` -> `AdaptiveAvgPool`; `degrees={"relu": 2}` changes a degree. It returns
  one `Replacement(path, original, replacement)` per module.
* It refuses (`UnsupportedModuleError`, a `CompileError`, listing every offender with a hint, before
  changing anything) any other `torch.nn` layer that is not affine: LayerNorm, GroupNorm, Softmax,
  LeakyReLU, PReLU, ELU, dilated MaxPool, attention and recurrent layers, ... Functional calls
  (`F.relu`, `torch.sigmoid`, `F.max_pool2d`, ...) are invisible to a module walk; when calibration data
  or `example_input` is given, a probe forward pass catches them and raises too. Your own leaf modules
  are trusted (the compiler rejects what it cannot lower).
* `calibrate_ranges(model, data, margin=0.1)` measures each activation's input range with the exact
  activations, widens it by the margin and refits; `check_ranges` and the modules themselves (eval mode)
  warn with `RangeWarning` when inputs leave a range. `finetune` trains through the polynomials with a
  penalty on inputs near or past a range's edge, and optionally distils from the original model,
  freezes BatchNorm statistics, augments batches and keeps the best epoch on validation data;
  afterwards it records the share of training and validation inputs outside a range (`out_of_range`)
  and warns above 1% (`RANGE_BOUND`).
* The coefficients and ranges are float32-exact buffers; with `polyfy(..., trainable=True)` the
  coefficients are parameters that `finetune` trains (the modules compute with them rounded to
  float32). The ONNX export (torch's default `dynamo=True` exporter, or the TorchScript one) writes them
  into `ai.h33::ChebyshevPoly` nodes, which the compiler keeps as they are.

"""


def _child(name: str, costs_path: str) -> None:
    """Compile one architecture and print a JSON record (runs in its own process)."""
    import torch

    torch.set_num_threads(2)
    from h33_bento import PrimitiveCosts, compile, zoo

    model = zoo.CIFAR_ARCHITECTURES[name]()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    compiled = compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with open(costs_path) as fh:
        measured = json.load(fh)
    compiled = compiled.with_costs(PrimitiveCosts.from_json(measured["costs"]))
    summary = compiled.summary()
    ops: dict[str, int] = {}
    for s in compiled.steps:
        ops[s.op.value] = ops.get(s.op.value, 0) + 1
    print(json.dumps({
        "name": name, "parameters": params, "compile_s": seconds, "peak_rss_gib": peak, "summary": summary,
        "ops": ops, "ring_dim": compiled.params.ring_dim, "depth_available": compiled.params.multiplicative_depth,
        "runnable": compiled.runnable, "report": compiled.report,
    }))


def _small_models() -> list[dict]:
    """Plans of the small zoo networks (ReLU ones polyfied with degree-4 PolyReLU)."""
    import torch

    torch.set_num_threads(2)
    from h33_bento import compile, zoo
    from h33_bento import nn as hnn

    rows = []
    for name, (ctor, dataset, shape, epochs, lr) in zoo.RECIPES.items():
        model = ctor().eval()
        replaced = hnn.polyfy(model)
        acts = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (hnn.PolyActivation, hnn.Square))})
        compiled = compile(model, shape, estimate_only=True, measure_costs=False)
        rows.append({"name": name, "class": ctor.__name__, "dataset": dataset, "shape": list(shape),
                     "activations": ", ".join(acts) + (" (polyfied from ReLU)" if replaced else ""),
                     "levels": compiled.depth, "ring_dim": compiled.params.ring_dim, "runnable": compiled.runnable,
                     "rotation_keys": len(compiled.params.rotation_indices), "epochs": epochs,
                     "parameters": sum(p.numel() for p in model.parameters())})
    return rows


def _measure_costs(degrees: tuple[int, ...]) -> dict:
    """Primitive costs and key sizes at N=2^16, depth 30 (what every CIFAR plan uses)."""
    from h33_bento.ckks.params import MAX_RING_DIM, CKKSParams, max_depth
    from h33_bento.ckks.timing import measure_primitives

    params = CKKSParams(ring_dim=MAX_RING_DIM, multiplicative_depth=max_depth(MAX_RING_DIM), scale_bits=40,
                        first_mod_bits=60, lanes=8)
    t0 = time.perf_counter()
    costs = measure_primitives(params, degrees, repeat=2)
    return {"costs": costs.to_json(), "seconds": time.perf_counter() - t0,
            "ring_dim": params.ring_dim, "depth": params.multiplicative_depth}


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def render(records: list[dict], measured: dict, command: str, total_s: float, small: list[dict]) -> str:
    lines = [
        "# Model zoo: compile plans of the seed architectures",
        "",
        "CIFAR-scale (3x32x32 input, 10 classes) versions of the four architectures the seed names, built in",
        "`h33_bento.zoo` with their usual activations and pooling and converted by `h33_bento.nn.polyfy`:",
        "ReLU -> `PolyReLU` (degree 4, 4 levels), ReLU6 -> `PolyReLU6` (degree 4), SiLU -> `PolySiLU` and",
        "Sigmoid -> `PolySigmoid` (degree 7, 5 levels), MaxPool -> AvgPool. The weights are untrained and the",
        "activation ranges placeholders; neither changes a plan (levels, rotations and keys depend on the",
        "architecture only).",
        "",
        "Every model passes the compiler's ONNX import, fusion, calibration, level planning, layout and",
        "diagonal planning through `compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)`. None",
        "fits the 30 levels that the largest 128-bit ring (N=2^16, 40-bit scale) holds, so none is",
        "runnable yet: running them encrypted needs bootstrapping, which is the next wave.",
        "",
        "Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        f"({platform.machine()}, {os.cpu_count()} cores shared with other jobs, torch threads = 2; the whole",
        f"script took {total_s / 60:.1f} min.)",
        "",
        "| model | parameters | levels needed | bootstraps (estimate) | ciphertext bootstraps | rotations per run | rotation keys | key bundle | predicted latency per 8 images (without bootstraps) | compile time | peak memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        s = r["summary"]
        lat = s["predicted_latency_ms"]
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {s['levels']} | {s['bootstraps']} | "
            f"{s['ciphertext_bootstraps']} | {s['rotations_per_run']} | {s['rotation_keys']} | "
            f"{_gib(s['key_bundle_bytes'])} | {lat / 1000:.0f} s | {r['compile_s']:.0f} s | {r['peak_rss_gib']:.1f} GiB |"
            if lat is not None else
            f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {s['levels']} | {s['bootstraps']} | "
            f"{s['ciphertext_bootstraps']} | {s['rotations_per_run']} | {s['rotation_keys']} | "
            f"{_gib(s['key_bundle_bytes'])} | n/a | {r['compile_s']:.0f} s | {r['peak_rss_gib']:.1f} GiB |"
        )
    c = measured["costs"]["ms"]
    lines += [
        "",
        "How to read the columns:",
        "",
        "* **levels needed**: multiplicative depth of the longest path (each fused linear block 1, x^2 and",
        "  ciphertext products 1, a degree-4 Chebyshev series 4, degree 7 5).",
        "* **bootstraps (estimate)**: `h33_bento.program.report.bootstrap_estimate`: a fresh ciphertext has the ring's",
        "  30 levels, each bootstrap restores 10 (`BootstrapConfig.levels_after`, the project's default",
        "  assumption, not yet measured), and a tensor is bootstrapped right before the first step that",
        "  would run out. *Ciphertext bootstraps* multiplies each by the tensor's ciphertext count (a 64x32x32",
        "  tensor spans 16 ciphertexts of 8 lanes x 4096 values). An estimate, not a schedule.",
        "* **rotations per run / rotation keys**: from the BSGS diagonal plans of the chosen slot layouts.",
        "* **key bundle**: public + relinearization key + one rotation key per index, each at its measured",
        "  serialized size at N=2^16, depth 30"
        f" ({_gib(measured['costs']['key_bytes'].get('rotation', 0))} per rotation key).",
        "* **predicted latency**: sum over steps of the primitive operations each needs, priced with the",
        "  costs measured at that step's level (below; after the first 30 levels, as if right after a",
        "  bootstrap), including re-encoding on every run the plaintext diagonals that do not fit the",
        "  engine's default 2 GiB cache (tens of GiB here). Bootstraps themselves are **not** included:",
        "  they have not been measured here.",
        "",
        f"Primitive costs measured once at N=2^16, depth 30 ({measured['seconds']:.0f} s to measure; ms, median of 2",
        f"or more, at levels {c['levels'][0]} / {c['levels'][len(c['levels']) // 2]} / {c['levels'][-1]}):",
        ", ".join(f"{label} {' / '.join(f'{c[key][i]:.1f}' for i in (0, len(c['levels']) // 2, -1))}"
                  for label, key in (("rotate", "rotate"), ("hoisted rotate", "fast_rotate"),
                                     ("hoisting precompute", "precompute"), ("extended-basis rotate", "rotate_ext"),
                                     ("ModDown", "key_switch_down"), ("plaintext multiply", "mult_plain"),
                                     ("add", "add"), ("ciphertext multiply", "mult_cipher"), ("encode", "encode")))
        + "".join(f", Chebyshev degree {k.split('_')[1]} {v:.0f} (top level)" for k, v in c.items()
                  if k.startswith("chebyshev_"))
        + ".",
        "",
        "Compiler changes these plans needed: estimate-only compiles import matrices in float32; fusion scales",
        "rows/columns for diagonal factors (BatchNorm) instead of a sparse product; diagonal planning finds",
        "distinct diagonals with a bitmap, in chunks; layout candidates and costs are memoized; the",
        "grid-layout search has a work budget (per layer and per graph) beyond which layers keep the compact",
        "and plane-grid layouts (docs/architecture.md); a plan reports bootstraps instead of assuming none.",
        "",
    ]
    lines += NN_SECTION.rstrip("\n").split("\n") + [""]
    lines += [
        "## Small networks (run encrypted without bootstrapping)",
        "",
        "Defined in `h33_bento.zoo`, with a training recipe each (`zoo.RECIPES`, `zoo.train_recipe(name, seed)`;",
        "`python -m h33_bento.zoo [name ...]` trains them and prints test accuracy). No weights are committed:",
        "training takes seconds to a few minutes on two cores and is deterministic for a seed, torch version",
        "and thread count. Plans below are from untrained weights (the ReLU networks polyfied with degree-4",
        "PolyReLU, as `benchmarks/accuracy.py` uses them for MNIST and PneumoniaMNIST; for CifarCNN it uses",
        "degree 13, 13 levels at the same N=2^16; see docs/accuracy.md for their measured accuracy).",
        "",
        "| recipe | class | data | input | parameters | activations | levels | ring | rotation keys | runnable |",
        "| --- | --- | --- | --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for r in small:
        lines.append(
            f"| {r['name']} | `{r['class']}` | {r['dataset']} | {'x'.join(map(str, r['shape']))} | "
            f"{r['parameters']:,} | {r['activations']} | {r['levels']} | N=2^{r['ring_dim'].bit_length() - 1} | "
            f"{r['rotation_keys']} | {'yes' if r['runnable'] else 'no'} |")
    lines.append("")
    for r in records:
        lines += [
            f"## {r['name']}",
            "",
            f"Ops after fusion: {', '.join(f'{v} {k}' for k, v in sorted(r['ops'].items()))}.",
            "",
            "<details><summary>plan report</summary>",
            "",
            "```",
            r["report"],
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--write", metavar="PATH", help="write the markdown report here (e.g. docs/models.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--costs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.costs)
        return
    t_start = time.perf_counter()
    print("measuring primitive costs at N=2^16 ...", flush=True)
    measured = _measure_costs((4, 7))
    records = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(measured, fh)
        costs_path = fh.name
    try:
        for name in args.models:
            print(f"compiling {name} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", name, "--costs", costs_path],
                                 check=True, capture_output=True, text=True, cwd=ROOT)
            record = json.loads(out.stdout.strip().splitlines()[-1])
            s = record["summary"]
            print(f"  {name}: {record['compile_s']:.0f} s, peak {record['peak_rss_gib']:.1f} GiB, levels {s['levels']}, "
                  f"bootstraps {s['bootstraps']}, rotations {s['rotations_per_run']}, keys {s['rotation_keys']}, "
                  f"predicted {s['predicted_latency_ms']} ms", flush=True)
            records.append(record)
    finally:
        os.unlink(costs_path)
    command = "python benchmarks/plan_models.py" + (f" --write {args.write}" if args.write else "")
    if args.models != list(MODELS):
        command += " --models " + " ".join(args.models)
    print("planning the small networks ...", flush=True)
    small = _small_models()
    text = render(records, measured, command, time.perf_counter() - t_start, small)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()
