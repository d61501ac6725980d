"""The evaluation-key store (``h33_bento.keystore``) on real bundles and real files.

Bundles come from real OpenFHE key chains at small 128-bit parameters (N = 2^14, depth 1, two
rotation keys: about 3.5 MB each), so these tests need no trained model.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from h33_bento.ckks.keys import KeyChain
from h33_bento.ckks.params import select_params
from h33_bento.errors import (
    EvaluationKeysNotFoundError,
    KeyMismatchError,
    ParamsMismatchError,
    TamperedDataError,
    TruncatedDataError,
)
from h33_bento.keystore import BUNDLE_FILE, DEFAULT_TENANT, INCOMING, META_FILE, KeyStore


@pytest.fixture(scope="module")
def params():
    return select_params(1, 1024, lanes=8, rotation_indices=(1, 2))


@pytest.fixture(scope="module")
def chains(params):
    return [KeyChain.generate(params) for _ in range(2)]


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_put_writes_one_directory_per_key_and_load_gives_the_bundle_back(tmp_path, params, chains):
    keys = chains[0].evaluation_keys()
    store = KeyStore(tmp_path)
    rec, created = store.put(keys, "acme", params)
    assert created and rec.key_id == keys.key_id and rec.tenant == "acme"
    assert rec.params_fingerprint == params.fingerprint and rec.size_bytes == len(keys.to_bytes())
    assert _files(tmp_path) == [INCOMING, keys.key_id, f"{keys.key_id}/{BUNDLE_FILE}", f"{keys.key_id}/{META_FILE}"]
    assert (tmp_path / keys.key_id / BUNDLE_FILE).read_bytes() == keys.to_bytes()
    meta = json.loads((tmp_path / keys.key_id / META_FILE).read_text())
    assert meta["tenant"] == "acme" and meta["key_tag"] == keys.key_tag
    assert store.load(keys.key_id, params) == keys
    assert "key_tag" not in rec.public() and rec.public()["tenant"] == "acme"

    # the first writer owns the key_id: storing it again (bytes, another tenant) changes nothing
    again, created = store.put(keys.to_bytes(), "globex")
    assert not created and again == rec
    assert json.loads((tmp_path / keys.key_id / META_FILE).read_text())["tenant"] == "acme"
    # a writer that names no tenant records the default one
    rec2, _ = store.put(chains[1].evaluation_keys())
    assert rec2.tenant == DEFAULT_TENANT
    assert [r.key_id for r in store.for_tenant("acme")] == [keys.key_id] and len(store) == 2
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_invalid_bundles_are_refused_and_nothing_is_written(tmp_path, params, chains):
    store = KeyStore(tmp_path)
    data = chains[0].evaluation_keys().to_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    other = select_params(1, 1024, lanes=8, rotation_indices=(1, 3))
    with pytest.raises(TruncatedDataError):
        store.put(data[:-10])
    with pytest.raises(TamperedDataError):
        store.put(bytes(flipped))
    with pytest.raises(ParamsMismatchError):
        store.put(data, params=other)
    with pytest.raises(ValueError, match="tenant name"):
        store.put(data, "not a tenant/name")
    assert _files(tmp_path) == [INCOMING] and len(store) == 0
    outside = tmp_path.parent / f"{tmp_path.name}-upload.h33k"
    outside.write_bytes(data)
    with pytest.raises(ValueError, match="not an upload of this store"):
        store.stage(outside)


def test_lookups_name_the_key_id(tmp_path, params, chains):
    a, b = (c.evaluation_keys() for c in chains)
    store = KeyStore(tmp_path)
    with pytest.raises(EvaluationKeysNotFoundError, match=f"key_id {a.key_id}: the key store .* has no bundle") as err:
        store.load(a.key_id)
    assert err.value.key_id == a.key_id and isinstance(err.value, KeyMismatchError)
    with pytest.raises(EvaluationKeysNotFoundError, match="not a valid key id"):
        store.load("../" + a.key_id)
    missing = tmp_path / "missing"
    with pytest.raises(EvaluationKeysNotFoundError, match=f"key_id {a.key_id}: .*missing does not exist"):
        KeyStore(missing, create=False).load(a.key_id)
    assert not missing.exists()  # a reader never creates the store

    store.put(a)
    store.put(b)
    # b's bundle swapped into a's directory: the bundle must be the one its key_id names
    (tmp_path / a.key_id / BUNDLE_FILE).write_bytes(b.to_bytes())
    with pytest.raises(KeyMismatchError, match=f"holds evaluation keys for key_id {b.key_id}, not {a.key_id}"):
        store.load(a.key_id)
    # a bundle corrupted on disk, and one loaded for other params: the error names the key
    data = bytearray(b.to_bytes())
    data[-40] ^= 1
    (tmp_path / b.key_id / BUNDLE_FILE).write_bytes(bytes(data))
    with pytest.raises(TamperedDataError, match=f"stored bundle for key_id {b.key_id}"):
        store.load(b.key_id)
    (tmp_path / b.key_id / BUNDLE_FILE).write_bytes(b.to_bytes())
    with pytest.raises(ParamsMismatchError, match=f"stored bundle for key_id {b.key_id}"):
        store.load(b.key_id, select_params(1, 1024, lanes=8, rotation_indices=(1, 3)))


def test_processes_sharing_a_store_see_each_others_writes_and_deletes(tmp_path, params, chains):
    """Two stores on one directory stand for two service replicas (or a service and a pyfunc)."""
    keys = chains[0].evaluation_keys()
    one, two = KeyStore(tmp_path), KeyStore(tmp_path, create=False)
    assert two.get(keys.key_id) is None
    one.put(keys, "acme")
    assert two.get(keys.key_id).tenant == "acme" and two.load(keys.key_id, params) == keys
    # deleted and registered again by another tenant behind one's back: one's index is not trusted
    two.delete(keys.key_id)
    two.put(keys, "globex")
    assert one.get(keys.key_id).tenant == "globex" and one.for_tenant("acme") == []
    two.delete(keys.key_id)
    assert one.get(keys.key_id) is None and _files(tmp_path) == [INCOMING]
    with pytest.raises(EvaluationKeysNotFoundError):
        one.delete(keys.key_id)


HOLD_AN_UPLOAD = """
import sys
from pathlib import Path
from h33_bento.keystore import KeyStore
store = KeyStore(sys.argv[1])
data = Path(sys.argv[2]).read_bytes()
with store.incoming() as upload:
    upload.file.write(data[: len(data) // 2])
    upload.file.flush()
    print(upload.path.name, flush=True)
    sys.stdin.readline()  # another process opens the store meanwhile
    upload.file.write(data[len(data) // 2:])
    upload.file.flush()
    staged = store.stage(upload.path)
    print(store.commit(staged, "acme")[0].key_id, flush=True)
"""


def test_leftovers_of_a_crash_are_cleaned_up_but_a_live_upload_is_not(tmp_path, params, chains):
    """Opening a store removes what crashed writers left in .incoming, at once, and never an upload
    another live process (a replica on the same volume) is still writing: it holds a lock on it."""
    keys, other = chains[0].evaluation_keys(), chains[1].evaluation_keys()
    KeyStore(tmp_path)
    half = tmp_path / keys.key_id  # a key directory without its meta.json (the store never writes one)
    half.mkdir()
    (half / BUNDLE_FILE).write_bytes(keys.to_bytes())
    staged = tmp_path / INCOMING / f"{keys.key_id}.0123"  # staged, never renamed into place
    staged.mkdir()
    (staged / BUNDLE_FILE).write_bytes(keys.to_bytes())
    (tmp_path / INCOMING / "crashed.part").write_bytes(b"partial upload")  # fresh: the crash was just now
    bundle = tmp_path.parent / f"{tmp_path.name}-other.h33k"
    bundle.write_bytes(other.to_bytes())
    writer = subprocess.Popen([sys.executable, "-c", HOLD_AN_UPLOAD, str(tmp_path), str(bundle)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live = writer.stdout.readline().strip()
        assert live.endswith(".part"), live
        store = KeyStore(tmp_path)  # a replica starting up while the other one uploads
        assert store.get(keys.key_id) is None and len(store) == 0
        assert [p.name for p in (tmp_path / INCOMING).iterdir()] == [live]
        out, _ = writer.communicate("go\n", timeout=120)
    finally:
        writer.kill()
    assert writer.returncode == 0 and out.strip() == other.key_id  # the live upload completed
    assert store.load(other.key_id, params) == other and store.get(other.key_id).tenant == "acme"
    assert list((tmp_path / INCOMING).iterdir()) == []

