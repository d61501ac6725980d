"""Levels: where each op runs and how many multiplicative levels it has consumed.

Each node's level comes from its op's level rule in the registry (``OpSpec.output_level``): a
linear transform, x^2 and a ciphertext product consume one level, a Chebyshev series what
OpenFHE's Paterson-Stockmeyer evaluation spends for its degree, an addition none; a pass that
inserts an op restoring levels gives it a rule that resets instead of adding.
"""
from __future__ import annotations

from ..program.ops import OPS
from .graph import Graph


def assign_levels(graph: Graph) -> dict[str, int]:
    """Levels consumed once each node's output exists (0 = a fresh ciphertext)."""
    levels: dict[str, int] = {}
    for node in graph.nodes.values():
        levels[node.name] = OPS[node.op].output_level(node.attrs, [levels[i] for i in node.inputs])
    return levels
