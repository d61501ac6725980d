"""Lower an ONNX model to the compiler's :class:`Graph`.

One pass over the (topologically sorted) ONNX nodes.  Constant sub-graphs (initializers and the
exporters' Shape/Gather/Concat plumbing) are evaluated with numpy so they vanish; every affine op
becomes a sparse ``linear`` node over the flattened tensor; re-shaping ops only relabel a tensor's
shape (C-order data does not move); named activations and the exporters' GELU/SiLU/HardSwish
patterns become ``activation`` nodes.  Pattern fusion leaves some nodes dead, so the graph is
pruned to what the output needs at the end.

The batch dimension is dropped everywhere: shape computations see a batch of one.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper, numpy_helper

from ..errors import CompileError, UnsupportedOpError
from ..program.ops import Op
from .graph import Graph, Node

MIN_OPSET = 13
#: Domain of the compiler's own ONNX ops (``ChebyshevPoly``).
CUSTOM_DOMAIN = "ai.h33"

_GELU_HINT = "Erf is only supported inside the GELU pattern x * 0.5 * (1 + erf(x / sqrt(2)))"


@dataclass(frozen=True)
class _Tensor:
    """A tensor computed from the model input: the IR node holding its flat data, and its shape."""

    node: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def import_onnx(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    input_shape: tuple[int, ...] | None = None,
    dtype: Any = np.float64,
) -> Graph:
    """Lower ``model`` (a ModelProto, a path, or serialized bytes) to a Graph.

    ``input_shape`` is the input's shape without the batch dimension; it fills in (and must
    agree with) the dimensions the model declares.  ``dtype`` is that of the linear ops'
    matrices: float32 halves the memory of plan-only compiles of CIFAR-scale networks.
    """
    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    elif isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    elif not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto, a path or bytes, got {type(model).__name__}")
    return _Importer(model, input_shape, dtype).run()


class _Importer:
    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...] | None, dtype: Any = np.float64) -> None:
        self.dtype = dtype
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None or opset < MIN_OPSET:
            raise CompileError(
                f"ONNX opset {opset} is not supported; re-export with opset_version >= {MIN_OPSET}"
            )
        self.onnx_graph = model.graph
        self.consts: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in model.graph.initializer
        }
        inputs = [vi for vi in model.graph.input if vi.name not in self.consts]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise CompileError(
                f"the model must have exactly one input and one output, it has {len(inputs)} "
                f"inputs and {len(model.graph.output)} outputs"
            )
        self.tensors: dict[str, _Tensor] = {}
        #: Tensors derived from an Erf that is not (yet) part of a GELU -> the Erf's node name.
        self.pending: dict[str, str] = {}
        self.producer: dict[str, onnx.NodeProto] = {
            out: node for node in model.graph.node for out in node.output
        }
        shape = _resolve_input_shape(inputs[0], input_shape)
        self.graph = Graph({}, inputs[0].name, "")
        self.tensors[inputs[0].name] = self._emit(inputs[0].name, Op.INPUT, [], shape)

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> Graph:
        counts = Counter(node.name for node in self.onnx_graph.node)
        for i, node in enumerate(self.onnx_graph.node):
            name = node.name if node.name and counts[node.name] == 1 else f"{node.op_type}_{i}"
            result = self._lower(node, name)
            if isinstance(result, _Tensor):
                self.tensors[node.output[0]] = result
            elif result is not None:  # numpy folds may return scalars
                self.consts[node.output[0]] = np.asarray(result)
        self._finish(self.onnx_graph.output[0].name)
        return self.graph

    def _lower(self, node: onnx.NodeProto, name: str) -> Any:
        op_type, attrs = node.op_type, _attrs(node)
        live_inputs = [t for t in node.input if t]
        pending = [self.pending[t] for t in live_inputs if t in self.pending]
        if pending:
            return self._lower_pending(node, name, pending[0])
        if node.domain == CUSTOM_DOMAIN and op_type == "ChebyshevPoly":
            return self._chebyshev(node, name, attrs)
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(op_type, name, f"domain {node.domain!r}")
        if op_type == "Constant":
            return _constant_value(attrs)
        if op_type in ("Shape", "Size") and node.input[0] in self.tensors:
            full = (1, *self.tensors[node.input[0]].shape)
            return _FOLD[op_type]([np.empty(full, dtype=np.int8)], attrs)
        if live_inputs and op_type in _FOLD and all(t in self.consts for t in live_inputs):
            return _FOLD[op_type]([self.consts[t] if t else None for t in node.input], attrs)
        handler = _HANDLERS.get(op_type)
        if handler is None:
            raise UnsupportedOpError(op_type, name)
        return handler(self, node, name, attrs)

    def _lower_pending(self, node: onnx.NodeProto, name: str, erf: str) -> _Tensor | None:
        """Ops downstream of an Erf wait until they complete a GELU, or fail."""
        if node.op_type == "Mul":
            x = self._match_gelu(node, name)
            if x is not None:
                return self._emit(name, Op.ACTIVATION, [x], x.shape, {"kind": "gelu"})
        if node.op_type in ("Add", "Mul", "Div"):
            self.pending[node.output[0]] = erf
            return None
        raise UnsupportedOpError("Erf", erf, _GELU_HINT)

    def _finish(self, output: str) -> None:
        if output in self.pending:
            raise UnsupportedOpError("Erf", self.pending[output], _GELU_HINT)
        if output not in self.tensors:
            raise CompileError(f"the model output {output!r} does not depend on the input")
        out = self.tensors[output]
        node = self.graph.nodes[out.node]
        if node.shape != out.shape:
            # The output was re-shaped after its last op: relabel that node if nothing else
            # reads it, else copy it through an identity.
            if node.op is not Op.INPUT and not self.graph.consumers(node.name):
                node.shape = out.shape
            else:
                out = self._linear(f"{output}/reshape", out, sp.identity(out.size), None, out.shape)
        self.graph.output = out.node
        live = {out.node}
        for n in reversed(list(self.graph.nodes.values())):
            if n.name in live:
                live.update(n.inputs)
        self.graph.nodes = {k: n for k, n in self.graph.nodes.items() if k in live or k == self.graph.input}

    # -- helpers --------------------------------------------------------------------------------

    def _tensor(self, name: str, node_name: str) -> _Tensor:
        if name in self.tensors:
            return self.tensors[name]
        if name in self.consts:
            raise CompileError(
                f"node {node_name!r}: input {name!r} is constant, expected a tensor computed from the input"
            )
        raise CompileError(f"node {node_name!r}: unknown input {name!r} (is the graph topologically sorted?)")

    def _const(self, node: onnx.NodeProto, index: int, name: str) -> np.ndarray | None:
        """The ``index``-th input as a constant, None when the optional input is absent."""
        if index >= len(node.input) or not node.input[index]:
            return None
        if node.input[index] not in self.consts:
            raise CompileError(f"node {name!r} ({node.op_type}): input {index} must be a constant")
        return self.consts[node.input[index]]

    def _emit(
        self, name: str, op: Op, inputs: list[_Tensor], shape: tuple[int, ...], attrs: dict[str, Any] | None = None
    ) -> _Tensor:
        unique, k = name, 0
        while unique in self.graph.nodes:
            k += 1
            unique = f"{name}_{k}"
        shape = tuple(int(d) for d in shape)
        self.graph.add(Node(unique, op, [t.node for t in inputs], shape, attrs or {}))
        return _Tensor(unique, shape)

    def _linear(
        self, name: str, x: _Tensor, matrix: Any, bias: np.ndarray | None, shape: tuple[int, ...]
    ) -> _Tensor:
        matrix = sp.csr_matrix(matrix, dtype=self.dtype)
        size = int(np.prod(shape))
        if matrix.shape != (size, x.size):
            raise CompileError(f"node {name!r}: matrix {matrix.shape} does not map {x.shape} to {shape}")
        bias = np.zeros(size) if bias is None else np.asarray(bias, dtype=np.float64).reshape(size)
        return self._emit(name, Op.LINEAR, [x], shape, {"matrix": matrix, "bias": bias})

    def _activation(self, name: str, x: _Tensor, kind: str) -> _Tensor:
        return self._emit(name, Op.ACTIVATION, [x], x.shape, {"kind": kind})

    def _broadcast(self, name: str, x: _Tensor, shape: tuple[int, ...]) -> _Tensor:
        if x.shape == shape:
            return x
        return self._linear(f"{name}/broadcast", x, _broadcast_matrix(x.shape, shape), None, shape)

    # -- pattern matching -----------------------------------------------------------------------

    def _factors(self, t: str) -> tuple[float, list[str]]:
        """``t`` as scalar * product of leaf tensors, expanding Mul/Div by scalars and pending Muls."""
        if t in self.consts and self.consts[t].size == 1:
            return float(self.consts[t].reshape(())), []
        p = self.producer.get(t)
        if p is not None and p.op_type in ("Mul", "Div"):
            scalar = [u in self.consts and self.consts[u].size == 1 for u in p.input]
            if t in self.pending or any(scalar):
                sa, la = self._factors(p.input[0])
                sb, lb = self._factors(p.input[1])
                if p.op_type == "Mul":
                    return sa * sb, la + lb
                if not lb and sb != 0.0:
                    return sa / sb, la
        return 1.0, [t]

    def _match_gelu(self, mul: onnx.NodeProto, name: str) -> _Tensor | None:
        """If ``mul`` completes k*y * 0.5 * (1 + erf(k*y / sqrt(2))), in any order, return k*y."""
        (sa, la), (sb, lb) = (self._factors(t) for t in mul.input)
        scale, leaves = sa * sb, la + lb
        if len(leaves) != 2:
            return None
        for y, s in (leaves, leaves[::-1]):
            add = self.producer.get(s)
            if y not in self.tensors or add is None or add.op_type != "Add":
                continue
            for e, one in (add.input, add.input[::-1]):
                erf = self.producer.get(e)
                if erf is None or erf.op_type != "Erf" or not _is_scalar(self.consts.get(one), 1.0):
                    continue
                inner, inner_leaves = self._factors(erf.input[0])
                k = inner * math.sqrt(2.0)
                same = [self.tensors.get(t) for t in inner_leaves] == [self.tensors[y]]
                if same and math.isclose(scale, 0.5 * k, rel_tol=1e-4):
                    x = self.tensors[y]
                    if math.isclose(k, 1.0, rel_tol=1e-4):
                        return x
                    return self._linear(f"{name}/scale", x, k * sp.identity(x.size), None, x.shape)
        return None

    # -- affine ops -----------------------------------------------------------------------------

    def _conv(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        weight = self._const(node, 1, name)
        bias = self._const(node, 2, name)
        kernel = list(weight.shape[2:])
        nd = len(kernel)
        if len(x.shape) != nd + 1:
            raise CompileError(f"node {name!r}: Conv with a {nd}-d kernel on an input of shape {x.shape}")
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = _pads(attrs, x.shape[1:], kernel, strides, dilations)
        matrix, shape = _window_matrix(x.shape, weight, strides, pads, dilations, attrs.get("group", 1), name)
        if bias is not None:
            bias = np.repeat(bias.astype(np.float64), int(np.prod(shape[1:])))
        return self._linear(name, x, matrix, bias, shape)

    def _pool(
        self, node: onnx.NodeProto, name: str, attrs: dict[str, Any], count_include_pad: bool
    ) -> _Tensor:
        x = self._tensor(node.input[0], name)
        kernel = list(attrs["kernel_shape"])
        nd = len(kernel)
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = _pads(attrs, x.shape[1:], kernel, strides, dilations)
        if attrs.get("ceil_mode", 0):
            for d, n in enumerate(x.shape[1:]):
                span = n + pads[d] + pads[d + nd] - dilations[d] * (kernel[d] - 1) - 1
                if span % strides[d]:
                    raise CompileError(f"node {name!r}: ceil_mode=1 changes the output size; use ceil_mode=0")
        weight = np.ones((x.shape[0], 1, *kernel))
        matrix, shape = _window_matrix(x.shape, weight, strides, pads, dilations, x.shape[0], name)
        counts = np.full(matrix.shape[0], np.prod(kernel)) if count_include_pad else np.diff(matrix.indptr)
        return self._linear(name, x, sp.diags(1.0 / counts) @ matrix, None, shape)

    def _average_pool(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        return self._pool(node, name, attrs, bool(attrs.get("count_include_pad", 0)))

    def _max_pool(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        warnings.warn(
            f"MaxPool at node {name!r} replaced by AveragePool with the same kernel, strides and "
            "pads (max is not a polynomial, so CKKS cannot evaluate it)",
            UserWarning,
            stacklevel=5,
        )
        return self._pool(node, name, attrs, count_include_pad=False)

    def _global_average_pool(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        return self._reduce(name, x, list(range(1, len(x.shape))), True, mean=True)

    def _reduce_op(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        axes = self._axes(node, name, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            raise CompileError(f"node {name!r}: {node.op_type} over all axes would mix the batch")
        axes = [a - 1 for a in _batch_free_axes(axes, len(x.shape) + 1, name)]
        return self._reduce(name, x, axes, bool(attrs.get("keepdims", 1)), mean=node.op_type == "ReduceMean")

    def _reduce(self, name: str, x: _Tensor, axes: list[int], keepdims: bool, mean: bool) -> _Tensor:
        kept = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
        matrix = _broadcast_matrix(kept, x.shape).T
        if mean:
            matrix = matrix * (int(np.prod(kept)) / x.size)
        shape = kept if keepdims else tuple(n for d, n in enumerate(x.shape) if d not in axes)
        return self._linear(name, x, matrix, None, shape)

    def _gemm(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        if attrs.get("transA", 0):
            raise UnsupportedOpError("Gemm", name, "transA=1 is not supported")
        x = self._tensor(node.input[0], name)
        weight = self._const(node, 1, name).astype(np.float64)
        if len(x.shape) != 1:
            raise CompileError(f"node {name!r}: Gemm input must be (batch, features), got {(1, *x.shape)}")
        matrix = attrs.get("alpha", 1.0) * (weight if attrs.get("transB", 0) else weight.T)
        c = self._const(node, 2, name)
        bias = None if c is None else attrs.get("beta", 1.0) * np.broadcast_to(c, (1, len(matrix))).ravel()
        return self._linear(name, x, matrix, bias, (matrix.shape[0],))

    def _matmul(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        if node.input[1] not in self.consts or self.consts[node.input[1]].ndim != 2:
            raise UnsupportedOpError("MatMul", name, "only x @ W with a constant 2-D W is supported")
        weight = self.consts[node.input[1]].astype(np.float64)
        if not x.shape or x.shape[-1] != weight.shape[0]:
            raise CompileError(f"node {name!r}: cannot multiply {x.shape} by {weight.shape}")
        lead = x.shape[:-1]
        matrix = sp.kron(sp.identity(int(np.prod(lead))), sp.csr_matrix(weight.T))
        return self._linear(name, x, matrix, None, (*lead, weight.shape[1]))

    def _batch_norm(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        if attrs.get("training_mode", 0):
            raise CompileError(f"node {name!r}: BatchNormalization in training mode; export in eval mode")
        x = self._tensor(node.input[0], name)
        scale, offset, mean, var = (self._const(node, i, name).astype(np.float64) for i in range(1, 5))
        gain = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
        per_channel = x.size // x.shape[0]
        bias = np.repeat(offset - mean * gain, per_channel)
        return self._linear(name, x, sp.diags(np.repeat(gain, per_channel)), bias, x.shape)

    def _transpose(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        perm = list(attrs.get("perm", range(len(x.shape), -1, -1)))
        if perm[0] != 0:
            raise CompileError(f"node {name!r}: Transpose {perm} moves the batch dimension")
        axes = [p - 1 for p in perm[1:]]
        source = np.arange(x.size).reshape(x.shape).transpose(axes).ravel()
        matrix = sp.csr_matrix((np.ones(x.size), (np.arange(x.size), source)), shape=(x.size, x.size))
        return self._linear(name, x, matrix, None, tuple(x.shape[a] for a in axes))

    def _pad(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        if attrs.get("mode", "constant") != "constant":
            raise UnsupportedOpError("Pad", name, f"mode {attrs['mode']!r}; only constant padding")
        x = self._tensor(node.input[0], name)
        rank = len(x.shape) + 1
        pads = self._const(node, 1, name).astype(np.int64).tolist()
        value = self._const(node, 2, name)
        axes = self._const(node, 3, name)
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        begin, end = [0] * rank, [0] * rank
        for i, a in enumerate(axes):
            begin[a], end[a] = pads[i], pads[i + len(axes)]
        if begin[0] or end[0]:
            raise CompileError(f"node {name!r}: Pad pads the batch dimension")
        shape = tuple(n + b + e for n, b, e in zip(x.shape, begin[1:], end[1:]))
        source, valid = np.zeros((), np.int64), np.ones((), bool)
        for d, n in enumerate(x.shape):
            pos = _along(np.arange(shape[d]) - begin[d + 1], d, len(shape))
            valid = valid & (pos >= 0) & (pos < n)
            source = source * n + pos
        source, valid = (a.ravel() for a in np.broadcast_arrays(source, valid))
        rows = np.flatnonzero(valid)
        matrix = sp.csr_matrix((np.ones(rows.size), (rows, source[valid])), shape=(valid.size, x.size))
        fill = 0.0 if value is None else float(value.reshape(()))
        return self._linear(name, x, matrix, np.where(valid, 0.0, fill), shape)

    # -- element-wise arithmetic ----------------------------------------------------------------

    def _arith(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        op_type = node.op_type
        a, b = node.input
        if a not in self.consts and b not in self.consts:
            return self._arith_tensors(op_type, name, self._tensor(a, name), self._tensor(b, name))
        x_first = b in self.consts
        x = self._tensor(a if x_first else b, name)
        c = self.consts[b if x_first else a].astype(np.float64)
        try:
            full = np.broadcast_shapes((1, *x.shape), c.shape)
        except ValueError as exc:
            raise CompileError(f"node {name!r}: cannot broadcast {c.shape} against {(1, *x.shape)}") from exc
        if len(full) != len(x.shape) + 1 or full[0] != 1:
            raise CompileError(f"node {name!r}: constant of shape {c.shape} broadcasts over the batch")
        shape = tuple(full[1:])
        c = np.broadcast_to(c, full).ravel()
        copy = _broadcast_matrix(x.shape, shape)
        if op_type == "Add":
            return self._linear(name, x, copy, c, shape)
        if op_type == "Sub":
            return self._linear(name, x, copy if x_first else -copy, -c if x_first else c, shape)
        if op_type == "Mul":
            return self._linear(name, x, sp.diags(c) @ copy, None, shape)
        if not x_first:
            raise UnsupportedOpError("Div", name, "division by a tensor is not supported")
        return self._linear(name, x, sp.diags(1.0 / c) @ copy, None, shape)

    def _arith_tensors(self, op_type: str, name: str, a: _Tensor, b: _Tensor) -> _Tensor:
        if op_type == "Mul":
            if a == b:
                return self._emit(name, Op.SQUARE, [a], a.shape)
            for x, gate in ((a, b), (b, a)):
                kind = self._self_gated(x, gate)
                if kind is not None:
                    return self._activation(name, x, kind)
        if op_type == "Div":
            raise UnsupportedOpError("Div", name, "division by a tensor is not supported")
        if len(a.shape) != len(b.shape):
            raise CompileError(f"node {name!r}: cannot broadcast {a.shape} against {b.shape}")
        try:
            shape = tuple(np.broadcast_shapes(a.shape, b.shape))
        except ValueError as exc:
            raise CompileError(f"node {name!r}: cannot broadcast {a.shape} against {b.shape}") from exc
        a, b = self._broadcast(name, a, shape), self._broadcast(name, b, shape)
        if op_type == "Sub":
            b = self._linear(f"{name}/neg", b, -sp.identity(b.size), None, shape)
        return self._emit(name, Op.MUL if op_type == "Mul" else Op.ADD, [a, b], shape)

    def _self_gated(self, x: _Tensor, gate: _Tensor) -> str | None:
        """x * sigmoid(x) is SiLU, x * hardsigmoid(x) is HardSwish."""
        node = self.graph.nodes[gate.node]
        if gate.shape != x.shape or node.op is not Op.ACTIVATION or node.inputs != [x.node]:
            return None
        return {"sigmoid": "silu", "hardsigmoid": "hardswish"}.get(node.attrs["kind"])

    def _pow(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        exponent = self._const(node, 1, name)
        if _is_scalar(exponent, 2.0):
            return self._emit(name, Op.SQUARE, [x], x.shape)
        if _is_scalar(exponent, 1.0):
            return x
        raise UnsupportedOpError("Pow", name, "only the exponents 1 and 2 are supported")

    # -- activations ----------------------------------------------------------------------------

    def _chebyshev(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        poly = {
            "coeffs": np.asarray(attrs["coeffs"], dtype=np.float64),
            "lower": float(attrs["lower"]),
            "upper": float(attrs["upper"]),
        }
        return self._emit(name, Op.POLY, [x], x.shape, poly)

    def _gelu(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        if attrs.get("approximate", "none") != "none":
            raise UnsupportedOpError("Gelu", name, "only approximate='none' is supported")
        return self._activation(name, self._tensor(node.input[0], name), "gelu")

    def _hard_sigmoid(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        if not (math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5, rel_tol=1e-6)):
            # clip(alpha x + beta, 0, 1) = hardsigmoid(6 alpha x + 6 beta - 3)
            bias = np.full(x.size, 6 * beta - 3)
            x = self._linear(f"{name}/affine", x, 6 * alpha * sp.identity(x.size), bias, x.shape)
        return self._activation(name, x, "hardsigmoid")

    def _clip(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        low, high = self._const(node, 1, name), self._const(node, 2, name)
        if _is_scalar(low, 0.0) and (high is None or np.isposinf(high).all()):
            return self._activation(name, x, "relu")
        if _is_scalar(low, 0.0) and _is_scalar(high, 6.0):
            return self._activation(name, x, "relu6")
        raise UnsupportedOpError("Clip", name, "only Clip(0, inf) (ReLU) and Clip(0, 6) (ReLU6)")

    def _erf(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> None:
        self._tensor(node.input[0], name)
        self.pending[node.output[0]] = name

    # -- re-shaping (no node: the flat data does not move) --------------------------------------

    def _alias(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        to_float = np.issubdtype(helper.tensor_dtype_to_np_dtype(attrs.get("to", 1)), np.floating)
        if node.op_type == "Cast" and not to_float:
            raise UnsupportedOpError("Cast", name, "casting a tensor to a non-float type")
        return self._tensor(node.input[0], name)

    def _flatten(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        if attrs.get("axis", 1) % (len(x.shape) + 1) != 1:
            raise CompileError(f"node {name!r}: Flatten axis {attrs['axis']} mixes the batch dimension")
        return _Tensor(x.node, (x.size,))

    def _reshape(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        target = self._const(node, 1, name).astype(np.int64).tolist()
        full = (1, *x.shape)
        if not attrs.get("allowzero", 0):
            target = [full[i] if d == 0 and i < len(full) else d for i, d in enumerate(target)]
        try:
            shape = np.empty(x.size, dtype=np.int8).reshape(target[1:]).shape
        except ValueError as exc:
            raise CompileError(f"node {name!r}: reshaping {full} to {target} mixes the batch") from exc
        return _Tensor(x.node, shape)

    def _axes(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> list[int] | None:
        """Squeeze/Unsqueeze/Reduce axes: an input in newer opsets, an attribute in older ones."""
        if "axes" in attrs:
            return list(attrs["axes"])
        axes = self._const(node, 1, name)
        return None if axes is None else axes.astype(np.int64).tolist()

    def _squeeze(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        axes = self._axes(node, name, attrs)
        if axes is None:
            return _Tensor(x.node, tuple(n for n in x.shape if n != 1))
        axes = [a - 1 for a in _batch_free_axes(axes, len(x.shape) + 1, name)]
        if any(x.shape[a] != 1 for a in axes):
            raise CompileError(f"node {name!r}: cannot squeeze axes {axes} of shape {x.shape}")
        return _Tensor(x.node, tuple(n for d, n in enumerate(x.shape) if d not in axes))

    def _unsqueeze(self, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        x = self._tensor(node.input[0], name)
        axes = self._axes(node, name, attrs) or []
        rank = len(x.shape) + 1 + len(axes)
        axes = sorted(a - 1 for a in _batch_free_axes(axes, rank, name))
        shape = list(x.shape)
        for a in axes:
            shape.insert(a, 1)
        return _Tensor(x.node, tuple(shape))


def _batch_free_axes(axes: list[int], rank: int, name: str) -> list[int]:
    axes = [int(a) % rank for a in axes]
    if 0 in axes:
        raise CompileError(f"node {name!r}: the op acts on the batch dimension")
    return axes


def _named_activation(kind: str) -> Callable[[_Importer, onnx.NodeProto, str, dict[str, Any]], _Tensor]:
    def handler(self: _Importer, node: onnx.NodeProto, name: str, attrs: dict[str, Any]) -> _Tensor:
        return self._activation(name, self._tensor(node.input[0], name), kind)

    return handler


_HANDLERS: dict[str, Callable[[_Importer, onnx.NodeProto, str, dict[str, Any]], Any]] = {
    "Conv": _Importer._conv,
    "Gemm": _Importer._gemm,
    "MatMul": _Importer._matmul,
    "BatchNormalization": _Importer._batch_norm,
    "AveragePool": _Importer._average_pool,
    "MaxPool": _Importer._max_pool,
    "GlobalAveragePool": _Importer._global_average_pool,
    "ReduceMean": _Importer._reduce_op,
    "ReduceSum": _Importer._reduce_op,
    "Transpose": _Importer._transpose,
    "Pad": _Importer._pad,
    "Add": _Importer._arith,
    "Sub": _Importer._arith,
    "Mul": _Importer._arith,
    "Div": _Importer._arith,
    "Pow": _Importer._pow,
    "Relu": _named_activation("relu"),
    "Sigmoid": _named_activation("sigmoid"),
    "Tanh": _named_activation("tanh"),
    "HardSwish": _named_activation("hardswish"),
    "Gelu": _Importer._gelu,
    "HardSigmoid": _Importer._hard_sigmoid,
    "Clip": _Importer._clip,
    "Erf": _Importer._erf,
    "Identity": _Importer._alias,
    "Dropout": _Importer._alias,
    "Cast": _Importer._alias,
    "Flatten": _Importer._flatten,
    "Reshape": _Importer._reshape,
    "Squeeze": _Importer._squeeze,
    "Unsqueeze": _Importer._unsqueeze,
}


# -- matrices -----------------------------------------------------------------------------------


def _along(values: np.ndarray, dim: int, ndim: int) -> np.ndarray:
    """A 1-D array laid along dimension ``dim`` of an ``ndim``-d broadcast."""
    shape = [1] * ndim
    shape[dim] = -1
    return values.reshape(shape)


def _window_matrix(
    in_shape: tuple[int, ...],
    weight: np.ndarray,
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    groups: int,
    name: str,
) -> tuple[sp.csr_matrix, tuple[int, ...]]:
    """Sparse matrix of an N-d grouped convolution of a (C, *spatial) tensor, and its output shape.

    Entries are built for every (out channel, in channel of its group, output pixel, kernel tap)
    at once by broadcasting, then the taps that fall in the padding are dropped.
    """
    c_in, *spatial = in_shape
    c_out, per_group, *kernel = weight.shape
    nd = len(kernel)
    if c_in != per_group * groups or c_out % groups:
        raise CompileError(f"node {name!r}: weight {weight.shape}, group={groups} does not fit input {in_shape}")
    out = [
        (n + pads[d] + pads[d + nd] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1
        for d, n in enumerate(spatial)
    ]
    if min(out, default=1) <= 0:
        raise CompileError(f"node {name!r}: the window does not fit input {in_shape}")
    ndim = 2 + 2 * nd
    o = _along(np.arange(c_out), 0, ndim)
    row = o
    col = (o // (c_out // groups)) * per_group + _along(np.arange(per_group), 1, ndim)
    valid = np.ones((), bool)
    for d in range(nd):
        p = _along(np.arange(out[d]), 2 + d, ndim)
        pos = p * strides[d] - pads[d] + _along(np.arange(kernel[d]), 2 + nd + d, ndim) * dilations[d]
        valid = valid & (pos >= 0) & (pos < spatial[d])
        row = row * out[d] + p
        col = col * spatial[d] + pos
    values = weight.astype(np.float64).reshape(c_out, per_group, *[1] * nd, *kernel)
    row, col, values, valid = np.broadcast_arrays(row, col, values, valid)
    shape = (c_out, *out)
    matrix = sp.csr_matrix(
        (values[valid], (row[valid], col[valid])),
        shape=(int(np.prod(shape)), int(np.prod(in_shape))),
    )
    return matrix, shape


def _pads(
    attrs: dict[str, Any], spatial: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """Explicit [begin..., end...] pads, resolving ``auto_pad``."""
    nd = len(kernel)
    mode = attrs.get("auto_pad", "NOTSET")
    if mode == "NOTSET":
        return list(attrs.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        begin.append(total // 2 if mode == "SAME_UPPER" else total - total // 2)
        end.append(total - begin[-1])
    return begin + end


def _broadcast_matrix(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> sp.csr_matrix:
    """0/1 matrix copying a tensor to a shape it broadcasts to (numpy rules)."""
    in_size, out_size = int(np.prod(in_shape)), int(np.prod(out_shape))
    source = np.broadcast_to(np.arange(in_size).reshape(in_shape), out_shape).ravel()
    return sp.csr_matrix((np.ones(out_size), (np.arange(out_size), source)), shape=(out_size, in_size))


# -- constant folding ---------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _is_scalar(value: np.ndarray | None, target: float) -> bool:
    if value is None or value.size != 1:
        return False
    return math.isclose(float(value.reshape(())), target, rel_tol=1e-6)


def _constant_value(attrs: dict[str, Any]) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.array(attrs[key], dtype=np.float32 if "float" in key else np.int64)
    raise CompileError(f"unsupported Constant attributes {sorted(attrs)}")


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dtype = np.result_type(a, b)
    if np.issubdtype(dtype, np.integer):
        return np.trunc(a / b).astype(dtype)
    return (a / b).astype(dtype)


def _slice(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    data, starts, ends = args[:3]
    axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
    steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for axis, start, stop, step in zip(axes, starts, ends, steps):
        index[int(axis)] = slice(int(start), int(stop), int(step))
    return data[tuple(index)]


def _reshape_const(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    data, target = args[0], args[1].astype(np.int64).tolist()
    if not attrs.get("allowzero", 0):
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _squeeze_const(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    axes = attrs.get("axes", args[1] if len(args) > 1 else None)
    return np.squeeze(args[0]) if axes is None else np.squeeze(args[0], axis=tuple(int(a) for a in axes))


def _unsqueeze_const(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    axes = attrs.get("axes", args[1] if len(args) > 1 else None)
    rank = args[0].ndim + len(axes)
    return np.expand_dims(args[0], tuple(int(a) % rank for a in axes))


def _shape(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    shape = args[0].shape
    return np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=np.int64)


def _constant_of_shape(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return np.full(tuple(int(d) for d in args[0]), value.reshape(-1)[0], dtype=value.dtype)


def _variadic(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def fold(args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out

    return fold


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda args, attrs: fn(args[0])


#: numpy implementations of the ops exporters use to compute shapes and constants.
_FOLD: dict[str, Callable[[list[np.ndarray | None], dict[str, Any]], np.ndarray]] = {
    "Identity": _unary(np.asarray),
    "Cast": lambda a, at: a[0].astype(helper.tensor_dtype_to_np_dtype(at["to"])),
    "Shape": _shape,
    "Size": lambda a, at: np.array(a[0].size, dtype=np.int64),
    "Add": _variadic(np.add),
    "Sub": _variadic(np.subtract),
    "Mul": _variadic(np.multiply),
    "Div": _variadic(_div),
    "Pow": _variadic(np.power),
    "Mod": lambda a, at: (np.fmod if at.get("fmod", 0) else np.mod)(a[0], a[1]),
    "MatMul": _variadic(np.matmul),
    "Min": _variadic(np.minimum),
    "Max": _variadic(np.maximum),
    "Equal": _variadic(np.equal),
    "Less": _variadic(np.less),
    "Greater": _variadic(np.greater),
    "And": _variadic(np.logical_and),
    "Or": _variadic(np.logical_or),
    "Not": _unary(np.logical_not),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil),
    "Where": lambda a, at: np.where(a[0], a[1], a[2]),
    "Gather": lambda a, at: np.take(a[0], a[1].astype(np.int64), axis=at.get("axis", 0)),
    "Concat": lambda a, at: np.concatenate(a, axis=at["axis"]),
    "Slice": _slice,
    "Reshape": _reshape_const,
    "Squeeze": _squeeze_const,
    "Unsqueeze": _unsqueeze_const,
    "Flatten": lambda a, at: a[0].reshape(int(np.prod(a[0].shape[: at.get("axis", 1)])), -1),
    "Transpose": lambda a, at: np.transpose(a[0], at.get("perm")),
    "Expand": lambda a, at: np.broadcast_to(a[0], np.broadcast_shapes(a[0].shape, tuple(a[1]))).copy(),
    "ConstantOfShape": _constant_of_shape,
    "Range": lambda a, at: np.arange(a[0], a[1], a[2]).astype(a[0].dtype),
}


def _resolve_input_shape(
    value_info: onnx.ValueInfoProto, input_shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The input's shape without batch: the model's declared dims, filled in by ``input_shape``."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        if input_shape is None:
            raise CompileError(f"input {value_info.name!r} has no declared shape; pass input_shape")
        return tuple(int(d) for d in input_shape)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim][1:]
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, input_shape)):
            raise CompileError(
                f"input_shape {input_shape} does not match the model's input {value_info.name!r} "
                f"of shape (batch, {', '.join('?' if d is None else str(d) for d in dims)})"
            )
        return input_shape
    if None in dims or not dims:
        raise CompileError(f"input {value_info.name!r} has dynamic or missing dimensions; pass input_shape")
    return tuple(dims)
