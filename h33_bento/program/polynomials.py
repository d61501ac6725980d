"""Chebyshev series as a program evaluates them: in plaintext, in OpenFHE, and the levels they spend.

Coefficients are kept in numpy's ``chebval`` convention (p = sum c_k T_k(t), t the input mapped
from [lower, upper] to [-1, 1]); OpenFHE's ``EvalChebyshevSeries`` halves c_0, so the engine
doubles it (``to_openfhe_coeffs``).
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev as C

# Upper degree bounds and the depth OpenFHE's EvalChebyshevSeries consumes for them (the affine
# map to [-1, 1] included).  Measured against openfhe 1.6.1; tests/test_ckks.py checks it.
_CHEB_DEPTH = ((2, 3), (5, 4), (13, 5), (27, 6), (59, 7), (119, 8), (247, 9), (495, 10), (1007, 11), (2031, 12))


def eval_chebyshev(coeffs: np.ndarray, lower: float, upper: float, x: np.ndarray) -> np.ndarray:
    """Evaluate the series exactly as OpenFHE does, in plaintext."""
    t = (2.0 * x - lower - upper) / (upper - lower)
    return C.chebval(t, np.asarray(coeffs, dtype=np.float64))


def to_openfhe_coeffs(coeffs: np.ndarray) -> list[float]:
    """OpenFHE evaluates c0/2 + sum c_k T_k, so c0 is doubled."""
    out = [float(c) for c in coeffs]
    out[0] *= 2.0
    return out


def chebyshev_depth(degree: int, lower: float = 0.0, upper: float = 0.0) -> int:
    """Levels EvalChebyshevSeries consumes for a series of this degree on [lower, upper].

    OpenFHE skips the affine map (and its level) when the range is exactly [-1, 1].
    """
    identity_map = 1 if (lower, upper) == (-1.0, 1.0) else 0
    for bound, depth in _CHEB_DEPTH:
        if degree <= bound:
            return depth - identity_map
    raise ValueError(f"Chebyshev degree {degree} is too large")
