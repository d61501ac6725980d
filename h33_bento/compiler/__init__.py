"""Compile a trained network into a CKKS program.

``compile`` runs ``PASSES`` in order, each a function of the previous ``Compilation``::

    import -> fuse -> calibrate -> levels -> parameters -> quadratics -> costs -> layout
           -> bootstraps -> diagonals -> keys -> program

One file per pass: ``onnx_import``/``torch_import``, ``fusion``, ``calibration``, ``levels``,
``parameters``, ``quadratics``, ``ckks.timing`` (the costs are measured there, or passed in),
``layout``, ``bootstraps``, ``diagonals``, ``rotation_keys``, ``emit``.  The result is a ``program.CompiledModel``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..ckks.params import CKKSParams, SecurityLevel
from ..ckks.timing import PrimitiveCosts, bootstrap_bound, cached_primitives, with_bootstrap
from ..errors import CompileError
from ..program.cost_model import CostModel, stored_costs
from ..program.diagonals import DiagonalPlan, lane_shifts
from ..program.report import bundle_bytes, key_sizes
from ..program.model import CompiledModel
from ..program.ops import Op
from .bootstraps import place_bootstraps
from .calibration import AGREEMENT_SAMPLES, calibrate, output_ranges
from .diagonals import extract_diagonals
from .emit import emit_program
from .fusion import fuse_linear_chains
from .graph import Graph
from .layout import Layouts, assign_layouts
from .levels import assign_levels
from .parameters import choose_params
from .quadratics import lower_quadratics
from .rotation_keys import choose_key_schedules, key_price_ms

__all__ = ["compile", "CompiledModel", "Compilation", "CompileOptions", "PASSES", "load_graph"]


def is_torch_module(model: Any) -> bool:
    """Whether ``model`` is a PyTorch module (anything else is read as ONNX)."""
    return type(model).__module__.startswith("torch") or hasattr(model, "state_dict")


def load_graph(model: Any, input_shape: Sequence[int] | None, dtype: Any = np.float64) -> Graph:
    """Import a PyTorch module, ONNX ModelProto, ONNX file path or ONNX bytes into the IR
    (linear ops' matrices in ``dtype``)."""
    if isinstance(model, Graph):
        return model
    if is_torch_module(model):
        from .torch_import import import_torch

        if input_shape is None:
            raise CompileError("input_shape is required to compile a PyTorch module")
        return import_torch(model, tuple(input_shape), dtype)
    from .onnx_import import import_onnx

    if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
        raise CompileError(f"model file {model} does not exist")
    return import_onnx(model, tuple(input_shape) if input_shape is not None else None, dtype)


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``compile`` was asked for (see its docstring)."""

    input_shape: tuple[int, ...] | None = None
    calibration_data: np.ndarray | None = None
    lanes: int = 8
    labels: tuple[str, ...] | None = None
    scale_bits: int = 40
    first_mod_bits: int = 60
    security_level: SecurityLevel = "HEStd_128_classic"
    activation_degrees: dict[str, int] | None = None
    range_margin: float = 0.1
    estimate_only: bool = False
    measure_costs: bool = True
    remeasure_costs: bool = False
    costs: PrimitiveCosts | None = None
    bootstrapping: bool | None = None
    key_budget_bytes: int | None = None


@dataclass(frozen=True)
class Compilation:
    """The state the passes hand on: each pass fills in the next fields."""

    source: Any
    options: CompileOptions
    graph: Graph | None = None
    levels: dict[str, int] = field(default_factory=dict)
    params: CKKSParams | None = None
    runnable: bool = True
    costs: PrimitiveCosts | None = None
    layouts: Layouts | None = None
    plans: dict[str, DiagonalPlan] = field(default_factory=dict)
    #: the default's plans (no key budget), when a budget changed them: what the report compares with
    unbudgeted_plans: dict[str, DiagonalPlan] | None = None
    program: CompiledModel | None = None

    @property
    def cost_model(self) -> CostModel:
        return CostModel(self.costs, self.params.multiplicative_depth)


def import_pass(c: Compilation) -> Compilation:
    # an estimate needs only where the matrices' entries are: float32 halves the memory of big networks
    dtype = np.float32 if c.options.estimate_only else np.float64
    return replace(c, graph=load_graph(c.source, c.options.input_shape, dtype))


def fuse_pass(c: Compilation) -> Compilation:
    return replace(c, graph=fuse_linear_chains(c.graph))


def calibrate_pass(c: Compilation) -> Compilation:
    data = c.options.calibration_data
    if data is not None:
        data = np.asarray(data, dtype=np.float64).reshape(-1, *c.graph.nodes[c.graph.input].shape)
    o = c.options
    reference = None  # what the compiler's own fits are compared with: the source model itself
    fits = any(n.op is Op.ACTIVATION for n in c.graph.nodes.values())
    if fits and data is not None and is_torch_module(c.source):
        from .torch_import import predict

        reference = predict(c.source, data[:AGREEMENT_SAMPLES])
    return replace(c, graph=calibrate(c.graph, data, o.range_margin, o.activation_degrees, reference))


def levels_pass(c: Compilation) -> Compilation:
    return replace(c, levels=assign_levels(c.graph))


def parameters_pass(c: Compilation) -> Compilation:
    o = c.options
    params, runnable = choose_params(c.graph, max(c.levels.values()), o.lanes, o.scale_bits, o.first_mod_bits,
                                     o.security_level, bootstrapping=o.bootstrapping,
                                     allow_too_deep=o.estimate_only)
    return replace(c, params=params, runnable=runnable)


def quadratics_pass(c: Compilation) -> Compilation:
    """Degree-2 series as one square in bootstrapped programs (``compiler.quadratics``); if the
    network then fits a ring without bootstrapping, and bootstrapping was not asked for, it gets
    that ring's parameters instead."""
    if c.params.bootstrapping is None:
        return c
    graph = lower_quadratics(c.graph)
    c = replace(c, graph=graph, levels=assign_levels(graph))
    if c.options.bootstrapping is None:
        o = c.options
        params, runnable = choose_params(graph, max(c.levels.values()), o.lanes, o.scale_bits, o.first_mod_bits,
                                         o.security_level, allow_too_deep=o.estimate_only)
        if params.bootstrapping is None:
            c = replace(c, params=params, runnable=runnable)
    return c


def _chebyshev_degrees(graph: Graph) -> tuple[int, ...]:
    return tuple(sorted({len(n.attrs["coeffs"]) - 1 for n in graph.nodes.values() if n.op is Op.POLY}))


def costs_pass(c: Compilation) -> Compilation:
    """The given cost table, or this machine's for the chosen parameters: from its cost cache, or
    measured now (and cached) on the first compile or with ``remeasure_costs``; none for estimates
    of networks too deep to run, or with ``measure_costs=False``: relative costs then."""
    o = c.options
    degrees = _chebyshev_degrees(c.graph)
    if o.costs is not None:
        if not o.costs.covers(c.params, degrees):
            raise CompileError(
                f"the cost table given was measured for CKKS parameters {o.costs.params} and Chebyshev degrees "
                f"{list(o.costs.chebyshev_degrees)}; this network needs parameters {c.params.cost_key} "
                f"(N={c.params.ring_dim}, depth {c.params.multiplicative_depth}) and degrees {list(degrees)}"
            )
        return replace(c, costs=o.costs)
    if not (o.measure_costs and c.runnable):
        return c
    costs = cached_primitives(c.params, degrees, remeasure=o.remeasure_costs)
    if c.params.bootstrapping is not None:
        costs = with_bootstrap(costs, c.params, c.params.slots, refresh=o.remeasure_costs)
    return replace(c, costs=costs)


def layout_pass(c: Compilation) -> Compilation:
    return replace(c, layouts=assign_layouts(c.graph, c.params.lane_length, c.cost_model, c.levels))


def bootstraps_pass(c: Compilation) -> Compilation:
    """Bootstraps where the predicted total is least (parameters with bootstrapping only)."""
    params = c.params
    if params.bootstrapping is None:
        return c
    stats = (c.costs.ms.get("bootstraps") or {}) if c.costs is not None else {}
    # measured when the costs were; else OpenFHE's own count of the levels a bootstrap consumes
    after = params.multiplicative_depth - int(stats.get("levels_after", params.multiplicative_depth
                                                        - params.bootstrapping.depth))
    ranges = None
    if not c.options.estimate_only:
        if c.options.calibration_data is None:
            raise CompileError("bootstrapping needs calibration_data: every bootstrap's input range is checked "
                               "against the range a bootstrap handles")
        data = np.asarray(c.options.calibration_data, dtype=np.float64).reshape(-1, *c.graph.nodes[c.graph.input].shape)
        ranges = output_ranges(c.graph, data)
    costs = c.costs

    def bootstrap_ms(slots: int) -> float:
        nonlocal costs
        if costs is None:  # relative costs: a sparse bootstrap priced as a full one
            return c.cost_model.ms(f"bootstrap_{params.slots}", 0)
        costs = with_bootstrap(costs, params, slots, refresh=c.options.remeasure_costs)
        return float(costs.ms[f"bootstrap_{slots}"])

    graph, layouts, params, _ = place_bootstraps(c.graph, c.layouts, c.layouts.index_plans, params, c.cost_model,
                                                 bootstrap_ms, after, bootstrap_bound(params), ranges,
                                                 c.options.range_margin)
    return replace(c, graph=graph, layouts=layouts, params=params, levels=assign_levels(graph), costs=costs)


def diagonals_pass(c: Compilation) -> Compilation:
    if c.options.estimate_only:  # indices only: the search already has them
        return replace(c, plans=c.layouts.index_plans)
    return replace(c, plans=extract_diagonals(c.graph, c.layouts, c.params.lane_length, c.cost_model, c.levels))


def keys_pass(c: Compilation) -> Compilation:
    """Every linear step's schedule chosen together for time and key bytes (``compiler.rotation_keys``),
    priced as the report predicts: with the compile's costs, else the stored table (relative costs
    for a ring it lacks: key bytes then only break ties, and bound the budget)."""
    params, depth = c.params, c.params.multiplicative_depth
    pricing = CostModel(c.costs if c.costs is not None else stored_costs(params, _chebyshev_degrees(c.graph)), depth)
    levels = {name: max((c.levels.get(i, 0) for i in c.graph.nodes[name].inputs), default=0) for name in c.plans}
    price = key_price_ms(key_sizes(params, c.costs).get("rotation", 0)) if pricing.costs else 0.0
    fixed = len(lane_shifts(params.lanes, params.slots))
    plans, default = choose_key_schedules(c.plans, levels, pricing, price,
                                          lambda keys: bundle_bytes(params, c.costs, keys + fixed),
                                          c.options.key_budget_bytes)
    return replace(c, plans=plans, unbudgeted_plans=default if c.options.key_budget_bytes is not None else None)


def program_pass(c: Compilation) -> Compilation:
    program = emit_program(c.graph, c.levels, c.params, c.layouts, c.plans, c.costs, c.runnable, c.options.labels)
    if c.unbudgeted_plans is not None:
        program.metadata["key_budget"] = {
            "budget_bytes": int(c.options.key_budget_bytes),
            "unbudgeted_schedules": {name: [p.baby_step, p.fold_chunk] for name, p in c.unbudgeted_plans.items()}}
    return replace(c, program=program)


#: The compiler, in order.
PASSES: tuple[tuple[str, Callable[[Compilation], Compilation]], ...] = (
    ("import", import_pass),
    ("fuse", fuse_pass),
    ("calibrate", calibrate_pass),
    ("levels", levels_pass),
    ("parameters", parameters_pass),
    ("quadratics", quadratics_pass),
    ("costs", costs_pass),
    ("layout", layout_pass),
    ("bootstraps", bootstraps_pass),
    ("diagonals", diagonals_pass),
    ("keys", keys_pass),
    ("program", program_pass),
)


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
    estimate_only: bool = False,
    costs: PrimitiveCosts | None = None,
    measure_costs: bool = True,
    remeasure_costs: bool = False,
    bootstrapping: bool | None = None,
    key_budget_bytes: int | None = None,
    progress: bool = False,
) -> CompiledModel:
    """Compile ``model`` for encrypted inference with ``lanes`` inputs per ciphertext.

    ``calibration_data`` (a batch shaped like the input) sets the ranges of the polynomial
    activations that replace ReLU/Sigmoid/Tanh/GELU/SiLU.  ``costs`` is a primitive-cost table
    (``h33_bento.ckks.timing.measure_primitives``, or ``compiled.costs`` of an earlier compile)
    to choose schedules with and predict from; without one this machine's costs for the chosen
    parameters are used: measured on the first compile (a few seconds) and cached per machine
    and parameter set (``ckks.timing.cached_primitives``), measured again with
    ``remeasure_costs=True``; with ``measure_costs=False`` static relative costs are used.  With
    ``estimate_only=True`` the diagonal values are not materialized and a network deeper than
    128-bit parameters allow still gets an estimate (marked not runnable) instead of a
    DepthExceededError.  ``bootstrapping``: None bootstraps when the network is deeper than the
    largest ring holds, True always, False never (too deep then raises DepthExceededError).
    The linear steps' schedules are chosen together for time and evaluation-key bytes, a key
    priced at its upload time (``compiler.rotation_keys``); ``key_budget_bytes`` caps the predicted
    key bundle: the fastest schedules found that fit it are chosen, or KeyBudgetError names the
    smallest bundle found, and the report shows what the budget cost against the default.
    ``progress`` shows a bar.
    """
    options = CompileOptions(
        input_shape=tuple(input_shape) if input_shape is not None else None, calibration_data=calibration_data,
        lanes=lanes, labels=tuple(labels) if labels is not None else None, scale_bits=scale_bits,
        first_mod_bits=first_mod_bits, security_level=security_level, activation_degrees=activation_degrees,
        range_margin=range_margin, estimate_only=estimate_only, measure_costs=measure_costs,
        remeasure_costs=remeasure_costs, costs=costs, bootstrapping=bootstrapping, key_budget_bytes=key_budget_bytes)
    state = Compilation(source=model, options=options)
    with tqdm(PASSES, desc="compile", unit="pass", disable=not progress, leave=False) as bar:
        for name, run in bar:
            bar.set_postfix_str(name)
            state = run(state)
    return state.program
