"""Slot layouts: where each tensor element lives in the lane vector, chosen to keep diagonals few.

A layout maps every logical element to a position ``block * n + offset``.  Element-wise ops keep
their input's layout; each linear transform may pick its output layout freely, and that choice
decides how many diagonals both it and the next transform need.  Candidates:

* compact: element i at position i;
* folded compact: as compact, but gathered modulo a power of two M (see ``diagonals``);
* grid: each output sits where its receptive field starts in the input, channels spread over
  the gaps a stride leaves, so a strided convolution keeps one diagonal per kernel tap and
  the next transform absorbs the gaps (found by a greedy search over channel offsets);
* plane grid: the same idea built directly for many-channel convolutions whose input lies on a
  ``PlaneGrid`` (channel planes of a power-of-two period on a canvas of fixed row width): output
  channels fill the lattice cells a stride leaves, then further planes; when planes tile a
  ciphertext block, a rotation by whole planes cycles every channel at once, so a convolution
  needs (planes per block) x (taps) diagonals per block pair, whatever its channel counts.

The client packs the input, so its layout is chosen too: row-major, or polyphase (space-to-depth)
planes for a strided first convolution, each compact or padded to a power-of-two canvas.

Each candidate is scored by its own cost plus the cheapest simple layout of the next linear
transform (one step of look-ahead).  Candidates and costs are memoized per (node, layouts), so
the look-ahead work is reused when the next transform's turn comes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..program.cost_model import CostModel
from ..program.diagonals import DiagonalPlan
from ..program.ops import OPS, Layout
from .diagonals import build_diagonals
from .graph import Graph, Node

#: The grid search tries channel offsets one by one; above this many non-zeros (the 10^7-entry
#: convolutions of CIFAR-scale networks) it would take minutes, so only the compact layouts are
#: considered there.
GRID_MAX_NNZ = 2_000_000
#: Work the grid search may do for one layer (matrix entries examined, plus 100 per offset tried;
#: about 30M per second here) before it gives up on the grid candidate: the larger of a floor and
#: a multiple of the layer's non-zeros (MNIST-scale layers need up to ~550 per non-zero) ...
GRID_WORK_BUDGET = 30_000_000
GRID_WORK_PER_ENTRY = 600
#: ... and for a whole graph: past it, the remaining layers (of deep CIFAR-scale networks, where
#: the search would add minutes) get the compact candidates only.
GRID_TOTAL_BUDGET = 600_000_000


class _OverBudget(Exception):
    pass


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def _virtual_anchors(anchor: np.ndarray, nnz: np.ndarray, out_shape: tuple[int, ...] | None) -> np.ndarray:
    """Where each output's full receptive field would start, padding included.

    A padded convolution clips the windows at the border, so their first input is not where the
    window starts.  For (C, H, W) outputs the window origin is affine in (y, x) per channel: fit
    it on the unclipped (densest) rows and extrapolate to the border rows.
    """
    if out_shape is None or len(out_shape) != 3 or np.all(nnz == nnz.max()):
        return anchor
    c_n, h, w = out_shape
    rows = np.arange(len(anchor))
    ch, y, x = rows // (h * w), (rows // w) % h, rows % w
    full = nnz == nnz.max()
    design = np.column_stack([y, x, np.eye(c_n)[ch]]).astype(float)
    coef, *_ = np.linalg.lstsq(design[full], anchor[full].astype(float), rcond=None)
    fitted = np.rint(design @ coef).astype(np.int64)
    if not np.array_equal(fitted[full], anchor[full]):
        return anchor  # not a convolution-like map: keep the first inputs
    return fitted


def grid_positions(matrix, in_pos: np.ndarray, capacity: int, n: int, tries: int = 64,
                   out_shape: tuple[int, ...] | None = None, budget: int | None = None,
                   spent: list[int] | None = None) -> np.ndarray | None:
    """Place each output at its receptive field's first input position, channels at offsets.

    Outputs sharing an anchor (the channels of one pixel) are placed in rounds; each round
    takes, among the first ``tries`` collision-free offsets, the one adding the fewest new
    diagonals, breaking ties by what the next round could then achieve.  None when no placement
    fits, or when the search would do more than ``budget`` work (see ``GRID_WORK_BUDGET``); the
    work done is added to ``spent[0]``.
    """
    work = [0]
    try:
        return _grid_positions(matrix, in_pos, capacity, n, tries, out_shape, budget, work)
    except _OverBudget:
        return None
    finally:
        if spent is not None:
            spent[0] += work[0]


def _grid_positions(matrix, in_pos: np.ndarray, capacity: int, n: int, tries: int,
                    out_shape: tuple[int, ...] | None, budget: int | None, work: list[int]) -> np.ndarray | None:
    csr = matrix.tocsr()
    m = csr.shape[0]
    first = np.where(np.diff(csr.indptr) > 0, csr.indices[np.minimum(csr.indptr[:-1], len(csr.indices) - 1)], 0)
    anchor = _virtual_anchors(in_pos[first], np.diff(csr.indptr), out_shape) % capacity
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
        while len(found) < tries and delta < capacity:
            cand = (base + delta) % capacity  # slot positions are cyclic
            work[0] += 100  # one offset tried costs about as much as 100 entries examined
            if not occupied[cand].any():
                work[0] += len(sub.row)
                dst = cand[sub.row]
                keys = set(((dst // n) * capacity + (src // n) * n + (src - dst) % n).tolist())
                found.append((len(keys - diagonals), delta, keys))
                if found[-1][0] == 0:
                    break
            delta += 1
            if budget is not None and work[0] > budget:
                raise _OverBudget
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
                occ[(anchor[rows] + f[1]) % capacity] = True
                nxt = options(rounds[j + 1], occ, diagonals | f[2])
                return nxt[0][0] if nxt else 1 << 30
            choice = min(tied[:8], key=next_cost)
        positions[rows] = (anchor[rows] + choice[1]) % capacity
        occupied[positions[rows]] = True
        diagonals |= choice[2]
    return positions


@dataclass(frozen=True)
class PlaneGrid:
    """A (C, H, W) layout on channel planes: element (c, y, x) sits at
    ``(c // G) * plane + (y * lat_y + sub_y) * row + x * lat_x + sub_x`` with
    ``(sub_y, sub_x) = divmod(c % G, lat_x)`` and ``G = lat_y * lat_x`` channels per plane.

    ``row`` is the canvas row width in slots and ``(lat_y, lat_x)`` the lattice the tensor's
    pixels sit on (a stride-s convolution multiplies it by s, leaving s*s cells per pixel).
    """

    plane: int
    row: int
    lat_y: int = 1
    lat_x: int = 1

    @property
    def per_plane(self) -> int:
        return self.lat_y * self.lat_x

    def positions(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Slot positions of a (C, H, W) tensor; None when its pixels overflow a plane."""
        c, h, w = shape
        if (w - 1) * self.lat_x + self.lat_x > self.row or h * self.lat_y * self.row > self.plane:
            return None
        ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
        sub_y, sub_x = np.divmod(ch % self.per_plane, self.lat_x)
        pos = (ch // self.per_plane) * self.plane + (y * self.lat_y + sub_y) * self.row + x * self.lat_x + sub_x
        return pos.reshape(-1).astype(np.int64)


def polyphase_positions(shape: tuple[int, ...], stride: int, padded: bool = False) -> np.ndarray | None:
    """Space-to-depth layout of a (C, H, W) tensor: element (c, y, x) goes to phase plane
    (c, y mod s, x mod s) at (y // s, x // s); planes are packed tight, or with ``padded`` on a
    power-of-two canvas (stride 1: row-major).  None when the stride does not fit the image."""
    c, h, w = shape
    if stride > 1 and stride >= min(h, w):
        return None
    grid = _phase_grid(shape, stride, padded)
    phases = grid.positions((c * stride * stride, -(-h // stride), -(-w // stride)))
    ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    phase = (ch * stride + y % stride) * stride + x % stride
    hs, ws = -(-h // stride), -(-w // stride)
    return phases[((phase * hs) + y // stride) * ws + x // stride].reshape(-1)


def _phase_grid(shape: tuple[int, ...], stride: int, padded: bool) -> PlaneGrid:
    h, w = -(-shape[1] // stride), -(-shape[2] // stride)
    row = _next_pow2(w) if padded else w
    return PlaneGrid(plane=_next_pow2(h * row) if padded else h * row, row=row)


def input_candidates(shape: tuple[int, ...], n: int) -> list[tuple[np.ndarray, PlaneGrid | None]]:
    """Where the client may pack a (C, H, W) input, each with its plane grid: row-major first,
    then padded and polyphase variants that need no more ciphertext blocks than row-major."""
    size = int(np.prod(shape))
    if len(shape) != 3:
        return [(np.arange(size, dtype=np.int64), None)]
    blocks = -(-size // n)
    cands = []
    for stride in (1, 2, 3, 4):  # stride 1: row-major (first), then on a padded canvas
        for pad in (False, True):
            pos = polyphase_positions(shape, stride, pad)
            if pos is not None and int(pos.max()) // n + 1 <= blocks:
                cands.append((pos, _phase_grid(shape, stride, pad)))
    return cands


def plane_grid_positions(matrix, in_pos: np.ndarray, in_grid: PlaneGrid, out_shape: tuple[int, ...]
                         ) -> tuple[np.ndarray, PlaneGrid] | None:
    """The plane-grid layout of a convolution's output, or None when ``matrix`` is not one.

    The window origins of the outputs, fitted affine in (y, x) (``_virtual_anchors``), give the
    output lattice in slots: (a_y, a_x) = (lat_y * row, lat_x).  Channels then fill the
    ``lat_y * lat_x`` cells of each lattice point, plane after plane, on the input's canvas.
    """
    if len(out_shape) != 3:
        return None
    csr = matrix.tocsr()
    nnz = np.diff(csr.indptr)
    if not nnz.any():
        return None
    first = csr.indices[np.minimum(csr.indptr[:-1], len(csr.indices) - 1)]
    anchors = _virtual_anchors(in_pos[first], nnz, out_shape)
    c_n, h, w = out_shape
    if h * w < 2:
        return None
    a = anchors.reshape(c_n, h, w)
    a_y = int(a[0, 1, 0] - a[0, 0, 0]) if h > 1 else in_grid.row
    a_x = int(a[0, 0, 1] - a[0, 0, 0]) if w > 1 else 1
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    if a_y <= 0 or a_x <= 0 or a_y % in_grid.row or not np.array_equal(a - a[:, :1, :1], np.broadcast_to(
            ys * a_y + xs * a_x, a.shape)):
        return None
    grid = PlaneGrid(plane=in_grid.plane, row=in_grid.row, lat_y=a_y // in_grid.row, lat_x=a_x)
    pos = grid.positions(out_shape)
    return None if pos is None else (pos, grid)


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8), digest_size=16).digest()


Candidate = tuple[np.ndarray, int, "PlaneGrid | None"]  # output positions, fold, plane grid


def _candidates(node: Node, in_pos: np.ndarray, in_grid: PlaneGrid | None, n: int,
                memo: dict | None = None) -> list[Candidate]:
    key = ("candidates", node.name, _digest(in_pos), in_grid)
    if memo is not None and key in memo:
        return memo[key]
    m = node.size
    compact = np.arange(m, dtype=np.int64)
    compact_grid = PlaneGrid(plane=int(np.prod(node.shape[1:])), row=node.shape[2]) if len(node.shape) == 3 else None
    cands: list[Candidate] = [(compact, 0, compact_grid)]
    if m <= n // 2:
        fold = _next_pow2(m)
        while fold < n:
            cands.append((compact, fold, None))
            fold *= 2
    if in_grid is not None and (planar := plane_grid_positions(node.attrs["matrix"], in_pos, in_grid, node.shape)):
        cands.append((planar[0], 0, planar[1]))
    in_blocks = int(in_pos.max()) // n + 1
    capacity = max(in_blocks, -(-m // n)) * n
    grid = None
    nnz = node.attrs["matrix"].nnz
    spent = memo.setdefault("grid_work", [0]) if memo is not None else [0]
    # more channels than a stride leaves gaps (LoLA: 5 channels, stride 2) need a second block
    for cap in (capacity, capacity + n):
        if grid is not None or nnz > GRID_MAX_NNZ or spent[0] >= GRID_TOTAL_BUDGET:
            break
        budget = min(max(GRID_WORK_BUDGET, GRID_WORK_PER_ENTRY * nnz), GRID_TOTAL_BUDGET - spent[0])
        grid = grid_positions(node.attrs["matrix"], in_pos, cap, n, out_shape=node.shape, budget=budget,
                              spent=spent)
    if grid is not None:
        cands.append((grid, 0, None))
    if memo is not None:
        memo[key] = cands
    return cands


def _rule(node: Node) -> Layout:
    return OPS[node.op].layout


class _LayoutSearch:
    """Layout choices for one graph: candidate layouts and memoized diagonal plans and costs."""

    def __init__(self, graph: Graph, n: int, model: CostModel, levels: dict[str, int]) -> None:
        self.graph, self.n, self.model, self.levels = graph, n, model, levels
        self.memo: dict = {}

    def level(self, node: Node) -> int:
        """Levels consumed before ``node`` runs (where its operations are priced)."""
        return max((self.levels.get(i, 0) for i in node.inputs), default=0)

    def diagonals(self, node: Node, in_pos: np.ndarray, out_pos: np.ndarray, fold: int) -> DiagonalPlan:
        """Diagonal indices (no values) of ``node`` under the given layouts, memoized."""
        key = ("plan", node.name, fold, _digest(in_pos), _digest(out_pos))
        if key not in self.memo:
            self.memo[key] = build_diagonals(node.attrs["matrix"], node.attrs["bias"], in_pos, out_pos, self.n, fold,
                                             values=False, model=self.model, level=self.level(node))
        return self.memo[key]

    def cost(self, node: Node, in_pos: np.ndarray, out_pos: np.ndarray, fold: int) -> float:
        return self.diagonals(node, in_pos, out_pos, fold).cost(self.model, self.level(node))

    def input_layout(self, node: Node) -> tuple[np.ndarray, PlaneGrid | None]:
        """Where the client packs the input: the candidate (``input_candidates``) under which the
        first transform, with one step of look-ahead, costs least."""
        options = input_candidates(node.shape, self.n)
        nxt = _downstream(self.graph, node)
        if nxt is None or _rule(nxt) is not Layout.TRANSFORM or len(options) == 1:
            return options[0]
        return min(options, key=lambda option: self.choose(nxt, option[0], option[1], {})[0])

    def choose(self, node: Node, in_pos: np.ndarray, in_grid: PlaneGrid | None,
               known: dict[str, tuple[np.ndarray, PlaneGrid | None]]
               ) -> tuple[float, np.ndarray, int, PlaneGrid | None]:
        """(cost with one step of look-ahead, output positions, fold, plane grid) of the best
        candidate; ``known`` holds the layouts already assigned (positions, plane grid)."""
        nxt = _downstream(self.graph, node)
        if nxt is not None and _rule(nxt) is Layout.JOIN:
            others = [known[i] for i in nxt.inputs if i in known]
            if others:  # residual/product operands must share one layout
                pos, grid = others[0]
                return self.cost(node, in_pos, pos, 0), pos, 0, grid
        best = None
        for out_pos, fold, grid in _candidates(node, in_pos, in_grid, self.n, self.memo):
            cost = self.cost(node, in_pos, out_pos, fold)
            if nxt is not None and _rule(nxt) is Layout.TRANSFORM:
                cost += min(self.cost(nxt, out_pos, p, f) for p, f, _ in _candidates(nxt, out_pos, grid, self.n,
                                                                                      self.memo))
            if best is None or cost < best[0]:
                best = (cost, out_pos, fold, grid)
        return best


def _downstream(graph: Graph, node: Node) -> Node | None:
    """The node reached from ``node`` through single-consumer element-wise ops."""
    cur = node
    while True:
        consumers = graph.consumers(cur.name)
        if len(consumers) != 1:
            return None
        nxt = consumers[0]
        if _rule(nxt) is not Layout.ELEMENTWISE:
            return nxt
        cur = nxt


@dataclass
class Layouts:
    """Where every node's values sit (``positions``), the fold of each linear node's output, and
    the diagonal indices (no values) of each linear node under the chosen layouts."""

    positions: dict[str, np.ndarray]
    folds: dict[str, int]
    index_plans: dict[str, DiagonalPlan]


def assign_layouts(graph: Graph, n: int, model: CostModel | None = None,
                   levels: dict[str, int] | None = None) -> Layouts:
    """Positions for every node and the output layout of every linear node.

    Choices are priced by ``model`` (measured primitive costs) at each node's level in ``levels``.
    """
    search = _LayoutSearch(graph, n, model or CostModel(None, 1), levels or {})
    layouts: dict[str, tuple[np.ndarray, PlaneGrid | None]] = {}  # node -> (positions, plane grid)
    folds: dict[str, int] = {}
    plans: dict[str, DiagonalPlan] = {}
    for node in graph.nodes.values():
        rule = _rule(node)
        if not OPS[node.op].in_program and rule is not Layout.SOURCE:
            raise CompileError(f"node {node.name!r}: op {node.op.value!r} must be lowered before layout")
        if rule is Layout.SOURCE:
            layouts[node.name] = search.input_layout(node)
        elif rule is Layout.ELEMENTWISE:
            layouts[node.name] = layouts[node.inputs[0]]
        elif rule is Layout.JOIN:
            a, b = (layouts[i][0] for i in node.inputs)
            if not np.array_equal(a, b):
                raise CompileError(f"operands of {node.op.value} node {node.name!r} have different slot layouts")
            layouts[node.name] = layouts[node.inputs[0]]
        else:  # a transform: the search picks its output layout
            in_pos, in_grid = layouts[node.inputs[0]]
            _, out_pos, folds[node.name], grid = search.choose(node, in_pos, in_grid, layouts)
            plans[node.name] = search.diagonals(node, in_pos, out_pos, folds[node.name])
            layouts[node.name] = (out_pos, grid)
    return Layouts({name: pos for name, (pos, _) in layouts.items()}, folds, plans)
