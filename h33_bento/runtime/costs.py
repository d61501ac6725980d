"""Measured costs of the CKKS primitives on this machine, for plan predictions and overhead checks.

Measured once per parameter set with a throwaway key (its secret key never leaves this
function), at the top level; the plan scales them down as levels are consumed.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import openfhe

from ..ckks.context import get_context
from ..ckks.params import CKKSParams
from ..compiler.activations import to_openfhe_coeffs


def _time_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1000.0)
    return best


def measure_primitives(params: CKKSParams, chebyshev_degrees: tuple[int, ...] = (), repeat: int = 3) -> tuple[dict[str, float], dict[str, int]]:
    """Return (milliseconds per primitive, serialized key sizes in bytes)."""
    cc = get_context(params)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    step = params.lanes
    cc.EvalRotateKeyGen(keys.secretKey, [step])
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, params.slots)
    pt = cc.MakeCKKSPackedPlaintext(values)
    ct = cc.Encrypt(keys.publicKey, pt)
    pre = cc.EvalFastRotationPrecompute(ct)
    m = cc.GetCyclotomicOrder()
    costs = {
        "rotate": _time_ms(lambda: cc.EvalRotate(ct, step), repeat),
        "precompute": _time_ms(lambda: cc.EvalFastRotationPrecompute(ct), repeat),
        "fast_rotate": _time_ms(lambda: cc.EvalFastRotation(ct, step, m, pre), repeat),
        "mult_plain": _time_ms(lambda: cc.EvalMult(ct, pt), repeat * 5),
        "add": _time_ms(lambda: cc.EvalAdd(ct, ct), repeat * 5),
        "mult_cipher": _time_ms(lambda: cc.EvalMult(ct, ct), repeat),
        "encode": _time_ms(lambda: cc.MakeCKKSPackedPlaintext(values), repeat),
        "encrypt": _time_ms(lambda: cc.Encrypt(keys.publicKey, pt), repeat),
        "decrypt": _time_ms(lambda: cc.Decrypt(ct, keys.secretKey), repeat),
    }
    for degree in sorted(set(chebyshev_degrees)):
        coeffs = to_openfhe_coeffs(np.full(degree + 1, 0.1))
        costs[f"chebyshev_{degree}"] = _time_ms(lambda: cc.EvalChebyshevSeries(ct, coeffs, -1.0, 1.0), 1)
    tag = keys.publicKey.GetKeyTag()
    sizes = {
        "public": len(openfhe.Serialize(keys.publicKey, openfhe.BINARY)),
        "mult": len(openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag)),
        "rotation": len(openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag)),
        "ciphertext": len(openfhe.Serialize(ct, openfhe.BINARY)),
    }
    return {k: round(v, 4) for k, v in costs.items()}, sizes
