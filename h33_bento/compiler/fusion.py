"""Fusion: collapse every chain of linear ops between two non-linearities into one transform.

BatchNorm, bias adds, pooling, transposes and dense layers all arrive as separate ``linear``
nodes; multiplying their matrices here means each chain costs one level and one set of
rotations instead of one per op.
"""
from __future__ import annotations

from .graph import Graph, Node


def fuse_linear_chains(graph: Graph) -> Graph:
    """Merge linear -> linear edges where the first node has no other consumer."""
    nodes = dict(graph.nodes)
    changed = True
    while changed:
        changed = False
        for node in list(nodes.values()):
            if node.op != "linear":
                continue
            src = nodes[node.inputs[0]]
            if src.op != "linear" or src.name == graph.output:
                continue
            if sum(src.name in n.inputs for n in nodes.values()) != 1:
                continue
            matrix = (node.attrs["matrix"] @ src.attrs["matrix"]).tocsr()
            matrix.eliminate_zeros()
            bias = node.attrs["matrix"] @ src.attrs["bias"] + node.attrs["bias"]
            nodes[node.name] = Node(node.name, "linear", list(src.inputs), node.shape,
                                    {**node.attrs, "matrix": matrix, "bias": bias})
            del nodes[src.name]
            changed = True
    return Graph(nodes, graph.input, graph.output)
