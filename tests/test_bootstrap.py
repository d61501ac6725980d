"""Bootstrapping: placement on deep and residual networks, sparse slots, range checks, one 128-bit bootstrap.

The networks here need 26 to 41 levels, beyond the 24 a bootstrappable ring holds.  They run on
small rings with the security level explicitly opted out (``security_level="HEStd_NotSet"``,
N=2^12: seconds per bootstrap instead of a minute); the 128-bit bootstrap is tested on its own.
Encrypted outputs are compared with ``simulate`` on the same program, and ``simulate`` with torch.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from h33_bento import compile, simulate  # noqa: E402
from h33_bento.ckks.keys import KeyChain  # noqa: E402
from h33_bento.ckks.params import select_bootstrap_params  # noqa: E402
from h33_bento.ckks.sandbox import Sandbox  # noqa: E402
from h33_bento.ckks.timing import measure_bootstrap  # noqa: E402
from h33_bento.client import FHEInferenceClient  # noqa: E402
from h33_bento.errors import CompileError, RangeWarning, TamperedDataError  # noqa: E402
from h33_bento.program.ops import Op  # noqa: E402
from h33_bento.program.report import peak_memory  # noqa: E402
from h33_bento.runtime.engine import Engine  # noqa: E402

from conftest import assert_logits_close  # noqa: E402

#: Small rings for speed, explicitly below 128-bit security: for these tests only.
INSECURE_FOR_TESTS = "HEStd_NotSet"


class DeepSquareMLP(nn.Module):
    """16 -> (linear, x^2 / 2) x 20 -> 4: 41 levels."""

    def __init__(self, width: int = 16, depth: int = 20) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            x = x * x * 0.5
        return self.out(x)


class ResidualSquareNet(nn.Module):
    """A stem and two residual blocks whose branches need 12 levels each: 26 levels in all, and no
    bootstrap placement can keep the second branch whole (a bootstrap leaves 8)."""

    def __init__(self, width: int = 16, branch: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.ModuleList(nn.Linear(width, width) for _ in range(branch)) for _ in range(2))
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            y = x
            for layer in block:
                y = layer(y)
                y = y * y
            x = x + y
        return self.out(x)


def _tame(model: nn.Module, gain: float) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -gain / m.in_features ** 0.5, gain / m.in_features ** 0.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)
    return model.eval()


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float64)).numpy()


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (64, 16))


@pytest.fixture(scope="module")
def deep_mlp(data):
    model = _tame(DeepSquareMLP(), 1.2).double()
    return model, compile(model, (16,), calibration_data=data, security_level=INSECURE_FOR_TESTS,
                          bootstrapping=True)


@pytest.fixture(scope="module")
def residual(data):
    model = _tame(ResidualSquareNet(), 0.8).double()
    return model, compile(model, (16,), calibration_data=data, security_level=INSECURE_FOR_TESTS,
                          bootstrapping=True)


def _bootstraps(compiled):
    return [s for s in compiled.steps if s.op is Op.BOOTSTRAP]


def _encrypted(compiled, x: np.ndarray) -> np.ndarray:
    client = FHEInferenceClient(compiled, min_security_level=INSECURE_FOR_TESTS)
    return client.decrypt_logits(client.infer(client.encrypt(x)))


def test_deep_mlp_is_compiled_with_bootstraps_and_runs_encrypted(deep_mlp, data):
    model, compiled = deep_mlp
    p = compiled.params
    assert p.bootstrapping is not None and p.scaling_technique == "FLEXIBLEAUTO"
    assert compiled.runnable and compiled.depth <= p.multiplicative_depth  # 41 levels folded into 24
    boots = _bootstraps(compiled)
    # a bootstrap leaves the levels measured by running them; 41 levels need at least three
    after = p.multiplicative_depth - boots[0].attrs["level"]
    assert after == p.multiplicative_depth - p.bootstrapping.depth
    assert len(boots) >= -(-(41 - p.multiplicative_depth) // after) >= 2
    summary = compiled.summary()
    assert summary["bootstraps"] == len(boots) and summary["predicted_latency_ms"] > 0
    assert "bootstraps: " in compiled.report and "slots -> level" in compiled.report
    # the server's predicted peak counts the precomputations measured for each slot count it uses
    measured = compiled.costs.ms["bootstraps"]["precompute"]  # also of the slot counts placement tried
    precompute = [measured[str(s)] for s in p.bootstrapping.slots]
    assert min(precompute) > 0
    without = dataclasses.replace(compiled, costs=dataclasses.replace(compiled.costs, ms={
        **compiled.costs.ms, "bootstraps": {k: v for k, v in compiled.costs.ms["bootstraps"].items() if k != "precompute"}}))
    assert peak_memory(compiled)["server"] - peak_memory(without)["server"] == sum(precompute)
    assert "precomputations not measured" in without.report and "precomputations not" not in compiled.report
    x = data[:8]
    sim = simulate(compiled, x)
    assert_logits_close(sim, _torch(model, x), rel=1e-6)  # a bootstrap is the identity on its range
    assert_logits_close(_encrypted(compiled, x), sim, rel=1e-2)


def test_a_sparse_bootstrap_runs_at_the_slots_its_tensor_fills(deep_mlp, data):
    _, compiled = deep_mlp
    sparse = [s for s in _bootstraps(compiled) if s.attrs["slots"] < compiled.params.slots]
    assert sparse, "the 16-wide layers fill 128 of 2048 slots: their bootstraps should run sparse"
    assert set(compiled.params.bootstrapping.slots) == {s.attrs["slots"] for s in _bootstraps(compiled)}
    assert all(s.attrs["slots"] == s.attrs["period"] * compiled.lanes for s in sparse)
    # a sparse bootstrap is cheaper than a full one, and the report prices it
    ms = compiled.costs.ms
    assert ms[f"bootstrap_{sparse[0].attrs['slots']}"] < ms[f"bootstrap_{compiled.params.slots}"]


def test_a_residual_branch_crosses_a_bootstrap(residual, data):
    model, compiled = residual
    boots = _bootstraps(compiled)
    assert boots
    adds = [s for s in compiled.steps if s.op is Op.ADD]
    assert len(adds) == 2
    # the second block's branch (12 levels) cannot run whole after a bootstrap (8 levels):
    # one bootstrap sits inside it, between the fork and the join
    names = [s.name for s in compiled.steps]
    fork = adds[0].name
    inside = names[names.index(fork) + 1:names.index(adds[1].name)]
    assert any(b.name in inside for b in boots)
    assert fork in adds[1].inputs  # the skip connection reads the fork across the bootstrap
    x = data[:8]
    sim = simulate(compiled, x)
    assert_logits_close(sim, _torch(model, x), rel=1e-6)
    assert_logits_close(_encrypted(compiled, x), sim, rel=1e-2)


def test_degree_2_activations_cost_one_level_in_a_bootstrapped_program(data):
    """A degree-2 series spends three levels; bootstrapped programs run it as one square between
    affine maps that fuse into the neighbouring layers, and compute the same function."""
    from h33_bento import nn as hnn

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 4))
    _tame(model, 1.0)
    hnn.polyfy(model, torch.as_tensor(data, dtype=torch.float32), degrees={"relu": 2})
    model.eval()
    flat = compile(model, (16,), measure_costs=False, bootstrapping=False, estimate_only=True)
    assert [s.op for s in flat.steps].count(Op.POLY) == 12 and flat.depth == 12 * (1 + 3) + 1
    compiled = compile(model, (16,), calibration_data=data, security_level=INSECURE_FOR_TESTS, bootstrapping=True)
    ops = [s.op for s in compiled.steps]
    assert Op.POLY not in ops and ops.count(Op.SQUARE) == 12
    assert ops.count(Op.LINEAR) == 13  # every affine map fused into a layer
    # 12 x (1 + 1) + 1 = 25 levels: one bootstrap, where the series would have needed four
    assert len(_bootstraps(compiled)) == 1
    x = data[:8]
    sim = simulate(compiled, x)
    assert_logits_close(sim, _torch(copy.deepcopy(model).double(), x), rel=1e-4)  # float32 weights
    assert_logits_close(_encrypted(compiled, x), sim, rel=1e-2)


def test_a_bootstrapped_bundle_passes_the_sandbox_and_one_without_its_bootstrapping_keys_does_not(deep_mlp, data,
                                                                                                  tmp_path):
    """A server validates key bundles in a child before installing them: the bootstrapping keys
    (rotation keys at automorphisms the program never names) are part of an honest bundle, and a
    bundle without them would fail only at the first bootstrap, after the upload was accepted."""
    _, compiled = deep_mlp
    params = compiled.params
    client = FHEInferenceClient(compiled, min_security_level=INSECURE_FOR_TESTS)
    honest = tmp_path / "honest.h33k"
    honest.write_bytes(client.keys.evaluation_keys().to_bytes())
    no_slots = params.bootstrapping.model_copy(update={"slots": ()})  # the same context, no bootstrapping keys
    plain = KeyChain.generate(params.model_copy(update={"bootstrapping": no_slots}),
                              min_security_level=INSECURE_FOR_TESTS).evaluation_keys()
    lying = tmp_path / "lying.h33k"
    lying.write_bytes(dataclasses.replace(plain, params_fingerprint=params.fingerprint).to_bytes())
    with Sandbox(params, scratch_dir=tmp_path) as sb:
        keys = sb.load_bundle(honest)
        with pytest.raises(TamperedDataError, match="automorphisms missing.*bootstrapping keys included"):
            sb.canonical_bundle(lying, tmp_path / "refused.h33k")
        assert not (tmp_path / "refused.h33k").exists()
        engine = Engine(compiled, keys, sandbox=sb)
        x = data[:8]
        assert_logits_close(client.decrypt_logits(engine.run(client.encrypt(x))), simulate(compiled, x), rel=1e-2)


def test_a_residual_join_beyond_the_bootstrap_bound_is_scaled_through_its_operands():
    """A ResNet block's join: the previous activation (read by the next linear map and the
    shortcut) plus the branch, bootstrapped, then an activation.  The join's range is 10x the
    bound; its operands' producers are scaled down and their other readers absorb the inverse."""
    import scipy.sparse as sp

    from h33_bento.compiler.bootstraps import _fit_ranges
    from h33_bento.compiler.calibration import output_ranges
    from h33_bento.compiler.graph import Graph, Node

    rng = np.random.default_rng(0)

    def linear(name, inp, scale):
        return Node(name, Op.LINEAR, [inp], (4,), {"matrix": sp.csr_matrix(rng.normal(size=(4, 4)) * scale),
                                                  "bias": rng.normal(size=4)})

    def poly(name, inp, lo, hi):
        return Node(name, Op.POLY, [inp], (4,), {"coeffs": np.array([0.5, 0.3, 0.2]), "lower": lo, "upper": hi})

    g = Graph({}, "x", "out")
    g.add(Node("x", Op.INPUT, [], (4,)))
    g.add(linear("stem", "x", 1.0))
    g.add(poly("act", "stem", -4.0, 4.0))
    g.add(linear("branch", "act", 40.0))
    g.add(Node("join", Op.ADD, ["branch", "act"], (4,)))
    g.add(Node("boot", Op.BOOTSTRAP, ["join"], (4,), {"slots": 4, "period": 4, "level": 0, "bound": 1.0}))
    g.add(poly("act2", "boot", -200.0, 200.0))
    g.add(linear("out", "act2", 1.0))
    x = rng.uniform(-1, 1, (32, 4))
    before, ranges = g.evaluate(x), output_ranges(g, x)
    assert max(map(abs, ranges["join"])) > 10.0
    scaled = copy.deepcopy(g)
    _fit_ranges(scaled, ranges, bound=1.0, margin=0.0, sparse={})
    after = output_ranges(scaled, x)
    assert max(map(abs, after["join"])) == pytest.approx(1.0)  # the bootstrap's input now fits
    assert np.allclose(scaled.evaluate(x), before)  # and the network computes what it did
    assert np.allclose(after["branch"], np.array(ranges["branch"]) * (after["join"][1] / ranges["join"][1]))

    g.nodes["join"].inputs = ["branch", "x"]  # a shortcut straight from the input: nothing can absorb it
    with pytest.raises(CompileError, match="cannot absorb a rescaling"):
        _fit_ranges(g, output_ranges(g, x), bound=1.0, margin=0.0, sparse={})


def test_simulate_warns_when_a_value_leaves_the_bootstrap_range(deep_mlp, data):
    _, compiled = deep_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("error", RangeWarning)
        simulate(compiled, data)  # the calibrated data stay in range
    with pytest.warns(RangeWarning, match="bootstrap"), np.errstate(all="ignore"):
        simulate(compiled, data * 4)  # a 4x gain on the input: the x^2 layers blow it out of range


def test_one_128_bit_bootstrap():
    """The bootstrap the engine runs, at the parameters deep networks get (N=2^16, 128-bit,
    sparse-encapsulated secret), at a small slot count (its keys fit the test machine)."""
    params = select_bootstrap_params(4096)
    assert params.ring_dim == 1 << 16 and params.security_level == "HEStd_128_classic"
    assert params.bootstrapping.secret_key_dist == "SPARSE_ENCAPSULATED"
    measured = measure_bootstrap(params, 64, refresh=True)
    assert measured["levels_after"] == params.multiplicative_depth - params.bootstrapping.depth >= 8
    assert measured["error"] < 1e-3 * measured["bound"]
    assert measured["error_after_levels"] < 1e-3 * measured["bound"]  # still right after using every level
    assert measured["ms"] > 0 and measured["keys"] > 0
    assert measured["precompute_bytes"] > 1 << 20  # plaintexts of N=2^16 polynomials, megabytes at least
