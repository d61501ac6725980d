"""The compiler's intermediate representation: a small DAG of FHE-friendly ops.

Every import path (ONNX, PyTorch) lowers to this graph; every later stage (fusion, calibration,
layout, planning) reads and rewrites it. Linear ops carry a scipy sparse matrix over the
flattened (C-order, batch dimension dropped) tensor, so convolutions, pooling, BatchNorm and
dense layers all look the same and compose by matrix product.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: Ops the graph may hold.  ``activation`` is a named non-linearity (relu, sigmoid, ...) that
#: calibration replaces with a ``poly`` node before layout.
OPS = ("input", "linear", "activation", "poly", "square", "add", "mul")


@dataclass
class Node:
    """One op.  ``shape`` is the logical output shape without the batch dimension."""

    name: str
    op: str
    inputs: list[str]
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Graph:
    """Nodes in topological order, one input and one output."""

    nodes: dict[str, Node]
    input: str
    output: str

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if name in n.inputs]

    def add(self, node: Node) -> Node:
        if node.op not in OPS:
            raise ValueError(f"unknown op {node.op!r}")
        self.nodes[node.name] = node
        return node

    def evaluate(
        self,
        x: np.ndarray,
        activation_fn: Callable[[Node, np.ndarray], np.ndarray] | None = None,
        observe: Callable[[Node, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Run the graph in plaintext on a batch ``x`` of shape (B, *input_shape).

        ``observe(node, value)`` sees the input of every activation/poly node (used for range
        calibration); ``activation_fn`` overrides how named activations are computed.
        """
        values: dict[str, np.ndarray] = {}
        batch = x.shape[0]
        for node in self.nodes.values():
            if node.op == "input":
                values[node.name] = x.reshape(batch, -1).astype(np.float64)
                continue
            args = [values[i] for i in node.inputs]
            if node.op in ("activation", "poly") and observe is not None:
                observe(node, args[0])
            values[node.name] = _eval_node(node, args, activation_fn)
        return values[self.output]


def _eval_node(
    node: Node,
    args: list[np.ndarray],
    activation_fn: Callable[[Node, np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    if node.op == "linear":
        return np.asarray(node.attrs["matrix"] @ args[0].T).T + node.attrs["bias"]
    if node.op == "square":
        return args[0] * args[0]
    if node.op == "add":
        return args[0] + args[1]
    if node.op == "mul":
        return args[0] * args[1]
    if node.op == "poly":
        from .activations import eval_chebyshev

        return eval_chebyshev(node.attrs["coeffs"], node.attrs["lower"], node.attrs["upper"], args[0])
    if node.op == "activation":
        if activation_fn is not None:
            return activation_fn(node, args[0])
        from .activations import exact_activation

        return exact_activation(node.attrs["kind"], args[0])
    raise ValueError(f"cannot evaluate op {node.op!r}")
