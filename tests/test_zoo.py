"""h33_bento.zoo: the small reference networks, their training recipes, and the CIFAR-scale seed
architectures (polynomial activations, average pooling) compiling to plans."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from h33_bento import compile, simulate, zoo  # noqa: E402
from h33_bento import nn as hnn  # noqa: E402
from h33_bento.compiler.torch_import import export_onnx  # noqa: E402

torch.set_num_threads(2)

NONPOLY = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.MaxPool2d, nn.AdaptiveMaxPool2d)


def test_square_is_shared_with_nn() -> None:
    assert zoo.Square is hnn.Square
    assert torch.equal(zoo.Square()(torch.tensor([-3.0, 2.0])), torch.tensor([9.0, 4.0]))


@pytest.mark.parametrize("ctor, shape, classes", [
    (zoo.ConvNet, (1, 28, 28), 10),
    (zoo.MnistCNN, (1, 28, 28), 10),
    (zoo.LolaMnist, (1, 28, 28), 10),
    (zoo.LeNet5, (1, 28, 28), 10),
    (zoo.MnistNet, (1, 28, 28), 10),
    (zoo.PneumoniaCNN, (1, 28, 28), 2),
    (zoo.CifarCNN, (3, 32, 32), 10),
    (zoo.TabularMLP, (30,), 2),
])
def test_small_models_forward(ctor, shape, classes) -> None:
    model = ctor().eval()
    assert model(torch.zeros((3, *shape))).shape == (3, classes)


def test_lenet5_is_the_orion_variant() -> None:
    m = zoo.LeNet5()
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 32, (5, 5), (2, 2), (2, 2)), (32, 64, (5, 5), (2, 2), (2, 2))]
    fcs = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(3136, 512), (512, 10)]
    assert sum(isinstance(l, zoo.Square) for l in m.modules()) == 3
    assert sum(isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d)) for l in m.modules()) == 3
    compiled = compile(m.eval(), (1, 28, 28), estimate_only=True, measure_costs=False)
    # conv+BN, x^2, conv+BN, x^2, fc+BN, x^2, fc: seven levels, runnable without bootstrapping
    # at the smallest ring the depth allows (N=2^15): the 32x14x14 activations span four blocks
    assert [s.op for s in compiled.steps] == ["linear", "square"] * 3 + ["linear"]
    assert compiled.depth == 7 and compiled.runnable and compiled.params.ring_dim == 2 ** 15
    # plane-grid layouts: 32 -> 64 channels k5 s2 in 8 cyclic planes per block pair, not dense diagonals
    conv2 = compiled.steps[2].linear
    assert conv2.in_blocks == 4 and conv2.out_blocks == 2 and len(conv2.terms) <= 2304
    assert compiled.summary()["bootstraps"] == 0


def test_lola_compiles_at_n_2_14_and_simulates_exactly() -> None:
    torch.manual_seed(0)
    model = zoo.LolaMnist().eval()
    compiled = compile(model, (1, 28, 28), measure_costs=False)
    assert compiled.depth == 5 and compiled.params.ring_dim == 2 ** 14
    x = np.random.default_rng(0).random((4, 1, 28, 28))
    ref = zoo.predict_logits(model, x)
    np.testing.assert_allclose(simulate(compiled, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_recipe_is_reproducible_and_learns() -> None:
    pytest.importorskip("sklearn")  # the breast-cancer table ships with scikit-learn
    a, acc_a = zoo.train_recipe("tabular_mlp", seed=3)
    b, acc_b = zoo.train_recipe("tabular_mlp", seed=3)
    assert acc_a == acc_b > 0.93
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    compiled = compile(a, (30,), measure_costs=False)
    x, _ = zoo._breast_cancer("test")
    assert (simulate(compiled, x).argmax(1) == zoo.predict_logits(a, x).argmax(1)).all()


def test_data_splits_are_the_named_ones() -> None:
    """The accuracy report picks PneumoniaMNIST's epochs on "val": it must not be the test split."""
    sizes = {split: len(zoo._data("pneumonia", split)[1]) for split in ("train", "val", "test")}
    assert sizes == {"train": 3882, "val": 524, "test": 624}
    with pytest.raises(ValueError, match="no 'val' split"):
        zoo._data("cifar10", "val")


def test_random_crop_flip_shifts_and_mirrors_each_image() -> None:
    torch.manual_seed(0)
    x = torch.arange(64 * 2 * 6 * 5, dtype=torch.float32).reshape(64, 2, 6, 5) + 1.0  # no zeros
    out = zoo.random_crop_flip(x, padding=2)
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        found = [(flip, dy, dx) for flip in (False, True) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], (padded[i].flip(2) if flip else padded[i])[:, dy:dy + 6, dx:dx + 5])]
        assert len(found) == 1, i  # every image is exactly one crop of the (mirrored) padded image
        seen.add(found[0])
    assert {f for f, _, _ in seen} == {False, True} and len(seen) > 20  # and they differ


def test_train_keeps_the_best_validation_epoch_with_cosine_and_augmentation() -> None:
    pytest.importorskip("sklearn")
    x, y = zoo._breast_cancer("train")
    xv, _ = zoo._breast_cancer("test")
    yv = np.random.default_rng(0).integers(0, 2, len(xv))  # noise: validation scores go up and down
    calls = []

    def noisy(xb: torch.Tensor) -> torch.Tensor:
        calls.append(len(xb))
        return xb + 0.05 * torch.randn_like(xb)

    history: list[dict] = []
    model = zoo.train(zoo.TabularMLP(act=nn.ReLU), x, y, epochs=6, lr=2e-3, lr_schedule="cosine", augment=noisy,
                      validation=(xv, yv), history=history)
    assert sum(calls) == 6 * len(x) and len(history) == 6
    scores = [h["val_accuracy"] for h in history]
    assert int(np.argmax(scores)) != 5  # the last epoch is not the best one...
    assert (zoo.predict_logits(model, xv).argmax(1) == yv).mean() == pytest.approx(max(scores))  # ... the best is kept
    assert history[-1]["loss"] < history[0]["loss"]


def test_cifar_cnn_with_degree_13_runs_without_bootstrapping() -> None:
    """The accuracy report's CIFAR-10 recipe: degree-13 PolyReLU (5 levels each) -> 13 levels, N=2^16."""
    model = zoo.CifarCNN().eval()
    hnn.polyfy(model, degrees={"relu": 13}, trainable=True)
    compiled = compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)
    assert [p.degree for _, p in hnn.poly_modules(model)] == [13, 13]
    assert compiled.depth == 13 and compiled.runnable and compiled.params.ring_dim == 2 ** 16
    assert compiled.summary()["bootstraps"] == 0


# ------------------------------------------------------------------ CIFAR-scale architectures


@pytest.mark.parametrize("name", list(zoo.CIFAR_ARCHITECTURES))
def test_cifar_architectures_are_polynomial(name) -> None:
    model = zoo.CIFAR_ARCHITECTURES[name]()
    assert not [m for m in model.modules() if isinstance(m, NONPOLY)]
    polys = hnn.poly_modules(model)
    assert polys and all(p.degree in (4, 7) for _, p in polys)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_efficientnet_squeeze_excitation_is_a_tensor_product() -> None:
    model = zoo.efficientnet_b0()
    kinds = {type(p).__name__ for _, p in hnn.poly_modules(model)}
    assert kinds == {"PolySiLU", "PolySigmoid"}
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())  # depthwise
    graph = export_onnx(model, (3, 32, 32)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("ChebyshevPoly") == len(hnn.poly_modules(model))
    assert "Mul" in ops and not {"Relu", "Sigmoid", "MaxPool"} & set(ops)


def _mbconv_net() -> nn.Module:
    """Stem + one MBConv (depthwise, SiLU, squeeze-and-excitation) + head: EfficientNet in small."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(),
        zoo._MBConv(8, 8, 2, 3, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    hnn.polyfy(model)
    return model.eval()


def test_mbconv_plan_has_the_ciphertext_product_and_bootstraps() -> None:
    model = _mbconv_net()
    # stem 1 + SiLU 5 + expand 1 + SiLU 5 + dw 1 + SiLU 5 + [pool.reduce 1 + SiLU 5 + expand 1 +
    # sigmoid 5 + broadcast 1] + mul 1 + project 1 + pool.fc 1 = 34 > 30: too deep without bootstraps
    flat = compile(model, (3, 32, 32), estimate_only=True, measure_costs=False, bootstrapping=False)
    assert flat.depth == 34 and not flat.runnable and flat.summary()["bootstraps"] == 0
    compiled = compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)
    ops = [s.op for s in compiled.steps]
    assert ops.count("mul") == 1 and ops.count("add") == 1  # SE gate product, residual
    mul = next(s for s in compiled.steps if s.op == "mul")
    assert len(mul.inputs) == 2 and all(i in {s.name for s in compiled.steps} for i in mul.inputs)
    assert compiled.runnable and compiled.depth <= compiled.params.multiplicative_depth
    summary = compiled.summary()
    assert summary["bootstraps"] >= 1 and summary["ciphertext_bootstraps"] >= summary["bootstraps"]
    assert "bootstraps: " in compiled.report and "slots -> level" in compiled.report


def test_resnet18_plan_small_width() -> None:
    """Full-depth ResNet-18 (width 4 so the test stays fast; docs/models.md has width 64)."""
    model = zoo.resnet18(width=4)
    compiled = compile(model, (3, 32, 32), estimate_only=True, measure_costs=False)
    ops = [s.op for s in compiled.steps]
    assert ops.count("add") == 8 and ops.count("poly") == 17
    # stem (1 + 4) + 8 blocks x (conv 1 + relu 4 + conv 1 + relu 4) + pool/fc 1
    assert compile(model, (3, 32, 32), estimate_only=True, measure_costs=False, bootstrapping=False).depth == 86
    summary, p = compiled.summary(), compiled.params
    after = p.multiplicative_depth - p.bootstrapping.depth  # levels a bootstrap leaves
    assert summary["bootstraps"] >= -(-(86 - p.multiplicative_depth) // after)
    assert summary["ciphertext_bootstraps"] >= summary["bootstraps"] and summary["rotations_per_run"] > 0
