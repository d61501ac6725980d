"""Encrypted-weight mode over HTTP: a real ``bentoml serve`` of a weightless MLflow model.

The model owner logs the weightless artifact of test_service.py's MNIST MLP with the MLflow flavor;
the service serves it from that MLflow model.  A tenant uploads its evaluation keys, the model owner
(``ModelOwner``, holding the full model and only the tenant's public key) uploads the weights
encrypted under it, and the tenant runs the same encrypt / infer / decrypt as in plaintext mode.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import subprocess

import boto3
import httpx
import numpy as np
import pytest
import yaml

pytest.importorskip("mlflow")

from h33_bento import simulate  # noqa: E402
from h33_bento.ckks.keys import PARAMS_FILE, PUBLIC_KEY_FILE  # noqa: E402
from h33_bento.client import FHEInferenceClient, ModelOwner  # noqa: E402
from h33_bento.errors import ModelMismatchError, WeightsNotProvisionedError  # noqa: E402
from h33_bento.runners.config import hash_api_key, new_api_key  # noqa: E402
from h33_bento.runtime.weights import provision_weights  # noqa: E402

from conftest import assert_logits_close  # noqa: E402
from test_encrypted_weights import _found, _windows  # noqa: E402
from test_keystore_s3 import BUCKET, CREDENTIALS, s3_endpoint  # noqa: E402,F401  (moto's S3 server)
from test_service import PYTHON, REPO, TENANTS, Server, error_code, post_infer, raw_request, read_answer  # noqa: E402
from test_service import reframe, service_model  # noqa: E402,F401  (the module-scoped fixture)

MAX_WEIGHTS_BYTES = 256 << 20


@pytest.fixture(scope="module")
def weightless_deployment(tmp_path_factory, service_model):  # noqa: F811
    """The weightless model, logged with the MLflow flavor and served from that MLflow model."""
    from h33_bento import mlflow_flavor

    root = tmp_path_factory.mktemp("h33-weights-serve")
    mlflow_flavor.save_model(service_model.without_weights(), root / "mlflow-model")
    env = {k: v for k, v in os.environ.items() if not k.startswith("H33_")}
    api_keys = {t: new_api_key() for t in TENANTS}
    (root / "api-keys.yaml").write_text(yaml.safe_dump({"tenants": {t: [hash_api_key(k)] for t, k in api_keys.items()}}))
    env.update({"BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
                "H33_API_KEYS_FILE": str(root / "api-keys.yaml"), "H33_KEY_STORE": str(root / "keystore"),
                "H33_MODEL_URI": str(root / "mlflow-model"), "H33_MAX_WEIGHTS_BYTES": str(MAX_WEIGHTS_BYTES)})
    server = Server("h33_bento.runners.service:H33Inference", env, root / "server.log")
    server.start()
    yield server, api_keys, root
    server.stop()


@pytest.fixture(scope="module")
def tenants(weightless_deployment):
    """Both tenants' remote clients (no local model: the layout comes from GET /model), keys uploaded."""
    server, api_keys, _ = weightless_deployment
    clients = {t: FHEInferenceClient(url=server.url, api_key=api_keys[t], weight_mode="encrypted") for t in TENANTS}
    for client in clients.values():
        client.upload_keys()
    yield clients
    for client in clients.values():
        client.close()


def _public_half(client: FHEInferenceClient, tmp_path) -> str:
    """What a client hands its model owner: the parameters and the public key, no secret key."""
    client.save_keys(tmp_path / "all")
    (tmp_path / "public").mkdir()
    for name in (PARAMS_FILE, PUBLIC_KEY_FILE):
        shutil.copy(tmp_path / "all" / name, tmp_path / "public" / name)
    return str(tmp_path / "public")


def test_the_service_serves_the_weightless_mlflow_model(weightless_deployment, service_model, tenants):
    from h33_bento import mlflow_flavor
    from h33_bento.mlflow_flavor import ModelFingerprintMismatchError

    server, api_keys, root = weightless_deployment
    mlmodel = yaml.safe_load((root / "mlflow-model" / "MLmodel").read_text())["flavors"]["h33"]
    weightless = service_model.without_weights()
    assert mlmodel["weight_mode"] == "encrypted" and mlmodel["weights_id"] == weightless.weights_id
    edited = root / "mlflow-edited"  # an MLmodel claiming plaintext weights for it is refused
    shutil.copytree(root / "mlflow-model", edited)
    (edited / "MLmodel").write_text((edited / "MLmodel").read_text().replace("weight_mode: encrypted",
                                                                             "weight_mode: plaintext"))
    with pytest.raises(ModelFingerprintMismatchError, match="weight_mode"):
        mlflow_flavor.load_model(str(edited))
    info = httpx.get(f"{server.url}/model", headers={"Authorization": f"Bearer {api_keys['acme']}"}, timeout=30).json()
    assert info["model"]["fingerprint"] == weightless.fingerprint and info["model"]["weight_mode"] == "encrypted"
    assert info["limits"]["max_weights_bytes"] == MAX_WEIGHTS_BYTES
    assert tenants["acme"].model.fingerprint == weightless.fingerprint
    with pytest.raises(ValueError, match="weight_mode='encrypted'"):  # a plaintext-mode client is told why
        FHEInferenceClient(url=server.url, api_key=api_keys["acme"])
    with pytest.raises(ModelMismatchError):  # the owner of another model cannot provision here
        retrained = copy.deepcopy(service_model)
        retrained.steps[0].linear.diags[0] *= 1.01
        retrained._fingerprint = None
        ModelOwner(retrained, server.url, api_keys["acme"]).provision(tenants["acme"].keys)


def test_inference_before_provisioning_is_a_409_weights_missing(tenants, mnist_test):
    client = tenants["globex"]  # globex's weights are never provisioned in this module
    with pytest.raises(WeightsNotProvisionedError) as info:
        client.infer(client.encrypt(mnist_test[0][0]))
    assert info.value.status == 409 and info.value.code == "weights_missing"


def test_encrypted_weights_over_http_match_plaintext_mode_on_16_real_images(
        weightless_deployment, service_model, tenants, mnist_test, tmp_path):
    server, api_keys, _ = weightless_deployment
    acme = tenants["acme"]
    owner = ModelOwner(service_model, server.url, api_keys["acme"])
    answer = owner.provision(_public_half(acme, tmp_path))
    assert answer["key_id"] == acme.keys.key_id and answer["ciphertexts"] > 0
    x = mnist_test[0][:16]
    got = np.concatenate([acme.decrypt_logits(acme.infer(acme.encrypt(x[i:i + 8]))) for i in (0, 8)])
    want = simulate(service_model, x)  # plaintext weights
    err = float(np.abs(got - want).max())
    print(f"encrypted weights over HTTP: argmax {(got.argmax(1) == want.argmax(1)).sum()}/16 equal to simulate, "
          f"max logit error {err:.3g} (logit range {float(want.max() - want.min()):.3g})")
    assert (got.argmax(1) == want.argmax(1)).all()
    assert_logits_close(got, want, rel=1e-3)
    pred = acme.decrypt(acme.infer(acme.encrypt(x[3])))
    assert pred.index == int(want[3].argmax()) and pred.top_k(3)[0][0] == pred.label


def test_no_weight_value_reaches_the_key_store_or_the_mlflow_artifacts(weightless_deployment, service_model, tmp_path):
    _, _, root = weightless_deployment
    # 16-byte windows as float64 and float32, and single float64 values, as test_encrypted_weights.py
    float64 = _windows(service_model, np.float64) + _windows(service_model, np.float64, width=8)
    float32 = _windows(service_model, np.float32)
    assert len(float64) >= 20 and len(float32) >= 10
    stored = [p for d in ("keystore", "mlflow-model") for p in (root / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".h33w" for p in stored)  # the encrypted weights are there
    blobs = [p.read_bytes() for p in stored]
    assert _found(float64, blobs) == 0 and _found(float32, blobs) == 0
    full = [p.read_bytes() for p in service_model.save(tmp_path / "full").iterdir()]  # the check can fail
    assert _found(float64, full) == len(float64)


def _bad_uploads(service_model, tenants, api_keys):
    acme, globex = tenants["acme"], tenants["globex"]
    good = provision_weights(service_model, acme.keys)
    data = good.to_bytes()
    retrained = copy.deepcopy(service_model)
    retrained.steps[0].linear.diags[0] *= 1.01
    retrained._fingerprint = None
    name, step = next(iter(good.steps.items()))
    blob = bytearray(step.diagonals[0])
    blob[:64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    # a valid frame whose first diagonal is a bias ciphertext: one level too low for its step
    wrong_level = dataclasses.replace(good, steps={**good.steps, name: dataclasses.replace(
        step, diagonals=[step.biases[0], *step.diagonals[1:]])})
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    acme_key, globex_key = acme.keys.key_id, globex.keys.key_id
    return {  # name: (tenant, key_id, body, status, code)
        "another-tenants-key": ("globex", acme_key, data, 403, "forbidden_key"),
        "another-model": ("acme", acme_key, provision_weights(retrained, acme.keys).to_bytes(), 409, "model_mismatch"),
        "encrypted-under-another-key": ("acme", acme_key, provision_weights(service_model, globex.keys).to_bytes(),
                                        422, "key_mismatch"),
        "truncated": ("acme", acme_key, data[: len(data) // 2], 422, "truncated"),
        "tampered": ("acme", acme_key, bytes(flipped), 422, "tampered"),
        "tampered-ciphertext-in-a-valid-frame": ("acme", acme_key, dataclasses.replace(good, steps={
            **good.steps, name: dataclasses.replace(step, diagonals=[bytes(blob), *step.diagonals[1:]])}).to_bytes(),
            422, {"tampered", "key_mismatch"}),
        "ciphertext-at-the-wrong-level": ("acme", acme_key, wrong_level.to_bytes(), 422, "tampered"),
        "header-edited-digest-recomputed": ("acme", acme_key, reframe(data, lambda h: h.replace(
            f'"key_id":"{acme_key}"'.encode(), f'"key_id":"{globex_key}"'.encode())), 422, "key_mismatch"),
    }


def test_bad_weight_uploads_get_a_clear_4xx_and_the_server_keeps_serving(
        weightless_deployment, service_model, tenants, mnist_test):
    server, api_keys, root = weightless_deployment
    acme = tenants["acme"]
    stored = root / "keystore" / acme.keys.key_id / "weights" / f"{acme.model.fingerprint}.h33w"
    before = stored.read_bytes()  # provisioned by the test above
    for case, (tenant, key_id, body, status, code) in _bad_uploads(service_model, tenants, api_keys).items():
        resp = httpx.post(f"{server.url}/keys/{key_id}/weights", content=body, timeout=600,
                          headers={"Authorization": f"Bearer {api_keys[tenant]}",
                                   "Content-Type": "application/octet-stream"})
        assert resp.status_code == status and error_code(resp) in ({code} if isinstance(code, str) else code), \
            f"{case}: {resp.text[:300]}"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200, case
    sock = raw_request(server.port, f"POST /keys/{acme.keys.key_id}/weights HTTP/1.1\nHost: x\n"
                                    f"Authorization: Bearer {api_keys['acme']}\n"
                                    f"Content-Length: {MAX_WEIGHTS_BYTES + 1}\n")
    status, _, body = read_answer(sock)
    sock.close()
    assert status == 413 and b"too_large" in body
    assert stored.read_bytes() == before  # nothing bad replaced the good weights
    x = mnist_test[0][40:48]
    got = acme.decrypt_logits(acme.infer(acme.encrypt(x)))
    assert (got.argmax(1) == simulate(service_model, x).argmax(1)).all()


def test_h33_provision_uploads_a_clients_weights(weightless_deployment, service_model, tenants, mnist_test, tmp_path):
    """The model owner's command line, run as a user would, provisions the tenant left without weights."""
    server, api_keys, _ = weightless_deployment
    globex = tenants["globex"]
    service_model.save(tmp_path / "model")
    done = subprocess.run([PYTHON, "-m", "h33_bento.cli", "provision", str(tmp_path / "model"),
                           "--public-key", _public_half(globex, tmp_path), "--url", server.url],
                          cwd=REPO, env={**os.environ, "H33_API_KEY": api_keys["globex"]},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"key_id {globex.keys.key_id}" in done.stdout and "weight ciphertexts" in done.stdout
    x = mnist_test[0][48:56]
    assert (globex.decrypt_logits(globex.infer(globex.encrypt(x))).argmax(1) == simulate(service_model, x).argmax(1)).all()


def test_runners_source_stores_the_weightless_artifact_for_bentoml(service_model, tmp_path):
    service_model.save(tmp_path / "compiled")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    for name, flag in (("full", []), ("weightless", ["--weightless"])):
        subprocess.run([PYTHON, "-m", "h33_bento.runners.source", "save", str(tmp_path / "compiled"),
                        "--name", name, *flag], env=env, check=True, capture_output=True, timeout=300, cwd=REPO)
    code = ("import bentoml, sys; from h33_bento.runners.source import load_from_bento_model as load; "
            "print(load(bentoml.models.get('full')).weight_mode, load(bentoml.models.get('weightless')).weight_mode, "
            "load(bentoml.models.get('weightless')).fingerprint)")
    out = subprocess.run([PYTHON, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=300,
                         cwd=REPO).stdout.split()
    assert out == ["plaintext", "encrypted", service_model.without_weights().fingerprint]


# --------------------------------------------------------------------------- weights on a shared key store
@pytest.fixture(scope="module")
def weights_replicas(weightless_deployment, s3_endpoint, tmp_path_factory):  # noqa: F811
    """Two servers of the weightless model that share only a key store on S3 (each its own BentoML home
    and local cache, as two pods without a shared volume), revalidating every lookup."""
    server, _, _ = weightless_deployment
    aws = {"AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
           "AWS_DEFAULT_REGION": CREDENTIALS["region_name"]}
    pods = []
    for name in ("pod-a", "pod-b"):
        root = tmp_path_factory.mktemp(f"weights-{name}")
        env = {**server.env, **aws, "BENTOML_HOME": str(root / "bentoml"), "H33_KEY_STORE": str(root / "cache"),
               "H33_KEY_STORE_URL": f"s3://{BUCKET}/weights", "H33_KEY_REVALIDATE_S": "0"}
        pods.append((Server("h33_bento.runners.service:H33Inference", env, root / "server.log"), root / "cache"))
    for pod, _ in pods:
        pod.start()
    yield pods, boto3.client("s3", endpoint_url=s3_endpoint, **CREDENTIALS)
    for pod, _ in pods:
        pod.stop()


def _objects(bucket, key_id: str) -> list[str]:
    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"weights/{key_id}/").get("Contents", [])
    return [o["Key"] for o in listed]


def test_weights_uploaded_through_one_replica_serve_through_the_other(
        weights_replicas, weightless_deployment, service_model, mnist_test, tmp_path):
    (a, _), (b, b_cache) = weights_replicas[0]
    bucket = weights_replicas[1]
    api_key = weightless_deployment[1]["acme"]
    x = mnist_test[0][56:60]
    want = simulate(service_model, x).argmax(1)
    with FHEInferenceClient(url=a.url, api_key=api_key, weight_mode="encrypted") as client:
        key_id = client.upload_keys()
        owner = ModelOwner(service_model, a.url, api_key)
        owner.provision(_public_half(client, tmp_path / "first"))
        cached = b_cache / key_id / "weights" / f"{client.model.fingerprint}.h33w"
        assert not cached.exists()
        resp = post_infer(b.url, api_key, client.encrypt(x).to_bytes())
        assert resp.status_code == 200, resp.text[:300]
        assert (client.decrypt_logits(resp.content).argmax(1) == want).all()
        first = cached.read_bytes()  # b fetched them from the bucket into its cache

        owner.provision(_public_half(client, tmp_path / "second"))  # replaced through a: a new encryption
        resp = post_infer(b.url, api_key, client.encrypt(x).to_bytes())
        assert resp.status_code == 200 and (client.decrypt_logits(resp.content).argmax(1) == want).all()
        assert cached.read_bytes() != first  # b serves the new weights, not its cached copy
        assert sum(k.endswith(".h33w") for k in _objects(bucket, key_id)) == 1  # the replaced object is gone

        gone = httpx.delete(f"{b.url}/keys/{key_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        assert gone.status_code == 200 and _objects(bucket, key_id) == []  # the key's weights went with it
