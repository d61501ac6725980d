"""Fusion: collapse every chain of linear ops between two non-linearities into one transform.

BatchNorm, bias adds, pooling, transposes and dense layers all arrive as separate ``linear``
nodes; multiplying their matrices here means each chain costs one level and one set of
rotations instead of one per op.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..program.ops import Op
from .graph import Graph, Node

if TYPE_CHECKING:
    import scipy.sparse as sp


def _diagonal(matrix: "sp.spmatrix") -> np.ndarray | None:
    """The diagonal of ``matrix`` if it has no off-diagonal entries (BatchNorm, scalings), else None."""
    n = matrix.shape[0]
    if matrix.shape[1] != n or matrix.nnz > n:
        return None
    csr = matrix.tocsr()
    rows = np.repeat(np.arange(n), np.diff(csr.indptr))
    if not np.array_equal(csr.indices, rows):
        return None
    return np.bincount(rows, weights=csr.data, minlength=n)


def _compose(outer: "sp.spmatrix", inner: "sp.spmatrix") -> "sp.csr_matrix":
    """outer @ inner as CSR.  A diagonal factor only scales the other's rows or columns, which is
    far cheaper than a sparse product for the 10^7-entry convolutions of CIFAR networks."""
    d = _diagonal(outer)
    if d is not None:
        out = inner.tocsr(copy=True)
        out.data *= np.repeat(d, np.diff(out.indptr)).astype(out.dtype, copy=False)
    elif (d := _diagonal(inner)) is not None:
        out = outer.tocsr(copy=True)
        out.data *= d[out.indices].astype(out.dtype, copy=False)
    else:
        out = (outer @ inner).tocsr()
    out.eliminate_zeros()
    return out


def fuse_linear_chains(graph: Graph) -> Graph:
    """Merge linear -> linear edges where the first node has no other consumer."""
    nodes = dict(graph.nodes)
    changed = True
    while changed:
        changed = False
        for node in list(nodes.values()):
            if node.op is not Op.LINEAR:
                continue
            src = nodes[node.inputs[0]]
            if src.op is not Op.LINEAR or src.name == graph.output:
                continue
            if sum(src.name in n.inputs for n in nodes.values()) != 1:
                continue
            matrix = _compose(node.attrs["matrix"], src.attrs["matrix"])
            bias = node.attrs["matrix"] @ src.attrs["bias"] + node.attrs["bias"]
            nodes[node.name] = Node(node.name, Op.LINEAR, list(src.inputs), node.shape,
                                    {**node.attrs, "matrix": matrix, "bias": bias})
            del nodes[src.name]
            changed = True
    return Graph(nodes, graph.input, graph.output)
