"""Evaluation keys generated, written and installed a chunk at a time, and the memory check
that refuses a key generation predicted not to fit (issue 17)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from h33_bento.ckks.keys import EVAL_KEYS_FILE, EvaluationKeys, KeyChain
from h33_bento.ckks.sandbox import Sandbox
from h33_bento.ckks.serialization import KEYS_MAGIC, FrameFile, pack_frame
from h33_bento.client import FHEInferenceClient
from h33_bento.errors import InsufficientMemoryError, TamperedDataError, TruncatedDataError
from h33_bento.memory import LIMIT_ENV, available_memory_bytes
from h33_bento.runtime.engine import Engine
from h33_bento.runtime.simulate import simulate

from conftest import assert_logits_close

ROOT = Path(__file__).resolve().parent.parent

# run in a fresh process: streamed key generation clears this process's rotation keys between chunks
# only when it holds no other key pair's (the test process holds several)
_KEYGEN = """
import json, sys
from h33_bento.ckks import keys
from h33_bento.ckks.context import get_context
from h33_bento.program.model import CompiledModel
model = CompiledModel.load(sys.argv[1])
keys.ROTATION_CHUNK_BYTES = 3 * model.params.estimated_key_bytes()["rotation"]
chain = keys.KeyChain.generate(model.params, directory=sys.argv[2])
cc = get_context(model.params)
print(json.dumps({"left": len(cc.GetExistingEvalAutomorphismKeyIndices(chain.key_tag)), "key_id": chain.key_id}))
"""
_INFER = """
import json, sys
import numpy as np
from h33_bento.client import FHEInferenceClient
client = FHEInferenceClient(sys.argv[1], keys=sys.argv[2])
x = np.load(sys.argv[3])
print(json.dumps(client.decrypt_logits(client.infer(client.encrypt(x))).tolist()))
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, convnet_compiled):
    """The ConvNet saved, and its keys generated in a fresh process three rotation keys a chunk."""
    root = tmp_path_factory.mktemp("chunked")
    convnet_compiled.save(root / "model")
    return root, json.loads(_python(_KEYGEN, str(root / "model"), str(root / "keys")))


def test_streamed_bundle_round_trips_through_a_file_and_runs_encrypted(chunked, tmp_path, convnet_compiled, mnist_test):
    """Keygen writes several rotation-key chunks and keeps none of them; a fresh process installs
    them chunk by chunk (OpenFHE merges each into the key tag's map) and runs the model with them."""
    root, made = chunked
    assert made["left"] == 0  # every chunk was dropped once written
    frame = FrameFile(root / "keys" / EVAL_KEYS_FILE, KEYS_MAGIC, "bundle")
    rotations = len(convnet_compiled.params.rotation_indices)
    assert len(frame.lengths) - 2 == -(-rotations // 3) > 1  # public, relinearization, then 3 keys a chunk
    bundle = EvaluationKeys.from_file(frame.path, convnet_compiled.params)
    assert bundle.key_id == made["key_id"] and bundle.rotation_keys == ()  # the chunks stay in the file
    assert EvaluationKeys.from_bytes(bundle.to_bytes(), convnet_compiled.params) == bundle

    x = mnist_test[0][:8]
    np.save(tmp_path / "x.npy", x)
    got = np.asarray(json.loads(_python(_INFER, str(root / "model"), str(root / "keys"), str(tmp_path / "x.npy"))))
    assert_logits_close(got, simulate(convnet_compiled, x), rel=1e-3)


def test_a_server_validates_a_chunked_bundle_one_chunk_at_a_time(chunked, tmp_path, convnet_compiled, mnist_test):
    """The sandbox child re-serializes each rotation-key chunk on its own, so its memory grows by
    about OpenFHE's one copy of the keys, never by the bundle several times over (ResNet-20's 15 GiB
    bundle must validate on a 24 GB machine); the canonical bundle keeps the upload's chunks, so
    the serving process installs it one chunk at a time too, from a file the validator removed."""
    root, _ = chunked
    upload = EvaluationKeys.from_file(root / "keys" / EVAL_KEYS_FILE, convnet_compiled.params)
    with Sandbox(convnet_compiled.params, scratch_dir=tmp_path) as sb:
        keys = sb.load_bundle(upload.source.path)
        assert not list(tmp_path.glob("sandbox-*"))  # its scratch copy is gone, and still reads:
        assert keys.source.lengths[2:] == upload.source.lengths[2:] and len(upload.source.lengths) > 4
        grown = sb.bundle_memory["peak_rss"] - sb.bundle_memory["rss_before"]
        assert grown < 1.5 * upload.rotation_bytes, (grown, upload.rotation_bytes)
        client = FHEInferenceClient(convnet_compiled, keys=KeyChain.load(root / "keys"))
        x = mnist_test[0][:8]
        out = Engine(convnet_compiled, keys, sandbox=sb).run(client.encrypt(x))
    assert_logits_close(client.decrypt_logits(out), simulate(convnet_compiled, x))


def test_a_single_blob_bundle_still_reads_as_one_chunk(convnet_client, convnet_compiled):
    keys = convnet_client.keys.evaluation_keys()
    old = pack_frame(KEYS_MAGIC, keys.header(), [keys.public_key, keys.mult_key, b"".join(keys.rotation_chunks())])
    if len(keys.source.lengths) == 3:  # generated in a process holding other keys: one chunk already
        assert EvaluationKeys.from_bytes(old, convnet_compiled.params) == keys
    assert len(EvaluationKeys.from_bytes(old).rotation_keys) == 1


def test_bundle_files_are_validated_as_a_stream(tmp_path, convnet_client, convnet_compiled):
    path = tmp_path / "b.h33k"
    convnet_client.keys.evaluation_keys().save(path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(TamperedDataError, match="digest"):
        EvaluationKeys.from_file(tmp_path / "flipped")
    (tmp_path / "short").write_bytes(data[:-100])
    with pytest.raises(TruncatedDataError):
        EvaluationKeys.from_file(tmp_path / "short")
    opened = EvaluationKeys.from_file(path, convnet_compiled.params)
    path.write_bytes(bytes(flipped))  # changed between validation and install
    with pytest.raises(TamperedDataError, match="modified since it was opened"):
        list(opened.rotation_chunks())
    assert not list(tmp_path.glob(".b.h33k.*"))  # the writer's temporary files are gone


def test_keygen_predicted_not_to_fit_is_refused(monkeypatch, tmp_path, convnet_compiled):
    """A prediction larger than the available memory (injected: a fault this machine cannot produce)
    is refused before any key is made, by the client and by ``h33 keygen``; the override generates."""
    need = convnet_compiled.summary()["predicted_keygen_peak_bytes"]
    assert need > 0
    monkeypatch.setenv(LIMIT_ENV, "1")
    assert available_memory_bytes() == 1
    with pytest.raises(InsufficientMemoryError, match="ignore_memory_check=True"):
        FHEInferenceClient(convnet_compiled)
    client = FHEInferenceClient(convnet_compiled, ignore_memory_check=True)
    assert client.keys.evaluation_keys().size_bytes > 0

    convnet_compiled.save(tmp_path / "model")
    h33 = [sys.executable, "-m", "h33_bento.cli", "keygen", str(tmp_path / "model"), "--keys", str(tmp_path / "keys")]
    env = {**os.environ, LIMIT_ENV: "1"}
    refused = subprocess.run(h33, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert refused.returncode == 2 and "--ignore-memory-check" in refused.stderr
    assert not (tmp_path / "keys").exists()
    done = subprocess.run([*h33, "--ignore-memory-check"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert KeyChain.load(tmp_path / "keys").evaluation_keys().key_id in done.stdout


def test_available_memory_honours_the_tightest_figure(monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    free = available_memory_bytes()
    assert free is None or free > 0
    if free is not None:
        monkeypatch.setenv(LIMIT_ENV, str(free // 4))
        assert available_memory_bytes() == free // 4  # the tighter figure wins
        monkeypatch.setenv(LIMIT_ENV, str(free * 4))
        assert available_memory_bytes() < free * 2  # a cap above the machine's figure is not what counts


def test_a_bundle_outlives_the_chain_that_generated_it():
    """Without a directory the bundle goes to a temporary file, removed once neither the chain nor
    a bundle read from it is left."""
    import gc

    from h33_bento.ckks.params import select_params

    params = select_params(2, 512)
    bundle = KeyChain.generate(params).evaluation_keys()
    gc.collect()
    folder = bundle.source.path.parent
    assert EvaluationKeys.from_bytes(bundle.to_bytes(), params) == bundle
    del bundle
    gc.collect()
    assert not folder.exists()
