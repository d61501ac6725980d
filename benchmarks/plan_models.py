"""Compile plans of the four CIFAR-scale seed architectures (ResNet-18, VGG-16, MobileNet-V2,
EfficientNet-B0, all polynomial + average pooling) and write them to docs/models.md.

    python benchmarks/plan_models.py                 # print the summary table and plans
    python benchmarks/plan_models.py --write docs/models.md

Each model is compiled at 128-bit security with its bootstraps placed where the predicted total is
least, ``compile(model, (3, 32, 32), estimate_only=True)``, in its own process
(so its peak memory is its own).  The compile measures what it prices with on this machine: the
primitives at the bootstrappable parameters and a bootstrap at every slot count placement tries
(both cached per machine, ``$H33_CACHE_DIR``), so the predicted latency includes the bootstraps.
Running them encrypted is ``benchmarks/deep.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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


def _child(name: str) -> None:
    """Compile one architecture and print a JSON record (runs in its own process)."""
    import torch

    torch.set_num_threads(2)
    from h33_bento import compile, zoo
    from h33_bento.ckks.context import peak_rss_bytes
    from h33_bento.program.ops import Op

    model = zoo.CIFAR_ARCHITECTURES[name]().eval()
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    compiled = compile(model, (3, 32, 32), estimate_only=True)
    seconds = time.perf_counter() - t0
    ops: dict[str, int] = {}
    by_slots: dict[str, int] = {}
    blocks = compiled.blocks()
    for s in compiled.steps:
        ops[s.op.value] = ops.get(s.op.value, 0) + 1
        if s.op is Op.BOOTSTRAP:
            by_slots[str(s.attrs["slots"])] = by_slots.get(str(s.attrs["slots"]), 0) + blocks[s.name]
    p = compiled.params
    print(json.dumps({
        "name": name, "parameters": params, "compile_s": seconds, "peak_rss_gib": peak_rss_bytes() / 2**30,
        "summary": compiled.summary(), "ops": ops, "ring_dim": p.ring_dim, "depth_available": p.multiplicative_depth,
        "bootstrap_slots": list(p.bootstrapping.slots) if p.bootstrapping else [],
        "ciphertext_bootstraps_by_slots": by_slots,
        "costs": compiled.costs.to_json() if compiled.costs is not None else None,
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


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def render(records: list[dict], command: str, total_s: float, small: list[dict]) -> str:
    lines = [
        "# Model zoo: compile plans of the seed architectures",
        "",
        "CIFAR-scale (3x32x32 input, 10 classes) versions of the four architectures the seed names, built in",
        "`h33_bento.zoo` with their usual activations and pooling and converted by `h33_bento.nn.polyfy`:",
        "ReLU -> `PolyReLU` (degree 4, 4 levels), ReLU6 -> `PolyReLU6` (degree 4), SiLU -> `PolySiLU` and",
        "Sigmoid -> `PolySigmoid` (degree 7, 5 levels), MaxPool -> AvgPool. The weights are untrained and the",
        "activation ranges placeholders; neither changes a plan (levels, rotations, keys and bootstraps depend",
        "on the architecture only; the bootstraps' input ranges are checked when a program is compiled to run).",
        "",
        "Every model is compiled at 128-bit security (N=2^16, a sparse-encapsulated secret, depth 24) with",
        "its bootstraps placed by the compiler where the predicted total is least, priced with costs",
        "measured on this machine, bootstraps included: `compile(model, (3, 32, 32), estimate_only=True)`",
        "(estimate-only: the diagonals are counted, not materialized). Running them encrypted is",
        "`benchmarks/deep.py` (docs/benchmarks.md).",
        "",
        "Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        f"({platform.machine()}, {os.cpu_count()} cores, torch threads = 2; the whole script took "
        f"{total_s / 60:.1f} min, measuring included.)",
        "",
        "| model | parameters | bootstraps | ciphertext bootstraps | bootstrap slots | rotation keys | key bundle "
        "| predicted s per 8 images | of which bootstraps | predicted server peak | compile time | compile peak |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        s = r["summary"]
        lat = s["predicted_latency_ms"]
        boot_ms = r["costs"]["ms"] if r["costs"] else {}
        boot_s = sum(n * boot_ms.get(f"bootstrap_{slots}", float("nan"))
                     for slots, n in r["ciphertext_bootstraps_by_slots"].items()) / 1000
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {s['bootstraps']} | {s['ciphertext_bootstraps']} | "
            f"{', '.join(map(str, r['bootstrap_slots'])) or '-'} | {s['rotation_keys']} | "
            f"{_gib(s['key_bundle_bytes'])} | {f'{lat / 1000:.0f} s' if lat is not None else 'n/a'} | {boot_s:.0f} s | "
            f"{_gib(s['predicted_server_peak_bytes'])} | {r['compile_s']:.0f} s | {r['peak_rss_gib']:.1f} GiB |")
    first = next((r for r in records if r["costs"]), None)
    lines += [
        "",
        "How to read the columns:",
        "",
        "* **bootstraps**: bootstrap steps in the program; *ciphertext bootstraps* counts each once per",
        "  ciphertext its tensor spans (a 64x32x32 tensor spans 16 ciphertexts of 8 lanes x 4096 values).",
        "  *Bootstrap slots*: the slot counts they run at (sparse ones where a tensor fills fewer slots).",
        "* **rotation keys / key bundle**: the program's rotation keys (BSGS diagonal plans of the chosen",
        "  slot layouts, after the key-budget pass), plus the bootstrapping keys, at their measured sizes.",
        "* **predicted s per 8 images**: one 8-lane pass, every step priced with the primitive costs",
        "  measured at its level, and every bootstrap at its measured cost for its slot count (the next",
        "  column), including re-encoding on every run the plaintext diagonals that do not fit the engine's",
        "  default 2 GiB cache.",
        "* **predicted server peak**: `program.report.peak_memory`: the installed bundle, the plaintext",
        "  cache, the widest step's ciphertexts and the measured bootstrapping precomputations. Above the",
        "  24 GB of this machine it cannot run here.",
        "",
    ]
    if first is not None:
        c = first["costs"]["ms"]
        boots = {n: r["costs"]["ms"][f"bootstrap_{n}"] for r in records if r["costs"] for n in r["bootstrap_slots"]}
        load = first["costs"]["load"]
        lines += [
            f"Primitive costs measured at N=2^16, depth {first['depth_available']}, {first['costs']['measured_at']}"
            f" (load average {load:g} on {os.cpu_count()} cores"
            + (": other jobs shared the cores, so these and the predictions above are pessimistic" if load >
               (os.cpu_count() or 1) else "") + f"; ms, at levels {c['levels'][0]} / "
            f"{c['levels'][len(c['levels']) // 2]} / {c['levels'][-1]}):",
            ", ".join(f"{label} {' / '.join(f'{c[key][i]:.1f}' for i in (0, len(c['levels']) // 2, -1))}"
                      for label, key in (("rotate", "rotate"), ("hoisted rotate", "fast_rotate"),
                                         ("hoisting precompute", "precompute"), ("extended-basis rotate", "rotate_ext"),
                                         ("ModDown", "key_switch_down"), ("plaintext multiply", "mult_plain"),
                                         ("add", "add"), ("ciphertext multiply", "mult_cipher"), ("encode", "encode")))
            + "; one bootstrap per ciphertext at the slot counts the plans use: " + ", ".join(f"{n} slots {v / 1000:.1f} s"
                                                                for n, v in sorted(boots.items())) + ".",
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
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    t_start = time.perf_counter()
    records = []
    for name in args.models:
        print(f"compiling {name} (measuring costs the first time) ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", name], check=True, capture_output=True, text=True,
                             cwd=ROOT)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        s = record["summary"]
        print(f"  {name}: {record['compile_s']:.0f} s, peak {record['peak_rss_gib']:.1f} GiB, bootstraps "
              f"{s['bootstraps']} ({s['ciphertext_bootstraps']} ciphertext), keys {s['rotation_keys']}, "
              f"predicted {s['predicted_latency_ms']} ms", flush=True)
        records.append(record)
    command = "python benchmarks/plan_models.py" + (f" --write {args.write}" if args.write else "")
    if args.models != list(MODELS):
        command += " --models " + " ".join(args.models)
    print("planning the small networks ...", flush=True)
    small = _small_models()
    text = render(records, command, time.perf_counter() - t_start, small)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()
