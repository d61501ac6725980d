"""Rotation keys as a cost: the schedules of all linear steps chosen together, so that they share
keys, weighing the key bundle's bytes against predicted time.

``DiagonalPlan.choose_schedule`` picks each step's BSGS split and fold chunking for its time alone,
and the bundle holds the union of the rotations every step then uses.  Many splits cost nearly the
same time but use different rotations (baby steps below n1, giant steps at multiples of n1, fold
steps at powers of two), so choosing them together, with a price on each key the union gains,
finds much smaller bundles for little time (measured: docs/benchmarks.md, "Key budget").

The price of a key: the client uploads it once (at ``UPLOAD_MBIT_S``) and it serves
``RUNS_PER_UPLOAD`` ciphertext runs, so a key is worth its upload time over those runs, in
milliseconds per run.  With a key budget the bundle must also fit: the price is raised step by
step until it does, and the fastest fitting choice found is kept; ``KeyBudgetError`` names the
smallest bundle found when none fits.  The search is coordinate descent (one step's schedule at a
time, the others fixed, until none changes) from the previous price's choice, and at the highest
price also from every power-of-two split shared by all steps: a heuristic, not an exact optimum, but every
choice it returns is priced exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import KeyBudgetError
from ..program.cost_model import CostModel
from ..program.diagonals import DiagonalPlan

#: The client's upload bandwidth the default assumes, in Mbit/s (a home or office uplink).
UPLOAD_MBIT_S = 100.0
#: Ciphertext runs one key upload serves, in the default's trade of key bytes against time.
RUNS_PER_UPLOAD = 100
#: Coordinate-descent passes per price (each pass revisits every step; most settle in 2-3).
MAX_PASSES = 8
#: Prices tried for a budget: the default's, then up by this factor, this many times.
PRICE_FACTOR, PRICE_STEPS = 1.6, 40


def key_price_ms(rotation_key_bytes: int) -> float:
    """Milliseconds of predicted time per run the default gives up to save one rotation key."""
    return rotation_key_bytes * 8 / (UPLOAD_MBIT_S * 1e6) * 1e3 / RUNS_PER_UPLOAD


@dataclass(frozen=True)
class Schedule:
    """One way to run a linear step: its BSGS split, fold chunking, their time and rotations."""

    baby_step: int
    fold_chunk: int
    ms: float
    rotations: frozenset[int]


def schedules(plan: DiagonalPlan, model: CostModel, level: int) -> list[Schedule]:
    """Every schedule ``choose_schedule`` considers for ``plan``, priced at ``level``."""
    bsgs = {n1: plan.bsgs_ms(model, level, n1) for n1 in plan.baby_steps()}
    fold = {c: plan.fold_ms(model, level, c) for c in plan.fold_chunk_sizes()}
    return [Schedule(n1, c, bsgs[n1] + fold[c], frozenset(plan.rotations(n1, c))) for n1 in bsgs for c in fold]


def _descend(options: list[list[Schedule]], choice: list[int], price: float) -> list[int]:
    """Coordinate descent on sum(ms) + price * |union of rotations| from ``choice``."""
    choice = list(choice)
    uses: dict[int, int] = {}
    for opts, k in zip(options, choice):
        for r in opts[k].rotations:
            uses[r] = uses.get(r, 0) + 1
    for _ in range(MAX_PASSES):
        changed = False
        for i, opts in enumerate(options):
            for r in opts[choice[i]].rotations:
                uses[r] -= 1

            def score(k: int) -> tuple[float, int]:
                new = sum(1 for r in opts[k].rotations if not uses.get(r))
                return opts[k].ms + price * new, new

            best = min(range(len(opts)), key=score)
            changed |= best != choice[i]
            choice[i] = best
            for r in opts[best].rotations:
                uses[r] = uses.get(r, 0) + 1
        if not changed:
            break
    return choice


def _keys(options: list[list[Schedule]], choice: list[int]) -> int:
    return len(frozenset().union(*(opts[k].rotations for opts, k in zip(options, choice))))


def _ms(options: list[list[Schedule]], choice: list[int]) -> float:
    return sum(opts[k].ms for opts, k in zip(options, choice))


def choose_key_schedules(plans: dict[str, DiagonalPlan], levels: dict[str, int], model: CostModel, price: float,
                         bundle_bytes: Callable[[int], int], budget_bytes: int | None = None
                         ) -> tuple[dict[str, DiagonalPlan], dict[str, DiagonalPlan]]:
    """(plans within the budget, plans of the default trade) with their schedules chosen together.

    ``levels`` gives each plan's level, ``price`` the milliseconds of time per run one key is
    worth, ``bundle_bytes(k)`` the bundle's size with ``k`` plan rotation keys (fixed keys such as
    lane shifts included).  Without a budget both are the default's.  Raises KeyBudgetError when
    no choice found fits ``budget_bytes``.
    """
    names = list(plans)
    options = [schedules(plans[name], model, levels[name]) for name in names]
    start = [min(range(len(opts)), key=lambda k: (opts[k].ms, len(opts[k].rotations))) for opts in options]
    default = _descend(options, start, price)
    chosen = default
    if budget_bytes is not None and bundle_bytes(_keys(options, default)) > budget_bytes:
        found, p = [], max(price, 1e-3 * _ms(options, default) / max(_keys(options, default), 1))
        for _ in range(PRICE_STEPS):
            p *= PRICE_FACTOR
            chosen = _descend(options, chosen, p)
            found.append(chosen)
        # descent is local: also start from every step using one power-of-two split (babies and giants shared)
        for n1 in sorted({o.baby_step for opts in options for o in opts if not o.baby_step & (o.baby_step - 1)}):
            start = [min(range(len(opts)), key=lambda k: (opts[k].baby_step != n1, len(opts[k].rotations)))
                     for opts in options]
            found.append(_descend(options, start, p))
        fitting = [ch for ch in found if bundle_bytes(_keys(options, ch)) <= budget_bytes]
        if not fitting:
            smallest = min(_keys(options, ch) for ch in found)
            raise KeyBudgetError(budget_bytes, bundle_bytes(smallest), bundle_bytes(0))
        chosen = min(fitting, key=lambda ch: (_ms(options, ch), _keys(options, ch)))

    def applied(choice: list[int]) -> dict[str, DiagonalPlan]:
        return {name: replace(plans[name], baby_step=opts[k].baby_step, fold_chunk=opts[k].fold_chunk)
                for name, opts, k in zip(names, options, choice)}

    return applied(chosen), applied(default)
