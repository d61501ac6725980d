"""ONNX and PyTorch import: the lowered Graph must compute what the original model computes."""
from __future__ import annotations

import math
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from h33_bento.compiler.onnx_import import import_onnx
from h33_bento.errors import CompileError, UnsupportedOpError

torch = pytest.importorskip("torch")
nn = torch.nn

from h33_bento.compiler.torch_import import export_onnx, import_torch  # noqa: E402


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    expected = np.asarray(expected, dtype=np.float64).reshape(actual.shape)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


def _check(module: nn.Module, input_shape: tuple[int, ...], batch: int = 2, seed: int = 0):
    """Import ``module`` and compare Graph.evaluate with the module on a random batch."""
    module.eval()
    graph = import_torch(module, input_shape)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(x).reshape(batch, -1).numpy()
    _assert_close(graph.evaluate(x.numpy().astype(np.float64)), expected)
    return graph


def _ops(graph) -> list[str]:
    return [n.op for n in graph.nodes.values()]


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# -- affine layers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv, input_shape",
    [
        (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 9, 9)),
        (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=2), (2, 9, 7)),
        (dict(in_channels=2, out_channels=4, kernel_size=3, padding="same"), (2, 6, 5)),
        (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), (4, 6, 6)),
        (dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, stride=2), (4, 7, 7)),
    ],
    ids=["stride-pad", "dilation-rect", "same", "grouped", "depthwise"],
)
def test_conv2d(conv, input_shape) -> None:
    torch.manual_seed(0)
    graph = _check(nn.Conv2d(**conv), input_shape)
    assert _ops(graph) == ["input", "linear"]
    (linear,) = [n for n in graph.nodes.values() if n.op == "linear"]
    assert linear.attrs["matrix"].shape == (linear.size, int(np.prod(input_shape)))
    assert linear.attrs["bias"].dtype == np.float64


def test_conv1d() -> None:
    torch.manual_seed(0)
    graph = _check(nn.Conv1d(3, 2, kernel_size=4, stride=2, padding=3, dilation=2), (3, 16))
    assert graph.nodes[graph.output].shape == (2, 8)


def test_batchnorm_after_conv() -> None:
    torch.manual_seed(0)
    norms = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    for bn in norms:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    # The exporter folds the first BatchNorm into the Conv; the second one is lowered here.
    graph = _check(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), norms[0], nn.ReLU(), norms[1]), (2, 6, 6))
    assert _ops(graph) == ["input", "linear", "activation", "linear"]


def test_batchnorm_alone() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    graph = _check(bn, (5,))
    assert _ops(graph) == ["input", "linear"]


def test_linear_and_flatten_view() -> None:
    torch.manual_seed(0)
    graph = _check(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2))
    assert _ops(graph) == ["input", "linear"]
    graph = _check(Lambda(lambda x: x.view(x.shape[0], -1) @ torch.ones(12, 2) + 1.5), (3, 2, 2))
    assert graph.nodes[graph.output].shape == (2,)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avgpool2d(count_include_pad: bool) -> None:
    graph = _check(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=count_include_pad), (2, 7, 7))
    assert graph.nodes[graph.output].shape == (2, 4, 4)


def test_adaptive_avgpool_and_mean() -> None:
    graph = _check(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), (3, 4, 5))
    assert graph.nodes[graph.output].shape == (3,)
    _check(Lambda(lambda x: x.mean(dim=(2, 3))), (3, 4, 5))


def test_maxpool_becomes_avgpool_with_warning() -> None:
    module = nn.MaxPool2d(2, stride=2)
    with pytest.warns(UserWarning, match="MaxPool at node .* replaced by AveragePool"):
        graph = import_torch(module, (2, 6, 6))
    x = torch.randn(2, 2, 6, 6)
    expected = nn.functional.avg_pool2d(x, 2, stride=2).reshape(2, -1).numpy()
    _assert_close(graph.evaluate(x.numpy()), expected)


def test_transpose_and_pad() -> None:
    graph = _check(Lambda(lambda x: nn.functional.pad(x.permute(0, 2, 1), (1, 2, 0, 1), value=0.5)), (3, 4))
    assert graph.nodes[graph.output].shape == (5, 6)


# -- two-tensor ops and activations ---------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        return x * gate.view(x.shape[0], -1, 1, 1)


def test_residual_add() -> None:
    torch.manual_seed(0)
    graph = _check(Residual(), (2, 5, 5))
    assert _ops(graph).count("add") == 1


def test_squeeze_excitation_mul() -> None:
    torch.manual_seed(0)
    graph = _check(SqueezeExcite(), (4, 3, 3))
    ops = _ops(graph)
    assert "mul" in ops and "activation" in ops
    mul = graph.nodes[graph.output]
    assert mul.op == "mul" and mul.shape == (4, 3, 3)
    assert all(graph.nodes[i].shape == (4, 3, 3) for i in mul.inputs)


@pytest.mark.parametrize("fn", [lambda x: x * x, lambda x: x**2], ids=["mul", "pow"])
def test_square(fn) -> None:
    torch.manual_seed(0)
    graph = _check(nn.Sequential(nn.Linear(6, 4), Lambda(fn)), (6,))
    assert _ops(graph) == ["input", "linear", "square"]


@pytest.mark.parametrize(
    "layer, kind",
    [
        (nn.ReLU(), "relu"),
        (nn.ReLU6(), "relu6"),
        (nn.Sigmoid(), "sigmoid"),
        (nn.Tanh(), "tanh"),
        (nn.GELU(), "gelu"),
        (nn.SiLU(), "silu"),
        (nn.Hardswish(), "hardswish"),
        (nn.Hardsigmoid(), "hardsigmoid"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_activation(layer: nn.Module, kind: str) -> None:
    torch.manual_seed(0)
    graph = _check(nn.Sequential(nn.Linear(6, 8), layer, nn.Linear(8, 3)), (6,), batch=4)
    assert _ops(graph) == ["input", "linear", "activation", "linear"]
    (act,) = [n for n in graph.nodes.values() if n.op == "activation"]
    assert act.attrs["kind"] == kind


def test_benchmark_convnet() -> None:
    torch.manual_seed(0)
    square = Lambda(lambda x: x * x)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 7, stride=3), square, nn.Flatten(), nn.Linear(256, 64), square, nn.Linear(64, 10)
    )
    graph = _check(model, (1, 28, 28), batch=3)
    assert _ops(graph) == ["input", "linear", "square", "linear", "square", "linear"]
    assert [n.shape for n in graph.nodes.values()] == [(1, 28, 28), (4, 8, 8), (4, 8, 8), (64,), (64,), (10,)]
    assert graph.input == next(iter(graph.nodes)) and graph.output == list(graph.nodes)[-1]


def test_dynamo_exporter_fallback(monkeypatch) -> None:
    """Where the TorchScript exporter is gone, the dynamo exporter's graph imports the same way."""
    export = torch.onnx.export

    def no_legacy(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("legacy exporter removed")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_legacy)
    torch.manual_seed(0)
    model = nn.Sequential(SqueezeExcite(), nn.Flatten(), nn.Linear(36, 8), nn.GELU(), nn.Linear(8, 3), nn.SiLU())
    graph = _check(model, (4, 3, 3))
    kinds = [n.attrs["kind"] for n in graph.nodes.values() if n.op == "activation"]
    assert kinds == ["sigmoid", "gelu", "silu"]


def test_missing_torch_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'h33-bento\[torch\]'"):
        export_onnx(object(), (3,))


def test_export_restores_training_mode() -> None:
    module = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    model = export_onnx(module, (3,))
    assert module.training
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13


# -- hand-built ONNX graphs -----------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _check_reference(model: onnx.ModelProto, data_shape: tuple[int, ...], batch: int = 2, **kwargs):
    """Import ``model`` and compare against onnx's reference evaluator."""
    graph = import_onnx(model, **kwargs)
    x = np.random.default_rng(0).normal(size=(batch, *data_shape)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})
    _assert_close(graph.evaluate(x.astype(np.float64)), expected.reshape(batch, -1))
    return graph


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad(auto_pad: str) -> None:
    weight = np.random.default_rng(1).normal(size=(3, 2, 4, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[2, 2])
    model = _model([node], [_value("x", ["N", 2, 7, 8])], [_value("y", None)], [("w", weight)])
    graph = _check_reference(model, (2, 7, 8))
    assert graph.nodes[graph.output].shape[1:] == ((4, 4) if auto_pad != "VALID" else (2, 3))


def test_dynamic_batch_needs_or_takes_input_shape() -> None:
    weight = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    bias = np.arange(5, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    model = _model(nodes, [_value("x", ["N", "T", 3])], [_value("y", None)], [("w", weight), ("b", bias)])
    with pytest.raises(CompileError, match="input_shape"):
        import_onnx(model)
    graph = _check_reference(model, (4, 3), input_shape=(4, 3))
    assert _ops(graph) == ["input", "linear", "linear"]
    with pytest.raises(CompileError, match="does not match"):
        import_onnx(model, input_shape=(4, 2))


@pytest.mark.parametrize("order", range(3))
def test_gelu_erf_patterns(order: int) -> None:
    """x*0.5*(1+erf(x/sqrt2)) in the orders the exporters emit, on a scaled input."""
    consts = [
        ("s2", np.array(math.sqrt(2), np.float32)),
        ("one", np.array(1.0, np.float32)),
        ("half", np.array(0.5, np.float32)),
        ("three", np.array(3.0, np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "three"], ["x3"]),
        helper.make_node("Div", ["x3", "s2"], ["u"]),
        helper.make_node("Erf", ["u"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["s"]),
    ]
    nodes += [
        [helper.make_node("Mul", ["x3", "s"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])],
        [helper.make_node("Mul", ["half", "s"], ["m"]), helper.make_node("Mul", ["x3", "m"], ["y"])],
        [helper.make_node("Mul", ["x3", "half"], ["m"]), helper.make_node("Mul", ["s", "m"], ["y"])],
    ][order]
    model = _model(nodes, [_value("x", [1, 5])], [_value("y", None)], consts)
    graph = _check_reference(model, (5,))
    assert [(n.op, n.attrs.get("kind")) for n in graph.nodes.values()][-1] == ("activation", "gelu")


def test_lone_erf_is_unsupported() -> None:
    nodes = [helper.make_node("Erf", ["x"], ["e"], name="my_erf"), helper.make_node("Relu", ["e"], ["y"])]
    model = _model(nodes, [_value("x", [1, 5])], [_value("y", None)])
    with pytest.raises(UnsupportedOpError, match="'Erf' at node 'my_erf'"):
        import_onnx(model)


def test_hardsigmoid_general_parameters() -> None:
    node = helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)
    model = _model([node], [_value("x", [1, 7])], [_value("y", None)])
    graph = _check_reference(model, (7,), batch=8)
    assert _ops(graph) == ["input", "linear", "activation"]


def test_chebyshev_custom_node() -> None:
    coeffs = [0.5, -1.0, 0.25, 0.125]
    node = helper.make_node(
        "ChebyshevPoly", ["x"], ["y"], domain="ai.h33", name="poly0", coeffs=coeffs, lower=-2.0, upper=3.0
    )
    custom = [helper.make_opsetid("ai.h33", 1)]
    model = _model([node], [_value("x", [1, 6])], [_value("y", [1, 6])], extra_opsets=custom)
    graph = import_onnx(model)
    poly = graph.nodes["poly0"]
    assert poly.op == "poly" and poly.shape == (6,)
    np.testing.assert_array_equal(poly.attrs["coeffs"], coeffs)
    assert (poly.attrs["lower"], poly.attrs["upper"]) == (-2.0, 3.0)
    x = np.linspace(-2, 3, 12).reshape(2, 6)
    expected = np.polynomial.chebyshev.chebval((2 * x - 1.0) / 5.0, coeffs)
    _assert_close(graph.evaluate(x), expected)


@pytest.mark.parametrize("op, attrs", [("Softmax", {"axis": -1}), ("LayerNormalization", {})])
def test_unsupported_op(op: str, attrs: dict) -> None:
    inputs = ["x", "scale"] if op == "LayerNormalization" else ["x"]
    node = helper.make_node(op, inputs, ["y"], name="the_node", **attrs)
    model = _model([node], [_value("x", [1, 4])], [_value("y", None)], [("scale", np.ones(4, np.float32))])
    with pytest.raises(UnsupportedOpError, match=f"'{op}' at node 'the_node'") as info:
        import_onnx(model)
    assert (info.value.op_type, info.value.node_name) == (op, "the_node")


def test_old_opset_and_multiple_inputs_rejected() -> None:
    relu = helper.make_node("Relu", ["x"], ["y"])
    with pytest.raises(CompileError, match="opset 11"):
        import_onnx(_model([relu], [_value("x", [1, 4])], [_value("y", None)], opset=11))
    add = helper.make_node("Add", ["x", "z"], ["y"])
    with pytest.raises(CompileError, match="exactly one input"):
        import_onnx(_model([add], [_value("x", [1, 4]), _value("z", [1, 4])], [_value("y", None)]))


def test_import_from_bytes_and_path(tmp_path) -> None:
    model = export_onnx(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), (3,))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model.SerializeToString(), path, str(path)):
        assert _ops(import_onnx(source)) == ["input", "linear", "activation"]
