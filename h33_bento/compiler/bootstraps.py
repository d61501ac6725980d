"""Bootstraps: where a deep program refreshes its levels, at the least predicted cost.

A bootstrap may follow any node: its output sits at the level a bootstrap leaves (``after``,
measured), whatever its input's.  The pass picks the nodes to bootstrap that minimize the
predicted run time -- bootstraps at their cost per ciphertext, every other op priced at the
level where it runs (deeper levels have fewer towers and cost less) -- such that no op runs
out of levels.

The search is a shortest path over levels, as in Orion's level DAG.  The graph is split into
series and parallel parts: a join's branches start at the fork that dominates it, each branch
is solved for every level the fork may hand it, and the branches meet at the deepest of their
levels (the engine aligns the other operand), so residual connections are joined at one level.
Tables are (levels + 1) squared, so ResNet-scale graphs take well under a second.

Sparse slots: a bootstrapped linear output that fits one ciphertext block is bootstrapped at the
fewest slots that hold it.  OpenFHE reads a sparse ciphertext as the average of its periods: a
folded output repeats with that period already; a zero-padded one is scaled up by the number of
periods (inside the linear map) so the average is the value.  At most one sparse slot count per
program: each slot count needs its own set of bootstrapping keys.

Ranges: every slot of a bootstrap's input must stay within ``ckks.timing.bootstrap_bound``.
The calibrated range of each bootstrapped tensor is checked; a linear or polynomial producer
whose range exceeds the bound is scaled down (a residual add through its operands' producers),
and the linear or polynomial ops that read what was scaled absorb the inverse scale, so no level
is spent on it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..ckks.params import CKKSParams
from ..errors import CompileError
from ..program.cost_model import CostModel
from ..program.diagonals import DiagonalPlan
from ..program.ops import OPS, Op
from .graph import Graph, Node
from .layout import Layouts

INF = float("inf")


@dataclass
class _Table:
    """cost[a][b]: least cost from a region's source at level a to its sink at level b, and the
    nodes bootstrapped on the way."""

    cost: np.ndarray
    chosen: list[list[frozenset]]

    @classmethod
    def empty(cls, size: int) -> "_Table":
        return cls(np.full((size, size), INF), [[frozenset()] * size for _ in range(size)])

    @classmethod
    def identity(cls, size: int) -> "_Table":
        t = cls.empty(size)
        np.fill_diagonal(t.cost, 0.0)
        return t

    def then(self, other: "_Table") -> "_Table":
        """This region followed by ``other`` (min-plus product)."""
        total = self.cost[:, :, None] + other.cost[None, :, :]
        via = total.argmin(axis=1)
        out = _Table(total.min(axis=1), [[frozenset()] * len(via) for _ in range(len(via))])
        for a, b in zip(*np.nonzero(np.isfinite(out.cost))):
            y = via[a, b]
            out.chosen[a][b] = self.chosen[a][y] | other.chosen[y][b]
        return out

    def meet(self, other: "_Table") -> "_Table":
        """Two branches from one fork, joined at the deeper of their levels."""
        size = len(self.cost)
        out = _Table.empty(size)
        for f in range(size):
            for a in np.flatnonzero(np.isfinite(self.cost[f])):
                for b in np.flatnonzero(np.isfinite(other.cost[f])):
                    s, c = max(a, b), self.cost[f, a] + other.cost[f, b]
                    if c < out.cost[f, s]:
                        out.cost[f, s] = c
                        out.chosen[f][s] = self.chosen[f][a] | other.chosen[f][b]
        return out


class _Search:
    """The series-parallel shortest path of the module docstring, over one graph."""

    def __init__(self, graph: Graph, depth: int, after: int, op_cost: Callable[[Node, int], float],
                 boot_cost: Callable[[Node], float]) -> None:
        self.graph, self.depth, self.after = graph, depth, after
        self.op_cost, self.boot_cost = op_cost, boot_cost
        self.size = depth + 1
        self.order = {name: i for i, name in enumerate(graph.nodes)}
        self.idom = self._dominators()
        self.memo: dict[tuple[str, str], tuple[_Table, frozenset]] = {}

    def _dominators(self) -> dict[str, str]:
        dom: dict[str, set[str]] = {}
        for node in self.graph.nodes.values():
            dom[node.name] = {node.name} | (set.intersection(*(dom[i] for i in node.inputs)) if node.inputs else set())
        return {n: max(d - {n}, key=self.order.__getitem__) for n, d in dom.items() if len(d) > 1}

    def transfer(self, node: Node) -> _Table:
        """``node`` starting at each level: its output level, or the bootstrap's after it."""
        t = _Table.empty(self.size)
        spec = OPS[node.op]
        for start in range(self.size):
            out = spec.output_level(node.attrs, [start] * max(len(node.inputs), 1))
            if out > self.depth:
                continue
            cost = self.op_cost(node, start)
            t.cost[start, out] = cost
            # a bootstrap's input keeps two towers at least (OpenFHE's bootstrap drops one itself)
            if self.after < out < self.depth and node.name != self.graph.output:
                boot = cost + self.boot_cost(node)
                if boot < t.cost[start, self.after]:
                    t.cost[start, self.after] = boot
                    t.chosen[start][self.after] = frozenset({node.name})
        return t

    def solve(self, source: str, sink: str) -> tuple[_Table, frozenset]:
        """(table from ``source``'s output to ``sink``'s, the nodes strictly inside the region)."""
        key = (source, sink)
        if key in self.memo:
            return self.memo[key]
        if sink == source:
            result = (_Table.identity(self.size), frozenset())
        else:
            node = self.graph.nodes[sink]
            if len(node.inputs) == 1:
                head, inside = self.solve(source, node.inputs[0])
                inside = inside | ({node.inputs[0]} - {source})
            else:
                fork = self.idom[sink]
                head, inside = self.solve(source, fork)
                inside = inside | ({fork} - {source})
                branches = [self.solve(fork, p) + (p,) for p in node.inputs]
                seen: set[str] = set()
                joined = None
                for table, nodes, pred in branches:
                    nodes = nodes | ({pred} - {fork})
                    if nodes & seen:
                        raise CompileError(f"bootstrap placement needs a series-parallel graph: the branches into "
                                           f"{sink!r} share {sorted(nodes & seen)[:3]}")
                    seen |= nodes
                    joined = table if joined is None else joined.meet(table)
                head = head.then(joined)
                inside = inside | seen
            result = (head.then(self.transfer(node)), inside)
        self.memo[key] = result
        return result

    def best(self) -> tuple[float, frozenset]:
        table, _ = self.solve(self.graph.input, self.graph.output)
        end = int(np.argmin(table.cost[0]))
        return float(table.cost[0, end]), table.chosen[0][end]


def _blocks(positions: np.ndarray, n: int) -> int:
    return int(positions.max()) // n + 1


def place_bootstraps(graph: Graph, layouts: Layouts, plans: dict[str, DiagonalPlan], params: CKKSParams,
                     model: CostModel, bootstrap_ms: Callable[[int], float], after: int, bound: float,
                     ranges: dict[str, tuple[float, float]] | None, margin: float = 0.1
                     ) -> tuple[Graph, Layouts, CKKSParams, list[str]]:
    """Insert the cheapest set of bootstraps; returns the graph, its layouts (a bootstrap keeps its
    input's), the parameters with the bootstrap slot counts, and the bootstrapped nodes.

    ``bootstrap_ms(slots)`` prices one ciphertext bootstrap, ``after`` is the level a bootstrap
    leaves, ``bound`` the input magnitude it handles, ``ranges`` the calibrated output range of
    every node (None for estimates: not checked).
    """
    n, lanes, slots = params.lane_length, params.lanes, params.slots
    blocks = {name: _blocks(pos, n) for name, pos in layouts.positions.items()}
    candidates = _sparse_candidates(graph, layouts, params, ranges, bound, margin)
    prices = {s: bootstrap_ms(s) for s in {slots} | {c[0] for c in candidates.values()}}

    def op_cost(node: Node, start: int) -> float:
        spec = OPS[node.op]
        if spec.counts is None:
            return 0.0
        item = SimpleNamespace(attrs=node.attrs, linear=plans.get(node.name))
        cost = model.total(spec.counts(item, blocks[node.name]), start)
        return cost if cost == cost else 0.0  # not measured (relative costs price no series): free

    def boot_cost(node: Node) -> float:
        return min(prices[slots], prices[candidates.get(node.name, (slots, 1))[0]]) * blocks[node.name]

    search = _Search(graph, params.multiplicative_depth, after, op_cost, boot_cost)
    cost, chosen = search.best()
    if cost == INF:
        deepest = max(graph.nodes.values(), key=lambda v: OPS[v.op].depth(v.attrs))
        raise CompileError(f"no bootstrap placement fits: a bootstrap leaves {params.multiplicative_depth - after} "
                           f"levels, and {deepest.name!r} ({deepest.op.value}) needs "
                           f"{OPS[deepest.op].depth(deepest.attrs)}; use lower-degree activations")
    chosen_nodes = [name for name in graph.nodes if name in chosen]
    sparse = _one_sparse_count({k: v for k, v in candidates.items() if k in chosen}, prices, prices[slots])
    nodes: dict[str, Node] = {}
    renamed: dict[str, str] = {}
    positions = dict(layouts.positions)
    for node in graph.nodes.values():
        node = replace(node, inputs=[renamed.get(i, i) for i in node.inputs], attrs=dict(node.attrs))
        nodes[node.name] = node
        if node.name not in chosen:
            continue
        slot_count, periods = sparse.get(node.name, (slots, 1))
        if periods > 1:  # zero-padded: the sparse bootstrap averages `periods` copies
            _scale_output(node, float(periods))
        boot = Node(f"{node.name}.bootstrap", Op.BOOTSTRAP, [node.name], node.shape,
                    {"slots": slot_count, "period": slot_count // lanes, "level": after, "bound": bound})
        nodes[boot.name] = boot
        renamed[node.name] = boot.name
        positions[boot.name] = positions[node.name]
    out = Graph(nodes, graph.input, renamed.get(graph.output, graph.output))
    if ranges is not None:
        _fit_ranges(out, ranges, bound, margin, sparse)
    used = tuple(sorted({int(v.attrs["slots"]) for v in out.nodes.values() if v.op is Op.BOOTSTRAP}))
    boot_config = params.bootstrapping.model_copy(update={"slots": used})
    return (out, replace(layouts, positions=positions), params.model_copy(update={"bootstrapping": boot_config}),
            chosen_nodes)


def _sparse_candidates(graph: Graph, layouts: Layouts, params: CKKSParams,
                       ranges: dict[str, tuple[float, float]] | None, bound: float, margin: float
                       ) -> dict[str, tuple[int, int]]:
    """(slot count, periods) of every node whose bootstrap could run sparse: a linear output in one
    block, periodic (folded) or zero-padded with values that stay in bound once scaled up."""
    n, lanes = params.lane_length, params.lanes
    candidates: dict[str, tuple[int, int]] = {}
    for name, node in graph.nodes.items():
        pos = layouts.positions[name]
        if node.op is not Op.LINEAR or _blocks(pos, n) != 1:
            continue
        fold = layouts.folds.get(name, 0)
        if fold:  # a folded output repeats with period `fold`
            period, periods = fold, 1
        else:
            period = 1 << int(pos.max()).bit_length()
            peak = _peak(ranges, name, margin)
            while period < n and (n // period) * peak > bound:  # the scaled-up values must stay in bound
                period *= 2
            periods = n // period
        if period < n:
            candidates[name] = (period * lanes, periods)
    return candidates


def _one_sparse_count(chosen: dict[str, tuple[int, int]], prices: dict[int, float], full: float
                      ) -> dict[str, tuple[int, int]]:
    """The chosen sparse bootstraps at the one slot count that saves the most (every slot count
    needs its own keys); the others run full."""
    savings: dict[int, float] = {}
    for slot_count, _ in chosen.values():
        savings[slot_count] = savings.get(slot_count, 0.0) + full - prices[slot_count]
    if not savings:
        return {}
    pick = max(savings, key=lambda s: (savings[s], -s))
    return {name: c for name, c in chosen.items() if c[0] == pick} if savings[pick] > 0 else {}


def _peak(ranges: dict[str, tuple[float, float]] | None, name: str, margin: float) -> float:
    if ranges is None or name not in ranges:
        return 0.0
    lo, hi = ranges[name]
    return max(abs(lo), abs(hi)) * (1.0 + margin)


def _scale_output(node: Node, factor: float) -> None:
    """Multiply what a linear or polynomial node computes by ``factor`` (no level spent)."""
    if node.op is Op.LINEAR:
        node.attrs["matrix"] = node.attrs["matrix"] * factor
        node.attrs["bias"] = node.attrs["bias"] * factor
    elif node.op is Op.POLY:
        node.attrs["coeffs"] = np.asarray(node.attrs["coeffs"], dtype=np.float64) * factor
    else:
        raise CompileError(f"cannot scale the output of {node.op.value} node {node.name!r}")


def _scale_input(node: Node, factor: float) -> None:
    """Make a linear or polynomial node compute on inputs ``factor`` times larger as before."""
    if node.op is Op.LINEAR:
        node.attrs["matrix"] = node.attrs["matrix"] / factor
    elif node.op is Op.POLY:
        node.attrs["lower"], node.attrs["upper"] = node.attrs["lower"] * factor, node.attrs["upper"] * factor
    else:
        raise CompileError(f"cannot rescale the input of {node.op.value} node {node.name!r}")


def _fit_ranges(graph: Graph, ranges: dict[str, tuple[float, float]], bound: float, margin: float,
                sparse: dict[str, tuple[int, int]]) -> None:
    """Scale down each bootstrapped tensor whose calibrated range exceeds ``bound``.

    The tensor's producer computes it ``factor`` times smaller and every reader of it (through the
    bootstrap or not) absorbs ``1 / factor``.  A residual join (an add) is scaled through its
    operands: each operand's linear or polynomial producer is scaled, and that producer's other
    readers absorb the inverse (a ResNet's identity shortcut: the previous block's activation,
    read by the next convolution too)."""
    for boot in [v for v in graph.nodes.values() if v.op is Op.BOOTSTRAP]:
        source = graph.nodes[boot.inputs[0]]
        periods = sparse.get(source.name, (0, 1))[1]
        peak = _peak(ranges, source.name, margin) * periods
        if peak <= bound:
            continue
        factor = bound / peak
        producers = [source] if source.op is not Op.ADD else [graph.nodes[i] for i in dict.fromkeys(source.inputs)]
        # readers of the scaled tensors: the bootstrap's, the source's others, each operand's others
        readers = [c for c in graph.consumers(source.name) if c is not boot] + graph.consumers(boot.name)
        if source.op is Op.ADD:
            readers += [c for p in producers for c in graph.consumers(p.name) if c is not source]
        if any(p.op not in (Op.LINEAR, Op.POLY) for p in producers) or any(
                c.op not in (Op.LINEAR, Op.POLY) for c in readers):
            raise CompileError(
                f"values up to {peak:.3g} reach the bootstrap after {source.name!r}, beyond the +-{bound:.3g} "
                "it handles, and its neighbours cannot absorb a rescaling; normalize that tensor (BatchNorm) "
                "or lower its range")
        for producer in producers:
            _scale_output(producer, factor)
        for reader in readers:
            _scale_input(reader, factor)
