"""Orion (orion-fhe 1.0.2, Lattigo backend) worker: one network, one process.

    benchmarks/peers/.venv-orion/bin/python benchmarks/peers/worker_orion.py \
        --network convnet --data benchmarks/peers/out/convnet --repeat 3 --json out.json

The network is built from ``orion.nn`` layers (Orion's own LoLA / LeNet from ``orion.models``;
ResNet-20 mirrors ``zoo.ResNet20``, see :func:`resnet20`), loaded with the shared trained weights,
fitted on the calibration batch, compiled (Orion places its own bootstraps where the network
needs them) and run one image per ciphertext (Orion has no batching across inputs: the amortized
time at k inputs is k sequential requests).  Parameters: ``common.ORION_PARAMS`` (128-bit, see there).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (ORION_BOOT_LOGP, RESNET20_STRIDES, load_canonical_by_name, log, measure_requests,  # noqa: E402
                    orion_config, orion_logqp, phase, timed, worker_args, write_result)


def monomial(coeffs: np.ndarray, bounds: np.ndarray) -> list[float]:
    """Our activation, sum c_k T_k((2x - lower - upper) / (upper - lower)), as the power series in x
    that ``orion.nn.Activation`` takes (highest degree first): the same polynomial, not a refit."""
    lower, upper = (float(v) for v in bounds)
    t = np.polynomial.Polynomial([-(lower + upper) / (upper - lower), 2.0 / (upper - lower)])
    p = np.polynomial.Polynomial(np.polynomial.chebyshev.cheb2poly(np.asarray(coeffs, dtype=np.float64)))(t)
    return [float(c) for c in p.coef[::-1]]


def resnet20(sd: dict):
    """``zoo.ResNet20`` in ``orion.nn``, module for module and under the same names, each activation
    our trained polynomial as an ``on.Activation`` (Orion's custom-polynomial activation: it evaluates
    the given power series, depth ceil(log2(degree + 1)) = 2 levels, the same as a degree-2 Chebyshev
    series; Orion's ``Quad`` is x^2 only and its ``Chebyshev`` refits a function on its own range)."""
    import orion.nn as on
    from torch import nn

    def act(name: str):
        return on.Activation(monomial(sd[f"{name}.coeffs"].numpy(), sd[f"{name}.range"].numpy()))

    class BasicBlock(on.Module):
        def __init__(self, name: str, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = on.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = on.BatchNorm2d(c_out)
            self.act1 = act(f"{name}.act1")
            self.conv2 = on.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = on.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(on.Conv2d(c_in, c_out, 1, stride, bias=False), on.BatchNorm2d(c_out))
            self.add = on.Add()
            self.act2 = act(f"{name}.act2")

        def forward(self, x):
            out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
            return self.act2(self.add(out, self.shortcut(x)))

    class ResNet20(on.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(on.Conv2d(3, 16, 3, 1, 1, bias=False), on.BatchNorm2d(16), act("stem.2"))
            blocks, c_in = [], 16
            for i, stride in enumerate(RESNET20_STRIDES):
                c_out = c_in * stride
                blocks.append(BasicBlock(f"layers.{i}", c_in, c_out, stride))
                c_in = c_out
            self.layers = nn.Sequential(*blocks)
            self.pool = on.AdaptiveAvgPool2d((1, 1))
            self.flatten = on.Flatten()
            self.fc = on.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))

    return ResNet20()


def build(net: str, sd: dict):
    import orion.models as models
    import orion.nn as on

    if net == "convnet":
        class ConvNet(on.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = on.Conv2d(1, 4, kernel_size=7, stride=3)
                self.act1 = on.Quad()
                self.flatten = on.Flatten()
                self.fc1 = on.Linear(256, 64)
                self.act2 = on.Quad()
                self.fc2 = on.Linear(64, 10)

            def forward(self, x):
                x = self.flatten(self.act1(self.conv(x)))
                return self.fc2(self.act2(self.fc1(x)))

        return ConvNet()
    if net == "lola":
        return models.LoLA()
    if net == "lenet5":
        return models.LeNet()
    if net == "resnet20":
        return resnet20(sd)
    raise ValueError(net)


def orion_galois_elements(scheme, logn: int) -> set[int]:
    """Distinct Galois elements Orion holds keys for: its power-of-two rotations (generated
    by the evaluator, slot rotations 1, 2, 4, ..., slots/2) plus those of the linear transforms."""
    two_n = 2 << logn
    slots = 1 << (logn - 1)
    po2 = {pow(5, k, two_n) for k in (1 << i for i in range(logn - 1)) if k < slots}
    return po2 | set(int(g) for g in scheme.lt_evaluator.saved_rotation_keys)


def main() -> None:
    args = worker_args()
    torch.set_num_threads(2)

    import orion

    data = np.load(os.path.join(args.data, "data.npz"))
    images = torch.tensor(data["images"][: args.images])
    ref = data["ref_logits"][: args.images]
    labels = data["labels"][: args.images]
    sd = torch.load(os.path.join(args.data, "weights.pt"))
    config = orion_config(args.network)
    p = config["ckks_params"]
    logqp, boot_logqp = orion_logqp(args.network)
    result = {"framework": "orion", "network": args.network, "orion_version": _version("orion-fhe"),
              "params": {**p, "logQP": logqp, **({"BootLogP": config["boot_params"]["LogP"], "bootLogQP": boot_logqp}
                                                  if boot_logqp else {})}}
    phase(args.json, "start", params=result["params"])

    # ------------------------------------------------------------------ setup
    log(f"orion {args.network}: init_scheme + fit + compile ...")
    quiet = io.StringIO()
    phase(args.json, "init_scheme (key generation)")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(_Tee(quiet, sys.stderr)):  # Orion's progress in the log, and parsed
        scheme = orion.init_scheme(config)
        t_keys = time.perf_counter()
        phase(args.json, "fit")
        net = build(args.network, sd)
        load_canonical_by_name(net, args.network, sd)
        net.eval()
        calib = torch.utils.data.TensorDataset(torch.tensor(data["calib"]), torch.zeros(len(data["calib"])))
        orion.fit(net, torch.utils.data.DataLoader(calib, batch_size=1))
        t_fit = time.perf_counter()
        phase(args.json, "compile (diagonals, bootstrap placement)")
        _phase_per_bootstrapper(scheme, args.json)
        input_level = orion.compile(net)
    t_done = time.perf_counter()
    out = quiet.getvalue()
    m = re.search(r"requires (\d+) bootstrap", out)
    result["bootstraps"] = int(m.group(1)) if m else None
    m = re.search(r"logslots = ([\d, ]+)", out)
    result["bootstrapper_logslots"] = [int(v) for v in m.group(1).split(",")] if m else []
    if result["bootstraps"] and args.network not in ORION_BOOT_LOGP:
        raise RuntimeError(f"Orion placed {result['bootstraps']} bootstraps: not enough levels in the parameters")
    result.update(setup_s=t_done - t0, init_scheme_s=t_keys - t0, fit_s=t_fit - t_keys, compile_s=t_done - t_fit,
                  input_level=input_level)
    log(f"orion {args.network}: setup {result['setup_s']:.1f} s (compile {result['compile_s']:.1f} s)")

    # key bundle: (distinct Galois keys + relinearization key) x one serialized key (all keys are
    # EvaluationKeys of the same shape in Lattigo; Orion exposes no serialization of its key set)
    gal = orion_galois_elements(scheme, p["LogN"])
    blob, ptr = scheme.backend.GenerateAndSerializeRotationKey(next(iter(gal)))
    key_bytes = len(blob)
    scheme.backend.FreeCArray(ptr)
    result.update(galois_keys=len(gal), key_bytes_each=key_bytes, key_bundle_bytes=(len(gal) + 1) * key_bytes)
    if result["bootstrapper_logslots"]:
        # each bootstrapper's own Lattigo key set (bootstrapping ring) is not visible from Python
        result["key_bundle_lower_bound"] = True

    # ------------------------------------------------------------------ inference
    net.he()
    phase(args.json, "inference")

    def one(img: torch.Tensor) -> tuple[float, float, float, np.ndarray]:
        t_enc, ct = timed(lambda: orion.encrypt(orion.encode(img[None], input_level)))
        t_srv, out = timed(lambda: net(ct))
        t_dec, logits = timed(lambda: out.decrypt().decode())
        return t_enc, t_srv, t_dec, np.asarray(logits, dtype=np.float64).reshape(-1)[:10]

    with contextlib.redirect_stdout(quiet):
        result.update(measure_requests(one, images[0], list(images), args.repeat, ref, labels, lanes=1))
    log(f"orion {args.network}: single {result['single_ms']:.0f} ms, amortized {result['amortized_ms']:.0f} ms/img, "
        f"err {result['max_abs_err']:.2e}")
    write_result(args.json, result)
    os._exit(0)  # skip Orion's __del__ hooks into the Go runtime at interpreter exit


def _phase_per_bootstrapper(scheme, json_path: str) -> None:
    """Record each bootstrapper's key generation as a phase: Orion makes one per slot count inside
    ``orion.compile``, each with its own bootstrapping key set, the likeliest place to run out of memory."""
    generate = scheme.bootstrapper.generate_bootstrapper

    def traced(slots: int):
        phase(json_path, f"compile: bootstrapping keys for 2^{int(slots).bit_length() - 1} slots")
        out = generate(slots)
        phase(json_path, "compile: layers (plaintext diagonals, rotation keys)")  # unless another follows
        return out

    scheme.bootstrapper.generate_bootstrapper = traced


class _Tee(io.TextIOBase):
    """Writes to several streams (Orion prints its progress, which we also parse)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _version(dist: str) -> str:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
