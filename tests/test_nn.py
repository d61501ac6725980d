"""h33_bento.nn: polynomial activations, polyfy, range calibration, fine-tuning, and the compiled
(and encrypted) result of a polyfied, fine-tuned model."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from h33_bento import compile, simulate, zoo  # noqa: E402
from h33_bento import nn as hnn  # noqa: E402
from h33_bento.compiler.activations import exact_activation  # noqa: E402
from h33_bento.compiler.calibration import RangeWarning  # noqa: E402
from h33_bento.compiler.torch_import import export_onnx  # noqa: E402
from h33_bento.program.polynomials import chebyshev_depth  # noqa: E402

torch.set_num_threads(2)

ACTIVATIONS = [
    (nn.ReLU, hnn.PolyReLU, 4),
    (nn.ReLU6, hnn.PolyReLU6, 4),
    (nn.Sigmoid, hnn.PolySigmoid, 7),
    (nn.Tanh, hnn.PolyTanh, 7),
    (nn.GELU, hnn.PolyGELU, 7),
    (nn.SiLU, hnn.PolySiLU, 7),
    (nn.Hardswish, hnn.PolyHardSwish, 7),
    (nn.Hardsigmoid, hnn.PolyHardSigmoid, 7),
]


def _data(n: int = 256, features: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, features), generator=torch.Generator().manual_seed(seed))


def _mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), act, nn.Linear(12, 3)).eval()


# ------------------------------------------------------------------------------------ polyfy


@pytest.mark.parametrize("act, poly_cls, degree", ACTIVATIONS, ids=[a[0].__name__ for a in ACTIVATIONS])
def test_polyfy_replaces_each_activation(act, poly_cls, degree) -> None:
    model = _mlp(act())
    x = _data()
    with torch.no_grad():
        before = model(x)
    replaced = hnn.polyfy(model, x, margin=0.05)
    assert [(r.path, r.original) for r in replaced] == [("1", act.__name__)]
    assert type(model[1]) is poly_cls and model[1].degree >= degree
    # the range covers the calibration inputs of the activation, plus the margin
    pre = model[0](x).detach()
    lo, hi = float(pre.min()), float(pre.max())
    span = hi - lo
    assert model[1].lower == pytest.approx(lo - 0.05 * span, rel=1e-5)
    assert model[1].upper == pytest.approx(hi + 0.05 * span, rel=1e-5)
    with torch.no_grad():
        after = model(x)
    # polynomial network output stays close to the original one
    err = float((after - before).abs().max())
    assert err < 0.1 * float(before.abs().max()) + 0.05, err
    assert not any(isinstance(m, act) for m in model.modules())


def test_polyfy_replaces_maxpool_and_reports_nested_paths() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.SiLU(), nn.AdaptiveMaxPool2d(1)), nn.Flatten(),
    )
    replaced = hnn.polyfy(model)
    assert [(r.path, r.original) for r in replaced] == [
        ("1", "ReLU"), ("2", "MaxPool2d"), ("3.1", "SiLU"), ("3.2", "AdaptiveMaxPool2d")]
    pool = model[2]
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    assert isinstance(model[3][2], nn.AdaptiveAvgPool2d) and model[3][2].output_size == 1
    # the polyfied model exports with no non-polynomial op left
    ops = {n.op_type for n in export_onnx(model, (1, 10, 10)).graph.node}
    assert "ChebyshevPoly" in ops and not ops & {"Relu", "MaxPool", "Sigmoid", "Mul", "GlobalMaxPool"}


def test_polyfy_degree_override() -> None:
    model = _mlp(nn.ReLU())
    hnn.polyfy(model, degrees={"relu": 2})
    assert model[1].degree == 2 and model[1].depth == chebyshev_depth(2) == 3


@pytest.mark.parametrize("layer, needle", [
    (nn.LayerNorm(12), "LayerNorm"),
    (nn.LeakyReLU(), "LeakyReLU"),
    (nn.Softmax(dim=1), "Softmax"),
    (nn.ELU(), "ELU"),
])
def test_polyfy_refuses_unconvertible_modules(layer, needle) -> None:
    model = nn.Sequential(nn.Linear(6, 12), layer, nn.Linear(12, 3), nn.ReLU())
    with pytest.raises(hnn.UnsupportedModuleError, match=needle) as info:
        hnn.polyfy(model)
    assert "'1'" in str(info.value) or "1 (" in str(info.value)
    assert isinstance(model[3], nn.ReLU)  # nothing was half-converted


def test_polyfy_refuses_dilated_maxpool_and_attention() -> None:
    with pytest.raises(hnn.UnsupportedModuleError, match="dilation"):
        hnn.polyfy(nn.Sequential(nn.MaxPool2d(2, dilation=2)))
    with pytest.raises(hnn.UnsupportedModuleError, match="MultiheadAttention"):
        hnn.polyfy(nn.Sequential(nn.MultiheadAttention(4, 2)))


def test_polyfy_detects_functional_activations() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return F.relu(self.fc(x)) + torch.sigmoid(x[:, :3])

    with pytest.raises(hnn.UnsupportedModuleError, match="relu.*sigmoid"):
        hnn.polyfy(Functional(), _data())
    # without data nothing can be probed: the module walk finds nothing to replace
    assert hnn.polyfy(Functional()) == []


# ------------------------------------------------------------------------- approximation


def _r2(fn, module: hnn.PolyActivation) -> float:
    x = torch.linspace(module.lower, module.upper, 4001, dtype=torch.float64)
    with torch.no_grad():
        y, p = fn(x), module(x)
    return float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@pytest.mark.parametrize("cls, fn, lo, hi", [
    (hnn.PolySigmoid, torch.sigmoid, -6.0, 6.0),
    (hnn.PolyTanh, torch.tanh, -3.0, 3.0),
])
def test_sigmoid_tanh_degree7_r2(cls, fn, lo, hi) -> None:
    m = cls(lo, hi).eval()
    assert m.degree == 7 and m.depth == 5
    assert _r2(fn, m) > 0.9998
    assert m.r_squared() > 0.9998


@pytest.mark.parametrize("cls, fn", [(hnn.PolySigmoid, torch.sigmoid), (hnn.PolyTanh, torch.tanh)])
def test_wide_ranges_raise_degree_within_the_same_depth(cls, fn) -> None:
    m = cls(-5.0, 5.0).eval() if cls is hnn.PolyTanh else cls(-10.0, 10.0).eval()
    assert 7 < m.degree <= 13 and m.depth == chebyshev_depth(7)
    assert _r2(fn, m) > 0.9998
    with pytest.warns(UserWarning, match="R\\^2"):  # beyond what degree 13 can do: said, not hidden
        wide = cls(-8.0, 8.0) if cls is hnn.PolyTanh else cls(-16.0, 16.0)
    assert wide.degree == 13 and wide.r_squared() < 0.9998


@pytest.mark.parametrize("cls, fn, lo, hi, max_err", [
    (hnn.PolyReLU, F.gelu, -8.0, 8.0, 0.45),  # the seed's degree-4 smooth ReLU
    (hnn.PolyReLU, F.gelu, -3.0, 3.0, 0.05),
    (hnn.PolyGELU, F.gelu, -6.0, 6.0, 0.16),
    (hnn.PolySiLU, F.silu, -6.0, 6.0, 0.06),
    (hnn.PolyHardSwish, F.hardswish, -6.0, 6.0, 0.12),
])
def test_error_bounds_on_range(cls, fn, lo, hi, max_err) -> None:
    m = cls(lo, hi).eval()
    x = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    with torch.no_grad():
        err = float((m(x) - fn(x)).abs().max())
    assert err < max_err, err
    assert m.max_error() == pytest.approx(err, rel=1e-3, abs=1e-6)
    assert _r2(fn, m) > 0.995


def test_torch_series_equals_numpy_chebval_and_float32_exact() -> None:
    m = hnn.PolyTanh(-2.5, 3.25).eval()
    coeffs = m.numpy_coeffs()
    assert np.array_equal(coeffs, coeffs.astype(np.float32).astype(np.float64))
    x = np.linspace(-2.5, 3.25, 101)
    t = (2 * x - m.lower - m.upper) / (m.upper - m.lower)
    with torch.no_grad():
        got = m(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, np.polynomial.chebyshev.chebval(t, coeffs), rtol=1e-12, atol=1e-12)
    # and the coefficients interpolate the exact tanh like the compiler's own fit
    assert np.abs(got - exact_activation("tanh", x)).max() < 0.01


def test_state_dict_roundtrip_with_changed_degree() -> None:
    src = hnn.PolySigmoid(-10.0, 10.0)
    dst = hnn.PolySigmoid()
    assert src.degree != dst.degree
    dst.load_state_dict(src.state_dict())
    assert dst.degree == src.degree and np.array_equal(dst.numpy_coeffs(), src.numpy_coeffs())
    assert (dst.lower, dst.upper) == (src.lower, src.upper)


# ----------------------------------------------------------------------- range warnings


def test_out_of_range_input_warns_in_eval_only() -> None:
    m = hnn.PolyReLU(-2.0, 2.0)
    inside = torch.linspace(-2.0, 2.0, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.eval()(inside)
    with pytest.warns(RangeWarning, match=r"outside its calibrated range \[-2, 2\]"):
        m(torch.tensor([0.0, 2.5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.train()(torch.tensor([0.0, 2.5]))  # fine-tuning uses the range penalty instead


def test_check_ranges_names_the_offender() -> None:
    model = _mlp(nn.Tanh())
    x = _data()
    hnn.polyfy(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hnn.check_ranges(model, x) == {}
    with pytest.warns(RangeWarning, match="'1'"):
        offenders = hnn.check_ranges(model, 4 * x)
    assert list(offenders) == ["1"]
    lo, hi = offenders["1"]
    assert lo < model[1].lower or hi > model[1].upper


# ------------------------------------------------------------------------------ fine-tuning


def test_finetune_pulls_activation_inputs_back_into_range() -> None:
    x = _data(512)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = _mlp(nn.ReLU())
    zoo.train(model, x.numpy(), y.numpy(), epochs=30, lr=1e-2)
    hnn.polyfy(model, x)
    poly = model[1]
    # shrink the range so that a fifth of the activation inputs fall outside it
    pre = model[0](x).detach().abs().flatten()
    limit = float(pre.quantile(0.8))
    poly.fit(-limit, limit)

    def outside() -> float:
        t = poly.normalized(model[0](x).detach())
        return float((t.abs() > 1).float().mean())

    assert outside() > 0.05
    history: list[dict] = []
    hnn.finetune(model, (x, y), epochs=30, lr=1e-2, penalty=100.0, batch_size=32, history=history)
    assert outside() < 0.002
    assert history[-1]["penalty"] < history[0]["penalty"]
    assert not model.training


def test_finetune_accepts_a_dataloader_and_recovers_accuracy() -> None:
    pytest.importorskip("sklearn")  # the breast-cancer table ships with scikit-learn
    xtr, ytr = zoo._breast_cancer("train")
    xte, yte = zoo._breast_cancer("test")
    model = zoo.train(zoo.TabularMLP(act=nn.ReLU), xtr, ytr, epochs=30, lr=2e-3)
    relu_acc = (zoo.predict_logits(model, xte).argmax(1) == yte).mean()
    hnn.polyfy(model, xtr)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.as_tensor(xtr), torch.as_tensor(ytr)), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(0))
    hnn.finetune(model, loader, epochs=5, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        poly_acc = (zoo.predict_logits(model, xte).argmax(1) == yte).mean()
    assert relu_acc > 0.93
    assert poly_acc >= relu_acc - 0.02


def test_finetune_distills_from_a_teacher() -> None:
    pytest.importorskip("sklearn")  # the breast-cancer table ships with scikit-learn
    xtr, ytr = zoo._breast_cancer("train")
    xte, _ = zoo._breast_cancer("test")
    teacher = zoo.train(zoo.TabularMLP(act=nn.ReLU), xtr, ytr, epochs=30, lr=2e-3)
    student = copy.deepcopy(teacher)
    hnn.polyfy(student, xtr)
    history: list[dict] = []
    # labels scrambled: with distill=1 only the teacher's soft outputs can teach anything
    scrambled = np.random.default_rng(0).permutation(ytr)
    hnn.finetune(student, (xtr, scrambled), epochs=8, lr=1e-3, teacher=teacher, distill=1.0, history=history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        agree = (zoo.predict_logits(student, xte).argmax(1) == zoo.predict_logits(teacher, xte).argmax(1)).mean()
    assert agree > 0.95 and len(history) == 8
    assert not teacher.training
    with pytest.raises(ValueError, match="distill"):
        hnn.finetune(student, (xtr, ytr), epochs=1, teacher=teacher, distill=1.5)


def test_finetune_leaves_fixed_coefficients_alone() -> None:
    x = _data(256)
    y = (x[:, 0] > 0).long()
    model = _mlp(nn.ReLU())
    hnn.polyfy(model, x)
    before = model[1].numpy_coeffs()
    hnn.finetune(model, (x, y), epochs=2, lr=1e-2)
    assert not model[1].trainable
    assert np.array_equal(model[1].numpy_coeffs(), before)


def test_trainable_coefficients_are_parameters_evaluated_in_float32() -> None:
    m = hnn.PolyReLU(-3.0, 3.0, trainable=True)
    assert m.trainable and any(p is m.coeffs for p in m.parameters())
    with torch.no_grad():
        m.coeffs += 1e-9  # not representable in float32 any more
    coeffs = m.numpy_coeffs()
    assert np.array_equal(coeffs, coeffs.astype(np.float32).astype(np.float64))
    assert not np.array_equal(coeffs, m.coeffs.detach().numpy())
    x = np.linspace(-3.0, 3.0, 101)
    with torch.no_grad():
        got = m.eval()(torch.as_tensor(x)).numpy()
    # the module computes with the float32 coefficients the export (and the compiler) will use
    np.testing.assert_allclose(got, np.polynomial.chebyshev.chebval(x / 3.0, coeffs), rtol=1e-12, atol=1e-12)
    # back to a fixed buffer and forth, through a state dict of another degree
    m.set_trainable(False)
    assert not m.trainable and not list(m.parameters()) and np.array_equal(m.numpy_coeffs(), coeffs)
    other = hnn.PolyReLU(degree=2, trainable=True)
    other.load_state_dict(hnn.PolyReLU(-3.0, 3.0, trainable=True).state_dict())
    assert other.trainable and other.degree == 4 and other.coeffs.shape == (5,)
    # recalibrating a trainable module refits in place (an optimizer keeps the same parameter)
    fresh = hnn.PolyReLU(-3.0, 3.0, trainable=True)
    param, before = fresh.coeffs, fresh.numpy_coeffs()
    fresh.fit(-2.0, 2.0)
    assert fresh.coeffs is param and fresh.upper == 2.0 and not np.array_equal(fresh.numpy_coeffs(), before)


@pytest.fixture(scope="module")
def trained_coeffs(mnist_train):
    """Conv + BN + ReLU MNIST net polyfied with trainable degree-2 coefficients, fine-tuned with
    BatchNorm frozen; returns (model, coefficients before fine-tuning, BN statistics before)."""
    x, y = mnist_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 10))
    zoo.train(model, x, y, epochs=2)
    hnn.polyfy(model, x[:1000], degrees={"relu": 2}, trainable=True)
    before = model[2].numpy_coeffs()
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    hnn.finetune(model, (x, y), epochs=1, coeff_lr=1e-2, freeze_bn=True)
    return model, before, stats


def test_trained_coefficients_compile_as_trained(trained_coeffs, mnist_test) -> None:
    model, before, _ = trained_coeffs
    (_, module), = hnn.poly_modules(model)
    assert module.trainable
    assert np.abs(module.numpy_coeffs() - before).max() > 1e-3  # the polynomial itself was trained
    compiled = compile(model, (1, 28, 28), measure_costs=False)
    (step,) = [s for s in compiled.steps if s.op == "poly"]
    assert np.array_equal(step.attrs["coeffs"], module.numpy_coeffs())
    assert (step.attrs["lower"], step.attrs["upper"]) == (module.lower, module.upper)
    x = mnist_test[0][:300]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        ref = zoo.predict_logits(model, x)
    np.testing.assert_allclose(simulate(compiled, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_freeze_bn_keeps_running_statistics(trained_coeffs, mnist_train) -> None:
    model, _, (mean, var) = trained_coeffs
    bn = model[1]
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    x, y = mnist_train
    moved = copy.deepcopy(model)  # a copy: the fixture stays as it is
    hnn.finetune(moved, (x[:512], y[:512]), epochs=1)
    assert not torch.equal(moved[1].running_mean, mean)  # without freeze_bn they move


def test_finetune_keeps_the_best_validation_epoch() -> None:
    x = _data(512)
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = _mlp(nn.ReLU())
    zoo.train(model, x.numpy(), y.numpy(), epochs=5, lr=1e-2)
    hnn.polyfy(model, x, trainable=True)
    xv = _data(200, seed=1)
    yv = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))  # noise: scores go up and down
    history: list[dict] = []
    hnn.finetune(model, (x, y), epochs=8, lr=3e-2, validation=(xv, yv), history=history)
    scores = [h["val_accuracy"] for h in history]
    assert len(scores) == 8 and int(np.argmax(scores)) != 7  # the last epoch is not the best one...
    final = float((zoo.predict_logits(model, xv.numpy()).argmax(1) == yv.numpy()).mean())
    assert final == pytest.approx(max(scores))  # ... and the best one is what comes back


def test_cosine_schedule_anneals_to_zero() -> None:
    x = _data(256)
    y = (x[:, 0] > 0).long()
    model = _mlp(nn.ReLU())
    hnn.polyfy(model, x, trainable=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hnn.finetune(model, (x, y), epochs=3, batch_size=32, optimizer=opt, lr_schedule="cosine")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        hnn.finetune(model, (x, y), epochs=1, lr_schedule="linear")


# ------------------------------------------------------- compiled and encrypted polyfied models


@pytest.fixture(scope="module")
def finetuned(mnist_train):
    """ConvNet-shaped MNIST net with ReLU, polyfied to degree-2 PolyReLU (5 levels: N=2^14)."""
    x, y = mnist_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    zoo.train(model, x, y, epochs=2)
    hnn.polyfy(model, x[:1000], degrees={"relu": 2})
    hnn.finetune(model, (x, y), epochs=1)
    return model


def test_compiled_polynomials_equal_the_trained_ones(finetuned, mnist_train, mnist_test) -> None:
    compiled = compile(finetuned, (1, 28, 28), measure_costs=False)
    polys = [s for s in compiled.steps if s.op == "poly"]
    (name, module), = hnn.poly_modules(finetuned)
    assert len(polys) == 1
    assert np.array_equal(polys[0].attrs["coeffs"], module.numpy_coeffs())
    assert (polys[0].attrs["lower"], polys[0].attrs["upper"]) == (module.lower, module.upper)
    assert compiled.depth == 5 and compiled.params.ring_dim == 2 ** 14
    x = mnist_test[0][:500]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        ref = zoo.predict_logits(finetuned, x)
    sim = simulate(compiled, x)
    np.testing.assert_allclose(sim, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_finetuned_model_runs_encrypted(finetuned, mnist_train, mnist_test) -> None:
    from h33_bento.client import FHEInferenceClient

    compiled = compile(finetuned, (1, 28, 28), measure_costs=False)
    client = FHEInferenceClient(compiled)
    x, y = mnist_test[0][:8], mnist_test[1][:8]
    got = client.decrypt_logits(client.infer(client.encrypt(x)))
    sim = simulate(compiled, x)
    span = float(sim.max() - sim.min())
    assert float(np.abs(got - sim).max()) < 1e-3 * span
    assert (got.argmax(1) == sim.argmax(1)).all()
    assert (got.argmax(1) == y).mean() >= 0.75


def test_polyfied_model_exports_with_torchs_default_exporter(trained_coeffs, mnist_test, tmp_path) -> None:
    """torch.onnx.export(..., dynamo=True), torch's default exporter, gives one ai.h33::ChebyshevPoly
    node per activation holding the trained coefficients; the ONNX import compiles it as the torch model."""
    import inspect

    import onnx

    model, _, _ = trained_coeffs
    assert inspect.signature(torch.onnx.export).parameters["dynamo"].default is True
    x = mnist_test[0][:200]
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), (torch.as_tensor(x[:1]),), str(path), dynamo=True)
    polys = [n for n in onnx.load(path).graph.node if n.op_type == "ChebyshevPoly"]
    assert [n.domain for n in polys] == ["ai.h33"]
    compiled = compile(str(path), (1, 28, 28), measure_costs=False)
    (step,) = [s for s in compiled.steps if s.op == "poly"]
    (_, module), = hnn.poly_modules(model)
    assert np.array_equal(step.attrs["coeffs"], module.numpy_coeffs())  # the trained ones, float32-exact
    assert (step.attrs["lower"], step.attrs["upper"]) == (module.lower, module.upper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        ref = zoo.predict_logits(model, x)
    np.testing.assert_allclose(simulate(compiled, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_out_of_range_counts_each_sample_once() -> None:
    model = nn.Sequential(hnn.PolyReLU(-1.0, 1.0), nn.Linear(1, 1), hnn.PolyReLU(-1.0, 1.0))
    with torch.no_grad():
        model[1].weight.fill_(4.0), model[1].bias.zero_()
    x = torch.tensor([[0.1], [0.5], [2.0], [-0.05]])  # after the linear layer: 0.4 (in), ~2 and ~8 (out), ~0.1 (in)
    coverage = hnn.out_of_range(model, x)
    assert coverage.samples == 4 and coverage.count == 2 and coverage.share == 0.5
    assert coverage.per_activation == {"0": 0.25, "2": 0.5}
    assert "2 of 4 (50.00%)" in coverage.describe()


def test_finetune_warns_with_the_share_of_inputs_out_of_range(mnist_train) -> None:
    """Ranges measured on 100 images without a margin, no penalty: many of the 5,000 leave them."""
    x, y = mnist_train
    model = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    hnn.polyfy(model, x[:100], margin=0.0)
    history: list[dict] = []
    with pytest.warns(RangeWarning, match=r"after fine-tuning, more than 1% .*\(training inputs: \d+ of 5000") as rec:
        hnn.finetune(model, (x, y), epochs=1, penalty=0.0, history=history)
    coverage = hnn.out_of_range(model, x)
    assert coverage.share > hnn.RANGE_BOUND and history[-1]["out_of_range"] == coverage.share
    assert any(f"{coverage.count} of 5000" in str(w.message) for w in rec)


def test_finetune_with_defaults_keeps_mnist_test_images_in_range_or_says_how_many_leave(mnist_train, mnist_test):
    """finetune with its defaults (trainable coefficients, the ReLU model as teacher) on the MNIST CNN:
    under RANGE_BOUND of the test images leave a range, or finetune warned; and it warns exactly when
    its training or validation share is above the bound."""
    order = np.random.default_rng(0).permutation(len(mnist_train[0]))  # the file is sorted by class
    x, y = mnist_train[0][order], mnist_train[1][order]
    relu = zoo.train(zoo.MnistNet(), x[:4000], y[:4000], epochs=2)
    model = copy.deepcopy(relu)
    hnn.polyfy(model, x[:2000], trainable=True)
    history: list[dict] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", RangeWarning)
        hnn.finetune(model, (x[:4000], y[:4000]), teacher=relu, validation=(x[4000:], y[4000:]), history=history)
    warned = [str(w.message) for w in rec if "after fine-tuning" in str(w.message)]
    last = history[-1]
    assert 0.9 < last["val_accuracy"] <= 1.0  # a fraction, as everywhere in the API
    assert bool(warned) == (max(last["out_of_range"], last["val_out_of_range"]) > hnn.RANGE_BOUND)
    test_share = hnn.out_of_range(model, mnist_test[0]).share
    assert test_share < hnn.RANGE_BOUND or warned



def test_sequential_calibration_measures_each_range_behind_the_polynomials_before_it() -> None:
    """In ResNet-20 with degree-2 ReLUs every approximation shifts the next layers' inputs: ranges
    measured on the exact network are left by every input; measured behind the polynomials before
    them, none are."""
    torch.manual_seed(0)
    model = zoo.ResNet20().eval()
    x = torch.randn(64, 3, 32, 32)
    exact, behind = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        hnn.polyfy(exact, x, degrees={"relu": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RangeWarning)  # calibrate_ranges' own check finds nothing outside
        hnn.polyfy(behind, x, degrees={"relu": 2}, sequential=True)
    assert hnn.out_of_range(exact, x).share > 0.9
    assert hnn.out_of_range(behind, x).share == 0.0
    first_exact, first_behind = hnn.poly_modules(exact)[0][1], hnn.poly_modules(behind)[0][1]
    assert (first_behind.lower, first_behind.upper) == (first_exact.lower, first_exact.upper)
