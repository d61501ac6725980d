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
