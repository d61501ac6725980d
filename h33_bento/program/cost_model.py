"""What each CKKS primitive costs at each level: drives layout, BSGS and fold choices and predictions.

A ``PrimitiveCosts`` table (``ckks.timing``) holds what was measured on the compiling machine:
milliseconds per primitive at each level of the modulus chain, and the serialized key sizes.
Level matters beyond the number of towers: hybrid key switching works on groups of towers
(digits), so a rotation costs the same at two adjacent levels and then drops in a step.
Without measurements (``measure_costs=False``, estimates of huge models) a static table of
relative costs (a top-level rotation = 1) scaled by the towers left stands in; it is only good
for choosing between schedules, not for predicting milliseconds.

The table is an input of compilation, not part of the program: a model's fingerprint never
depends on it, and ``CompiledModel.with_costs`` re-prices a program without changing it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..ckks.params import CKKSParams
from ..ckks.timing import BOOTSTRAP, CHEBYSHEV, PrimitiveCosts

#: Relative costs at the top level, measured with OpenFHE 1.6 at N=2^14, depth 5 (rotate = 1).
RELATIVE = {
    "rotate": 1.0,  # EvalRotate: digit decomposition + key switch + ModDown
    "precompute": 0.45,  # EvalFastRotationPrecompute: the digit decomposition (ModUp) alone
    "fast_rotate": 0.51,  # EvalFastRotation on precomputed digits (inner product + ModDown)
    "rotate_ext": 0.19,  # EvalFastRotationExt: inner product only, result kept in the P*Q basis
    "key_switch_down": 0.34,  # KeySwitchDown: ModDown of an extended-basis sum back to Q
    "add_ext": 0.016,
    "mult_plain": 0.033,
    "add": 0.013,
    "rescale": 0.05,
    "mult_cipher": 1.0,
    "mult_norelin": 0.09,  # EvalMultNoRelin: the tensor product alone (encrypted weights)
    "relinearize": 0.85,  # a key switch, like a rotation (measured on a loaded machine, 2026-12)
    "encode": 0.15,
    # one full-slot bootstrap, measured with OpenFHE 1.6 at N=2^16, depth 24 (where they run)
    "bootstrap": 400.0,
}

#: Top-level milliseconds per primitive by ring dimension (the rings 128-bit parameters use), for
#: predictions where nothing was measured on this machine (plan-only compiles, estimates of
#: networks too deep to run): ``measure_primitives(select_params(depth, 8), (2, 3, 4, 5, 7, 15),
#: repeat=3, max_levels=1)`` at the ``depth`` listed, OpenFHE 1.6, once on the project's 2-core AMD
#: EPYC VM while two other engineers' jobs kept it loaded (load average 3.6-5), so an idle machine
#: is faster.  ``bootstrap``: one full-slot bootstrap at N=2^16, depth 24 (57 s, docs/architecture.md).
STORED_MS: dict[int, dict[str, float]] = {
    1 << 14: {"depth": 5, "rotate": 23.95, "precompute": 10.86, "fast_rotate": 11.35, "rotate_ext": 4.07,
              "key_switch_down": 9.05, "add_ext": 0.262, "mult_plain": 1.035, "add": 0.357, "rescale": 4.63,
              "mult_cipher": 23.39, "encode": 3.77, "encrypt": 11.02, "decrypt": 3.77, "serialize_input": 0.77,
              "deserialize_input": 7.91, "serialize_output": 0.49, "deserialize_output": 5.68, "chebyshev_2": 40.2,
              "chebyshev_3": 70.3, "chebyshev_4": 99.4, "chebyshev_5": 114.6, "chebyshev_7": 204.3,
              "chebyshev_15": 279.7},
    1 << 15: {"depth": 14, "rotate": 142.4, "precompute": 93.8, "fast_rotate": 73.4, "rotate_ext": 24.19,
              "key_switch_down": 59.9, "add_ext": 2.12, "mult_plain": 3.93, "add": 1.82, "rescale": 27.9,
              "mult_cipher": 258.8, "encode": 22.5, "encrypt": 63.4, "decrypt": 9.69, "serialize_input": 6.25,
              "deserialize_input": 50.0, "serialize_output": 0.41, "deserialize_output": 31.3, "chebyshev_2": 336.2,
              "chebyshev_3": 617.5, "chebyshev_4": 875.7, "chebyshev_5": 1218.0, "chebyshev_7": 1394.4,
              "chebyshev_15": 2584.5},
    1 << 16: {"depth": 20, "rotate": 688.7, "precompute": 279.0, "fast_rotate": 383.2, "rotate_ext": 97.2,
              "key_switch_down": 299.4, "add_ext": 11.7, "mult_plain": 26.1, "add": 8.96, "rescale": 125.5,
              "mult_cipher": 721.7, "encode": 66.0, "encrypt": 206.9, "decrypt": 23.5, "serialize_input": 21.1,
              "deserialize_input": 163.8, "serialize_output": 1.12, "deserialize_output": 110.3, "chebyshev_2": 944.8,
              "chebyshev_3": 1953.5, "chebyshev_4": 2576.5, "chebyshev_5": 3194.8, "chebyshev_7": 4197.1,
              "chebyshev_15": 7246.1, "bootstrap": 57000.0},
}


def stored_costs(params: CKKSParams, chebyshev_degrees: tuple[int, ...] = ()) -> PrimitiveCosts | None:
    """A cost table for ``params`` from ``STORED_MS`` (None for a ring it lacks), for predictions only.

    Every figure is scaled by the towers ``params`` has against the depth measured (key switching
    grows somewhat faster, so deeper chains are under-predicted); a series of an unlisted degree
    is priced as the next listed degree up, or beyond the largest in proportion to its degree;
    every bootstrap as a full-slot one (sparse ones measured about 2.5x cheaper).  Key sizes
    come from the parameters (``CKKSParams.estimated_key_bytes``).
    """
    stored = STORED_MS.get(params.ring_dim)
    if stored is None:
        return None
    scale = (params.multiplicative_depth + 1) / (stored["depth"] + 1)
    ms = {name: value * scale for name, value in stored.items()
          if name not in ("depth", "bootstrap") and not name.startswith(CHEBYSHEV)}
    listed = sorted(int(name[len(CHEBYSHEV):]) for name in stored if name.startswith(CHEBYSHEV))
    for degree in chebyshev_degrees:
        up = next((d for d in listed if d >= degree), listed[-1])
        ms[f"{CHEBYSHEV}{degree}"] = stored[f"{CHEBYSHEV}{up}"] * max(degree / up, 1.0) * scale
    boot = params.bootstrapping
    if boot is not None and "bootstrap" in stored:
        ms.update({f"{BOOTSTRAP}{slots}": stored["bootstrap"] for slots in (*boot.slots, params.slots)})
    return PrimitiveCosts(params=params.cost_key, ms=ms, key_bytes=params.estimated_key_bytes())


#: Bytes of encoded plaintext diagonals an engine keeps by default (``Engine(cache_bytes=...)``);
#: plans price the diagonals beyond it as encoded on every run.
DEFAULT_CACHE_BYTES = 2 << 30


class CostModel:
    """Milliseconds (or relative units) of a primitive at a level; ``total`` prices an op count."""

    def __init__(self, costs: PrimitiveCosts | None, depth: int) -> None:
        self.costs = dict(costs.ms) if costs is not None else {}
        self.depth = max(int(depth), 1)
        levels = self.costs.get("levels")
        self._levels = np.asarray(levels, dtype=float) if levels else None

    @property
    def measured(self) -> bool:
        return bool(self.costs) and self._levels is not None

    def ms(self, name: str, level: int) -> float:
        """Cost of ``name`` on a ciphertext that has consumed ``level`` levels."""
        towers = self.depth + 1
        scale = max(towers - level, 1) / towers
        value = self.costs.get(name)
        if name.startswith(BOOTSTRAP):  # one cost per ciphertext, whatever the input level
            if isinstance(value, (int, float)):
                return float(value)
            return float("nan") if self.measured else RELATIVE["bootstrap"]
        if isinstance(value, (list, tuple)) and self._levels is not None:
            return float(np.interp(level, self._levels, np.asarray(value, dtype=float)))
        if isinstance(value, (int, float)):  # measured once at the top level
            return float(value) * scale
        if name.startswith(CHEBYSHEV):  # not measured for this degree: no estimate
            return float("nan")
        return RELATIVE.get(name, 0.0) * scale

    def total(self, counts: Mapping[str, int], level: int) -> float:
        """The price of ``counts`` (primitive name -> how many) at ``level``; other entries are ignored."""
        return sum(self.ms(name, level) * count for name, count in counts.items()
                   if name in RELATIVE or name.startswith((CHEBYSHEV, BOOTSTRAP)))
