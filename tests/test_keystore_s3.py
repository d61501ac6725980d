"""One key store for every replica: ``KeyStore(remote=S3Keys(...))`` against a real S3 server.

The server is moto's, started on 127.0.0.1 by the fixture and spoken to over HTTP with boto3, as
a replica would speak to S3 or MinIO.  Each "replica" is a ``KeyStore`` with its own local cache
directory; they share only the bucket.
"""
from __future__ import annotations

import boto3
import pytest
from moto.server import ThreadedMotoServer

from h33_bento.ckks.serialization import WEIGHTS_MAGIC, frame_digest, pack_frame
from h33_bento.errors import EvaluationKeysNotFoundError
from h33_bento.keystore import KeyStore
from h33_bento.keystore_s3 import S3Keys

from test_keystore import chains, params  # noqa: F401  (the module-scoped key chains)

BUCKET = "h33-keys"
CREDENTIALS = {"aws_access_key_id": "h33-test", "aws_secret_access_key": "h33-test", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, **CREDENTIALS).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def remote(s3_endpoint, request):
    """A fresh prefix of the bucket per test, as a factory of clients onto it (one per replica)."""
    prefix = f"t-{request.node.name[:40]}"
    return lambda: S3Keys(BUCKET, prefix, client=boto3.client("s3", endpoint_url=s3_endpoint, **CREDENTIALS))


def test_a_key_stored_through_one_replica_is_loaded_through_another(tmp_path, remote, params, chains):
    a = KeyStore(tmp_path / "a", remote=remote())
    b = KeyStore(tmp_path / "b", remote=remote())
    bundle = chains[0].evaluation_keys()
    rec, created = a.put(bundle, "acme", params)
    assert created and b.get(rec.key_id) == rec and len(b) == 1
    assert [r.key_id for r in b.for_tenant("acme")] == [rec.key_id] and b.for_tenant("globex") == []
    assert not b.bundle_path(rec.key_id).exists()  # nothing local until it is used
    assert b.load(rec.key_id, params) == bundle
    assert b.bundle_path(rec.key_id).read_bytes() == a.bundle_path(rec.key_id).read_bytes()
    # the first writer owns a key_id, whichever replica the second upload reaches
    again, created = b.put(bundle, "globex", params)
    assert not created and again.tenant == "acme"


def test_a_key_deleted_through_one_replica_is_gone_from_the_others_cache(tmp_path, remote, params, chains):
    a = KeyStore(tmp_path / "a", remote=remote())
    b = KeyStore(tmp_path / "b", remote=remote(), revalidate_s=0.0)
    rec, _ = a.put(chains[0].evaluation_keys(), "acme", params)
    b.load(rec.key_id, params)
    assert b.bundle_path(rec.key_id).is_file()
    a.delete(rec.key_id)
    assert b.get(rec.key_id) is None and not b.bundle_path(rec.key_id).exists()
    with pytest.raises(EvaluationKeysNotFoundError, match="s3://h33-keys/"):
        b.load(rec.key_id, params)


def test_a_writer_that_dies_before_its_record_leaves_no_visible_key(tmp_path, remote, params, chains, monkeypatch):
    """A crash between the bundle upload and the meta.json write, injected: the one fault that a
    real kill cannot be timed to hit."""
    dying = remote()
    real_put = dying.client.put_object

    def crash(**kwargs):
        if kwargs["Key"].endswith("/meta.json"):
            raise KeyboardInterrupt("killed")
        return real_put(**kwargs)

    monkeypatch.setattr(dying.client, "put_object", crash)
    with pytest.raises(KeyboardInterrupt):
        KeyStore(tmp_path / "a", remote=dying).put(chains[1].evaluation_keys(), "acme", params)
    other = KeyStore(tmp_path / "b", remote=remote())
    assert other.get(chains[1].key_id) is None and len(other) == 0
    assert other.put(chains[1].evaluation_keys(), "acme", params)[1]  # and the key can still be stored


MODEL = "ab" * 16


def _put_weights(store: KeyStore, key_id: str, fill: bytes) -> bytes:
    """Store a weights frame (the store checks no contents: that is ``load_weights``'s) for ``MODEL``
    as an upload would be; returns its bytes."""
    data = pack_frame(WEIGHTS_MAGIC, {"model_fingerprint": MODEL, "params_fingerprint": "p", "key_id": key_id,
                                      "steps": []}, [fill * 4096])
    with store.incoming() as upload:
        upload.file.write(data)
        upload.file.flush()
        store.put_weights(key_id, MODEL, upload.path)
    return data


def _objects(remote: S3Keys, key_id: str) -> list[str]:
    listed = remote.client.list_objects_v2(Bucket=remote.bucket, Prefix=remote._key(key_id) + "/")
    return sorted(o["Key"].rsplit("/", 2)[-2] + "/" + o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", []))


def test_weights_stored_through_one_replica_are_used_replaced_and_deleted_through_others(
        tmp_path, remote, params, chains):
    a = KeyStore(tmp_path / "a", remote=remote())
    b = KeyStore(tmp_path / "b", remote=remote(), revalidate_s=0.0)
    c = KeyStore(tmp_path / "c", remote=remote(), revalidate_s=3600.0)
    rec, _ = a.put(chains[0].evaluation_keys(), "acme", params)
    assert b.weights_digest(rec.key_id, MODEL) is None and b.weights_file(rec.key_id, MODEL) is None
    first = _put_weights(a, rec.key_id, b"1")
    assert a.weights_path(rec.key_id, MODEL).read_bytes() == first  # a holds the key: cached at once
    assert b.weights_digest(rec.key_id, MODEL) == first[-32:]
    b.load(rec.key_id, params)
    assert b.weights_file(rec.key_id, MODEL).read_bytes() == first  # fetched into b's cache
    c.load(rec.key_id, params)
    assert c.weights_file(rec.key_id, MODEL).read_bytes() == first

    second = _put_weights(a, rec.key_id, b"2")  # replaced through a: b revalidates at once, c within an hour
    assert b.weights_digest(rec.key_id, MODEL) == second[-32:]
    assert b.weights_file(rec.key_id, MODEL).read_bytes() == second
    assert c.weights_digest(rec.key_id, MODEL) == first[-32:]
    c.revalidate_s = 0.0
    assert c.weights_file(rec.key_id, MODEL).read_bytes() == second
    assert frame_digest(c.weights_path(rec.key_id, MODEL)) == c.weights_digest(rec.key_id, MODEL)
    weights_objects = [o for o in _objects(a.remote, rec.key_id) if o.startswith("weights/")]
    assert len(weights_objects) == 2  # the record and the current object: the replaced one was removed

    b.delete(rec.key_id)  # deleting the key takes its weights, on the object store and in every cache
    assert _objects(a.remote, rec.key_id) == []
    assert a.weights_digest(rec.key_id, MODEL) is None and a.weights_file(rec.key_id, MODEL) is None
    assert c.get(rec.key_id) is None and not c.weights_path(rec.key_id, MODEL).exists()  # c's cache is dropped


def test_weights_for_a_key_deleted_while_they_upload_are_not_left_behind(tmp_path, remote, params, chains,
                                                                          monkeypatch):
    a, b = KeyStore(tmp_path / "a", remote=remote()), KeyStore(tmp_path / "b", remote=remote())
    rec, _ = a.put(chains[1].evaluation_keys(), "acme", params)
    real_upload = a.remote.client.upload_file

    def upload_then_lose_the_key(*args, **kwargs):
        real_upload(*args, **kwargs)
        b.delete(rec.key_id)  # another replica deletes the key between the object and its record

    monkeypatch.setattr(a.remote.client, "upload_file", upload_then_lose_the_key)
    with pytest.raises(EvaluationKeysNotFoundError):
        _put_weights(a, rec.key_id, b"3")
    assert _objects(a.remote, rec.key_id) == []


def test_the_service_config_takes_a_shared_store_url(tmp_path):
    from h33_bento.runners.config import ServeConfig

    cfg = ServeConfig.from_env({"H33_KEY_STORE": str(tmp_path), "H33_KEY_STORE_URL": "s3://h33-keys/prod"})
    assert cfg.key_store_url == "s3://h33-keys/prod"
    with pytest.raises(ValueError, match="key_store_url"):
        ServeConfig.from_env({"H33_KEY_STORE_URL": "/var/keys"})
    with pytest.raises(ValueError, match="s3://bucket"):
        S3Keys.from_url("gs://h33-keys")
