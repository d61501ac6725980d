"""Measured costs of the CKKS primitives on this machine: the input of layout, BSGS and fold
choices, of predictions and of overhead checks.

Measured once per parameter set with a throwaway key (its secret key never leaves this
function).  Every primitive the engine uses is timed at each level of the modulus chain (at most
``max_levels`` of them, evenly spread, for deep chains; the cost model interpolates between),
because key-switching costs fall in steps as levels are consumed.  The result is a
``PrimitiveCosts`` table, passed to ``compile(costs=...)`` or measured by it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .params import CKKSParams

#: Prefix of a Chebyshev series' cost (``chebyshev_<degree>``, measured from the top level).
CHEBYSHEV = "chebyshev_"
#: Prefix of a bootstrap's cost per ciphertext (``bootstrap_<slots>``; the same at any input level).
BOOTSTRAP = "bootstrap_"

# A run streams its rotation keys and plaintext diagonals from memory (hundreds of MiB); timing
# one key and a few plaintexts would time them hot in the last-level cache (32 MiB here) and
# under-predict.  The operand pools below are sized to exceed this many bytes.
STREAMED_BYTES = 96 << 20


def _time_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median of ``repeat`` timings after one warm-up: what a run typically pays, not its best case."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def _per_op_ms(op: Callable[[int], object], repeat: int, batch: int = 4) -> float:
    """Milliseconds per call of ``op(i)`` (``i`` picks the operands), timed in batches whose
    results are all kept alive, as a program keeps its rotated copies and partial products (fresh
    allocations cost ~10% more than a result freed and reused at once); the median over
    ``repeat`` batches."""
    op(0)
    times = []
    for r in range(repeat):
        kept = []
        t0 = time.perf_counter()
        for i in range(1 + r * batch, 1 + (r + 1) * batch):  # i keeps counting: fresh operands
            kept.append(op(i))
        times.append((time.perf_counter() - t0) * 1000.0 / batch)
        del kept
    return float(np.median(times))


def _pool_size(item_bytes: int, least: int, most: int) -> int:
    """How many distinct operands of ``item_bytes`` each exceed ``STREAMED_BYTES`` together."""
    return int(min(most, max(least, -(-STREAMED_BYTES // max(item_bytes, 1)))))


def _levels(depth: int, max_levels: int) -> list[int]:
    if depth <= max_levels:
        return list(range(depth))
    return sorted({int(round(x)) for x in np.linspace(0, depth - 1, max_levels)})


@dataclass(frozen=True)
class PrimitiveCosts:
    """Measured costs for one parameter set on one machine.

    ``ms["levels"]`` lists the levels measured; each per-level primitive maps to a list of
    milliseconds, one per listed level; ``encrypt`` (a fresh ciphertext), ``decrypt`` (and decode,
    at the output level), the (de)serialization of an input and of an output ciphertext and
    ``chebyshev_<d>`` (from the top level) are single numbers.  ``key_bytes`` holds serialized
    sizes (``public``, ``mult``, one ``rotation`` key, a ``ciphertext``).  ``params`` is the
    ``CKKSParams.cost_key`` of the parameters measured (their rotations do not matter).
    """

    params: str
    ms: Mapping[str, Any] = field(default_factory=dict)
    key_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def chebyshev_degrees(self) -> tuple[int, ...]:
        return tuple(sorted(int(k[len(CHEBYSHEV):]) for k in self.ms if k.startswith(CHEBYSHEV)))

    def covers(self, params: CKKSParams, chebyshev_degrees: tuple[int, ...] = ()) -> bool:
        """Were these costs measured for ``params``, with every one of these series degrees?"""
        return self.params == params.cost_key and set(chebyshev_degrees) <= set(self.chebyshev_degrees)

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "ms": dict(self.ms), "key_bytes": dict(self.key_bytes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PrimitiveCosts":
        return cls(params=str(data["params"]), ms=dict(data.get("ms", {})), key_bytes=dict(data.get("key_bytes", {})))


def measure_primitives(params: CKKSParams, chebyshev_degrees: tuple[int, ...] = (), repeat: int = 5,
                       max_levels: int = 12) -> PrimitiveCosts:
    """Time every primitive the engine uses for ``params`` on this machine (a few seconds)."""
    import openfhe

    from .context import get_context

    cc = get_context(params)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    tag = keys.publicKey.GetKeyTag()
    cc.EvalRotateKeyGen(keys.secretKey, [params.lanes])
    key_bytes = len(openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag))
    # every rotation of a program uses its own key: cycle through enough of them
    steps = [params.lanes * (k + 1) for k in range(_pool_size(key_bytes, 2, 8))]
    cc.EvalRotateKeyGen(keys.secretKey, steps[1:])
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, params.slots)
    m = cc.GetCyclotomicOrder()
    fresh = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(values))
    levels = _levels(params.multiplicative_depth, max_levels)
    per_level: dict[str, list[float]] = {}
    # a program multiplies many rotated copies by many diagonals, each encoded from its own values
    vectors = [rng.uniform(-1, 1, params.slots) for _ in range(_pool_size(params.plaintext_bytes(0), 4, 48))]
    for level in levels:
        pts = [cc.MakeCKKSPackedPlaintext(v, 1, level) for v in vectors]
        ct = fresh if level == 0 else cc.Compress(fresh, params.multiplicative_depth + 1 - level)
        cts = [ct] + [cc.EvalAdd(ct, ct) for _ in vectors[1:]]
        product = cc.EvalMult(ct, pts[0])  # scale degree 2, as the partial sums of a linear transform are
        digits = cc.EvalFastRotationPrecompute(product)
        ext = cc.EvalFastRotationExt(product, steps[0], digits, True)
        total, total_ext = cc.EvalMult(ct, pts[0]), cc.EvalFastRotationExt(product, steps[0], digits, True)
        tensor = cc.EvalMultNoRelin(ct, ct)  # three elements, as the products of encrypted weights
        timings = {  # each as the engine calls it
            "rotate": lambda i: cc.EvalRotate(product, steps[i % len(steps)]),
            "precompute": lambda i: cc.EvalFastRotationPrecompute(product),
            "fast_rotate": lambda i: cc.EvalFastRotation(product, steps[i % len(steps)], m, digits),
            "rotate_ext": lambda i: cc.EvalFastRotationExt(product, steps[i % len(steps)], digits, True),
            "key_switch_down": lambda i: cc.KeySwitchDown(ext),
            "add_ext": lambda i: cc.EvalAddInPlace(total_ext, ext),
            "mult_plain": lambda i: cc.EvalMult(cts[i % len(cts)], pts[(i + 1) % len(pts)]),
            "add": lambda i: cc.EvalAddInPlace(total, product),
            "rescale": lambda i: cc.Compress(product, params.multiplicative_depth - level),  # as Engine._rescale
            "mult_cipher": lambda i: cc.EvalMult(ct, ct),
            "mult_norelin": lambda i: cc.EvalMultNoRelin(cts[i % len(cts)], cts[(i + 1) % len(cts)]),  # weights
            "relinearize": lambda i: cc.Relinearize(tensor),  # once per partial sum of encrypted weights
            "encode": lambda i: cc.MakeCKKSPackedPlaintext(vectors[i % len(vectors)], 1, level),
        }
        for name, fn in timings.items():
            per_level.setdefault(name, []).append(round(_per_op_ms(fn, repeat), 4))
    costs: dict[str, Any] = {"levels": levels, **per_level}
    pt = cc.MakeCKKSPackedPlaintext(values)
    last = cc.Compress(fresh, 1)  # the last level, where outputs are decrypted
    blobs = {"input": openfhe.Serialize(fresh, openfhe.BINARY), "output": openfhe.Serialize(last, openfhe.BINARY)}

    def decrypt() -> None:
        out = cc.Decrypt(last, keys.secretKey)
        out.SetLength(params.slots)
        out.GetRealPackedValue()

    costs.update({  # the client's and the wire's share of a request, per ciphertext
        "encrypt": _time_ms(lambda: cc.Encrypt(keys.secretKey, pt), repeat),  # as KeyChain.encrypt_slots
        "decrypt": _time_ms(decrypt, repeat),  # and decode, at the output level
        "serialize_input": _time_ms(lambda: openfhe.Serialize(fresh, openfhe.BINARY), repeat),
        "deserialize_input": _time_ms(lambda: openfhe.DeserializeCiphertextString(blobs["input"], openfhe.BINARY),
                                      repeat),
        "serialize_output": _time_ms(lambda: openfhe.Serialize(last, openfhe.BINARY), repeat),
        "deserialize_output": _time_ms(lambda: openfhe.DeserializeCiphertextString(blobs["output"], openfhe.BINARY),
                                       repeat),
    })
    for degree in sorted(set(chebyshev_degrees)):
        coeffs = [0.1] * (degree + 1)
        costs[f"{CHEBYSHEV}{degree}"] = _time_ms(lambda: cc.EvalChebyshevSeries(fresh, coeffs, -1.0, 1.0), 1)
    sizes = {
        "public": len(openfhe.Serialize(keys.publicKey, openfhe.BINARY)),
        "mult": len(openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag)),
        "rotation": key_bytes,
        "ciphertext": len(openfhe.Serialize(fresh, openfhe.BINARY)),
    }
    return PrimitiveCosts(params=params.cost_key, key_bytes=sizes,
                          ms={k: (round(v, 4) if isinstance(v, float) else v) for k, v in costs.items()})


# ------------------------------------------------------------------------------ bootstrapping
def bootstrap_bound(params: CKKSParams) -> float:
    """The magnitude every slot must stay within at a bootstrap's input.

    OpenFHE's modular reduction is accurate while values stay well below 2^(first - scale) (the
    first modulus over the scale): measured at N=2^12, the error stays at about 2e-4 up to 64
    and grows tenfold by 200 with 58/50 bits.  A factor 8 of headroom below that edge.
    """
    return 2.0 ** (params.first_mod_bits - params.scale_bits - 3)


def _bootstrap_cache(params: CKKSParams, slots: int) -> Path | None:
    root = os.environ.get("H33_CACHE_DIR", str(Path.home() / ".cache" / "h33-bento"))
    if not root:
        return None
    key = hashlib.sha256(f"{params.cost_key}:{slots}".encode()).hexdigest()[:32]
    return Path(root) / "bootstrap" / f"{key}.json"


def measure_bootstrap(params: CKKSParams, slots: int, refresh: bool = False) -> dict[str, float]:
    """What one bootstrap at ``slots`` slots costs here: ``ms`` per ciphertext, ``levels_after``
    (the depth-1 operations a bootstrapped ciphertext still allows, counted by running them),
    ``error`` (max absolute error on values spread over +-``bound``), ``bound``, and ``keys``
    (the rotation keys its setup needs).

    Measured in a child process: the throwaway keys and precomputations take gigabytes at
    N=2^16, and OpenFHE cannot free one key's evaluation keys without dropping everyone's.  The
    result is cached per machine and parameter set under ``$H33_CACHE_DIR`` (default
    ``~/.cache/h33-bento``; empty disables the cache); ``refresh`` measures again.
    """
    cache = _bootstrap_cache(params, slots)
    if cache is not None and cache.is_file() and not refresh:
        return json.loads(cache.read_text())
    request = json.dumps({"params": params.model_dump(mode="json"), "slots": slots})
    done = subprocess.run([sys.executable, "-m", "h33_bento.ckks.timing"], input=request, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring a bootstrap failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.part")
        partial.write_text(json.dumps(result))
        os.replace(partial, cache)
    return result


def with_bootstrap(costs: PrimitiveCosts, params: CKKSParams, slots: int) -> PrimitiveCosts:
    """``costs`` plus a bootstrap at ``slots`` slots (``bootstrap_<slots>`` in ms per ciphertext,
    and under ``bootstraps``: the levels one leaves, its input bound and its error per slot count)."""
    if f"{BOOTSTRAP}{slots}" in costs.ms:
        return costs
    measured = measure_bootstrap(params, slots)
    stats = dict(costs.ms.get("bootstraps") or {})
    stats.update(levels_after=measured["levels_after"], bound=measured["bound"],
                 error={**stats.get("error", {}), str(slots): measured["error"]},
                 keys={**stats.get("keys", {}), str(slots): measured["keys"]})
    return PrimitiveCosts(params=costs.params, key_bytes=costs.key_bytes,
                          ms={**costs.ms, f"{BOOTSTRAP}{slots}": round(measured["ms"], 1), "bootstraps": stats})


def _measure_bootstrap_here(params: CKKSParams, slots: int, repeat: int = 2) -> dict[str, float]:
    import openfhe

    from .context import bootstrap_context

    boot = params.bootstrapping.model_copy(update={"slots": (slots,)})
    params = params.model_copy(update={"bootstrapping": boot, "rotation_indices": ()})
    cc = bootstrap_context(params, precompute=True)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    cc.EvalBootstrapKeyGen(keys.secretKey, slots)
    depth, bound = params.multiplicative_depth, bootstrap_bound(params)
    values = np.tile(np.random.default_rng(0).uniform(-bound, bound, slots), params.slots // slots)
    # as deep as a bootstrap's input may be: two towers (OpenFHE's bootstrap drops one itself)
    ct = cc.Compress(cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(values)), 2)
    ct.SetSlots(slots)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = cc.EvalBootstrap(ct)
        times.append((time.perf_counter() - t0) * 1000.0)
    out.SetSlots(params.slots)
    ones = np.ones(params.slots)
    levels, cur = 0, out
    while True:  # depth-1 operations as the engine runs them: rescale, then multiply
        if cur.GetNoiseScaleDeg() > 1:
            cur = cc.Compress(cur, depth - cur.GetLevel())
        if cur.GetLevel() >= depth:
            break
        cur = cc.EvalMult(cur, cc.MakeCKKSPackedPlaintext(ones, 1, cur.GetLevel()))
        levels += 1

    def error(ciphertext: Any) -> float:
        pt = cc.Decrypt(ciphertext, keys.secretKey)
        pt.SetLength(params.slots)
        return float(np.abs(np.asarray(pt.GetRealPackedValue()) - values).max())

    return {"ms": float(np.median(times)), "levels_after": levels, "error": error(out),
            "error_after_levels": error(cur), "bound": bound,
            "keys": len(cc.GetExistingEvalAutomorphismKeyIndices(keys.publicKey.GetKeyTag()))}


if __name__ == "__main__":  # the child process of measure_bootstrap
    request = json.loads(sys.stdin.read())
    print(json.dumps(_measure_bootstrap_here(CKKSParams.model_validate(request["params"]), int(request["slots"]))))
