"""Measured costs of the CKKS primitives on this machine: the input of layout, BSGS and fold
choices, of predictions and of overhead checks.

Measured with a throwaway key (its secret key never leaves this module).  Every primitive the
engine uses is timed at each level of the modulus chain (at most ``max_levels`` of them, evenly
spread, for deep chains; the cost model interpolates between), because key-switching costs fall
in steps as levels are consumed.  Each figure is the fastest of a few samples, within a time
budget: a busy machine only ever adds time.  The result is a ``PrimitiveCosts`` table, passed to
``compile(costs=...)`` or taken by it from this machine's cost cache (``cached_primitives``:
measured once per machine and parameter set, under ``$H33_CACHE_DIR``), as bootstraps are.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
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


def _fastest_ms(op: Callable[[int], object], budget_s: float, batch: int = 4, least: int = 2,
                most: int = 5) -> float:
    """Milliseconds per call of ``op(i)`` (``i`` picks the operands): the fastest of ``least`` to
    ``most`` samples, sampling stopped once ``budget_s`` is spent.

    Each sample times ``batch`` calls whose results are all kept alive, as a program keeps its
    rotated copies and partial products (fresh allocations cost ~10% more than a result freed
    and reused at once); a costly ``op`` gets smaller batches to fit the budget.  The fastest
    sample, not the median: other processes on the cores only ever add time, so the fastest is
    the closest to what the primitive costs this machine (on the shared 2-core VM it priced the
    ConvNet at 0.45-0.81x the median of the same samples; docs/benchmarks.md, "Honest
    predictions").  Load that lasts through every sample still inflates it: tables record it.
    """
    t0 = time.perf_counter()
    op(0)  # warm-up, and a first guess at the cost
    first = time.perf_counter() - t0
    batch = int(max(1, min(batch, budget_s / (least * max(first, 1e-9)))))
    samples: list[float] = []
    i, start = 1, time.perf_counter()
    while len(samples) < most and (len(samples) < least or time.perf_counter() - start < budget_s):
        kept = []
        t0 = time.perf_counter()
        for _ in range(batch):
            kept.append(op(i))  # i keeps counting: fresh operands
            i += 1
        samples.append((time.perf_counter() - t0) * 1000.0 / batch)
        del kept
    return _estimate(samples)


def _estimate(samples: list[float]) -> float:
    """What a table records of one primitive's samples (see ``_fastest_ms``)."""
    return float(min(samples))


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
    ``origin`` says where the table came from: ``"measured"`` in this process, or ``"cached"``
    (this machine's cost cache, ``cached_primitives``); ``measured_at`` when (UTC, ISO 8601),
    ``load`` the machine's 1-minute load average then (over its core count, the figures are
    inflated by other processes: see ``busy``).
    """

    params: str
    ms: Mapping[str, Any] = field(default_factory=dict)
    key_bytes: Mapping[str, int] = field(default_factory=dict)
    origin: str = "measured"
    measured_at: str = ""
    load: float = 0.0

    @property
    def busy(self) -> bool:
        """Measured while other processes wanted more CPUs than there are (load above cores)?"""
        return self.load > (os.cpu_count() or 1)

    @property
    def chebyshev_degrees(self) -> tuple[int, ...]:
        return tuple(sorted(int(k[len(CHEBYSHEV):]) for k in self.ms if k.startswith(CHEBYSHEV)))

    def covers(self, params: CKKSParams, chebyshev_degrees: tuple[int, ...] = ()) -> bool:
        """Were these costs measured for ``params``, with every one of these series degrees?"""
        return self.params == params.cost_key and set(chebyshev_degrees) <= set(self.chebyshev_degrees)

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "ms": dict(self.ms), "key_bytes": dict(self.key_bytes),
                "origin": self.origin, "measured_at": self.measured_at, "load": self.load}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PrimitiveCosts":
        return cls(params=str(data["params"]), ms=dict(data.get("ms", {})), key_bytes=dict(data.get("key_bytes", {})),
                   origin=str(data.get("origin", "measured")), measured_at=str(data.get("measured_at", "")),
                   load=float(data.get("load", 0.0)))


#: The primitives ``measure_primitives`` times at every measured level.
PER_LEVEL = ("rotate", "precompute", "fast_rotate", "rotate_ext", "key_switch_down", "add_ext", "mult_plain", "add",
             "rescale", "mult_cipher", "mult_norelin", "relinearize", "encode")
#: The client's and the wire's primitives, timed once per table.
ONCE = ("encrypt", "decrypt", "serialize_input", "deserialize_input", "serialize_output", "deserialize_output")


def measure_primitives(params: CKKSParams, chebyshev_degrees: tuple[int, ...] = (), repeat: int = 5,
                       max_levels: int = 12, budget_s: float = 30.0) -> PrimitiveCosts:
    """Time every primitive the engine uses for ``params`` on this machine.

    Each primitive gets the fastest of at most ``repeat`` samples (``_fastest_ms``); ``budget_s``
    is shared out among them and stops their sampling early, though each still gets a warm-up
    and two samples, and one once the budget is spent (a few seconds at N=2^14 on an idle
    machine; on a busy one the budget is exceeded by about the time of two calls of each).
    """
    import openfhe

    from .context import get_context

    load = os.getloadavg()[0]  # before this measurement adds to it
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
    share = budget_s / (len(levels) * len(PER_LEVEL) + len(ONCE) + len(set(chebyshev_degrees)))
    deadline = time.perf_counter() + budget_s

    def fastest(op: Callable[[int], object], **kw: Any) -> float:
        least = 2 if time.perf_counter() < deadline else 1
        return round(_fastest_ms(op, share, least=least, most=max(least, repeat), **kw), 4)

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
        for name in PER_LEVEL:
            per_level.setdefault(name, []).append(fastest(timings[name]))
    # a level has fewer towers than the one before, so no primitive costs more there: a higher
    # figure is a load spike while that level was timed (one over-predicted the ConvNet's last
    # layer 8.7x, docs/benchmarks.md), and the level before bounds it
    costs: dict[str, Any] = {"levels": levels, **{name: np.minimum.accumulate(v).tolist()
                                                  for name, v in per_level.items()}}
    pt = cc.MakeCKKSPackedPlaintext(values)
    last = cc.Compress(fresh, 1)  # the last level, where outputs are decrypted
    blobs = {"input": openfhe.Serialize(fresh, openfhe.BINARY), "output": openfhe.Serialize(last, openfhe.BINARY)}

    def decrypt() -> None:
        out = cc.Decrypt(last, keys.secretKey)
        out.SetLength(params.slots)
        out.GetRealPackedValue()

    once = {  # the client's and the wire's share of a request, per ciphertext
        "encrypt": lambda i: cc.Encrypt(keys.secretKey, pt),  # as KeyChain.encrypt_slots
        "decrypt": lambda i: decrypt(),  # and decode, at the output level
        "serialize_input": lambda i: openfhe.Serialize(fresh, openfhe.BINARY),
        "deserialize_input": lambda i: openfhe.DeserializeCiphertextString(blobs["input"], openfhe.BINARY),
        "serialize_output": lambda i: openfhe.Serialize(last, openfhe.BINARY),
        "deserialize_output": lambda i: openfhe.DeserializeCiphertextString(blobs["output"], openfhe.BINARY),
    }
    costs.update({name: fastest(once[name], batch=1) for name in ONCE})
    costs.update(_chebyshev_ms(fastest, cc, fresh, chebyshev_degrees))
    sizes = {
        "public": len(openfhe.Serialize(keys.publicKey, openfhe.BINARY)),
        "mult": len(openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag)),
        "rotation": key_bytes,
        "ciphertext": len(openfhe.Serialize(fresh, openfhe.BINARY)),
    }
    return PrimitiveCosts(params=params.cost_key, key_bytes=sizes, measured_at=_now(), load=round(load, 2),
                          ms={k: (round(v, 4) if isinstance(v, float) else v) for k, v in costs.items()})


def _chebyshev_ms(fastest: Callable[..., float], cc: Any, fresh: Any, degrees: tuple[int, ...]) -> dict[str, float]:
    """``chebyshev_<d>``: a series of each degree from the top level (``fresh``), timed by ``fastest``."""
    out = {}
    for degree in sorted(set(degrees)):
        coeffs = [0.1] * (degree + 1)
        out[f"{CHEBYSHEV}{degree}"] = fastest(lambda i: cc.EvalChebyshevSeries(fresh, coeffs, -1.0, 1.0), batch=1)
    return out


def measure_chebyshev(params: CKKSParams, degrees: tuple[int, ...], repeat: int = 5,
                      budget_s: float = 10.0) -> dict[str, float]:
    """``chebyshev_<d>`` costs alone, for a cached table that lacks some degrees."""
    from .context import get_context

    cc = get_context(params)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    values = np.random.default_rng(0).uniform(-1, 1, params.slots)
    fresh = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(values))
    share = budget_s / max(len(set(degrees)), 1)
    return _chebyshev_ms(lambda op, **kw: round(_fastest_ms(op, share, most=repeat, **kw), 4), cc, fresh, degrees)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ the cache
#: Bump when what ``measure_primitives`` or ``measure_bootstrap`` measures, or how, changes:
#: tables cached by older code are then measured again.
MEASUREMENT_VERSION = 2


def machine_key() -> dict[str, str]:
    """What the speed of a measurement depends on besides the parameters: the CPU, how many
    cores and OpenMP threads, the OpenFHE build, and how it was measured."""
    import openfhe

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": str(os.cpu_count()), "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "openfhe": str(getattr(openfhe, "__version__", "")), "method": str(MEASUREMENT_VERSION)}


def cache_path(kind: str, key: str) -> Path | None:
    """This machine's cache file for ``key`` (a ``cost_key``, or one with a slot count) under
    ``$H33_CACHE_DIR/<kind>/`` (default ``~/.cache/h33-bento``; empty disables the cache)."""
    root = os.environ.get("H33_CACHE_DIR", str(Path.home() / ".cache" / "h33-bento"))
    if not root:
        return None
    digest = hashlib.sha256(json.dumps({"key": key, **machine_key()}, sort_keys=True).encode()).hexdigest()[:32]
    return Path(root) / kind / f"{digest}.json"


def _read_cache(path: Path | None) -> dict[str, Any] | None:
    """A cache entry, or None (with a warning) when it is unreadable: it is measured again then."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    except (OSError, ValueError):
        pass
    warnings.warn(f"ignoring the unreadable cost cache entry {path}; measuring again", RuntimeWarning, stacklevel=3)
    return None


def _write_cache(path: Path | None, data: Mapping[str, Any]) -> None:
    """Write atomically (readers never see half a file); a cache that cannot be written is skipped."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)
    except OSError as exc:
        warnings.warn(f"could not write the cost cache entry {path}: {exc}", RuntimeWarning, stacklevel=3)


def cached_primitives(params: CKKSParams, chebyshev_degrees: tuple[int, ...] = (),
                      remeasure: bool = False) -> PrimitiveCosts:
    """``measure_primitives`` once per machine and parameter set: later calls read this
    machine's cache (``origin="cached"``); ``remeasure`` measures again and replaces the entry.
    Series degrees the entry lacks are measured and added to it."""
    path = cache_path("costs", params.cost_key)
    costs = None
    data = None if remeasure else _read_cache(path)
    if data is not None:
        try:
            costs = replace(PrimitiveCosts.from_json(data), origin="cached")
            if costs.params != params.cost_key or not all(name in costs.ms for name in (*PER_LEVEL, *ONCE)):
                raise ValueError("an entry for other parameters, or incomplete")
        except (KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"ignoring the cost cache entry {path} ({exc}); measuring again", RuntimeWarning,
                          stacklevel=2)
            costs = None
    if costs is None:
        costs = measure_primitives(params, chebyshev_degrees)
    elif not costs.covers(params, chebyshev_degrees):
        missing = tuple(sorted(set(chebyshev_degrees) - set(costs.chebyshev_degrees)))
        costs = replace(costs, ms={**costs.ms, **measure_chebyshev(params, missing)})
    else:
        return costs
    _write_cache(path, {**costs.to_json(), "origin": "measured"})
    return costs


# ------------------------------------------------------------------------------ bootstrapping
def bootstrap_bound(params: CKKSParams) -> float:
    """The magnitude every slot must stay within at a bootstrap's input.

    OpenFHE's modular reduction is accurate while values stay well below 2^(first - scale) (the
    first modulus over the scale): measured at N=2^12, the error stays at about 2e-4 up to 64
    and grows tenfold by 200 with 58/50 bits.  A factor 8 of headroom below that edge.
    """
    return 2.0 ** (params.first_mod_bits - params.scale_bits - 3)


def measure_bootstrap(params: CKKSParams, slots: int, refresh: bool = False) -> dict[str, float]:
    """What one bootstrap at ``slots`` slots costs here: ``ms`` per ciphertext, ``levels_after``
    (the depth-1 operations a bootstrapped ciphertext still allows, counted by running them),
    ``error`` (max absolute error on values spread over +-``bound``), ``bound``, ``keys``
    (the rotation keys its setup needs) and ``precompute_bytes`` (the resident memory its
    precomputations take: what a server holds per slot count besides the keys).

    Measured in a child process: the throwaway keys and precomputations take gigabytes at
    N=2^16, and OpenFHE cannot free one key's evaluation keys without dropping everyone's.  The
    result is cached per machine and parameter set (``cache_path``); ``refresh`` measures again.
    """
    cache = cache_path("bootstrap", f"{params.cost_key}:{slots}")
    cached = None if refresh else _read_cache(cache)
    if cached is not None and all(k in cached for k in ("ms", "levels_after", "error", "bound", "keys",
                                                                  "precompute_bytes")):
        return cached
    request = json.dumps({"params": params.model_dump(mode="json"), "slots": slots})
    done = subprocess.run([sys.executable, "-m", "h33_bento.ckks.timing"], input=request, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring a bootstrap failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    _write_cache(cache, result)
    return result


def with_bootstrap(costs: PrimitiveCosts, params: CKKSParams, slots: int, refresh: bool = False) -> PrimitiveCosts:
    """``costs`` plus a bootstrap at ``slots`` slots (``bootstrap_<slots>`` in ms per ciphertext,
    and under ``bootstraps``: the levels one leaves, its input bound and its error per slot count);
    ``refresh`` measures it again rather than reading this machine's cache."""
    if f"{BOOTSTRAP}{slots}" in costs.ms:
        return costs
    measured = measure_bootstrap(params, slots, refresh)
    stats = dict(costs.ms.get("bootstraps") or {})
    stats.update(levels_after=measured["levels_after"], bound=measured["bound"],
                 error={**stats.get("error", {}), str(slots): measured["error"]},
                 keys={**stats.get("keys", {}), str(slots): measured["keys"]},
                 precompute={**stats.get("precompute", {}), str(slots): measured["precompute_bytes"]})
    return replace(costs, ms={**costs.ms, f"{BOOTSTRAP}{slots}": round(measured["ms"], 1), "bootstraps": stats})


def _measure_bootstrap_here(params: CKKSParams, slots: int, repeat: int = 2) -> dict[str, float]:
    import openfhe

    from .context import bootstrap_context, get_context, rss_bytes

    boot = params.bootstrapping.model_copy(update={"slots": (slots,)})
    params = params.model_copy(update={"bootstrapping": boot, "rotation_indices": ()})
    get_context(params)
    before = rss_bytes()
    cc = bootstrap_context(params, precompute=True)
    precompute = max(0, rss_bytes() - before)
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
            "keys": len(cc.GetExistingEvalAutomorphismKeyIndices(keys.publicKey.GetKeyTag())),
            "precompute_bytes": precompute}


if __name__ == "__main__":  # the child process of measure_bootstrap
    request = json.loads(sys.stdin.read())
    print(json.dumps(_measure_bootstrap_here(CKKSParams.model_validate(request["params"]), int(request["slots"]))))
