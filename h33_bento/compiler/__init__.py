"""Compile a trained network into a CKKS program: import -> fuse -> calibrate -> layout -> plan."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..ckks.params import CKKSParams, SecurityLevel, max_depth, select_params, MAX_RING_DIM
from ..errors import CompileError, DepthExceededError
from .calibration import calibrate
from .cost_model import CostModel
from .fusion import fuse_linear_chains
from .graph import Graph
from .layout import assign_layouts
from .levels import plan_levels
from .program import CompiledModel, Step

__all__ = ["compile", "CompiledModel", "load_graph"]


def load_graph(model: Any, input_shape: Sequence[int] | None, dtype: Any = np.float64) -> Graph:
    """Import a PyTorch module, ONNX ModelProto, ONNX file path or ONNX bytes into the IR
    (linear ops' matrices in ``dtype``)."""
    if isinstance(model, Graph):
        return model
    if type(model).__module__.startswith("torch") or hasattr(model, "state_dict"):
        from .torch_import import import_torch

        if input_shape is None:
            raise CompileError("input_shape is required to compile a PyTorch module")
        return import_torch(model, tuple(input_shape), dtype)
    from .onnx_import import import_onnx

    if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
        raise CompileError(f"model file {model} does not exist")
    return import_onnx(model, tuple(input_shape) if input_shape is not None else None, dtype)


def _lane_length(graph: Graph, lanes: int, ring_for_depth: int) -> int:
    """Values per lane: enough for the input, and all the slots the ring the depth needs offers.

    Larger intermediate tensors span several ciphertext blocks rather than forcing a larger
    ring: a ring twice as large makes every operation and every rotation key twice as costly,
    and block-cyclic layouts keep multi-block transforms cheap.
    """
    size = graph.nodes[graph.input].size
    n = max(1 << max(0, (size - 1).bit_length()), ring_for_depth // 2 // lanes, 1)
    return min(n, (MAX_RING_DIM // 2) // lanes)


def compile(
    model: Any,
    input_shape: Sequence[int] | None = None,
    calibration_data: np.ndarray | None = None,
    lanes: int = 8,
    labels: Sequence[str] | None = None,
    *,
    scale_bits: int = 40,
    first_mod_bits: int = 60,
    security_level: SecurityLevel = "HEStd_128_classic",
    activation_degrees: dict[str, int] | None = None,
    range_margin: float = 0.1,
    plan_only: bool = False,
    measure_costs: bool = True,
    progress: bool = False,
) -> CompiledModel:
    """Compile ``model`` for encrypted inference with ``lanes`` inputs per ciphertext.

    ``calibration_data`` (a batch shaped like the input) sets the ranges of the polynomial
    activations that replace ReLU/Sigmoid/Tanh/GELU/SiLU.  With ``plan_only=True`` the diagonal
    values are not materialized and a network deeper than 128-bit parameters allow still gets
    a plan (marked not runnable) instead of a DepthExceededError.  ``progress`` shows a bar.
    """
    bar = tqdm(total=5, desc="compile", unit="stage", disable=not progress, leave=False)
    bar.set_postfix_str("import")
    # a plan needs only where the matrices' entries are: float32 halves the memory of big networks
    graph = load_graph(model, input_shape, np.float32 if plan_only else np.float64)
    input_node = graph.nodes[graph.input]
    if calibration_data is not None:
        calibration_data = np.asarray(calibration_data, dtype=np.float64).reshape(-1, *input_node.shape)
    bar.update(); bar.set_postfix_str("fuse + calibrate")
    graph = fuse_linear_chains(graph)
    graph = calibrate(graph, calibration_data, range_margin, activation_degrees)
    bar.update(); bar.set_postfix_str("levels + parameters")
    levels = plan_levels(graph)
    depth = max(levels.values())
    runnable = True
    try:
        deepest = max_depth(MAX_RING_DIM, scale_bits, first_mod_bits, security_level)
        if depth > deepest:  # beyond any ring: fail fast (select_params cannot represent it)
            raise DepthExceededError(depth, deepest, MAX_RING_DIM)
        ring = select_params(depth, lanes, lanes, scale_bits, first_mod_bits, security_level).ring_dim
        n = _lane_length(graph, lanes, ring)
        params = select_params(depth, n * lanes, lanes, scale_bits, first_mod_bits, security_level)
    except DepthExceededError:
        if not plan_only:
            raise
        runnable = False
        params = CKKSParams(ring_dim=MAX_RING_DIM, multiplicative_depth=max_depth(MAX_RING_DIM), scale_bits=scale_bits,
                            first_mod_bits=first_mod_bits, lanes=lanes, security_level=security_level)
    n = params.lane_length
    bar.update(); bar.set_postfix_str("measure primitive costs")
    costs: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    if measure_costs and runnable:
        from ..runtime.costs import measure_primitives

        degrees = tuple(len(node.attrs["coeffs"]) - 1 for node in graph.nodes.values() if node.op == "poly")
        costs, sizes = measure_primitives(params, degrees)
    bar.update(); bar.set_postfix_str("layout + diagonals")
    positions, plans = assign_layouts(graph, n, values=not plan_only,
                                      model=CostModel(costs, params.multiplicative_depth), levels=levels)

    steps: list[Step] = []
    rotations: set[int] = set()
    for node in graph.nodes.values():
        if node.op == "input":
            continue
        start = max(levels[i] for i in node.inputs) if node.inputs else 0
        plan = plans.get(node.name)
        if plan is not None:
            rotations |= plan.rotations()
        attrs = {k: v for k, v in node.attrs.items() if k in ("coeffs", "lower", "upper", "replaces")}
        steps.append(Step(node.name, node.op, list(node.inputs), start, attrs, plan))
    slot_rotations = {(r * lanes) % params.slots for r in rotations}
    lane_shifts = {params.slots - lane for lane in range(1, lanes)}  # server-side lane packing
    params = CKKSParams(**{**params.model_dump(), "rotation_indices": tuple(sorted(slot_rotations | lane_shifts))})
    bar.update()
    bar.close()
    out_node = graph.nodes[graph.output]
    if labels is not None and len(labels) != out_node.size:
        raise CompileError(f"{len(labels)} labels given for {out_node.size} outputs")
    return CompiledModel(
        params=params,
        input_shape=tuple(input_node.shape),
        input_name=input_node.name,
        input_positions=positions[graph.input],
        output_shape=tuple(out_node.shape),
        output_positions=positions[graph.output],
        steps=steps,
        labels=[str(label) for label in labels] if labels is not None else None,
        depth=depth,
        primitive_costs_ms=costs,
        key_sizes=sizes,
        runnable=runnable,
    )
