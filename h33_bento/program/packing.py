"""Where tensor elements live in the lane vectors: the layout the client packs and reads.

A model publishes ``input_positions`` and ``output_positions`` (``block * lane_length + offset``
per logical element); the client, ``simulate`` and the server's layout-only view all pack and
unpack with these two functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import CompiledModel


def pack(model: "CompiledModel", x: np.ndarray) -> np.ndarray:
    """Inputs (B, *input_shape) -> lane vectors (B, blocks, n) in the model's input layout."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = model.lane_length
    vec = np.zeros((len(x), model.input_blocks, n))
    blocks, offsets = np.divmod(model.input_positions, n)
    vec[:, blocks, offsets] = x
    return vec


def unpack(model: "CompiledModel", vec: np.ndarray) -> np.ndarray:
    """Lane vectors (B, blocks, n) -> outputs (B, num_outputs) read at the output layout."""
    blocks, offsets = np.divmod(model.output_positions, model.lane_length)
    return vec[:, blocks, offsets]
