"""Range calibration: measure each activation's input range on real data and swap the
activation for a Chebyshev polynomial fitted on that range (plus a margin).

Outside its range a polynomial diverges quickly, so ranges come from data the model will see,
and ``check_ranges`` warns when later inputs leave them.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import CompileError, RangeWarning
from ..program.ops import Op, range_problem
from .activations import fit_chebyshev
from .graph import Graph, Node


def _ranges(graph: Graph, data: np.ndarray, batch_size: int, hook: str) -> dict[str, tuple[float, float]]:
    """Min and max of what ``Graph.evaluate`` hands its ``hook`` callback, per node, over ``data``."""
    ranges: dict[str, list[float]] = {}

    def observe(node: Node, value: np.ndarray) -> None:
        lo, hi = float(value.min()), float(value.max())
        cur = ranges.setdefault(node.name, [lo, hi])
        cur[0], cur[1] = min(cur[0], lo), max(cur[1], hi)

    for start in range(0, len(data), batch_size):
        graph.evaluate(data[start:start + batch_size], **{hook: observe})
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def observe_ranges(graph: Graph, data: np.ndarray, batch_size: int = 512) -> dict[str, tuple[float, float]]:
    """Min and max of the input of every activation and polynomial node over ``data`` (exact activations)."""
    return _ranges(graph, data, batch_size, "observe")


def output_ranges(graph: Graph, data: np.ndarray, batch_size: int = 512) -> dict[str, tuple[float, float]]:
    """Min and max of every node's output over ``data``."""
    return _ranges(graph, data, batch_size, "observe_outputs")


def calibrate(graph: Graph, data: np.ndarray | None, margin: float = 0.1,
              degrees: dict[str, int] | None = None) -> Graph:
    """Replace every named activation by a Chebyshev series fitted on its calibrated range."""
    needs = [n for n in graph.nodes.values() if n.op is Op.ACTIVATION]
    if needs and data is None:
        raise CompileError(
            f"the model has non-polynomial activations ({', '.join(sorted({n.attrs['kind'] for n in needs}))}); "
            "pass calibration_data so their input ranges can be measured"
        )
    ranges = observe_ranges(graph, data) if data is not None else {}
    check_ranges(graph, ranges)
    nodes = {}
    for node in graph.nodes.values():
        if node.op is Op.ACTIVATION:
            lo, hi = ranges[node.name]
            span = max(hi - lo, 1e-6)
            lo, hi = lo - margin * span, hi + margin * span
            degree = (degrees or {}).get(node.attrs["kind"])
            coeffs = fit_chebyshev(node.attrs["kind"], lo, hi, degree)
            node = Node(node.name, Op.POLY, node.inputs, node.shape,
                        {"coeffs": coeffs, "lower": lo, "upper": hi, "replaces": node.attrs["kind"]})
        nodes[node.name] = node
    return Graph(nodes, graph.input, graph.output)


def check_ranges(graph: Graph, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Warn (RangeWarning) for every polynomial whose observed inputs leave its range."""
    offenders = []
    for node in graph.nodes.values():
        if node.op is not Op.POLY or node.name not in ranges:
            continue
        problem = range_problem(node.attrs["lower"], node.attrs["upper"], *ranges[node.name])
        if problem:
            offenders.append(node.name)
            warnings.warn(f"polynomial activation {node.name!r}: {problem}", RangeWarning, stacklevel=3)
    return offenders
