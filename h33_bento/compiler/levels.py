"""Level planning: how many multiplicative levels each op consumes, and where each op runs.

A linear transform costs one level (its plaintext products are rescaled once), x^2 and a
ciphertext product one each, a Chebyshev series what OpenFHE's Paterson-Stockmeyer evaluation
spends for its degree, and an addition the deeper of its operands.
"""
from __future__ import annotations

from .activations import chebyshev_depth
from .graph import Graph, Node


def node_depth(node: Node) -> int:
    """Levels one node consumes."""
    if node.op in ("linear", "square", "mul"):
        return 1
    if node.op == "poly":
        return chebyshev_depth(len(node.attrs["coeffs"]) - 1, node.attrs["lower"], node.attrs["upper"])
    return 0


def plan_levels(graph: Graph) -> dict[str, int]:
    """Level at which each node's output is available (0 = fresh ciphertext)."""
    levels: dict[str, int] = {}
    for node in graph.nodes.values():
        start = max((levels[i] for i in node.inputs), default=0)
        levels[node.name] = start + node_depth(node)
    return levels
