"""Shared, framework-neutral pieces of the peer suite (stdlib + numpy; torch only where asked).

Imported by every worker, whatever its venv (ours: Python 3.10; Orion's: 3.11; TenSEAL's: 3.10),
so it must not import h33_bento, orion or tenseal.

* ``LAYERS``: for every network, its parametric layers in forward order with the *canonical*
  names (Orion's attribute names; for ResNet-20, ``zoo.ResNet20``'s, which the Orion worker
  mirrors).  The trained weights are saved once under these names
  (``<net>.pt``, a torch state dict, and ``<net>.npz``, the same arrays for workers without
  torch); each framework maps them onto its own module names.
* ``ORION_PARAMS`` / ``TENSEAL_PARAMS``: the 128-bit parameters the peers run with.
* timing helpers and the JSON result contract between workers and ``run.py``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

NETWORKS = ("convnet", "lola", "lenet5", "resnet20")
FRAMEWORKS = ("h33", "orion", "tenseal")

#: ResNet-20's stride per basic block (``zoo.ResNet20``: 3 stages of 3 blocks, 16/32/64 channels);
#: the stride-2 blocks have a 1x1 projection shortcut.
RESNET20_STRIDES = (1, 1, 1, 2, 1, 1, 2, 1, 1)


def _resnet20_layers() -> list[tuple[str, str]]:
    """``zoo.ResNet20``'s module names, polynomial activations included (their trained
    coefficients are part of the weights)."""
    out = [("stem.0", "conv"), ("stem.1", "bn"), ("stem.2", "poly")]
    for i, stride in enumerate(RESNET20_STRIDES):
        b = f"layers.{i}"
        out += [(f"{b}.conv1", "conv"), (f"{b}.bn1", "bn"), (f"{b}.act1", "poly"),
                (f"{b}.conv2", "conv"), (f"{b}.bn2", "bn")]
        if stride != 1:
            out += [(f"{b}.shortcut.0", "conv"), (f"{b}.shortcut.1", "bn")]
        out.append((f"{b}.act2", "poly"))
    return out + [("fc", "linear")]


#: net -> [(canonical name, kind)], kind in conv | linear | bn | poly; forward order.
#: poly: a ``PolyActivation``'s Chebyshev coefficients and [lower, upper] range.
LAYERS: dict[str, list[tuple[str, str]]] = {
    # conv 1->4 k7 s3 -> x^2 -> fc 256->64 -> x^2 -> fc 64->10 (TenSEAL's tutorial network)
    "convnet": [("conv", "conv"), ("fc1", "linear"), ("fc2", "linear")],
    # orion.models.LoLA: conv 1->5 k2 s2, BN, x^2, fc 980->100, BN, x^2, fc 100->10
    "lola": [("conv1", "conv"), ("bn1", "bn"), ("fc1", "linear"), ("bn2", "bn"), ("fc2", "linear")],
    # orion.models.LeNet: conv 1->32 k5 s2 p2, BN, x^2, conv 32->64 k5 s2 p2, BN, x^2,
    #                     fc 3136->512, BN, x^2, fc 512->10
    "lenet5": [("conv1", "conv"), ("bn1", "bn"), ("conv2", "conv"), ("bn2", "bn"),
               ("fc1", "linear"), ("bn3", "bn"), ("fc2", "linear")],
    "resnet20": _resnet20_layers(),
}

TITLES = {
    "convnet": "ConvNet (conv 1->4 k7 s3, x^2, fc 256->64, x^2, fc 64->10)",
    "lola": "LoLA (Orion's: conv 1->5 k2 s2 + BN, x^2, fc 980->100 + BN, x^2, fc 100->10)",
    "lenet5": "LeNet-5 (Orion's: conv 1->32 k5 s2 p2 + BN, x^2, conv 32->64 k5 s2 p2 + BN, x^2, "
              "fc 3136->512 + BN, x^2, fc 512->10)",
    "resnet20": "ResNet-20 (zoo.ResNet20: conv3x3 16 + BN, 3x3 basic blocks of 16/32/64 channels with 1x1 "
                "projection shortcuts at the stride-2 ones, avgpool, fc 64->10; trained degree-2 PolyReLU "
                "activations)",
}

_KEYS = {"conv": ("weight", "bias"), "linear": ("weight", "bias"),
         "bn": ("weight", "bias", "running_mean", "running_var"), "poly": ("coeffs", "range")}


def _keys(module: Any, kind: str) -> list[str]:
    """The tensors a layer of ``kind`` carries (a convolution without bias has no ``bias``)."""
    return [k for k in _KEYS[kind] if getattr(module, k, None) is not None]

# ------------------------------------------------------------------------ 128-bit parameters
#
# HomomorphicEncryption.org security standard (Albrecht et al.), classical 128-bit, ternary
# secret, error sigma 3.2: log2(Q*P) <= 218 (N=2^13), 438 (2^14), 881 (2^15), 1747 (2^16).
HE_STD_128_MAX_LOGQP = {13: 218, 14: 438, 15: 881, 16: 1747}

#: Orion (Lattigo) parameters per network.  Standard ring (N/2 complex slots; not Orion's
#: ConjugateInvariant examples), secret with a fixed Hamming weight H = round(2N/3), the
#: expected weight of the uniform ternary secret the standard's table assumes (Orion's
#: default H = 192 is a sparse secret, below the table's assumption).  One level per linear
#: layer (BN folded into it) and per x^2, no bootstrapping:
#:   convnet, lola: 5 levels; lenet5: 7 levels.
#: resnet20: Orion's own ResNet parameter set (configs/resnet.yml in baahl-nyu/orion: LogN 16,
#: LogQ [55, 40 x 10], LogP [61 x 3], scale 2^40), with bootstrapping (ORION_BOOT_LOGP).
ORION_PARAMS: dict[str, dict[str, Any]] = {
    "convnet": {"LogN": 13, "LogQ": [29] + [26] * 5, "LogP": [29, 29], "LogScale": 26},
    "lola": {"LogN": 13, "LogQ": [29] + [26] * 5, "LogP": [29, 29], "LogScale": 26},
    "lenet5": {"LogN": 14, "LogQ": [45] + [35] * 7, "LogP": [45, 45], "LogScale": 35},
    "resnet20": {"LogN": 16, "LogQ": [55] + [40] * 10, "LogP": [61] * 3, "LogScale": 40},
}

#: Bits of modulus Lattigo v6's default bootstrapping circuit adds above the residual LogQ (what
#: Orion's NewBootstrapper builds, setting only LogN, LogP, Xs and LogSlots): CoeffsToSlots
#: 4 x 56 + EvalMod 8 x 60 + SlotsToCoeffs 3 x 39 = 821 (circuits/ckks/bootstrapping/parameters_literal.go).
LATTIGO_BOOTSTRAP_BITS = 821

#: Key-switching primes of the bootstrapping parameters.  Orion's resnet.yml has 8 x 61, which
#: makes the bootstrapping ring 455 + 821 + 488 = 1764 bits, above 1747 at N=2^16; one prime less
#: gives 1703.
ORION_BOOT_LOGP: dict[str, list[int]] = {"resnet20": [61] * 7}

#: TenSEAL (SEAL) parameters: as in TenSEAL's MNIST tutorial, 218 bits at N=8192 (the
#: last prime is SEAL's special prime), 6 levels for the 5 the network needs.
TENSEAL_PARAMS: dict[str, dict[str, Any]] = {
    "convnet": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [31] + [26] * 6 + [31], "scale_bits": 26},
    "lola": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [31] + [26] * 6 + [31], "scale_bits": 26},
}


def check_128(logn: int, logqp: int) -> None:
    limit = HE_STD_128_MAX_LOGQP[logn]
    if logqp > limit:
        raise ValueError(f"log2(QP) = {logqp} > {limit}: not 128-bit secure at N=2^{logn}")


def orion_logqp(net: str) -> tuple[int, int | None]:
    """log2(QP) of Orion's parameters for ``net``: the residual ring and, with bootstrapping,
    the bootstrapping ring (residual Q + the circuit's moduli + its own P); None without."""
    p = ORION_PARAMS[net]
    residual = sum(p["LogQ"]) + sum(p["LogP"])
    if net not in ORION_BOOT_LOGP:
        return residual, None
    return residual, sum(p["LogQ"]) + LATTIGO_BOOTSTRAP_BITS + sum(ORION_BOOT_LOGP[net])


def orion_config(net: str) -> dict[str, Any]:
    p = dict(ORION_PARAMS[net])
    for logqp in orion_logqp(net):
        if logqp is not None:
            check_128(p["LogN"], logqp)
    n = 1 << p["LogN"]
    config = {
        "ckks_params": {**p, "H": round(2 * n / 3), "RingType": "Standard"},
        "orion": {"margin": 2, "embedding_method": "hybrid", "backend": "lattigo", "fuse_modules": True,
                  "debug": False, "io_mode": "none"},
    }
    if net in ORION_BOOT_LOGP:
        config["boot_params"] = {"LogP": ORION_BOOT_LOGP[net]}
    return config


# ------------------------------------------------------------------------ weights

#: networks whose torch definition carries the canonical names (matched by name, not by module order).
BY_NAME = frozenset({"resnet20"})


def _layers(model: Any, net: str) -> list[tuple[Any, str, str]]:
    """(module, canonical name, kind) for every layer of ``LAYERS[net]`` in a torch model: by name
    for ``BY_NAME`` networks, else the model's parametric layers in module order, type-checked."""
    import torch

    spec = LAYERS[net]
    if net in BY_NAME:
        return _named(model, net)
    mods = [m for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm))]
    if len(mods) != len(spec):
        raise ValueError(f"{type(model).__name__}: {len(mods)} parametric layers, expected {len(spec)} for {net}")
    for m, (name, kind) in zip(mods, spec):
        want = {"conv": torch.nn.Conv2d, "linear": torch.nn.Linear,
                "bn": torch.nn.modules.batchnorm._BatchNorm}[kind]
        if not isinstance(m, want):
            raise ValueError(f"{net}: layer {name} is a {type(m).__name__}, expected {kind}")
    return [(m, name, kind) for m, (name, kind) in zip(mods, spec)]


def _named(model: Any, net: str) -> list[tuple[Any, str, str]]:
    """(module, canonical name, kind) for every layer of ``LAYERS[net]``, looked up by name."""
    return [(model.get_submodule(name), name, kind) for name, kind in LAYERS[net]]


def _copy(layers: list[tuple[Any, str, str]], net: str, sd: "dict[str, Any]") -> None:
    import torch

    with torch.no_grad():
        for m, name, kind in layers:
            for k in _keys(m, kind):
                src = torch.as_tensor(sd[f"{name}.{k}"])
                dst = getattr(m, k)
                if tuple(dst.shape) != tuple(src.shape):
                    raise ValueError(f"{net}.{name}.{k}: shape {tuple(src.shape)} vs {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))


def canonical_from_modules(model: Any, net: str) -> "dict[str, Any]":
    """Canonical state dict of a torch model whose parametric layers are, in module order,
    the layers of ``LAYERS[net]`` (whatever the model calls them; by name for ``BY_NAME``)."""
    return {f"{name}.{k}": getattr(m, k).detach().clone().float()
            for m, name, kind in _layers(model, net) for k in _keys(m, kind)}


def load_canonical_into(model: Any, net: str, sd: "dict[str, Any]") -> None:
    """Copy a canonical state dict into ``model`` (inverse of canonical_from_modules)."""
    _copy(_layers(model, net), net, sd)


def load_canonical_by_name(model: Any, net: str, sd: "dict[str, Any]") -> None:
    """Copy a canonical state dict into a model whose layers carry the canonical names
    (Orion's models: their modules are not torch.nn.Conv2d/Linear subclasses).  Polynomial
    activations are not copied: an Orion activation is built from its coefficients."""
    _copy([layer for layer in _named(model, net) if layer[2] != "poly"], net, sd)


# ------------------------------------------------------------------------ timing / results

def worker_args() -> "argparse.Namespace":
    """The command line every framework worker takes from run.py."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--network", required=True, choices=sorted(LAYERS))
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", required=True)
    ap.add_argument("--profile-runs", type=int, default=5,
                    help="h33: more 8-image requests for the per-layer profile (0: no profile)")
    return ap.parse_args()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def measure_requests(one: Callable[[Any], tuple[float, float, float, Any]], single: Any, batches: list[Any],
                     repeat: int, ref: Any, labels: Any, lanes: int) -> dict[str, Any]:
    """Time one warm-up request, then ``repeat`` rounds of one single-input request and one pass
    over ``batches`` (each ``one(x)`` returns encrypt/server/decrypt seconds and the logits), and
    summarize them the same way for every framework.  Singles and passes alternate so that both
    see the same machine: on a shared VM, speed drifts by 10-20% over a minute."""
    import numpy as np

    t_cold = time.perf_counter()
    one(single)
    cold_ms = (time.perf_counter() - t_cold) * 1000
    singles, servers1 = [], []
    batch_tot, batch_srv, logits = [], [], None
    for _ in range(repeat):
        e, s, d, _ = one(single)
        singles.append(e + s + d)
        servers1.append(s)
        rows, tot, srv = [], 0.0, 0.0
        for x in batches:
            e, s, d, lg = one(x)
            rows.append(np.asarray(lg, dtype=np.float64).reshape(-1, ref.shape[1]))
            tot += e + s + d
            srv += s
        batch_tot.append(tot)
        batch_srv.append(srv)
        logits = np.concatenate(rows)
    k = len(logits)
    return dict(
        cold_request_ms=cold_ms,
        single_ms=median(singles), single_server_ms=median(servers1),
        batch_images=k, batch_ms=median(batch_tot), batch_server_ms=median(batch_srv),
        amortized_ms=median(batch_tot) / k, amortized_server_ms=median(batch_srv) / k,
        max_abs_err=float(np.abs(logits - ref).max()),
        correct=int((logits.argmax(1) == labels).sum()),
        argmax_agree=int((logits.argmax(1) == ref.argmax(1)).sum()),
        lanes=lanes,
    )


def vm_hwm_kib() -> int:
    """This process's peak resident set (VmHWM), KiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def write_result(path: str, result: dict[str, Any]) -> None:
    result.setdefault("python", sys.version.split()[0])
    result["worker_vm_hwm_kib"] = vm_hwm_kib()
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=float)
    os.replace(tmp, path)


def phase(json_path: str, name: str, **facts: Any) -> None:
    """Record the phase a worker is in, plus facts known so far (e.g. the parameters); run.py
    reports them when the worker is killed (OOM / timeout) or fails."""
    path = json_path + ".phase"
    known: dict[str, Any] = {}
    try:
        with open(path) as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        pass
    known.update(facts, phase=name)
    try:
        with open(path, "w") as fh:
            json.dump(known, fh, default=float)
    except OSError:
        pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
