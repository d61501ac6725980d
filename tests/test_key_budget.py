"""Key size as a compile cost: ``compile(..., key_budget_bytes=...)`` fits the real key bundle in
the budget, still computes what ``simulate`` does, says what the budget cost, and refuses a budget
no schedule fits."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_logits_close

from h33_bento import compile, simulate
from h33_bento.client import FHEInferenceClient
from h33_bento.compiler.torch_import import export_onnx
from h33_bento.errors import KeyBudgetError
from h33_bento.program.model import CompiledModel

REPO = Path(__file__).resolve().parents[1]


def _compile(convnet, mnist_train, costs, budget=None):
    return compile(convnet, (1, 28, 28), calibration_data=mnist_train[0][:128], costs=costs, key_budget_bytes=budget)


@pytest.fixture(scope="module")
def smallest(convnet, convnet_compiled, mnist_train):
    """The smallest bundle the search finds for the ConvNet (from the error of an impossible budget)."""
    with pytest.raises(KeyBudgetError) as err:
        _compile(convnet, mnist_train, convnet_compiled.costs, budget=1)
    return err.value


@pytest.fixture(scope="module")
def budgeted(convnet, convnet_compiled, mnist_train, smallest):
    """The ConvNet with a budget half a rotation key above the smallest bundle found."""
    budget = smallest.smallest_bytes + convnet_compiled.costs.key_bytes["rotation"] // 2
    assert budget < convnet_compiled.predicted_key_bundle_bytes  # the lever exists: the default is bigger
    return _compile(convnet, mnist_train, convnet_compiled.costs, budget)


def test_a_budget_below_the_default_bundle_gives_a_real_bundle_within_it(budgeted, convnet_compiled, mnist_test):
    budget = budgeted.metadata["key_budget"]["budget_bytes"]
    ks = convnet_compiled.costs.key_bytes
    keys = len(budgeted.params.rotation_indices)
    assert keys < len(convnet_compiled.params.rotation_indices)
    assert ks["public"] + ks["mult"] + keys * ks["rotation"] <= budget  # the exact key count x measured size
    client = FHEInferenceClient(budgeted)
    bundle = client.keys.evaluation_keys()
    assert bundle.size_bytes <= len(bundle.to_bytes()) <= budget  # what a client really uploads
    # the smaller key set still computes the same program: encrypted output equals simulate
    x = mnist_test[0][:8]
    got = client.decrypt_logits(client.infer(client.encrypt(x)))
    want = simulate(budgeted, x)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert_logits_close(got, want, rel=1e-3)


def test_the_report_shows_what_the_budget_cost(budgeted, convnet, convnet_compiled, mnist_train, tmp_path):
    s = budgeted.summary()
    default = _compile(convnet, mnist_train, convnet_compiled.costs).summary()
    assert s["key_budget_bytes"] == budgeted.metadata["key_budget"]["budget_bytes"] >= s["key_bundle_bytes"]
    # "without it" is what the same compile chooses without a budget
    assert (s["unbudgeted_rotation_keys"], s["unbudgeted_key_bundle_bytes"], s["unbudgeted_predicted_latency_ms"]) \
        == (default["rotation_keys"], default["key_bundle_bytes"], default["predicted_latency_ms"])
    assert s["rotation_keys"] < s["unbudgeted_rotation_keys"]
    assert s["key_budget_cost_ms"] == pytest.approx(s["predicted_latency_ms"] - default["predicted_latency_ms"],
                                                    abs=0.02)
    assert f"key budget {s['key_budget_bytes'] / 2**20:.1f} MiB: {s['rotation_keys']} rotation keys" in budgeted.report
    assert default["key_budget_bytes"] is None and "key budget" not in convnet_compiled.report
    loaded = CompiledModel.load(budgeted.save(tmp_path / "m"))
    assert loaded.summary() == s and loaded.fingerprint == budgeted.fingerprint


def test_a_budget_no_schedule_fits_names_the_smallest_bundle(smallest, budgeted):
    assert smallest.fixed_bytes < smallest.smallest_bytes <= budgeted.predicted_key_bundle_bytes
    assert f"the smallest bundle found is {smallest.smallest_bytes / 2**20:.1f} MiB" in str(smallest)


def test_cli_key_budget(convnet, mnist_train, tmp_path):
    onnx.save(export_onnx(convnet, (1, 28, 28)), tmp_path / "convnet.onnx")
    np.save(tmp_path / "calib.npy", mnist_train[0][:128])

    def h33(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "h33_bento.cli", "compile", str(tmp_path / "convnet.onnx"),
                               "--input-shape", "1,28,28", "--calibration", str(tmp_path / "calib.npy"),
                               "--plan-only", *args], capture_output=True, text=True, timeout=600, cwd=REPO)

    too_small = h33("--key-budget", "1MiB")
    assert too_small.returncode == 2 and "smallest bundle found is" in " ".join(too_small.stderr.split())
    bad = h33("--key-budget", "lots")
    assert bad.returncode == 2 and "200MiB" in bad.stderr
    fits = h33("--key-budget", "2GiB")
    assert fits.returncode == 0 and "key budget 2048.0 MiB" in fits.stdout


@pytest.mark.parametrize("lanes", [(0, 1, 2, 3, 4, 5, 6, 7), (0, 7), (5, 2, 6)])
def test_lane_packing_composes_every_shift_from_log2_lanes_keys(lanes, convnet_compiled, convnet_client, mnist_test):
    import openfhe

    from h33_bento.ckks.serialization import EncryptedTensor
    from h33_bento.runtime.engine import Engine

    p = convnet_compiled.params
    assert [r for r in p.rotation_indices if r % p.lanes] == [p.slots - 4, p.slots - 2, p.slots - 1]
    engine = Engine(convnet_compiled, convnet_client.keys.evaluation_keys())
    x = mnist_test[0][200:200 + len(lanes)]
    singles = [[engine.deserialize(b) for b in convnet_client.encrypt(img).ciphertexts] for img in x]
    out = engine.run_ciphertexts(engine.pack_lanes(list(zip(lanes, singles))))
    env = EncryptedTensor(model_fingerprint=convnet_compiled.fingerprint, params_fingerprint=p.fingerprint,
                          key_id=convnet_client.keys.key_id, shape=(p.lanes, *convnet_compiled.output_shape),
                          lanes_used=p.lanes, level=convnet_compiled.depth, batched=True, lane=0,
                          ciphertexts=[openfhe.Serialize(ct, openfhe.BINARY) for ct in out])
    got = convnet_client.decrypt_logits(env)
    assert_logits_close(got[list(lanes)], simulate(convnet_compiled, x), rel=1e-3)
    empty = [lane for lane in range(p.lanes) if lane not in lanes]
    if empty:  # what the program gives an all-zero input, not a misplaced request
        assert_logits_close(got[empty], simulate(convnet_compiled, np.zeros((len(empty), *x.shape[1:]))), rel=1e-2)
