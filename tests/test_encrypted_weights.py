"""Encrypted-weight mode: the server runs a weightless artifact with weights it cannot read."""
from __future__ import annotations

import copy
import json
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from h33_bento import simulate
from h33_bento.ckks import sandbox as sandbox_module
from h33_bento.ckks.sandbox import Sandbox
from h33_bento.client import FHEInferenceClient
from h33_bento.errors import (
    KeyMismatchError,
    ModelFormatError,
    ModelMismatchError,
    TamperedDataError,
    TruncatedDataError,
    WeightsNotProvisionedError,
)
from h33_bento.program.model import CompiledModel
from h33_bento.runtime.engine import Engine
from h33_bento.runtime.weights import EncryptedWeights, load_weights, predicted_weights_bytes, provision_weights

from conftest import assert_logits_close, held_bytes


@pytest.fixture(scope="module")
def weightless(convnet_compiled):
    return convnet_compiled.without_weights()


@pytest.fixture(scope="module")
def client(weightless):
    """A data owner holding only the weightless artifact."""
    return FHEInferenceClient(weightless, weight_mode="encrypted")


@pytest.fixture(scope="module")
def weights(convnet_compiled, client):
    """The model owner provisions its weights for the client's public key."""
    return provision_weights(convnet_compiled, client.keys.evaluation_keys())


@pytest.fixture(scope="module")
def engine(weightless, client, weights):
    return Engine(weightless, client.keys.evaluation_keys(), weights=weights.to_bytes())


def test_encrypted_weights_match_simulate_on_16_real_images(convnet_compiled, client, weights, mnist_test):
    client.install_weights(weights.to_bytes())
    x = mnist_test[0][:16]
    got = np.concatenate([client.decrypt_logits(client.infer(client.encrypt(x[i:i + 8]))) for i in (0, 8)])
    want = simulate(convnet_compiled, x)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert_logits_close(got, want, rel=1e-3)
    pred = client.decrypt(client.infer(client.encrypt(x[0])))
    assert pred.index == int(want[0].argmax()) and pred.top_k(3)[0][0] == pred.label


def test_a_client_holding_the_full_model_provisions_its_own_local_engine(convnet_compiled, mnist_test):
    local = FHEInferenceClient(convnet_compiled, weight_mode="encrypted")
    assert local.model.weight_mode == "encrypted"
    x = mnist_test[0][16:24]
    assert_logits_close(local.decrypt_logits(local.infer(local.encrypt(x))), simulate(convnet_compiled, x), rel=1e-3)
    assert local._engine.model.weight_mode == "encrypted"


def test_weightless_artifact_saves_and_loads_with_its_structure_only(convnet_compiled, weightless, tmp_path):
    path = weightless.save(tmp_path / "weightless")
    loaded = CompiledModel.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["weight_mode"] == "encrypted" and loaded.weight_mode == "encrypted"
    assert loaded.fingerprint == weightless.fingerprint != convnet_compiled.fingerprint
    assert loaded.weights_id == weightless.weights_id
    for full, bare in zip(convnet_compiled.steps, loaded.steps):
        if full.linear is not None:
            assert bare.op.value == "encrypted_linear" and bare.linear.diags.size == bare.linear.bias.size == 0
            np.testing.assert_array_equal(bare.linear.terms, full.linear.terms)
    assert loaded.params == convnet_compiled.params and loaded.summary()["plaintext_bytes"] == 0
    assert "weight_mode" not in convnet_compiled._serialize()[0]  # plaintext fingerprints are unchanged
    with pytest.raises(WeightsNotProvisionedError):
        simulate(loaded, np.zeros(loaded.input_shape))

    manifest["weight_mode"] = "plaintext"  # an edited manifest is refused
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError):
        CompiledModel.load(path)


def _windows(compiled: CompiledModel, dtype: type, width: int = 16) -> list[bytes]:
    """``width``-byte windows of every linear step's diagonal and bias values as ``dtype`` bytes, each
    of non-zero values only (zeros occur anywhere), a few per array."""
    out = []
    for step in compiled.steps:
        if step.linear is None:
            continue
        for values in (step.linear.diags, step.linear.bias):
            raw = values.astype(dtype).reshape(-1)
            per = width // raw.itemsize
            nonzero = np.flatnonzero(np.convolve(raw != 0, np.ones(per), "valid") == per)
            out += [raw[i:i + per].tobytes() for i in nonzero[:: max(1, len(nonzero) // 8)][:8]]
    return out


def _found(windows: list[bytes], blobs: list[bytes]) -> int:
    return sum(any(w in blob for blob in blobs) for w in windows)


def test_no_weight_value_reaches_the_server(convnet_compiled, weightless, weights, engine, tmp_path):
    # 16-byte windows as float64 and float32, and single float64 values (biases are sparse)
    float64, float32 = _windows(convnet_compiled, np.float64), _windows(convnet_compiled, np.float32)
    float64 += _windows(convnet_compiled, np.float64, width=8)
    assert len(float64) >= 60 and len(float32) >= 30
    files = [f.read_bytes() for f in weightless.save(tmp_path / "weightless").iterdir()]
    server = [*files, weights.to_bytes(), *held_bytes(engine)]
    assert _found(float64, server) == 0 and _found(float32, server) == 0
    assert engine.cache.used == 0  # no weight was encoded as a plaintext either

    # the same check finds them in the plaintext-weight artifact and engine, so it can fail
    full = [f.read_bytes() for f in convnet_compiled.save(tmp_path / "full").iterdir()]
    assert _found(float64, full) == len(float64)
    keys = engine.keys
    assert _found(float64, held_bytes(Engine(convnet_compiled, keys))) == len(float64)


def test_weights_for_another_model_or_key_are_refused(convnet_compiled, weightless, client, weights):
    keys = client.keys.evaluation_keys()
    retrained = copy.deepcopy(convnet_compiled)  # same architecture, other weights: another model
    retrained.steps[0].linear.diags[0] *= 1.01
    retrained._fingerprint = None
    assert retrained.without_weights().fingerprint != weightless.fingerprint
    with pytest.raises(ModelMismatchError, match="belong to model"):
        Engine(weightless, keys, weights=provision_weights(retrained, keys))

    other = FHEInferenceClient(weightless, weight_mode="encrypted")
    with pytest.raises(KeyMismatchError, match="encrypted under key"):
        Engine(weightless, keys, weights=provision_weights(convnet_compiled, other.keys.evaluation_keys()))


def test_truncated_or_tampered_weights_are_refused(weightless, client, weights):
    keys, data = client.keys.evaluation_keys(), weights.to_bytes()
    with pytest.raises(TruncatedDataError):
        EncryptedWeights.from_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(TamperedDataError, match="digest"):
        Engine(weightless, keys, weights=bytes(flipped))
    name, step = next(iter(weights.steps.items()))
    fewer = replace(weights, steps={**weights.steps, name: replace(step, diagonals=step.diagonals[1:])})
    with pytest.raises(TamperedDataError, match="ciphertext counts"):
        Engine(weightless, keys, weights=fewer.to_bytes())


def test_encrypted_mode_without_weights_is_refused(weightless, client, convnet_compiled, mnist_test):
    with pytest.raises(WeightsNotProvisionedError, match="none were provisioned"):
        Engine(weightless, client.keys.evaluation_keys())
    bare = FHEInferenceClient(weightless, weight_mode="encrypted", keys=client.keys)
    with pytest.raises(WeightsNotProvisionedError):
        bare.infer(bare.encrypt(mnist_test[0][0]))
    with pytest.raises(ValueError, match="weight_mode='encrypted'"):
        FHEInferenceClient(weightless, keys=client.keys)
    with pytest.raises(ValueError, match="in the clear"):
        Engine(convnet_compiled, client.keys.evaluation_keys(), weights=b"")


class _RecordingSandbox:
    """The sandbox's batching (``Sandbox.canonical_weights``) over a recorder of what each child call
    would receive, so the test sees every batch without starting children."""

    canonical_weights = Sandbox.canonical_weights

    def __init__(self) -> None:
        self._canonical: set[bytes] = set()
        self.calls: list[tuple[int, int]] = []  # (level, bytes) per child call

    def canonical_ciphertexts(self, blobs, key_tag, level=0):
        self.calls.append((level, sum(map(len, blobs))))
        return list(blobs)


def test_a_weights_file_is_checked_and_loaded_a_batch_at_a_time(convnet_compiled, weightless, client, weights,
                                                                mnist_test, tmp_path, monkeypatch):
    """What a server does with an upload or a stored file (``load_weights``, then ``Engine``) never
    holds the file's bytes whole: Python's peak allocation stays under an eighth of the file."""
    monkeypatch.setattr(sandbox_module, "WEIGHT_BATCH", 4)
    path = tmp_path / "weights.h33w"
    path.write_bytes(weights.to_bytes())
    size, blob = path.stat().st_size, max(len(b) for _, _, b in weights.ciphertexts())
    keys, sandbox = client.keys.evaluation_keys(), _RecordingSandbox()
    tracemalloc.start()
    try:
        loaded = load_weights(path, weightless, keys.key_id, keys.key_tag, sandbox)
        engine = Engine(weightless, keys, weights=loaded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 32 * blob and peak < size / 8, f"peak {peak} of a {size}-byte file"
    assert sum(n for _, n in sandbox.calls) == weights.size_bytes and max(n for _, n in sandbox.calls) <= 4 * blob
    assert {name: (len(d), len(b)) for name, (d, b) in engine._weights.items()} == \
        {name: (len(w.diagonals), len(w.biases)) for name, w in weights.steps.items()}
    x = mnist_test[0][24:26]
    assert_logits_close(client.decrypt_logits(engine.run(client.encrypt(x))), simulate(convnet_compiled, x), rel=1e-3)
    calls = len(sandbox.calls)
    load_weights(path, weightless, keys.key_id, keys.key_tag, sandbox)  # a frame it passed is not sent again
    assert len(sandbox.calls) == calls
    with open(path, "r+b") as fh:  # and a file whose bytes changed is refused before any blob is sent
        fh.seek(size // 2)
        fh.write(b"\xff" * 8)
    refused = _RecordingSandbox()
    with pytest.raises(TamperedDataError, match="digest"):
        load_weights(path, weightless, keys.key_id, keys.key_tag, refused)
    assert refused.calls == []


def test_the_weights_size_is_predicted_from_the_plan_and_written_as_a_stream(convnet_compiled, weightless, weights,
                                                                              tmp_path):
    """What sizing a server (and the LeNet-5 benchmark's decision to run) relies on."""
    assert predicted_weights_bytes(weightless) == predicted_weights_bytes(convnet_compiled)
    assert abs(predicted_weights_bytes(weightless) / weights.size_bytes - 1) < 0.01
    assert weights.write(tmp_path / "w.h33w").read_bytes() == weights.to_bytes()
