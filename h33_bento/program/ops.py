"""Op kinds: the one place each is spelled, and the rules every stage applies to it.

``Op`` names every kind a compiler graph or a program may hold; ``OPS`` gives each its
``OpSpec``: how many operands it takes, the levels it consumes and the level rule that places
its output (a later pass may insert an op whose rule restores levels instead of adding to
them), how it moves slot layouts, its plaintext evaluation on lane vectors (``simulate``; the
compiler's graph evaluation uses it too for element-wise ops), the CKKS primitives it costs and
its line in the report.  The other stage keyed by ``Op`` is the engine's CKKS evaluation
(``runtime.engine.Engine``); the compiler evaluates linear maps as matrices and named
activations exactly before they are lowered (``compiler.graph``).

Adding an op kind: one ``Op`` member and one ``OpSpec`` here, one engine method in the engine's
table, and, if models can contain it, one importer rule.  ``tests/test_architecture.py`` checks
that the tables agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ..ckks.timing import BOOTSTRAP, CHEBYSHEV
from ..errors import WeightsNotProvisionedError
from .polynomials import chebyshev_depth, eval_chebyshev


class Op(str, Enum):
    """An op kind; its value is the name manifests and reports use."""

    INPUT = "input"
    LINEAR = "linear"  # y = W x + b with plaintext weights, run as generalized diagonals
    ENCRYPTED_LINEAR = "encrypted_linear"  # the same map with W and b ciphertexts the server cannot read
    ACTIVATION = "activation"  # a named non-linearity (relu, sigmoid, ...): calibration lowers it to POLY
    POLY = "poly"  # a Chebyshev series on a calibrated range
    SQUARE = "square"
    ADD = "add"
    MUL = "mul"
    BOOTSTRAP = "bootstrap"  # refreshes levels: its output is at attrs["level"], whatever its input's

    def __str__(self) -> str:
        return self.value


class Layout(Enum):
    """How an op's output slot layout relates to its operands' (the layout pass's rule)."""

    SOURCE = "source"  # the program input: the compiler chooses where the client packs it
    ELEMENTWISE = "elementwise"  # the output keeps its single operand's layout
    JOIN = "join"  # element-wise on two operands, which must share one layout
    TRANSFORM = "transform"  # a linear map: the compiler chooses the output layout


class OpItem(Protocol):
    """What the rules read: a compiler ``Node`` or a program ``Step`` (``linear`` on steps only)."""

    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class OpSpec:
    """The stage rules of one op kind (see the module docstring)."""

    arity: int
    layout: Layout
    depth: Callable[[Mapping[str, Any]], int]
    evaluate: Callable[[Any, list[np.ndarray]], np.ndarray] | None = None
    counts: Callable[[Any, int], dict[str, int]] | None = None
    describe: Callable[[Any], str] | None = None
    #: False for kinds a program never holds (the input, and activations lowered at compile time)
    in_program: bool = True
    #: the node attributes a program step keeps (arrays are saved in ``arrays.npz``)
    attrs: tuple[str, ...] = ()
    #: the level rule (levels consumed once the output exists); default: operands' deepest + depth
    level: Callable[[Mapping[str, Any], Sequence[int]], int] | None = None
    #: a plaintext check of the operands ``simulate`` warns with (None: nothing to check)
    check: Callable[[Any, list[np.ndarray]], str | None] | None = None

    def output_level(self, attrs: Mapping[str, Any], input_levels: Sequence[int]) -> int:
        if self.level is not None:
            return self.level(attrs, input_levels)
        return max(input_levels, default=0) + self.depth(attrs)


def _poly_degree(attrs: Mapping[str, Any]) -> int:
    return len(attrs["coeffs"]) - 1


def _poly_depth(attrs: Mapping[str, Any]) -> int:
    return chebyshev_depth(_poly_degree(attrs), attrs["lower"], attrs["upper"])


def _poly(item: OpItem, args: list[np.ndarray]) -> np.ndarray:
    a = item.attrs
    return eval_chebyshev(a["coeffs"], a["lower"], a["upper"], args[0])


def range_problem(lower: float, upper: float, lo: float, hi: float) -> str | None:
    """Why inputs spanning [lo, hi] are a problem for a polynomial fitted on [lower, upper] (None: they are not)."""
    if lower <= lo and hi <= upper:
        return None
    return (f"inputs span [{lo:.3g}, {hi:.3g}], outside its calibrated range [{lower:.3g}, {upper:.3g}]; "
            "the polynomial diverges there and predictions may be wrong")


def _poly_range(item: OpItem, args: list[np.ndarray]) -> str | None:
    """Every slot, as for a bootstrap: unused ones hold zeros or copies of used values."""
    x = args[0]
    if not x.size:
        return None
    return range_problem(item.attrs["lower"], item.attrs["upper"], float(x.min()), float(x.max()))


def _products(item: OpItem, blocks: int) -> dict[str, int]:
    return {"mult_cipher": blocks, "rescale": blocks}


def _linear_line(item: OpItem) -> str:
    return f"fold mod {item.linear.fold}" if item.linear.fold else ""


def _encrypted_weights(item: OpItem, args: list[np.ndarray]) -> np.ndarray:
    raise WeightsNotProvisionedError("this step's weights are encrypted: simulate the model owner's full artifact")


def _cipher_products(item: OpItem, blocks: int) -> dict[str, int]:
    """A plaintext transform's counts with ciphertext diagonals: each product left unrelinearized,
    one relinearization per partial sum (per output block and giant step), and a bias add per block."""
    counts = item.linear.counts()
    counts["mult_norelin"] = counts.pop("mult_plain")
    counts["relinearize"] = item.linear.partial_sums()
    counts["add"] += item.linear.out_blocks
    return counts


def _bootstrap(item: OpItem, args: list[np.ndarray]) -> np.ndarray:
    """What OpenFHE returns: the input on the used slots; a sparse bootstrap (``period`` values
    per lane) returns the average of the input's ``period``-periodic copies, repeated."""
    x, period = args[0], int(item.attrs["period"])
    n = x.shape[-1]
    if period >= n:
        return x
    mean = x.reshape(*x.shape[:-1], n // period, period).mean(axis=-2)
    return np.tile(mean, n // period)


def _bootstrap_range(item: OpItem, args: list[np.ndarray]) -> str | None:
    """Every slot (unused ones too: bootstrapping mixes them all) must lie within the bound."""
    peak = float(np.abs(args[0]).max(initial=0.0))
    bound = float(item.attrs["bound"])
    if peak <= bound:
        return None
    return (f"a value of magnitude {peak:.3g} reaches a bootstrap whose inputs must stay within "
            f"+-{bound:.3g}; the encrypted bootstrap would return garbage for the whole ciphertext")


OPS: dict[Op, OpSpec] = {
    Op.INPUT: OpSpec(arity=0, layout=Layout.SOURCE, depth=lambda a: 0, in_program=False),
    Op.LINEAR: OpSpec(
        arity=1, layout=Layout.TRANSFORM, depth=lambda a: 1,  # the plaintext products are rescaled once
        evaluate=lambda item, args: item.linear.apply(args[0]),
        counts=lambda item, blocks: item.linear.counts(), describe=_linear_line,
    ),
    Op.ENCRYPTED_LINEAR: OpSpec(  # produced by ``CompiledModel.without_weights``, never by an importer
        arity=1, layout=Layout.TRANSFORM, depth=lambda a: 1,  # ciphertext products, rescaled once
        evaluate=_encrypted_weights, counts=_cipher_products, describe=_linear_line,
    ),
    Op.ACTIVATION: OpSpec(arity=1, layout=Layout.ELEMENTWISE, depth=lambda a: 0, in_program=False),
    Op.POLY: OpSpec(
        arity=1, layout=Layout.ELEMENTWISE, depth=_poly_depth, evaluate=_poly, check=_poly_range,
        attrs=("coeffs", "lower", "upper", "replaces"),
        counts=lambda item, blocks: {f"{CHEBYSHEV}{_poly_degree(item.attrs)}": blocks},
        describe=lambda item: (f"deg {_poly_degree(item.attrs)} on "
                               f"[{item.attrs['lower']:.3g}, {item.attrs['upper']:.3g}]"),
    ),
    Op.SQUARE: OpSpec(arity=1, layout=Layout.ELEMENTWISE, depth=lambda a: 1,
                      evaluate=lambda item, args: args[0] * args[0], counts=_products),
    Op.ADD: OpSpec(arity=2, layout=Layout.JOIN, depth=lambda a: 0,
                   evaluate=lambda item, args: args[0] + args[1], counts=lambda item, blocks: {"add": blocks}),
    Op.MUL: OpSpec(arity=2, layout=Layout.JOIN, depth=lambda a: 1,
                   evaluate=lambda item, args: args[0] * args[1], counts=_products),
    Op.BOOTSTRAP: OpSpec(
        arity=1, layout=Layout.ELEMENTWISE, depth=lambda a: 0, evaluate=_bootstrap, check=_bootstrap_range,
        level=lambda attrs, inputs: int(attrs["level"]),
        counts=lambda item, blocks: {f"{BOOTSTRAP}{int(item.attrs['slots'])}": blocks},
        describe=lambda item: f"{int(item.attrs['slots'])} slots -> level {int(item.attrs['level'])}",
        attrs=("slots", "period", "level", "bound"),
    ),
}

#: The kinds a program may hold, in declaration order.
PROGRAM_OPS: tuple[Op, ...] = tuple(op for op, spec in OPS.items() if spec.in_program)
