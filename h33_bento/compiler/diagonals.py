"""Diagonal extraction: a linear transform's matrix under fixed slot layouts -> a ``DiagonalPlan``.

The plan itself (its schedule, counts and plaintext evaluation) lives in ``program.diagonals``;
this stage finds the non-zero generalized diagonals of the matrix and their values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..program.cost_model import CostModel
from ..program.diagonals import DiagonalPlan

if TYPE_CHECKING:
    import scipy.sparse as sp

    from .graph import Graph
    from .layout import Layouts


def extract_diagonals(graph: "Graph", layouts: "Layouts", n: int, model: CostModel,
                      levels: dict[str, int]) -> dict[str, DiagonalPlan]:
    """The diagonal values of every linear node under its chosen layouts, scheduled at its level."""
    plans = {}
    for name, fold in layouts.folds.items():
        node = graph.nodes[name]
        level = max((levels.get(i, 0) for i in node.inputs), default=0)
        plans[name] = build_diagonals(node.attrs["matrix"], node.attrs["bias"], layouts.positions[node.inputs[0]],
                                      layouts.positions[name], n, fold, values=True, model=model, level=level)
    return plans


def build_diagonals(
    matrix: "sp.spmatrix",
    bias: np.ndarray,
    in_pos: np.ndarray,
    out_pos: np.ndarray,
    n: int,
    fold: int = 0,
    values: bool = True,
    model: CostModel | None = None,
    level: int = 0,
) -> DiagonalPlan:
    """Extract the non-zero (generalized) diagonals of ``matrix`` under the given layouts.

    ``in_pos``/``out_pos`` map each logical element to its slot position (block * n + offset).
    With ``values=False`` only the diagonal indices are computed (for planning huge models).
    The schedule is the cheapest under ``model`` at ``level`` (default: the static relative costs).
    """
    in_blocks = int(in_pos.max()) // n + 1 if len(in_pos) else 1
    out_blocks = int(out_pos.max()) // n + 1 if len(out_pos) else 1
    if fold and (out_blocks != 1 or int(out_pos.max()) >= fold):
        raise ValueError("folded outputs must fit in [0, fold) of one block")

    def keys(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal key (out block, in block, k) and output slot of each entry."""
        ib, io = np.divmod(in_pos[cols], n)
        ob, oo = np.divmod(out_pos[rows], n)
        if fold:
            k = (io - oo) % fold
            slot = (io - k) % n
        else:
            k = (io - oo) % n
            slot = oo
        return (ob * in_blocks + ib) * n + k, slot

    if not values:
        uniq = _unique_keys(matrix.tocsr(), keys, out_blocks * in_blocks * n)
    else:
        coo = matrix.tocoo()
        key, slot = keys(coo.row, coo.col)
        uniq, inverse = np.unique(key, return_inverse=True)
    terms = np.stack([uniq // (in_blocks * n), (uniq // n) % in_blocks, uniq % n], axis=1).astype(np.int64)
    diags = np.zeros((len(uniq), n if values else 0))
    if values:
        flat = inverse.reshape(-1) * n + slot
        if len(np.unique(flat)) != len(flat):
            raise AssertionError("layout collision: two matrix entries map to one diagonal slot")
        diags.reshape(-1)[flat] = coo.data
    bias_vec = np.zeros((out_blocks, n))
    b_ob, b_oo = np.divmod(out_pos, n)
    if fold:
        for r in range(0, n, fold):
            bias_vec[b_ob, b_oo + r] = bias
    else:
        bias_vec[b_ob, b_oo] = bias
    plan = DiagonalPlan(n=n, in_blocks=in_blocks, out_blocks=out_blocks, fold=fold,
                        terms=terms, diags=diags, bias=bias_vec)
    plan.choose_schedule(model or CostModel(None, 1), level)
    return plan


def _unique_keys(csr: "sp.csr_matrix", keys, space: int, chunk: int = 1 << 22) -> np.ndarray:
    """Sorted distinct diagonal keys of every entry, ``chunk`` entries at a time.

    Planning only needs which diagonals exist, so a bitmap over the key space replaces the sort
    (and its n log n) for the 10^7-entry matrices of CIFAR-scale networks; memory stays bounded
    by the chunk.
    """
    indptr = csr.indptr
    m = csr.shape[0]
    bitmap = np.zeros(space, dtype=bool) if space <= 1 << 28 else None
    found: list[np.ndarray] = []
    start = 0
    while start < m:
        stop = int(np.searchsorted(indptr, indptr[start] + chunk, side="right")) - 1
        stop = min(max(stop, start + 1), m)
        lo, hi = indptr[start], indptr[stop]
        rows = np.repeat(np.arange(start, stop), np.diff(indptr[start:stop + 1]))
        key, _ = keys(rows, csr.indices[lo:hi])
        if bitmap is not None:
            bitmap[key] = True
        else:
            found.append(np.unique(key))
        start = stop
    if bitmap is not None:
        return np.flatnonzero(bitmap)
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
