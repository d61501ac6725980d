"""Several models in one service, addressed by name: ``H33_MODELS``, ``/models/{name}/...``, ``model="a"``.

The configuration checks run without a server.  The acceptance test starts one real ``bentoml
serve`` holding two MNIST MLPs (test_service's small one, and a second one trained differently)
and checks that clients using ``model="a"`` and ``model="b"`` get each model's answers, that keys,
metrics and routes are kept per model, and that a name the server does not serve is a 404 the
client raises as ``UnknownModelError``.
"""
from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")

from h33_bento import compile, simulate, zoo  # noqa: E402
from h33_bento.client import FHEInferenceClient, RemoteError  # noqa: E402
from h33_bento.errors import UnknownModelError  # noqa: E402
from h33_bento.runners.config import SINGLE_MODEL_NAME, ServeConfig  # noqa: E402
from h33_bento.runners.http import route_of  # noqa: E402

from test_service import MnistMLP, Deployment, Server, error_code, scrape, serve_env, service_model, store_model  # noqa: E402,F401

IMAGES = slice(0, 4)


# --------------------------------------------------------------------------- configuration (no server)
def test_models_are_configured_by_name_as_json_or_pairs(tmp_path):
    cfg = ServeConfig.from_env({"H33_MODELS": '{"mnist": "models:/mnist@prod", "lenet": {"bento_model": "lenet:v1"}}',
                                "H33_KEY_STORE": str(tmp_path), "H33_KEY_STORE_URL": "s3://bucket/keys"})
    assert list(cfg.served_models()) == ["mnist", "lenet"] and cfg.default_model_name == "mnist"
    assert cfg.served_models()["mnist"].model_uri == "models:/mnist@prod"
    assert cfg.served_models()["lenet"].bento_model == "lenet:v1"
    assert cfg.key_store_for("lenet") == (tmp_path / "models" / "lenet", "s3://bucket/keys/models/lenet")
    pairs = ServeConfig.from_env({"H33_MODELS": "a=bento:h33-a, b=runs:/abc/model", "H33_DEFAULT_MODEL": "b"})
    assert pairs.served_models()["a"].bento_model == "h33-a" and pairs.served_models()["b"].model_uri == "runs:/abc/model"
    assert pairs.default_model_name == "b"
    single = ServeConfig.from_env({"H33_BENTO_MODEL": "h33-model", "H33_KEY_STORE": str(tmp_path)})
    assert list(single.served_models()) == [SINGLE_MODEL_NAME] and single.key_store_for(SINGLE_MODEL_NAME) == (tmp_path, None)


@pytest.mark.parametrize("env, message", [
    ({"H33_MODELS": "a=bento:x,a=bento:y"}, "names 'a' twice"),
    ({"H33_MODELS": '{"a": "bento:x", "a": "bento:y"}'}, "names 'a' twice"),
    ({"H33_MODELS": "MNIST=bento:x"}, "model name 'MNIST' must match"),
    ({"H33_MODELS": '{"a/b": "bento:x"}'}, "model name 'a/b' must match"),
    ({"H33_MODELS": '{"..": "bento:x"}'}, "model name '..' must match"),
    ({"H33_MODELS": "a"}, "entries look like name="),
    ({"H33_MODELS": "{}"}, "names no model"),
    ({"H33_MODELS": "{not json"}, "not valid JSON"),
    ({"H33_MODELS": '{"a": {"model_uri": "runs:/x/m", "bento_model": "x"}}'}, "not both or neither"),
    ({"H33_MODELS": "a=bento:x", "H33_MODEL_URI": "models:/m@prod"}, "configure one or the other"),
    ({"H33_MODELS": "a=bento:x", "H33_DEFAULT_MODEL": "b"}, "default_model 'b' is not a served model"),
])
def test_bad_model_configurations_are_refused_clearly(env, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.from_env(env)


def test_routes_under_a_model_name_have_the_un_prefixed_templates():
    assert route_of("/models/a/infer") == ("/infer", "a")
    assert route_of("/models/a") == ("/model", "a") and route_of("/models/a/model") == ("/model", "a")
    assert route_of("/models/a/keys/" + "0" * 32 + "/weights") == ("/keys/{key_id}/weights", "a")
    assert route_of("/models/a/tasks/" + "f" * 32 + "/result") == ("/tasks/{task_id}/result", "a")
    assert route_of("/models") == ("/models", None) and route_of("/infer") == ("/infer", None)
    assert route_of("/models/a/health") == ("other", None) and route_of("/models/a/b/c/d") == ("other", None)


# --------------------------------------------------------------------------- one server, two models
@pytest.fixture(scope="module")
def other_model(mnist_train):
    """A second MNIST MLP, trained differently: another fingerprint and other logits, the same CKKS params."""
    x, y = mnist_train
    torch.manual_seed(1)
    net = zoo.train(MnistMLP(), x, y, epochs=1)
    return compile(net, (1, 28, 28), calibration_data=x[:256], labels=[str(i) for i in range(10)])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, service_model, other_model):
    root = tmp_path_factory.mktemp("h33-two-models")
    env, api_keys = serve_env(root)
    store_model(service_model, root / "a", env, "mm-a")
    store_model(other_model, root / "b", env, "mm-b")
    env["H33_MODELS"] = json.dumps({"a": "bento:mm-a", "b": "bento:mm-b"})
    server = Server("h33_bento.runners.service:H33Inference", env, root / "server.log")
    server.start()
    yield Deployment(server, api_keys, env, root)
    server.stop()


def test_one_service_answers_each_model_by_name(two_models, service_model, other_model, mnist_test):
    assert service_model.fingerprint != other_model.fingerprint
    x = mnist_test[0][IMAGES]
    for name, compiled in (("a", service_model), ("b", other_model)):
        with FHEInferenceClient(url=two_models.url, api_key=two_models.api_keys["acme"], model=name) as client:
            assert client.model_name == name and client.model.fingerprint == compiled.fingerprint
            got = [p.index for p in client.infer_batch(x)]
            assert got == list(simulate(compiled, x).argmax(1)), name
            assert client.last_run["run_lanes"] == str(len(x))  # one engine run, lanes packed per model
    listed = httpx.get(f"{two_models.url}/models", headers=two_models.auth("acme"), timeout=30).json()
    assert listed["default"] == "a"
    assert [(m["name"], m["fingerprint"], m["weight_mode"]) for m in listed["models"]] == [
        ("a", service_model.fingerprint, "plaintext"), ("b", other_model.fingerprint, "plaintext")]
    # the un-prefixed routes are the default model's; GET /models/{name} is its /model
    default = httpx.get(f"{two_models.url}/model", headers=two_models.auth("acme"), timeout=30).json()
    b = httpx.get(f"{two_models.url}/models/b", headers=two_models.auth("acme"), timeout=30).json()
    assert (default["model"]["name"], b["model"]["name"]) == ("a", "b")
    assert b["model"]["fingerprint"] == other_model.fingerprint
    for name in ("a", "b"):
        assert scrape(two_models.url, f'h33_engine_runs_total{{model="{name}"}}') >= 1
    health = httpx.get(f"{two_models.url}/health", timeout=30).json()
    assert set(health["models"]) == {"a", "b"} and health["engine_runs"] >= 2


def test_keys_uploaded_for_one_model_are_unknown_to_the_other(two_models, other_model, mnist_test):
    url, auth = two_models.url, two_models.auth("globex")
    x = mnist_test[0]
    with FHEInferenceClient(url=url, api_key=two_models.api_keys["globex"], model="b") as b_client:
        key_id = b_client.upload_keys()
        # model b's task routes: its own task store, and a Location under its prefix
        submitted = httpx.post(f"{url}/models/b/tasks", content=b_client.encrypt(x[10]).to_bytes(),
                               headers={**auth, "Content-Type": "application/octet-stream"}, timeout=300)
        assert submitted.status_code == 202, submitted.text
        location = submitted.headers["location"]
        assert location == f"/models/b/tasks/{submitted.json()['task_id']}"
        deadline = time.monotonic() + 300
        while httpx.get(url + location, headers=auth, timeout=30).json()["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        result = httpx.get(f"{url}{location}/result", headers=auth, timeout=30)
        assert b_client.decrypt(result.content).index == simulate(other_model, x[10:11]).argmax(1)[0]
        assert httpx.get(f"{url}/tasks/{submitted.json()['task_id']}", headers=auth, timeout=30).status_code == 404
        assert httpx.get(f"{url}/models/b/keys/{key_id}", headers=auth, timeout=30).status_code == 200
        for path in (f"/models/a/keys/{key_id}", f"/keys/{key_id}"):  # model a (the default) has no such key
            resp = httpx.get(url + path, headers=auth, timeout=30)
            assert resp.status_code == 404 and error_code(resp) == "unknown_key", path
        assert (two_models.root / "keystore" / "models" / "b" / key_id).is_dir()
        assert not (two_models.root / "keystore" / "models" / "a" / key_id).exists()
        # model a's client with the same key chain: the envelope names model a, whose store lacks the key
        with FHEInferenceClient(url=url, api_key=two_models.api_keys["globex"], model="a",
                                keys=b_client.keys) as a_client:
            resp = httpx.post(f"{url}/models/a/infer", content=a_client.encrypt(mnist_test[0][0]).to_bytes(),
                              headers={**auth, "Content-Type": "application/octet-stream"}, timeout=300)
            assert resp.status_code == 404 and error_code(resp) == "unknown_key"


def test_a_name_the_server_does_not_serve_is_a_404_unknown_model(two_models):
    url = two_models.url
    assert httpx.get(f"{url}/models/nope/model", timeout=30).status_code == 401  # names are not told to strangers
    for path in ("/models/nope", "/models/nope/keys"):
        resp = httpx.get(url + path, headers=two_models.auth("acme"), timeout=30)
        assert resp.status_code == 404 and error_code(resp) == "unknown_model", path
    resp = httpx.post(f"{url}/models/nope/infer", content=b"\0" * 1000, timeout=30,
                      headers={**two_models.auth("acme"), "Content-Type": "application/octet-stream"})
    assert resp.status_code == 404 and error_code(resp) == "unknown_model" and resp.headers["connection"] == "close"
    with pytest.raises(UnknownModelError) as raised:
        FHEInferenceClient(url=url, api_key=two_models.api_keys["acme"], model="nope")
    assert isinstance(raised.value, RemoteError) and raised.value.status == 404 and "GET /models" in str(raised.value)
    with pytest.raises(ValueError, match="neither a directory nor a served model's name"):
        FHEInferenceClient(url=url, api_key=two_models.api_keys["acme"], model="./no/such/dir")
    assert "nope" not in httpx.get(f"{url}/metrics", timeout=30).text  # unknown names add no series
    assert scrape(url, 'h33_requests_total{endpoint="/model",method="GET",model="",status="404"}') >= 1
