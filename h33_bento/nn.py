"""FHE-friendly PyTorch building blocks: polynomial activations, ``polyfy``, range calibration and
fine-tuning.

CKKS evaluates only additions and multiplications, so every non-linearity of a network must be
a polynomial, valid on a bounded input range.  This module gives

* polynomial activation modules (:class:`PolyReLU`, :class:`PolySigmoid`, :class:`PolyTanh`,
  :class:`PolyGELU`, :class:`PolySiLU`, :class:`PolyReLU6`, :class:`PolyHardSwish`,
  :class:`PolyHardSigmoid`) and :class:`Square`.  Each holds its Chebyshev coefficients (numpy
  ``chebval`` convention, input mapped from [lower, upper] to [-1, 1]) and its range as buffers,
  rounded to float32 so that the ONNX export (float attributes) carries them *exactly*;
* :func:`polyfy`, which swaps ReLU/ReLU6/Sigmoid/Tanh/GELU/SiLU/Hardswish/Hardsigmoid modules for
  those and MaxPool for AvgPool in any model, and refuses what it cannot convert;
* :func:`calibrate_ranges` (measure every activation's input range on data, add a margin, refit),
  :func:`check_ranges` (warn with :class:`RangeWarning` where data leave a range) and
  :func:`out_of_range` (the share of inputs that leave one);
* :func:`finetune`, training with a penalty that keeps activation inputs inside their ranges,
  optionally distilling from the original model and training the polynomials' coefficients too
  (``polyfy(..., trainable=True)``), with the epoch kept on validation data, and a warning when
  more than :data:`RANGE_BOUND` of the inputs still leave a range.

A polyfied model exports to ONNX (torch's default dynamo exporter or the TorchScript one) with
one ``ai.h33::ChebyshevPoly`` node per activation, which the compiler keeps as-is: the compiled
polynomials are the trained ones, bit for bit (trained coefficients included: the modules compute
with them rounded to float32, as the export stores them).

Outside its range a polynomial diverges (like ``t**degree``), so an input that leaves the
calibrated range gives garbage activations; modules in eval mode warn (``RangeWarning``) when
that happens.  See ``docs/accuracy.md`` for what it does to accuracy.

Needs the ``torch`` extra.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial import chebyshev as C
from torch import nn

from .compiler.activations import exact_activation
from .compiler.onnx_import import CUSTOM_DOMAIN
from .errors import CompileError, RangeWarning
from .program.polynomials import chebyshev_depth

__all__ = [
    "RangeWarning",
    "UnsupportedModuleError",
    "PolyActivation",
    "PolyReLU",
    "PolyReLU6",
    "PolySigmoid",
    "PolyTanh",
    "PolyGELU",
    "PolySiLU",
    "PolyHardSwish",
    "PolyHardSigmoid",
    "Square",
    "Replacement",
    "polyfy",
    "poly_modules",
    "calibrate_ranges",
    "check_ranges",
    "RangeCoverage",
    "out_of_range",
    "RANGE_BOUND",
    "range_penalty",
    "finetune",
    "r_squared",
]


class UnsupportedModuleError(CompileError):
    """``polyfy`` met a module or function it cannot turn into a polynomial."""


# ------------------------------------------------------------------------------ target functions


def _smooth_relu_np(x: np.ndarray) -> np.ndarray:
    return exact_activation("gelu", x)  # x * (1 + erf(x / sqrt 2)) / 2


def _smooth_relu6_np(x: np.ndarray) -> np.ndarray:
    return _smooth_relu_np(x) - _smooth_relu_np(x - 6.0)


def _smooth_relu6_torch(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) - F.gelu(x - 6.0)


# --------------------------------------------------------------------------- the ONNX custom op


class _ChebyshevPolyFn(torch.autograd.Function):
    """Exports as ``ai.h33::ChebyshevPoly`` under the TorchScript exporter (``dynamo=False``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeffs: tuple[float, ...], lower: float, upper: float) -> torch.Tensor:
        return _clenshaw(x, torch.tensor(coeffs, dtype=torch.float64), lower, upper)

    @staticmethod
    def symbolic(g: Any, x: Any, coeffs: tuple[float, ...], lower: float, upper: float) -> Any:
        out = g.op(f"{CUSTOM_DOMAIN}::ChebyshevPoly", x, coeffs_f=list(coeffs), lower_f=lower, upper_f=upper)
        out.setType(x.type())
        return out


def _clenshaw(x: torch.Tensor, coeffs: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """sum_k c_k T_k(t), t = (2x - lower - upper) / (upper - lower): numpy's ``chebval`` in torch."""
    t = (2.0 * x - (lower + upper)) / (upper - lower)
    c = coeffs.to(x.dtype)
    if len(c) == 1:
        return c[0] + 0.0 * t
    b1 = torch.zeros_like(t)
    b2 = torch.zeros_like(t)
    for k in range(len(c) - 1, 0, -1):
        b1, b2 = c[k] + 2.0 * t * b1 - b2, b1
    return c[0] + t * b1 - b2


def _f32(values: Any) -> np.ndarray:
    """Round to float32 (what ONNX float attributes hold), keep as float64."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def r_squared(fn_np: Callable[[np.ndarray], np.ndarray], coeffs: np.ndarray, lower: float, upper: float,
              points: int = 4001) -> float:
    """Coefficient of determination of the series against ``fn_np`` on a uniform grid of the range."""
    x = np.linspace(lower, upper, points)
    y = fn_np(x)
    p = C.chebval((2.0 * x - lower - upper) / (upper - lower), coeffs)
    return float(1.0 - np.sum((y - p) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-300))


# --------------------------------------------------------------------------------- the modules


class PolyActivation(nn.Module):
    """A Chebyshev series on [lower, upper] fitted to a target activation.

    Buffers: ``coeffs`` (float64 holding float32-exact values, numpy ``chebval`` convention) and
    ``range`` ([lower, upper]).  ``fit(lower, upper)`` refits on a new range; subclasses name the
    target.  With ``trainable`` (or :meth:`set_trainable`) ``coeffs`` is an ``nn.Parameter`` instead,
    trained with the network: the series then starts as the fit of the target and becomes whatever
    polynomial of that degree the training finds, and the module evaluates it with the
    coefficients rounded to float32 (:meth:`numpy_coeffs`), exactly what ONNX export and the
    compiler use.  With ``min_r2`` set, a fit whose R^2 on the range falls short is retried at higher
    degrees up to ``max_degree``, but never past the multiplicative depth of ``degree`` itself
    (a degree-7 series and a degree-13 one both cost 5 levels).

    In eval mode an input outside the range triggers a :class:`RangeWarning` (``check_range``).
    """

    #: short name of the target (also the ``replaces`` tag in plans).
    kind = "identity"
    default_degree = 7
    default_range = (-4.0, 4.0)
    min_r2: float | None = None
    max_degree = 13

    def __init__(self, lower: float | None = None, upper: float | None = None, degree: int | None = None,
                 coeffs: Sequence[float] | None = None, trainable: bool = False) -> None:
        super().__init__()
        self.degree = int(degree if degree is not None else self.default_degree)
        if self.degree < 1:
            raise ValueError(f"degree must be at least 1, got {self.degree}")
        self.base_degree = self.degree
        lo, hi = self.default_range
        lower = lo if lower is None else lower
        upper = hi if upper is None else upper
        self.register_buffer("coeffs", torch.zeros(self.degree + 1, dtype=torch.float64))
        self.register_buffer("range", torch.tensor([lower, upper], dtype=torch.float64))
        #: evaluate the exact target instead of the polynomial (range calibration).
        self.exact = False
        #: warn (RangeWarning) in eval mode when an input leaves the range.
        self.check_range = True
        #: [min, max] of the inputs seen while recording (None when not recording).
        self.observed: list[float] | None = None
        if coeffs is not None:
            self.set_polynomial(coeffs, lower, upper)
        else:
            self.fit(lower, upper)
        self.set_trainable(trainable)

    # -- target ---------------------------------------------------------------------------------
    def target_np(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- coefficients ---------------------------------------------------------------------------
    @property
    def lower(self) -> float:
        return float(self.range[0])

    @property
    def upper(self) -> float:
        return float(self.range[1])

    @property
    def trainable(self) -> bool:
        """Whether the coefficients are a trainable ``nn.Parameter`` (else a fixed buffer)."""
        return isinstance(self.coeffs, nn.Parameter)

    def set_trainable(self, trainable: bool = True) -> PolyActivation:
        """Make the coefficients a trainable parameter, or a fixed buffer again; returns ``self``.

        Create the optimizer after this call: it replaces the ``coeffs`` tensor.
        """
        if bool(trainable) != self.trainable:
            c = self.coeffs.detach().clone()
            delattr(self, "coeffs")
            if trainable:
                self.coeffs = nn.Parameter(c)
            else:
                self.register_buffer("coeffs", c)
        return self

    def numpy_coeffs(self) -> np.ndarray:
        """The coefficients rounded to float32 (what the module evaluates and ONNX export stores)."""
        return _f32(self.coeffs.detach().cpu().double().numpy())

    def set_polynomial(self, coeffs: Sequence[float], lower: float, upper: float) -> None:
        lower, upper = (float(v) for v in _f32([lower, upper]))
        if not upper > lower:
            raise ValueError(f"empty range [{lower}, {upper}]")
        c = torch.as_tensor(_f32(coeffs), dtype=torch.float64, device=self.coeffs.device)
        if not self.trainable:
            self.coeffs = c  # re-registers the buffer with the new size
        elif c.shape == self.coeffs.shape:
            with torch.no_grad():
                self.coeffs.copy_(c)  # in place: an optimizer holding the parameter keeps it
        else:
            self.coeffs = nn.Parameter(c)
        self.range = torch.tensor([lower, upper], dtype=torch.float64, device=self.range.device)
        self.degree = len(c) - 1
        self._refresh_onnx_attrs()

    def _refresh_onnx_attrs(self) -> None:
        """Keep (coefficients, lower, upper) as Python floats for the dynamo exporter, which traces
        with fake tensors whose values cannot be read; every eager forward and ``eval()`` refresh them."""
        coeffs = tuple(float(c) for c in self.numpy_coeffs())
        self._onnx_attrs: tuple[tuple[float, ...], float, float] = (coeffs, self.lower, self.upper)

    def train(self, mode: bool = True) -> PolyActivation:
        """As ``nn.Module.train``; also takes the coefficients trained so far for the ONNX export."""
        self._refresh_onnx_attrs()
        return super().train(mode)

    def _fit_coeffs(self, lower: float, upper: float, degree: int) -> np.ndarray:
        """Chebyshev interpolation (least squares on 4d+4 Chebyshev nodes, as the compiler fits)."""
        nodes = np.cos(np.pi * (np.arange(4 * degree + 4) + 0.5) / (4 * degree + 4))
        xs = (nodes + 1.0) * (upper - lower) / 2.0 + lower
        return _f32(C.chebfit(nodes, self.target_np(xs), degree))

    def fit(self, lower: float, upper: float) -> None:
        """Fit the target on [lower, upper] (raising the degree within the same depth if needed)."""
        lower, upper = (float(v) for v in _f32([lower, upper]))
        if not upper > lower:
            raise ValueError(f"empty range [{lower}, {upper}] for {type(self).__name__}")
        degree = self.base_degree
        coeffs = self._fit_coeffs(lower, upper, degree)
        if self.min_r2 is not None:
            depth = chebyshev_depth(self.base_degree)
            while (r_squared(self.target_np, coeffs, lower, upper) < self.min_r2 and degree + 2 <= self.max_degree
                   and chebyshev_depth(degree + 2) <= depth):
                degree += 2
                coeffs = self._fit_coeffs(lower, upper, degree)
            r2 = r_squared(self.target_np, coeffs, lower, upper)
            if r2 < self.min_r2:
                warnings.warn(
                    f"{type(self).__name__} on [{lower:.4g}, {upper:.4g}]: R^2 {r2:.6f} < {self.min_r2} even at "
                    f"degree {degree}; narrow the range (fine-tune with a range penalty) or accept the error",
                    UserWarning,
                    stacklevel=3,
                )
        self.set_polynomial(coeffs, lower, upper)

    def r_squared(self) -> float:
        """R^2 of the polynomial against the target on the module's range."""
        return r_squared(self.target_np, self.numpy_coeffs(), self.lower, self.upper)

    def max_error(self, points: int = 4001) -> float:
        x = np.linspace(self.lower, self.upper, points)
        p = C.chebval((2.0 * x - self.lower - self.upper) / (self.upper - self.lower), self.numpy_coeffs())
        return float(np.abs(self.target_np(x) - p).max())

    @property
    def depth(self) -> int:
        """Multiplicative levels this activation costs under CKKS."""
        return chebyshev_depth(self.degree, self.lower, self.upper)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch API
        key = prefix + "coeffs"
        if key in state_dict and state_dict[key].shape != self.coeffs.shape:
            zeros = torch.zeros_like(state_dict[key], dtype=torch.float64)
            self.coeffs = nn.Parameter(zeros) if self.trainable else zeros
            self.degree = len(self.coeffs) - 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_onnx_attrs()

    # -- forward --------------------------------------------------------------------------------
    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The input mapped to the series' domain: [lower, upper] -> [-1, 1]."""
        return (2.0 * x - (self.lower + self.upper)) / (self.upper - self.lower)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            if torch.jit.is_tracing():  # TorchScript exporter: real tensors
                self._refresh_onnx_attrs()
                return _ChebyshevPolyFn.apply(x, *self._onnx_attrs)
            coeffs, lower, upper = self._onnx_attrs  # dynamo exporter (torch's default): fake tensors
            if not hasattr(torch.onnx, "ops"):
                raise CompileError(f"exporting {type(self).__name__} with the dynamo exporter needs "
                                   f"torch.onnx.ops.symbolic (torch 2.8 or newer; this is {torch.__version__}): "
                                   "pass dynamo=False")
            return torch.onnx.ops.symbolic(f"{CUSTOM_DOMAIN}::ChebyshevPoly", (x,),
                                           {"coeffs": list(coeffs), "lower": lower, "upper": upper},
                                           dtype=x.dtype, shape=x.shape, version=1)
        self._refresh_onnx_attrs()
        lower, upper = self.lower, self.upper
        if self.observed is not None:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.observed = [min(self.observed[0], lo), max(self.observed[1], hi)]
        if self.exact:
            return self.target_torch(x)
        if self.check_range and not self.training and x.numel():
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if lo < lower or hi > upper:
                warnings.warn(
                    f"{type(self).__name__} inputs span [{lo:.4g}, {hi:.4g}], outside its calibrated range "
                    f"[{lower:.4g}, {upper:.4g}]; the polynomial diverges there and predictions may be wrong "
                    "(recalibrate with h33_bento.nn.calibrate_ranges or fine-tune with a range penalty)",
                    RangeWarning,
                    stacklevel=2,
                )
        # float32 rounding (the identity for fixed coefficients; straight-through for trained ones)
        return _clenshaw(x, self.coeffs.to(torch.float32).to(torch.float64), lower, upper)

    def extra_repr(self) -> str:
        return f"degree={self.degree}, range=[{self.lower:.4g}, {self.upper:.4g}]"


class PolyReLU(PolyActivation):
    """Degree-4 smooth ReLU: a Chebyshev fit of x * (1 + erf(x / sqrt 2)) / 2 on the range (4 levels)."""

    kind = "relu"
    default_degree = 4
    default_range = (-8.0, 8.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return _smooth_relu_np(x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class PolyReLU6(PolyActivation):
    """Degree-4 smooth ReLU6: fit of s(x) - s(x - 6) with s the smooth ReLU above (4 levels)."""

    kind = "relu6"
    default_degree = 4
    default_range = (-8.0, 8.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return _smooth_relu6_np(x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return _smooth_relu6_torch(x)


class PolySigmoid(PolyActivation):
    """Degree-7 sigmoid (5 levels); keeps R^2 > 0.9998 on its range, raising the degree up to 13
    (same 5 levels) when the range is wider than about [-6, 6]."""

    kind = "sigmoid"
    default_degree = 7
    default_range = (-6.0, 6.0)
    min_r2 = 0.9998

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return exact_activation("sigmoid", x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class PolyTanh(PolyActivation):
    """Degree-7 tanh (5 levels); keeps R^2 > 0.9998 on its range, raising the degree up to 13
    (same 5 levels) when the range is wider than about [-3, 3]."""

    kind = "tanh"
    default_degree = 7
    default_range = (-3.0, 3.0)
    min_r2 = 0.9998

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class PolyGELU(PolyActivation):
    """Degree-7 GELU x * (1 + erf(x / sqrt 2)) / 2 (5 levels)."""

    kind = "gelu"
    default_degree = 7
    default_range = (-6.0, 6.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return exact_activation("gelu", x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class PolySiLU(PolyActivation):
    """Degree-7 SiLU x * sigmoid(x) (5 levels)."""

    kind = "silu"
    default_degree = 7
    default_range = (-6.0, 6.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return exact_activation("silu", x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class PolyHardSwish(PolyActivation):
    """Degree-7 Hardswish x * relu6(x + 3) / 6 (5 levels)."""

    kind = "hardswish"
    default_degree = 7
    default_range = (-6.0, 6.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return exact_activation("hardswish", x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)


class PolyHardSigmoid(PolyActivation):
    """Degree-7 Hardsigmoid relu6(x + 3) / 6 (5 levels)."""

    kind = "hardsigmoid"
    default_degree = 7
    default_range = (-6.0, 6.0)

    def target_np(self, x: np.ndarray) -> np.ndarray:
        return exact_activation("hardsigmoid", x)

    def target_torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)


class Square(nn.Module):
    """x -> x^2: the cheapest polynomial activation (one ciphertext multiply, one level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


POLY_CLASSES: dict[str, type[PolyActivation]] = {
    cls.kind: cls
    for cls in (PolyReLU, PolyReLU6, PolySigmoid, PolyTanh, PolyGELU, PolySiLU, PolyHardSwish, PolyHardSigmoid)
}


# ------------------------------------------------------------------------------------ polyfy


@dataclass(frozen=True)
class Replacement:
    """One module ``polyfy`` swapped: where, what it was, what it became."""

    path: str
    original: str
    replacement: str


#: torch.nn activation modules polyfy converts, by exact type (ReLU6 subclasses Hardtanh).
_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
}

#: torch.nn leaf modules the compiler lowers as they are (affine, re-shaping or polynomial).
_COMPILABLE: tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
)

_HINTS: dict[type, str] = {
    nn.LayerNorm: "it divides by a data-dependent standard deviation; use BatchNorm (folded into the "
                  "preceding linear layer at compile time) and retrain",
    nn.GroupNorm: "it divides by a data-dependent standard deviation; use BatchNorm and retrain",
    nn.Softmax: "apply softmax on the client after decryption (the server returns logits)",
    nn.LogSoftmax: "apply it on the client after decryption (the server returns logits)",
    nn.LeakyReLU: "replace it with nn.ReLU (converted to PolyReLU) and fine-tune",
    nn.PReLU: "replace it with nn.ReLU (converted to PolyReLU) and fine-tune",
    nn.ELU: "replace it with nn.SiLU or nn.GELU (converted to polynomials) and fine-tune",
}


def _max_to_avg(module: nn.Module) -> nn.Module | None:
    def one(v: Any) -> Any:
        return v[0] if isinstance(v, (tuple, list)) and len(set(v)) == 1 else v

    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        if any(d != 1 for d in np.atleast_1d(module.dilation)):
            return None
        cls = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}[type(module)]
        return cls(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode,
                   count_include_pad=False)
    adaptive = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
    if type(module) in adaptive:
        return adaptive[type(module)](one(module.output_size))
    return None


#: functions (by ``__name__``) that are not polynomials; polyfy's probe run refuses them.
_NONPOLY_FUNCTIONS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "logsigmoid", "softsign",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "softmax", "log_softmax", "layer_norm", "group_norm", "instance_norm", "exp", "log", "sqrt", "rsqrt",
    "abs", "clamp", "clamp_", "clip", "erf", "sign", "reciprocal",
}


class _FunctionProbe(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch API
        name = getattr(func, "__name__", "")
        if name in _NONPOLY_FUNCTIONS:
            self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _make_poly(kind: str, degrees: dict[str, int] | None, original: nn.Module, trainable: bool) -> PolyActivation:
    cls = POLY_CLASSES[kind]
    if kind == "gelu" and getattr(original, "approximate", "none") not in ("none", "tanh"):
        raise UnsupportedModuleError(f"GELU(approximate={original.approximate!r}) is not supported")
    return cls(degree=(degrees or {}).get(kind), trainable=trainable)


def polyfy(
    model: nn.Module,
    calibration_data: Any = None,
    *,
    margin: float = 0.1,
    degrees: dict[str, int] | None = None,
    example_input: torch.Tensor | None = None,
    trainable: bool = False,
    sequential: bool = False,
) -> list[Replacement]:
    """Make ``model`` FHE-friendly in place; return what was replaced, in module order.

    * ReLU, ReLU6, Sigmoid, Tanh, GELU, SiLU, Hardswish, Hardsigmoid -> the ``Poly*`` modules
      (``degrees`` overrides the degree per kind, e.g. ``{"relu": 2}``);
    * MaxPool (dilation 1) -> AvgPool with the same kernel, stride, padding and ceil mode
      (``count_include_pad=False``), AdaptiveMaxPool -> AdaptiveAvgPool.

    Raises :class:`UnsupportedModuleError` listing every module it cannot convert (LayerNorm,
    GroupNorm, Softmax, LeakyReLU, recurrent layers, attention, ... - any ``torch.nn`` layer that is
    neither convertible nor affine).  Functional calls (``F.relu(x)``, ``torch.sigmoid(x)``,
    ``F.max_pool2d``, ...) are invisible to a module walk; when ``calibration_data`` or
    ``example_input`` is given, a probe forward pass detects them and raises too.  Modules of
    your own with no children are trusted as they are (the probe still sees their functions).

    With ``calibration_data`` (a tensor/array of inputs, or a loader of (x, y) batches) the new
    activations' ranges are calibrated (:func:`calibrate_ranges`, widened by ``margin``; each with
    the ones before it already polynomial when ``sequential``, which deep networks need).  With
    ``trainable`` the new activations' coefficients are parameters that :func:`finetune` trains
    (see :class:`PolyActivation`); their ranges stay fixed.
    """
    replaced: list[Replacement] = []
    problems: list[str] = []
    pending: list[tuple[nn.Module, str, nn.Module]] = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            new: nn.Module | None = None
            if type(child) in _ACTIVATIONS:
                new = _make_poly(_ACTIVATIONS[type(child)], degrees, child, trainable)
            elif isinstance(child, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
                new = _max_to_avg(child)
                if new is None:
                    problems.append(f"{full} ({type(child).__name__} with dilation): no average-pool equivalent")
                    continue
            elif isinstance(child, (nn.MultiheadAttention, nn.RNNBase)):
                problems.append(f"{full} ({type(child).__name__}): attention and recurrent layers need softmax "
                                "or saturating gates between time steps; not supported")
                continue
            elif isinstance(child, (PolyActivation, Square)) or isinstance(child, _COMPILABLE):
                continue
            elif type(child).__module__.startswith("torch.nn") and not list(child.children()):
                hint = next((h for t, h in _HINTS.items() if isinstance(child, t)),
                            "it is not a polynomial; the compiler cannot evaluate it under CKKS")
                problems.append(f"{full} ({type(child).__name__}): {hint}")
                continue
            else:
                continue
            pending.append((module, name, new))
            replaced.append(Replacement(full, type(child).__name__, type(new).__name__))
    if problems:  # raised before anything changes: the model is never half-converted
        raise UnsupportedModuleError("polyfy cannot convert these modules:\n  " + "\n  ".join(problems))
    for module, name, new in pending:
        setattr(module, name, new)
    probe_input = example_input
    if probe_input is None and calibration_data is not None:
        probe_input = next(_batches(calibration_data, 8))
    if probe_input is not None:
        _probe_functions(model, probe_input)
    if calibration_data is not None:
        calibrate_ranges(model, calibration_data, margin=margin, sequential=sequential)
    return replaced


def _probe_functions(model: nn.Module, x: torch.Tensor) -> None:
    polys = poly_modules(model)
    saved = [(m.check_range, m.exact) for _, m in polys]
    for _, m in polys:
        m.check_range, m.exact = False, False
    was_training = model.training
    model.eval()
    probe = _FunctionProbe()
    try:
        with torch.no_grad(), probe:
            model(torch.as_tensor(x, dtype=torch.float32))
    finally:
        model.train(was_training)
        for (_, m), (check, exact) in zip(polys, saved):
            m.check_range, m.exact = check, exact
    if probe.seen:
        calls = ", ".join(f"{k} (x{v})" for k, v in sorted(probe.seen.items()))
        raise UnsupportedModuleError(
            f"the model's forward calls non-polynomial functions polyfy cannot replace: {calls}; "
            "use the nn.Module versions (nn.ReLU, nn.MaxPool2d, ...) so polyfy can swap them, or polynomials"
        )


def poly_modules(model: nn.Module) -> list[tuple[str, PolyActivation]]:
    """Every polynomial activation in ``model`` with its path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PolyActivation)]


# ------------------------------------------------------------------------------- calibration


def _batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Inputs from a tensor/array or from a loader yielding x or (x, y, ...) batches."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(data, dtype=torch.float32)
        for i in range(0, len(t), batch_size):
            yield t[i:i + batch_size]
        return
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield torch.as_tensor(x, dtype=torch.float32)


def _record(model: nn.Module, data: Any, batch_size: int,
            exact: bool | Sequence[bool]) -> dict[str, tuple[float, float]]:
    """Every activation's observed input range on ``data``; ``exact`` says, for all activations or
    one by one (in :func:`poly_modules` order), whether the target or the polynomial is evaluated."""
    polys = poly_modules(model)
    flags = [exact] * len(polys) if isinstance(exact, bool) else list(exact)
    saved = [(m.exact, m.check_range, m.observed) for _, m in polys]
    was_training = model.training
    model.eval()
    try:
        for (_, m), e in zip(polys, flags):
            m.exact, m.check_range, m.observed = e, False, [math.inf, -math.inf]
        with torch.no_grad():
            for x in _batches(data, batch_size):
                model(x)
        return {n: (m.observed[0], m.observed[1]) for n, m in polys if m.observed[0] <= m.observed[1]}
    finally:
        model.train(was_training)
        for (_, m), (e, c, o) in zip(polys, saved):
            m.exact, m.check_range, m.observed = e, c, o


def calibrate_ranges(model: nn.Module, data: Any, margin: float = 0.1, batch_size: int = 256,
                     check: bool = True, sequential: bool = False) -> dict[str, tuple[float, float]]:
    """Measure every polynomial activation's input range on ``data`` and refit it there.

    The ranges are measured with the *exact* activations (as the compiler's own calibration
    does), widened by ``margin`` times their span on each side, and every series is refitted
    (trained coefficients are replaced by the fit of the target on the new range).

    ``sequential`` measures each activation's range with the activations before it (in module
    order, the forward order of a ``Sequential`` or a ResNet) already polynomial, one pass over
    ``data`` per activation.  Deep networks of low-degree polynomials need it: there each
    approximation shifts the next layer's inputs, and ranges measured on the exact network are left
    by every input (ResNet-20 with degree-2 PolyReLU: 100% of CIFAR-10 training inputs out of
    range at the 7th residual block's first activation, the 14th of 19).

    With ``check`` a final pass runs the polynomials themselves and warns (``RangeWarning``)
    where their inputs still leave a range.  Returns the new ranges by module path.
    """
    if margin < 0:
        raise ValueError("margin must be non-negative")
    polys = poly_modules(model)
    # (exact flags of one pass, the activations it refits): one pass for all, or one per activation
    passes = ([([j >= i for j in range(len(polys))], polys[i:i + 1]) for i in range(len(polys))]
              if sequential else [(True, polys)])
    ranges: dict[str, tuple[float, float]] = {}
    for flags, refitted in passes:
        observed = _record(model, data, batch_size, exact=flags)
        for name, m in refitted:
            if name not in observed:
                continue
            lo, hi = observed[name]
            span = max(hi - lo, 1e-3)
            m.fit(lo - margin * span, hi + margin * span)
            ranges[name] = (m.lower, m.upper)
    if check:
        check_ranges(model, data, batch_size)
    return ranges


def check_ranges(model: nn.Module, data: Any, batch_size: int = 256) -> dict[str, tuple[float, float]]:
    """Run the polynomial model on ``data``; warn (RangeWarning) for every activation whose inputs
    leave its range.  Returns {path: observed (min, max)} for the offenders."""
    observed = _record(model, data, batch_size, exact=False)
    offenders = {}
    for name, m in poly_modules(model):
        if name in observed:
            lo, hi = observed[name]
            if lo < m.lower or hi > m.upper:
                offenders[name] = (lo, hi)
                warnings.warn(
                    f"inputs of polynomial activation {name!r} span [{lo:.4g}, {hi:.4g}], outside its "
                    f"range [{m.lower:.4g}, {m.upper:.4g}]; the polynomial diverges there and predictions "
                    "may be wrong",
                    RangeWarning,
                    stacklevel=2,
                )
    return offenders


@dataclass(frozen=True)
class RangeCoverage:
    """Share of inputs (samples, in [0, 1]) that drive an activation outside its range, in eval mode."""

    samples: int
    #: samples with some activation input out of range
    count: int
    #: share of the samples out of the range of each activation, by module path
    per_activation: dict[str, float]

    @property
    def share(self) -> float:
        """Share of the samples with some activation input out of range."""
        return self.count / max(self.samples, 1)

    def describe(self) -> str:
        worst = ", ".join(f"{n!r} {v:.2%}" for n, v in sorted(self.per_activation.items(), key=lambda kv: -kv[1]) if v)
        return f"{self.count} of {self.samples} ({self.share:.2%})" + (f"; by activation: {worst}" if worst else "")


def out_of_range(model: nn.Module, data: Any, batch_size: int = 1000) -> RangeCoverage:
    """Run ``model`` in eval mode on ``data`` (inputs, or a loader of (x, y) batches) and count the
    samples whose input to some polynomial activation leaves its range: where the compiled
    polynomials give wrong activations.  No RangeWarning is raised; the model's mode is restored."""
    polys = poly_modules(model)
    state: dict[str, torch.Tensor] = {}
    hits = {name: 0 for name, _ in polys}
    handles = []
    for name, m in polys:
        def hook(mod: PolyActivation, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            outside = mod.normalized(inputs[0]).abs().flatten(1).amax(1) > 1.0
            state[name] = state[name] | outside if name in state else outside  # a module called twice
        handles.append(m.register_forward_pre_hook(hook))
    saved = [m.check_range for _, m in polys]
    was_training = model.training
    model.eval()
    total = 0
    any_hits = 0
    try:
        for _, m in polys:
            m.check_range = False
        with torch.no_grad():
            for x in _batches(data, batch_size):
                state.clear()
                model(x)
                flags = torch.zeros(len(x), dtype=torch.bool)
                for name, hit in state.items():
                    hits[name] += int(hit.sum())
                    flags |= hit
                any_hits += int(flags.sum())
                total += len(x)
    finally:
        for h in handles:
            h.remove()
        for (_, m), check in zip(polys, saved):
            m.check_range = check
        model.train(was_training)
    return RangeCoverage(total, any_hits, {name: k / max(total, 1) for name, k in hits.items()})


# -------------------------------------------------------------------------------- fine-tuning

#: ``finetune`` warns when more than this share of its training or validation inputs leave a range.
RANGE_BOUND = 0.01



def range_penalty(model: nn.Module, slack: float = 0.0) -> Callable[[], torch.Tensor]:
    """Install hooks measuring how far activation inputs leave their ranges.

    Returns a function giving the penalty accumulated since its last call: the mean over
    activations of mean(e + e^2), e = relu(|t| - (1 - slack)) and t the input mapped to [-1, 1]
    (the linear part keeps pulling inputs that are only slightly out, the square the far ones).  Call
    ``.remove()`` on the returned function to uninstall the hooks.
    """
    terms: list[torch.Tensor] = []
    handles = []
    for _, m in poly_modules(model):
        def hook(mod: PolyActivation, inputs: tuple[torch.Tensor, ...]) -> None:
            t = mod.normalized(inputs[0])
            excess = torch.relu(t.abs() - (1.0 - slack))
            terms.append((excess + excess * excess).mean())
        handles.append(m.register_forward_pre_hook(hook))

    def take() -> torch.Tensor:
        if not terms:
            return torch.zeros(())
        out = torch.stack(terms).mean()
        terms.clear()
        return out

    def remove() -> None:
        for h in handles:
            h.remove()

    take.remove = remove  # type: ignore[attr-defined]
    return take


def finetune(
    model: nn.Module,
    loader: Any,
    epochs: int = 3,
    *,
    lr: float = 1e-3,
    penalty: float = 10.0,
    slack: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    grad_clip: float | None = 5.0,
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 2.0,
    history: list[dict[str, float]] | None = None,
    coeff_lr: float | None = None,
    lr_schedule: str = "constant",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    freeze_bn: bool = False,
    validation: tuple[Any, Any] | None = None,
    range_bound: float = RANGE_BOUND,
) -> nn.Module:
    """Fine-tune a polyfied model through its polynomials, keeping activation inputs in range.

    ``loader`` is an iterable of (x, y) batches (e.g. a DataLoader; iterated once per epoch) or
    an ``(x, y)`` pair of arrays, shuffled with ``seed`` into ``batch_size`` batches.  The loss
    is ``loss_fn(model(x), y) + penalty * range_penalty``: the penalty grows once an input comes
    within ``slack`` of its range's edge (see :func:`range_penalty`).  The ranges are not trained;
    the coefficients are trained only where they are parameters (``polyfy(..., trainable=True)``),
    at ``coeff_lr`` (default ``lr``) when this function builds the (Adam) optimizer.

    With a ``teacher`` (typically the original ReLU model, kept in eval mode) the task loss becomes
    ``(1 - distill) * loss_fn + distill * T^2 * KL(softmax(teacher / T) || softmax(model / T))``
    with T = ``temperature``: distilling from the original recovers far more accuracy than the
    labels alone (CIFAR-10, docs/accuracy.md).

    * ``lr_schedule``: ``"constant"``, or ``"cosine"`` (annealed to 0 over all the batches of all
      epochs, stepped after every batch; also applied to a given ``optimizer``);
    * ``augment``: applied to every input batch (e.g. :func:`h33_bento.zoo.random_crop_flip`);
      the teacher sees the same augmented batch;
    * ``freeze_bn``: BatchNorm layers keep their running statistics and normalize with them while
      training (their affine weights still train), so activation inputs during training are the
      ones the compiled model (which folds BatchNorm) computes, and the range penalty acts on them;
    * ``validation``: an ``(x, y)`` pair; after every epoch the model's top-1 on it is measured and
      the model returned is the one of the best epoch (the first of equals).

    Afterwards the share of training (and validation) inputs that drive some activation outside
    its range in eval mode is measured (:func:`out_of_range`); above ``range_bound`` (1%) a
    :class:`RangeWarning` says how many and what to change.

    Returns the model in eval mode; one dict per epoch (``epoch`` from 0, mean ``loss``, mean
    ``penalty``, and ``val_accuracy`` with ``validation``, a fraction in [0, 1]) is appended to
    ``history`` when given; the last one also holds ``out_of_range`` (and ``val_out_of_range``), the
    shares for the model returned.
    """
    if teacher is not None:
        teacher.eval()
        if not 0.0 <= distill <= 1.0:
            raise ValueError("distill must lie in [0, 1]")
    torch.manual_seed(seed)
    train_inputs = loader
    if isinstance(loader, tuple) and len(loader) == 2 and not isinstance(loader[0], torch.utils.data.Dataset):
        xt, yt = torch.as_tensor(loader[0], dtype=torch.float32), torch.as_tensor(loader[1])
        train_inputs = xt
        gen = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(xt) // batch_size)

        def epoch_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
                yield xt[idx], yt[idx]
    else:
        steps_per_epoch = len(loader) if hasattr(loader, "__len__") else 0

        def epoch_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for xb, yb, *_ in loader:
                yield torch.as_tensor(xb, dtype=torch.float32), torch.as_tensor(yb)

    if optimizer is None:
        coeffs = [m.coeffs for _, m in poly_modules(model) if m.trainable]
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not c for c in coeffs)]
        groups = [{"params": rest}] + ([{"params": coeffs, "lr": coeff_lr or lr}] if coeffs else [])
        optimizer = torch.optim.Adam(groups, lr=lr)
    scheduler = _lr_scheduler(optimizer, lr_schedule, epochs * steps_per_epoch)
    best = _BestEpoch(model, validation)
    take = range_penalty(model, slack)
    try:
        for epoch in range(epochs):
            model.train()
            if freeze_bn:
                _freeze_batchnorm(model)
            total = pen_total = 0.0
            count = 0
            for xb, yb in epoch_batches():
                if augment is not None:
                    xb = augment(xb)
                optimizer.zero_grad()
                out = model(xb)
                pen = take()
                task = loss_fn(out, yb)
                if teacher is not None:
                    with torch.no_grad():
                        soft = F.softmax(teacher(xb) / temperature, dim=1)
                    kl = F.kl_div(F.log_softmax(out / temperature, dim=1), soft, reduction="batchmean")
                    task = (1.0 - distill) * task + distill * temperature ** 2 * kl
                loss = task + penalty * pen
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"fine-tuning diverged at epoch {epoch}: loss is {loss.item()}; activation inputs "
                        "probably left their ranges - recalibrate with a larger margin or lower the lr"
                    )
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.item() * len(xb)
                pen_total += pen.item() * len(xb)
                count += len(xb)
            record = {"epoch": epoch, "loss": total / max(count, 1), "penalty": pen_total / max(count, 1)}
            if validation is not None:
                record["val_accuracy"] = best.update(epoch)
            if history is not None:
                history.append(record)
    finally:
        take.remove()  # type: ignore[attr-defined]
    best.restore()
    _report_coverage(model, train_inputs, validation, range_bound, penalty, history)
    return model.eval()


def _report_coverage(model: nn.Module, train_inputs: Any, validation: tuple[Any, Any] | None, bound: float,
                     penalty: float, history: list[dict[str, float]] | None) -> None:
    """Measure the fine-tuned model's out-of-range shares; record them; warn above ``bound``."""
    shares = {"training": out_of_range(model, train_inputs)}
    if validation is not None:
        shares["validation"] = out_of_range(model, validation[0])
    if history:
        history[-1]["out_of_range"] = shares["training"].share
        if validation is not None:
            history[-1]["val_out_of_range"] = shares["validation"].share
    over = {k: v for k, v in shares.items() if v.share > bound}
    if over:
        which = "; ".join(f"{k} inputs: {v.describe()}" for k, v in over.items())
        warnings.warn(
            f"after fine-tuning, more than {bound:.0%} of the inputs drive an activation outside its calibrated "
            f"range, where the compiled polynomials give wrong values ({which}). Fine-tune with "
            f"freeze_bn=True, more epochs or a larger penalty (now {penalty:g}), or recalibrate with a wider "
            "margin (h33_bento.nn.calibrate_ranges(model, x, margin=0.2)) and fine-tune again",
            RangeWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------- training helpers (shared with zoo)


def _freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: normalize with (and keep) the running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for ``"constant"``; cosine annealing to 0 over ``total_steps`` (batches) for ``"cosine"``."""
    if schedule == "constant":
        return None
    if schedule == "cosine":
        if total_steps < 1:
            raise ValueError("the cosine schedule needs the number of batches: pass arrays or a loader with a length")
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    raise ValueError(f"unknown lr_schedule {schedule!r}: use 'constant' or 'cosine'")


class _BestEpoch:
    """Keeps a copy of the model's state at the epoch with the best top-1 on ``validation``."""

    def __init__(self, model: nn.Module, validation: tuple[Any, Any] | None) -> None:
        self.model = model
        self.validation = validation
        self.score = -1.0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int) -> float:
        """Measure the model (in eval mode, polynomial range warnings silenced); keep it if best."""
        assert self.validation is not None
        x, y = self.validation
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", RangeWarning)
                logits = torch.cat([self.model(xb) for xb in _batches(x, 1000)])
        finally:
            self.model.train(was_training)
        score = float((logits.argmax(1) == torch.as_tensor(y)).double().mean())  # a fraction in [0, 1]
        if score > self.score:
            self.score, self.state = score, copy.deepcopy(self.model.state_dict())
        return score

    def restore(self) -> None:
        """Load the best state kept (nothing without validation data)."""
        if self.state is not None:
            self.model.load_state_dict(self.state)
