"""Exact plaintext execution of a compiled program: same layouts, diagonals, folds and polynomials.

It is what the encrypted engine computes minus the CKKS noise, fast enough to check accuracy on
whole test sets.  Lane vectors are numpy rows, rotations are ``np.roll``.
"""
from __future__ import annotations

import numpy as np

from ..compiler.activations import eval_chebyshev
from ..compiler.program import CompiledModel, Step


def pack(model: CompiledModel, x: np.ndarray) -> np.ndarray:
    """Inputs (B, *input_shape) -> lane vectors (B, blocks, n) in the model's input layout."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = model.lane_length
    vec = np.zeros((len(x), model.input_blocks, n))
    blocks, offsets = np.divmod(model.input_positions, n)
    vec[:, blocks, offsets] = x
    return vec


def unpack(model: CompiledModel, vec: np.ndarray) -> np.ndarray:
    """Lane vectors (B, blocks, n) -> outputs (B, num_outputs) read at the output layout."""
    blocks, offsets = np.divmod(model.output_positions, model.lane_length)
    return vec[:, blocks, offsets]


def _linear(step: Step, x: np.ndarray) -> np.ndarray:
    plan = step.linear
    out = np.zeros((x.shape[0], plan.out_blocks, plan.n))
    for t, (ob, ib, k) in enumerate(plan.terms.tolist()):
        out[:, ob] += plan.diags[t] * np.roll(x[:, ib], -k, axis=-1)
    for f in plan.fold_steps:
        out += np.roll(out, -f, axis=-1)
    return out + plan.bias


def run_vectors(model: CompiledModel, vec: np.ndarray) -> np.ndarray:
    """Run the program on packed lane vectors."""
    values = {model.input_name: vec}
    for step in model.steps:
        args = [values[i] for i in step.inputs]
        if step.op == "linear":
            values[step.name] = _linear(step, args[0])
        elif step.op == "poly":
            values[step.name] = eval_chebyshev(step.attrs["coeffs"], step.attrs["lower"], step.attrs["upper"], args[0])
        elif step.op == "square":
            values[step.name] = args[0] * args[0]
        elif step.op == "add":
            values[step.name] = args[0] + args[1]
        elif step.op == "mul":
            values[step.name] = args[0] * args[1]
        else:
            raise ValueError(f"unknown step op {step.op!r}")
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
