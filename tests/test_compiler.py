"""Compiler stages: fusion, layouts, level planning, persistence and the plan report."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from h33_bento import CompiledModel, compile, simulate
from h33_bento.compiler.diagonals import build_diagonals
from h33_bento.compiler.fusion import fuse_linear_chains
from h33_bento.compiler.graph import Graph, Node
from h33_bento.compiler.layout import grid_positions
from h33_bento.errors import AccuracyWarning, CompileError, DepthExceededError, ModelFormatError, RangeWarning
from h33_bento import zoo
from h33_bento.zoo import Square


def _linear(name, inp, w, b, shape):
    return Node(name, "linear", [inp], shape, {"matrix": sp.csr_matrix(w), "bias": np.asarray(b, float)})


def test_fusion_merges_linear_chains_only_between_nonlinearities():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(6, 4)), rng.normal(size=(5, 6)), rng.normal(size=(3, 5))
    g = Graph({}, "x", "l3")
    g.add(Node("x", "input", [], (4,)))
    g.add(_linear("l1", "x", a, np.ones(6), (6,)))
    g.add(_linear("l2", "l1", b, np.zeros(5), (5,)))
    g.add(Node("sq", "square", ["l2"], (5,)))
    g.add(_linear("l3", "sq", c, np.ones(3), (3,)))
    x = rng.normal(size=(7, 4))
    fused = fuse_linear_chains(g)
    assert [n.op for n in fused.nodes.values()] == ["input", "linear", "square", "linear"]
    assert np.allclose(fused.evaluate(x), g.evaluate(x))


@pytest.mark.parametrize("fold", [0, 16, 64])
def test_diagonals_reproduce_the_matrix(fold):
    rng = np.random.default_rng(1)
    n, m, d = 256, 10, 120
    w = sp.random(m, d, density=0.3, random_state=2, format="csr")
    in_pos = rng.permutation(n)[:d]
    out_pos = np.arange(m) if fold else rng.permutation(n)[:m]
    plan = build_diagonals(w, np.arange(m, dtype=float), in_pos, out_pos, n, fold)
    x = rng.normal(size=d)
    vec = np.zeros(n)
    vec[in_pos] = x
    out = np.zeros(n)
    for t, (_, _, k) in enumerate(plan.terms.tolist()):
        out += plan.diags[t] * np.roll(vec, -k)
    for f in plan.fold_steps:
        out += np.roll(out, -f)
    out += plan.bias[0]
    assert np.allclose(out[out_pos], w @ x + np.arange(m))
    if fold:
        assert len(plan.terms) <= fold


def test_strided_conv_grid_layout_keeps_diagonals_per_tap():
    conv = nn.Conv2d(1, 4, 7, stride=3)
    from h33_bento.compiler.torch_import import import_torch

    g = import_torch(conv, (1, 28, 28))
    node = [n for n in g.nodes.values() if n.op == "linear"][0]
    grid = grid_positions(node.attrs["matrix"], np.arange(784), 1024, 1024)
    assert grid is not None and len(set(grid.tolist())) == 256
    plan = build_diagonals(node.attrs["matrix"], node.attrs["bias"], np.arange(784), grid, 1024)
    compact = build_diagonals(node.attrs["matrix"], node.attrs["bias"], np.arange(784), np.arange(256), 1024)
    assert len(plan.terms) <= 64 < 4 * 49 < len(compact.terms)  # channels share diagonals


def test_report_and_summary(convnet_compiled):
    report = convnet_compiled.report
    for word in ("N=16384", "depth=5", "HEStd_128_classic", "rotation keys", "key bundle", "pred ms"):
        assert word in report
    summary = convnet_compiled.summary()
    assert summary["levels"] == 5 and summary["bootstraps"] == 0
    assert summary["rotation_keys"] == len(convnet_compiled.params.rotation_indices) > 0
    assert summary["key_bundle_bytes"] > 10 * 2**20
    assert summary["predicted_latency_ms"] > 0


def test_reprice_measures_the_costs_again_for_the_same_program(convnet_compiled):
    priced = convnet_compiled.repriced()
    assert priced.fingerprint == convnet_compiled.fingerprint and priced.steps is convnet_compiled.steps
    assert set(priced.costs.ms) == set(convnet_compiled.costs.ms)
    assert priced.costs.ms != convnet_compiled.costs.ms  # timings never repeat exactly
    then, now = (m.summary()["predicted_latency_ms"] for m in (convnet_compiled, priced))
    assert 0.25 < now / then < 4


def test_same_network_and_cost_table_give_the_same_fingerprint(convnet, convnet_compiled, mnist_train):
    again = compile(convnet, (1, 28, 28), calibration_data=mnist_train[0][:128], costs=convnet_compiled.costs)
    assert again.fingerprint == convnet_compiled.fingerprint and again.costs == convnet_compiled.costs
    # a table measured for other parameters is refused rather than silently mispricing the program
    with pytest.raises(CompileError, match="cost table given was measured for"):  # LeNet-5 needs N=2^15, depth 7
        compile(zoo.LeNet5().eval(), (1, 28, 28), costs=convnet_compiled.costs)


def test_predicted_key_bundle_size_matches_the_real_bundle(convnet_compiled, convnet_client):
    real = len(convnet_client.keys.evaluation_keys().to_bytes())
    assert abs(convnet_compiled.predicted_key_bundle_bytes - real) < 0.02 * real


def test_unmeasured_programs_are_priced_from_the_stored_table_and_their_parameters(convnet_compiled, convnet_client):
    # the same program with nothing measured: key sizes from the parameters, latency from the stored table
    unmeasured = replace(convnet_compiled, costs=None)
    real = len(convnet_client.keys.evaluation_keys().to_bytes())
    assert abs(unmeasured.predicted_key_bundle_bytes - real) < 0.02 * real
    summary = unmeasured.summary()
    assert summary["costs"] == "stored" and summary["key_sizes"] == "parameters"
    measured = convnet_compiled.summary()["predicted_latency_ms"]
    assert 0.2 < summary["predicted_latency_ms"] / measured < 5  # another machine, another load: same magnitude
    assert "from the stored cost table, not measured on this machine" in unmeasured.report
    assert "estimated from the parameters" in unmeasured.report


def test_plan_of_a_too_deep_network_estimates_keys_and_latency():
    estimate = compile(_Deep(20), (8,), estimate_only=True, measure_costs=False, bootstrapping=False)
    summary = estimate.summary()
    assert not estimate.runnable and estimate.costs is None
    assert summary["key_bundle_bytes"] > 100 * 2**20  # N=2^16, 30 levels
    assert summary["predicted_latency_ms"] > 0 and summary["costs"] == "stored"
    assert "key bundle: 0.0 MiB" not in estimate.report and "latency None" not in estimate.report


def test_save_load_roundtrip(tmp_path, convnet_compiled, mnist_test):
    convnet_compiled.save(tmp_path / "m")
    loaded = CompiledModel.load(tmp_path / "m")
    assert loaded.fingerprint == convnet_compiled.fingerprint
    assert loaded.params == convnet_compiled.params
    x = mnist_test[0][:16]
    assert np.array_equal(simulate(loaded, x), simulate(convnet_compiled, x))
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "m").iterdir())


def test_tampered_artifacts_are_refused(tmp_path, convnet_compiled):
    d = convnet_compiled.save(tmp_path / "m")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["steps"][0]["level"] = 3
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="integrity check"):
        CompiledModel.load(d)
    d2 = convnet_compiled.save(tmp_path / "m2")
    with np.load(d2 / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["0.diags"][0, 0] += 1.0
    np.savez(d2 / "arrays.npz", **arrays)
    with pytest.raises(ModelFormatError, match="modified"):
        CompiledModel.load(d2)


def test_unknown_format_version_is_refused(tmp_path, convnet_compiled):
    d = convnet_compiled.save(tmp_path / "m")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = 999
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="format version 999"):
        CompiledModel.load(d)
    manifest["format_version"] = 1  # an artifact from before programs and costs were separated
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="format version 1.*recompile"):
        CompiledModel.load(d)
    with pytest.raises(ModelFormatError, match="missing"):
        CompiledModel.load(tmp_path / "nowhere")


class _Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            x = x * x
        return x


def test_too_deep_network_gives_levels_needed_and_available():
    with pytest.raises(DepthExceededError, match="needs 40 multiplicative levels.*at most 30"):
        compile(_Deep(20), (8,), measure_costs=False, bootstrapping=False)
    estimate = compile(_Deep(20), (8,), estimate_only=True, measure_costs=False, bootstrapping=False)
    assert not estimate.runnable and estimate.depth == 40
    # by default a network this deep is bootstrapped, which checks every bootstrap's input range
    with pytest.raises(CompileError, match="bootstrapping needs calibration_data"):
        compile(_Deep(20), (8,), measure_costs=False)


def test_named_activation_needs_calibration_data():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(CompileError, match="calibration_data"):
        compile(model, (4,), measure_costs=False)


def test_simulate_warns_when_an_activation_input_leaves_its_calibrated_range(mnist_train):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    x = mnist_train[0][:256]
    compiled = compile(model, (1, 28, 28), calibration_data=x[:128], measure_costs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RangeWarning)
        simulate(compiled, x)  # the calibration images and held-out ones stay in range
    with pytest.warns(RangeWarning, match=r"step '.*Relu.*': inputs span .* outside its calibrated range"):
        simulate(compiled, 2 * x)  # a gain of 2 on the input


def test_default_relu_fits_warn_naming_the_measured_loss_and_the_fix(mnist_train):
    """A ReLU + MaxPool MNIST CNN compiled straight from ReLU: the compiler's fits (and AvgPool) change
    some of its predictions; compile says how many, measured against the torch model, and how to train
    the polynomials instead."""
    x, y = mnist_train
    torch.manual_seed(0)
    relu = zoo.train(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                   nn.Linear(4 * 14 * 14, 10)), x, y, epochs=2)
    with pytest.warns(AccuracyWarning, match=r"(?s)differs from the original model's on (\d+\.\d)% .*"
                      r"polyfy\(model, .*trainable=True\).*finetune\(model, .*teacher=relu_model") as rec:
        compiled = compile(relu, (1, 28, 28), calibration_data=x[:512], measure_costs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        differ = 1 - (simulate(compiled, x[:512]).argmax(1) == zoo.predict_logits(relu, x[:512]).argmax(1)).mean()
    assert differ > 0.01
    assert any(f"on {differ:.1%} of them" in str(w.message) for w in rec if w.category is AccuracyWarning)


def test_default_relu_fits_keep_mnist_accuracy_without_a_warning(mnist_train, mnist_test):
    """Where the compiler's degree-15 fits keep the predictions (zoo.MnistNet), compile stays quiet and
    the compiled program's accuracy is within 2 points of the ReLU model's."""
    x, y = mnist_train
    torch.manual_seed(0)
    relu = zoo.train(zoo.MnistNet(), x, y, epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)
        compiled = compile(relu, (1, 28, 28), calibration_data=x[:512], measure_costs=False)
    xt, yt = mnist_test[0][:2000], mnist_test[1][:2000]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)
        compiled_acc = (simulate(compiled, xt).argmax(1) == yt).mean()
    relu_acc = (zoo.predict_logits(relu, xt).argmax(1) == yt).mean()
    assert relu_acc > 0.93 and compiled_acc >= relu_acc - 0.02


def test_relu_network_compiles_to_chebyshev_and_runs_encrypted():
    from sklearn.datasets import load_breast_cancer

    from h33_bento import FHEInferenceClient, zoo

    data = load_breast_cancer()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    y = data.target
    model = zoo.train(nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)), x, y, epochs=20)
    compiled = compile(model, (30,), calibration_data=x, labels=["malignant", "benign"],
                       activation_degrees={"relu": 7})
    assert [s.op for s in compiled.steps] == ["linear", "poly", "linear"]
    ref = zoo.predict_logits(model, x)
    sim = simulate(compiled, x)
    assert (sim.argmax(1) == ref.argmax(1)).mean() > 0.97
    client = FHEInferenceClient(compiled)
    got = client.decrypt_logits(client.infer(client.encrypt(x[:8])))
    assert np.abs(got - sim[:8]).max() < 1e-3
    assert [p.label for p in client.decrypt(client.infer(client.encrypt(x[:8])))] == \
        [compiled.labels[i] for i in sim[:8].argmax(1)]


def test_grid_layout_spills_extra_channels_into_a_second_block():
    """LoLA's conv (5 channels, k2 s2) has more channels than a stride-2 grid has gaps."""
    from h33_bento.compiler.torch_import import import_torch

    g = import_torch(nn.Conv2d(1, 5, 2, stride=2), (1, 28, 28))
    matrix = [n for n in g.nodes.values() if n.op == "linear"][0].attrs["matrix"]
    assert grid_positions(matrix, np.arange(784), 1024, 1024) is None
    grid = grid_positions(matrix, np.arange(784), 2048, 1024)
    assert grid is not None and int(grid.max()) >= 1024
    plan = build_diagonals(matrix, np.zeros(980), np.arange(784), grid, 1024)
    assert plan.out_blocks == 2 and len(plan.terms) <= 4 * 5


def test_polyphase_input_layout_for_a_strided_first_conv():
    """The client packs the image in s*s phase planes when that makes the first conv cheaper:
    LoLA's conv (k2 s2, 5 channels) then needs 8 diagonals in one block instead of 17 in two."""
    conv = nn.Conv2d(1, 5, 2, stride=2)
    model = nn.Sequential(conv, Square(), nn.Flatten(), nn.Linear(980, 10))
    compiled = compile(model, (1, 28, 28), measure_costs=False)
    pos = compiled.input_positions
    assert not np.array_equal(pos, np.arange(784))
    assert len(np.unique(pos)) == 784 and compiled.input_blocks == 1  # distinct slots, one ciphertext
    assert len(compiled.steps[0].linear.terms) <= 8  # row-major needs 17 (test above)
    x = np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).double().numpy()
    assert np.allclose(simulate(compiled, x), ref, atol=1e-4)
    from h33_bento import FHEInferenceClient

    client = FHEInferenceClient(compiled)  # the client packs the phase planes itself
    got = client.decrypt_logits(client.infer(client.encrypt(x)))
    assert np.abs(got - ref).max() < 1e-3


def test_row_major_input_stays_when_polyphase_does_not_pay():
    compiled = compile(nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), Square(), nn.Flatten(), nn.Linear(256, 10)),
                       (1, 28, 28), measure_costs=False)
    assert np.array_equal(compiled.input_positions, np.arange(784))
    assert len(compiled.steps[0].linear.terms) <= 64


def test_plane_grid_layouts_for_many_channel_strided_convolutions():
    """conv 1->8 s2, conv 8->16 s2: each conv's channels fill the lattice cells its stride leaves,
    on power-of-two planes that rotate cyclically, and the program still computes the network."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), Square(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), Square(), nn.Flatten(),
                          nn.Linear(16 * 7 * 7, 10)).eval()
    compiled = compile(model, (1, 28, 28), measure_costs=False)
    from h33_bento.compiler.fusion import fuse_linear_chains
    from h33_bento.compiler.torch_import import import_torch

    conv2 = [n for n in fuse_linear_chains(import_torch(model, (1, 28, 28))).nodes.values() if n.op == "linear"][1]
    compact = build_diagonals(conv2.attrs["matrix"], conv2.attrs["bias"], np.arange(8 * 14 * 14),
                              np.arange(16 * 7 * 7), 1024, values=False)
    assert len(compiled.steps[2].linear.terms) <= 128 < len(compact.terms) // 3
    x = np.random.default_rng(0).uniform(size=(2, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).double().numpy()
    sim = simulate(compiled, x)
    assert np.abs(sim - ref).max() < 1e-6
    from h33_bento import FHEInferenceClient

    client = FHEInferenceClient(compiled)
    assert np.abs(client.decrypt_logits(client.infer(client.encrypt(x))) - sim).max() < 1e-3


def test_runtime_imports_neither_torch_nor_onnx_nor_scipy():
    import subprocess
    import sys

    code = ("import sys; import h33_bento.runtime.engine, h33_bento.client, h33_bento.runtime.simulate; "
            "print(sorted(m for m in ('torch', 'onnx', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
