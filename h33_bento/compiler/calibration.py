"""Range calibration: measure each activation's input range on real data and swap the
activation for a Chebyshev polynomial fitted on that range (plus a margin).

Outside its range a polynomial diverges quickly, so ranges come from data the model will see,
and ``check_ranges`` warns when later inputs leave them.  A fit of a kinked activation (ReLU) is
rough even on its range, so ``calibrate`` measures how often the fitted polynomials change the
model's top-1 on the calibration data and warns (``AccuracyWarning``) when that costs accuracy.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import AccuracyWarning, CompileError, RangeWarning
from ..program.ops import Op, range_problem
from ..program.polynomials import chebyshev_depth
from .activations import DEFAULT_DEGREE, fit_chebyshev
from .graph import Graph, Node

#: ``calibrate`` warns when the polynomials it fits change more than this share of the top-1
#: predictions on the calibration data (measured, docs/accuracy.md#the-default-compile-path).
AGREEMENT_BOUND = 0.99
#: inputs the agreement is measured on (the first ones of the calibration data)
AGREEMENT_SAMPLES = 512


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
              degrees: dict[str, int] | None = None, reference: np.ndarray | None = None) -> Graph:
    """Replace every named activation by a Chebyshev series fitted on its calibrated range.

    Then warn (``AccuracyWarning``) if on the first ``AGREEMENT_SAMPLES`` calibration inputs the
    result's top-1 differs from the original's in more than 1 - ``AGREEMENT_BOUND`` of them;
    ``reference`` holds the original's outputs there (the source PyTorch module's, which still
    has its MaxPool), else the graph with exact activations stands in.
    """
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
    fitted = Graph(nodes, graph.input, graph.output)
    if needs:
        data = data[:AGREEMENT_SAMPLES]
        _warn_if_predictions_change(graph.evaluate(data) if reference is None else reference,
                                    fitted.evaluate(data), needs, degrees)
    return fitted


def top1_agreement(reference: np.ndarray, outputs: np.ndarray) -> float | None:
    """Share of rows whose argmax is the same in both (B, classes) arrays; None for a single output."""
    if reference.shape[1] < 2:
        return None
    return float((reference.argmax(1) == outputs.argmax(1)).mean())


def _warn_if_predictions_change(reference: np.ndarray, outputs: np.ndarray, replaced: list[Node],
                                degrees: dict[str, int] | None) -> None:
    agreement = top1_agreement(reference, outputs)
    if agreement is None or agreement >= AGREEMENT_BOUND:
        return
    kinds = sorted({n.attrs["kind"] for n in replaced})
    fits = ", ".join(f"{k} degree {(degrees or {}).get(k, DEFAULT_DEGREE[k])} "
                     f"({chebyshev_depth((degrees or {}).get(k, DEFAULT_DEGREE[k]))} levels)" for k in kinds)
    warnings.warn(
        f"compile replaced {len(replaced)} activations ({', '.join(kinds)}) by Chebyshev fits ({fits}); on "
        f"{len(outputs)} calibration inputs the compiled program's top-1 differs from the original model's on "
        f"{1 - agreement:.1%} of them (agreement {agreement:.1%}): expect accuracy to drop by about that much, "
        "more on data the model was not trained on. "
        "Train the polynomials instead, then compile the result (in PyTorch; export it to ONNX for an ONNX "
        "model): relu_model = copy.deepcopy(model); "
        "h33_bento.nn.polyfy(model, x_train[:2000], degrees={'relu': 4}, trainable=True); "
        "h33_bento.nn.finetune(model, (x_train, y_train), epochs=5, teacher=relu_model, freeze_bn=True) "
        "(docs/accuracy.md#the-default-compile-path)",
        AccuracyWarning,
        stacklevel=5,  # compile's caller
    )


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
