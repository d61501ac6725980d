"""Slot layouts: where each tensor element lives in the lane vector, chosen to keep diagonals few.

A layout maps every logical element to a position ``block * n + offset``.  Element-wise ops keep
their input's layout; each linear transform may pick its output layout freely, and that choice
decides how many diagonals both it and the next transform need.  Candidates:

* compact: element i at position i;
* folded compact: as compact, but gathered modulo a power of two M (see ``diagonals``);
* grid: each output sits where its receptive field starts in the input, channels spread over
  the gaps a stride leaves, so a strided convolution keeps one diagonal per kernel tap and
  the next transform absorbs the gaps.

Each candidate is scored by its own cost plus the cheapest simple layout of the next linear
transform (one step of look-ahead).
"""
from __future__ import annotations

import numpy as np

from ..errors import CompileError
from .diagonals import DiagonalPlan, build_diagonals, relative_cost
from .graph import Graph, Node

ELEMENTWISE = ("poly", "square", "activation")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def grid_positions(matrix, in_pos: np.ndarray, capacity: int, n: int, tries: int = 64) -> np.ndarray | None:
    """Place each output at its receptive field's first input position, channels at offsets.

    Outputs sharing an anchor (the channels of one pixel) are placed in rounds; each round
    takes, among the first ``tries`` collision-free offsets, the one adding the fewest new
    diagonals, breaking ties by what the next round could then achieve.
    """
    csr = matrix.tocsr()
    m = csr.shape[0]
    first = np.where(np.diff(csr.indptr) > 0, csr.indices[np.minimum(csr.indptr[:-1], len(csr.indices) - 1)], 0)
    anchor = in_pos[first]
    order = np.lexsort((np.arange(m), anchor))
    sorted_anchor = anchor[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_anchor)) + 1]
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m) - np.repeat(starts, np.diff(np.r_[starts, m]))
    rounds = [np.flatnonzero(rank == j) for j in range(int(rank.max()) + 1)]

    def options(rows: np.ndarray, occupied: np.ndarray, diagonals: set[int]) -> list[tuple[int, int, set[int]]]:
        """(new diagonals, offset, diagonal keys) for the first ``tries`` free offsets."""
        base = anchor[rows]
        sub = csr[rows].tocoo()
        src = in_pos[sub.col]
        found, delta = [], 0
        while len(found) < tries and delta <= capacity and base.max() + delta < capacity:
            cand = base + delta
            if not occupied[cand].any():
                dst = cand[sub.row]
                keys = set(((dst // n) * capacity + (src // n) * n + (src - dst) % n).tolist())
                found.append((len(keys - diagonals), delta, keys))
                if found[-1][0] == 0:
                    break
            delta += 1
        return sorted(found, key=lambda f: (f[0], f[1]))

    occupied = np.zeros(capacity, dtype=bool)
    positions = np.empty(m, dtype=np.int64)
    diagonals: set[int] = set()
    for j, rows in enumerate(rounds):
        found = options(rows, occupied, diagonals)
        if not found:
            return None
        choice = found[0]
        tied = [f for f in found if f[0] == choice[0]]
        if len(tied) > 1 and j + 1 < len(rounds):
            def next_cost(f: tuple[int, int, set[int]]) -> int:
                occ = occupied.copy()
                occ[anchor[rows] + f[1]] = True
                nxt = options(rounds[j + 1], occ, diagonals | f[2])
                return nxt[0][0] if nxt else 1 << 30
            choice = min(tied[:8], key=next_cost)
        positions[rows] = anchor[rows] + choice[1]
        occupied[positions[rows]] = True
        diagonals |= choice[2]
    return positions


def _candidates(node: Node, in_pos: np.ndarray, n: int) -> list[tuple[np.ndarray, int]]:
    m = node.size
    compact = np.arange(m, dtype=np.int64)
    cands: list[tuple[np.ndarray, int]] = [(compact, 0)]
    if m <= n // 2:
        fold = _next_pow2(m)
        while fold < n:
            cands.append((compact, fold))
            fold *= 2
    in_blocks = int(in_pos.max()) // n + 1
    capacity = max(in_blocks, -(-m // n)) * n
    grid = grid_positions(node.attrs["matrix"], in_pos, capacity, n)
    if grid is not None:
        cands.append((grid, 0))
    return cands


def _cost(node: Node, in_pos: np.ndarray, out_pos: np.ndarray, n: int, fold: int) -> float:
    plan = build_diagonals(node.attrs["matrix"], node.attrs["bias"], in_pos, out_pos, n, fold, values=False)
    return relative_cost(plan.counts())


def _downstream(graph: Graph, node: Node) -> Node | None:
    """The node reached from ``node`` through single-consumer element-wise ops."""
    cur = node
    while True:
        consumers = graph.consumers(cur.name)
        if len(consumers) != 1:
            return None
        nxt = consumers[0]
        if nxt.op not in ELEMENTWISE:
            return nxt
        cur = nxt


def assign_layouts(graph: Graph, n: int, values: bool = True) -> tuple[dict[str, np.ndarray], dict[str, DiagonalPlan]]:
    """Positions for every node and a diagonal plan for every linear node."""
    positions: dict[str, np.ndarray] = {}
    plans: dict[str, DiagonalPlan] = {}
    for node in graph.nodes.values():
        if node.op == "input":
            positions[node.name] = np.arange(node.size, dtype=np.int64)
        elif node.op in ELEMENTWISE:
            positions[node.name] = positions[node.inputs[0]]
        elif node.op in ("add", "mul"):
            a, b = (positions[i] for i in node.inputs)
            if not np.array_equal(a, b):
                raise CompileError(f"operands of {node.op} node {node.name!r} have different slot layouts")
            positions[node.name] = a
        elif node.op == "linear":
            in_pos = positions[node.inputs[0]]
            out_pos, fold = _choose(graph, node, in_pos, positions, n)
            plans[node.name] = build_diagonals(node.attrs["matrix"], node.attrs["bias"], in_pos, out_pos, n,
                                               fold, values=values)
            positions[node.name] = out_pos
        else:
            raise CompileError(f"node {node.name!r}: op {node.op!r} must be lowered before layout")
    return positions, plans


def _choose(graph: Graph, node: Node, in_pos: np.ndarray, known: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, int]:
    nxt = _downstream(graph, node)
    if nxt is not None and nxt.op in ("add", "mul"):
        others = [known[i] for i in nxt.inputs if i in known]
        if others:
            return others[0], 0  # residual/product operands must share one layout
    best = None
    for out_pos, fold in _candidates(node, in_pos, n):
        cost = _cost(node, in_pos, out_pos, n, fold)
        if nxt is not None and nxt.op == "linear":
            cost += min(_cost(nxt, out_pos, p, n, f) for p, f in _candidates(nxt, out_pos, n))
        if best is None or cost < best[0]:
            best = (cost, out_pos, fold)
    return best[1], best[2]
