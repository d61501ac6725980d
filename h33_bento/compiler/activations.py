"""Polynomial activations: exact reference functions, Chebyshev fits on calibrated ranges, and
the multiplicative depth OpenFHE spends evaluating them.

Coefficients are kept in numpy's ``chebval`` convention (p = sum c_k T_k(t), t the input mapped
from [lower, upper] to [-1, 1]); OpenFHE's ``EvalChebyshevSeries`` halves c_0, so the runtime
doubles it (``to_openfhe_coeffs``).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import chebyshev as C

#: Default Chebyshev degree per activation kind when the compiler replaces it by itself.
#: ReLU has a kink, so it needs more terms than the smooth ones for the same accuracy.
DEFAULT_DEGREE = {
    "relu": 15,
    "relu6": 15,
    "sigmoid": 7,
    "tanh": 7,
    "gelu": 15,
    "silu": 15,
    "hardswish": 15,
    "hardsigmoid": 15,
}

# Upper degree bounds and the depth OpenFHE's EvalChebyshevSeries consumes for them (the affine
# map to [-1, 1] included).  Measured against openfhe 1.6.1; tests/test_ckks.py checks it.
_CHEB_DEPTH = ((2, 3), (5, 4), (13, 5), (27, 6), (59, 7), (119, 8), (247, 9), (495, 10), (1007, 11), (2031, 12))


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x)


def exact_activation(kind: str, x: np.ndarray) -> np.ndarray:
    """The real (non-polynomial) activation, for calibration and accuracy references."""
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "relu6":
        return np.clip(x, 0.0, 6.0)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if kind == "silu":
        return x / (1.0 + np.exp(-x))
    if kind == "hardsigmoid":
        return np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if kind == "hardswish":
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown activation {kind!r}")


def fit_chebyshev(kind: str, lower: float, upper: float, degree: int | None = None) -> np.ndarray:
    """Chebyshev interpolant of ``kind`` on [lower, upper] (numpy convention)."""
    if not upper > lower:
        raise ValueError(f"empty range [{lower}, {upper}] for {kind}")
    degree = DEFAULT_DEGREE[kind] if degree is None else degree
    nodes = np.cos(np.pi * (np.arange(4 * degree + 4) + 0.5) / (4 * degree + 4))
    xs = (nodes + 1.0) * (upper - lower) / 2.0 + lower
    return C.chebfit(nodes, exact_activation(kind, xs), degree)


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


def power_to_chebyshev(power_coeffs: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Re-express p(x) = sum a_k x^k in the Chebyshev basis of [lower, upper]."""
    # x = ((upper - lower) t + lower + upper) / 2, so compose p with that affine map in t.
    affine = np.polynomial.Polynomial([(lower + upper) / 2.0, (upper - lower) / 2.0])
    in_t = np.polynomial.Polynomial(np.asarray(power_coeffs, dtype=np.float64))(affine)
    return C.poly2cheb(in_t.coef)
