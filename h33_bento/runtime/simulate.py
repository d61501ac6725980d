"""Exact plaintext execution of a compiled program: same layouts, diagonals, folds and polynomials.

It is what the encrypted engine computes minus the CKKS noise, fast enough to check accuracy on
whole test sets.  Lane vectors are numpy rows; each step is its op's plaintext evaluation
(``OpSpec.evaluate``), rotations are ``np.roll``.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import RangeWarning
from ..program.model import CompiledModel
from ..program.ops import OPS
from ..program.packing import pack, unpack


def run_vectors(model: CompiledModel, vec: np.ndarray) -> np.ndarray:
    """Run the program on packed lane vectors (B, blocks, n), warning (``RangeWarning``) where a
    step's check fails, e.g. a value a bootstrap could not handle."""
    values = {model.input_name: vec}
    for step in model.steps:
        spec = OPS[step.op]
        args = [values[i] for i in step.inputs]
        problem = spec.check(step, args) if spec.check is not None else None
        if problem:
            warnings.warn(f"step {step.name!r}: {problem}", RangeWarning, stacklevel=3)
        values[step.name] = spec.evaluate(step, args)
    return values[model.output]


def simulate(model: CompiledModel, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of the compiled program on inputs ``x`` of shape (B, *input_shape) or one input."""
    x = np.asarray(x, dtype=np.float64)
    single = x.shape == tuple(model.input_shape)
    if single:
        x = x[None]
    outs = [unpack(model, run_vectors(model, pack(model, x[i:i + batch_size])))
            for i in range(0, len(x), batch_size)]
    logits = np.concatenate(outs).reshape(len(x), *model.output_shape)
    return logits[0] if single else logits
