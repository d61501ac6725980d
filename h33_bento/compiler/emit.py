"""Program: the compiled graph as the steps the engine runs, and the rotation keys they need.

Each node becomes a ``Step`` at the level where it starts, keeping only the attributes its op
declares (``OpSpec.attrs``) and, for linear nodes, their diagonal plan.  The rotation keys are
every rotation the plans use (scaled by the lanes), plus the lane shifts the server uses to pack
single requests into one ciphertext.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..ckks.params import CKKSParams
from ..ckks.timing import PrimitiveCosts
from ..errors import CompileError
from ..program.diagonals import DiagonalPlan, rotation_indices
from ..program.model import CompiledModel, Step
from ..program.ops import OPS
from .graph import Graph
from .layout import Layouts


def _plain(value: Any) -> Any:
    """Attributes as the manifest stores them: float64 arrays and builtin scalars."""
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float64)
    return value.item() if isinstance(value, np.generic) else value


def emit_program(graph: Graph, levels: dict[str, int], params: CKKSParams, layouts: Layouts,
                 plans: dict[str, DiagonalPlan], costs: PrimitiveCosts | None, runnable: bool,
                 labels: Sequence[str] | None) -> CompiledModel:
    """The ``CompiledModel`` of a lowered, laid-out graph."""
    steps: list[Step] = []
    for node in graph.nodes.values():
        spec = OPS[node.op]
        if not spec.in_program:
            continue
        plan = plans.get(node.name)
        start = max((levels[i] for i in node.inputs), default=0)
        attrs = {k: _plain(node.attrs[k]) for k in spec.attrs if k in node.attrs}
        steps.append(Step(node.name, node.op, list(node.inputs), start, attrs, plan))
    rotations = rotation_indices((s.linear for s in steps if s.linear is not None), params.lanes, params.slots)
    params = CKKSParams.model_validate({**params.model_dump(), "rotation_indices": rotations})
    input_node, out_node = graph.nodes[graph.input], graph.nodes[graph.output]
    if labels is not None and len(labels) != out_node.size:
        raise CompileError(f"{len(labels)} labels given for {out_node.size} outputs")
    return CompiledModel(
        params=params,
        input_shape=tuple(input_node.shape),
        input_name=input_node.name,
        input_positions=layouts.positions[graph.input],
        output_shape=tuple(out_node.shape),
        output_positions=layouts.positions[graph.output],
        steps=steps,
        labels=[str(label) for label in labels] if labels is not None else None,
        depth=max(levels.values()),
        costs=costs,
        runnable=runnable,
    )
