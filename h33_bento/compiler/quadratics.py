"""Quadratics: in a bootstrapped program, a degree-2 activation costs one level, not three.

A Chebyshev series of degree 2 spends three levels in OpenFHE (the map to [-1, 1] and two
products).  Written as a square between two affine maps it spends one:

    p(x) = c0 + c1 t + c2 T2(t),  t = (2x - lo - hi) / (hi - lo)
         = 2 c2 (t + s)^2 + c0 - c2 - c1^2 / (8 c2),  s = c1 / (4 c2)

and the affine maps are linear nodes that fusion folds into the linear neighbours (the
convolution before, and the next layer after when it is the only consumer).  The square's input
is divided by 1 + |s| so it stays within [-1, 1] (a bootstrap may follow it) and the product
is multiplied back after.  Bootstrapped programs get this rewrite, where every level saved is a
fraction of a bootstrap; programs that fit their ring keep the series exactly as it was trained.
A series whose shift is large (nearly linear) is kept: the cancellation after the square
amplifies the CKKS error by about (1 + |s|)^2.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..program.ops import Op
from .fusion import fuse_linear_chains
from .graph import Graph, Node

#: Largest |shift| rewritten: the error of the square is amplified by at most (1 + 64)^2 ~ 4e3
#: (about 1e-6 of a 50-bit scale's 1e-9 relative error).
MAX_SHIFT = 64.0


def _affine(name: str, source: str, shape: tuple[int, ...], scale: float, offset: float) -> Node:
    size = int(np.prod(shape))
    return Node(name, Op.LINEAR, [source], shape,
                {"matrix": sp.diags(np.full(size, scale)).tocsr(), "bias": np.full(size, offset)})


def lower_quadratics(graph: Graph) -> Graph:
    """Every degree-2 series with a moderate shift as affine -> square -> affine, then fused."""
    nodes: dict[str, Node] = {}
    for node in graph.nodes.values():
        coeffs = node.attrs.get("coeffs")
        if node.op is not Op.POLY or len(coeffs) != 3 or coeffs[2] == 0:
            nodes[node.name] = node
            continue
        c0, c1, c2 = (float(c) for c in coeffs)
        shift = c1 / (4.0 * c2)
        if abs(shift) > MAX_SHIFT:
            nodes[node.name] = node
            continue
        lo, hi = float(node.attrs["lower"]), float(node.attrs["upper"])
        alpha, beta, width = 2.0 / (hi - lo), -(lo + hi) / (hi - lo), 1.0 + abs(shift)
        pre = _affine(f"{node.name}.shift", node.inputs[0], node.shape, alpha / width, (beta + shift) / width)
        square = Node(f"{node.name}.square", Op.SQUARE, [pre.name], node.shape)
        post = _affine(node.name, square.name, node.shape, 2.0 * c2 * width * width, c0 - c2 - c1 * c1 / (8.0 * c2))
        for new in (pre, square, post):  # the last keeps the series' name: its consumers are unchanged
            nodes[new.name] = new
    return fuse_linear_chains(Graph(nodes, graph.input, graph.output))
