"""Orion (orion-fhe 1.0.2, Lattigo backend) worker: one network, one process.

    benchmarks/peers/.venv-orion/bin/python benchmarks/peers/worker_orion.py \
        --network convnet --data benchmarks/peers/out/convnet --repeat 3 --json out.json

The network is built from ``orion.nn`` layers (Orion's own LoLA / LeNet from ``orion.models``),
loaded with the shared trained weights, fitted on the calibration batch, compiled and run one
image per ciphertext (Orion has no batching across inputs: the amortized time at k inputs is k
sequential requests).  Parameters: ``common.ORION_PARAMS`` (128-bit, see there).
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

from common import (load_canonical_by_name, log, measure_requests, orion_config, phase, timed,  # noqa: E402
                    worker_args, write_result)


def build(net: str):
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
    result = {"framework": "orion", "network": args.network, "orion_version": _version("orion-fhe"),
              "params": {**p, "logQP": sum(p["LogQ"]) + sum(p["LogP"])}}
    phase(args.json, "start", params=result["params"])

    # ------------------------------------------------------------------ setup
    log(f"orion {args.network}: init_scheme + fit + compile ...")
    quiet = io.StringIO()
    phase(args.json, "init_scheme (key generation)")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        scheme = orion.init_scheme(config)
        t_keys = time.perf_counter()
        phase(args.json, "fit")
        net = build(args.network)
        load_canonical_by_name(net, args.network, sd)
        net.eval()
        calib = torch.utils.data.TensorDataset(torch.tensor(data["calib"]), torch.zeros(len(data["calib"])))
        orion.fit(net, torch.utils.data.DataLoader(calib, batch_size=1))
        t_fit = time.perf_counter()
        phase(args.json, "compile")
        input_level = orion.compile(net)
    t_done = time.perf_counter()
    out = quiet.getvalue()
    m = re.search(r"requires (\d+) bootstrap", out)
    result["bootstraps"] = int(m.group(1)) if m else None
    if result["bootstraps"]:
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


def _version(dist: str) -> str:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
