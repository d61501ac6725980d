"""Polynomial activations: exact reference functions and Chebyshev fits on calibrated ranges.

Coefficients are in numpy's ``chebval`` convention, as ``program.polynomials`` evaluates them.
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


def power_to_chebyshev(power_coeffs: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Re-express p(x) = sum a_k x^k in the Chebyshev basis of [lower, upper]."""
    # x = ((upper - lower) t + lower + upper) / 2, so compose p with that affine map in t.
    affine = np.polynomial.Polynomial([(lower + upper) / 2.0, (upper - lower) / 2.0])
    in_t = np.polynomial.Polynomial(np.asarray(power_coeffs, dtype=np.float64))(affine)
    return C.poly2cheb(in_t.coef)
