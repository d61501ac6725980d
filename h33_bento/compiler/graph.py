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

from ..program.ops import OPS, Op


@dataclass
class Node:
    """One op (any ``Op``; a named ``ACTIVATION`` is lowered to ``POLY`` by calibration before
    layout).  ``shape`` is the logical output shape without the batch dimension."""

    name: str
    op: Op
    inputs: list[str]
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.op = Op(self.op)  # ValueError for an unknown kind

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
        self.nodes[node.name] = node
        return node

    def evaluate(
        self,
        x: np.ndarray,
        activation_fn: Callable[[Node, np.ndarray], np.ndarray] | None = None,
        observe: Callable[[Node, np.ndarray], None] | None = None,
        observe_outputs: Callable[[Node, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Run the graph in plaintext on a batch ``x`` of shape (B, *input_shape).

        ``observe(node, value)`` sees the input of every activation and polynomial node (used
        for range calibration), ``observe_outputs(node, value)`` every node's output;
        ``activation_fn`` overrides how named activations are computed.
        """
        values: dict[str, np.ndarray] = {}
        batch = x.shape[0]
        for node in self.nodes.values():
            if node.op is Op.INPUT:
                values[node.name] = x.reshape(batch, -1).astype(np.float64)
                continue
            args = [values[i] for i in node.inputs]
            if node.op in RANGED and observe is not None:
                observe(node, args[0])
            values[node.name] = _eval_node(node, args, activation_fn)
            if observe_outputs is not None:
                observe_outputs(node, values[node.name])
        return values[self.output]


#: Ops whose input range calibration measures: a polynomial is only accurate on its range.
RANGED = (Op.ACTIVATION, Op.POLY)


def _eval_node(
    node: Node,
    args: list[np.ndarray],
    activation_fn: Callable[[Node, np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """Graph nodes hold linear maps as matrices and activations by name; the element-wise ops
    evaluate as the program does (``OpSpec.evaluate``)."""
    if node.op is Op.LINEAR:
        return np.asarray(node.attrs["matrix"] @ args[0].T).T + node.attrs["bias"]
    if node.op is Op.ACTIVATION:
        if activation_fn is not None:
            return activation_fn(node, args[0])
        from .activations import exact_activation

        return exact_activation(node.attrs["kind"], args[0])
    return OPS[node.op].evaluate(node, args)
