"""The ``mlflow.h33`` flavor against a real MLflow tracking server, a local file store,
``mlflow models serve`` (in this environment and in the virtualenv MLflow builds from the model's
requirements), ``mlflow models predict``, ``generate-dockerfile`` and ``mlflow.models.evaluate``,
on the benchmark ConvNet (N = 2^14) and real MNIST images.

Encrypted results are compared with running the Engine directly on the same envelope.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
httpx = pytest.importorskip("httpx")
pd = pytest.importorskip("pandas")

import h33_bento  # noqa: E402
from h33_bento import mlflow_flavor as flavor  # noqa: E402
from h33_bento import simulate  # noqa: E402
from h33_bento.errors import EnvelopeError, KeyMismatchError, ModelFormatError, TamperedDataError  # noqa: E402
from h33_bento.keystore import DEFAULT_TENANT  # noqa: E402
from h33_bento.runtime.engine import Engine  # noqa: E402

BIN = Path(sys.executable).parent
#: Where the h33_bento under test was imported from: subprocesses import the same code.
SOURCE = Path(h33_bento.__file__).resolve().parents[1]
NAME = "mnist-fhe"
ALIAS = "champion"


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """This environment with the venv's bin first on PATH (mlflow runs `uvicorn` from PATH) and the
    source under test first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _bare_env(**extra: str) -> dict[str, str]:
    """What a machine with only MLflow has: the dev venv's mlflow and pyenv, no PYTHONPATH into this
    checkout, so a model environment MLflow creates imports only what it installed."""
    env = _env(**extra)
    del env["PYTHONPATH"]
    return env


def _start(args: list[str], log: Path, bare: bool = False, **env: str) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([str(BIN / "mlflow"), *args], env=(_bare_env if bare else _env)(**env), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session (its process group: mlflow + uvicorn)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@contextmanager
def _tracking(uri: str):
    """Point tracking (and so the registry) at ``uri``; restore the previous setting after."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri mirrors itself there
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient()
    finally:
        mlflow.set_tracking_uri(previous)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
    span = float(want.max() - want.min())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(span, 1.0))


def _edit_flavor(model_dir: Path, **changes) -> None:
    mlmodel = model_dir / "MLmodel"
    doc = yaml.safe_load(mlmodel.read_text())
    for dotted, value in changes.items():
        section = doc["flavors"]["h33"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            section = section[p]
        section[leaf] = value
    mlmodel.write_text(yaml.safe_dump(doc))


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def _server_process(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifact storage."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    proc = _start(["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                   "--artifacts-destination", str(root / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log)
    yield proc, f"http://127.0.0.1:{port}", log
    _stop(proc)


@pytest.fixture(scope="module", autouse=True)
def _start_server_early(request):
    """Start the tracking server while the session fixtures train and compile, if a test needs it."""
    if any({"tracking_server", "backend"} & set(getattr(item, "fixturenames", ()))
           for item in request.session.items):
        request.getfixturevalue("_server_process")


@pytest.fixture(scope="session")
def tracking_server(_server_process) -> str:
    proc, url, log = _server_process
    _wait_ready(f"{url}/health", proc, log)
    return url


@pytest.fixture(params=["tracking-server", "file-store"])
def backend(request, tmp_path, monkeypatch):
    """An MLflow tracking + registry URI: the real server, or a local ``file://`` store."""
    if request.param == "tracking-server":
        uri = request.getfixturevalue("tracking_server")
    else:
        # MLflow 3 keeps the file store in maintenance mode behind this opt-out.
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    with _tracking(uri) as client:
        yield client


@pytest.fixture(scope="session")
def key_store(tmp_path_factory, convnet_client):
    store = tmp_path_factory.mktemp("key-store")
    key_id = flavor.save_evaluation_keys(convnet_client, store)
    assert key_id == convnet_client.keys.key_id
    # the layout the BentoML service uses: one directory per key, bound to the default tenant
    assert sorted(p.name for p in store.iterdir()) == [".incoming", key_id]
    assert sorted(p.name for p in (store / key_id).iterdir()) == ["bundle.h33k", "meta.json"]
    assert json.loads((store / key_id / "meta.json").read_text())["tenant"] == DEFAULT_TENANT
    return store


@pytest.fixture(scope="session")
def envelope(convnet_client, mnist_test) -> bytes:
    """Eight real MNIST test images in one ciphertext."""
    return convnet_client.encrypt(mnist_test[0][:8]).to_bytes()


@pytest.fixture(scope="session")
def direct_logits(convnet_compiled, convnet_client, envelope) -> np.ndarray:
    """The reference: a fresh Engine given only the evaluation-key bytes, run on the envelope."""
    engine = Engine(convnet_compiled, convnet_client.keys.evaluation_keys().to_bytes())
    return convnet_client.decrypt_logits(engine.run(envelope))


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, convnet_compiled) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    flavor.save_model(convnet_compiled, path)
    return path


@pytest.fixture
def model_copy(saved_model, tmp_path) -> Path:
    return Path(shutil.copytree(saved_model, tmp_path / "model"))


# ----------------------------------------------------------------------------- mlflow.h33
HOOK_CHECKS = {
    "h33_bento-then-mlflow": """
        import sys, h33_bento
        assert "mlflow" not in sys.modules, "import h33_bento must not import mlflow"
        import mlflow
        assert mlflow.h33 is sys.modules["h33_bento.mlflow_flavor"]
        assert type(mlflow.__loader__).__name__ == "SourceFileLoader" and mlflow.__spec__.loader is mlflow.__loader__
        import mlflow.h33
        from mlflow.h33 import load_model, log_model, save_model
        assert mlflow.h33.FLAVOR_NAME == "h33"
    """,
    "mlflow-alone": """
        import sys, mlflow
        assert mlflow.h33.log_model is sys.modules["h33_bento.mlflow_flavor"].log_model
        assert mlflow.h33.FLAVOR_NAME == "h33"
        import h33_bento
        import mlflow.h33
        from mlflow.tracking.context.registry import resolve_tags
        assert not any(k.startswith("h33") for k in resolve_tags({}))  # the entry point tags no run
    """,
    "pyfunc-loader-module-alone": """
        import importlib
        flavor = importlib.import_module("h33_bento.mlflow_flavor")
        import mlflow
        assert mlflow.h33 is flavor and callable(flavor._load_pyfunc)
    """,
}


def test_mlflow_h33_is_attached_by_import_mlflow(tmp_path):
    """In fresh interpreters (run side by side): either import order, and the pyfunc loader path."""
    procs = {
        name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) + "\nprint('ok')\n"], cwd=tmp_path,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, code in HOOK_CHECKS.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", f"{name}:\n{err[-3000:]}"
    assert mlflow.h33 is flavor


def test_log_register_alias_load_and_infer(backend, convnet_compiled, convnet_client, key_store, envelope,
                                           direct_logits, tmp_path, request):
    """log -> register -> alias -> load by alias -> encrypted inference == the Engine run directly."""
    client = backend
    accuracy = {"plaintext": 0.975, "polynomial": 0.974, "encrypted": 0.973}
    with mlflow.start_run() as run:
        info = mlflow.h33.log_model(convnet_compiled, name=NAME, registered_model_name=NAME, accuracy=accuracy)
    assert str(info.registered_model_version) == "1"
    client.set_registered_model_alias(NAME, ALIAS, info.registered_model_version)
    uri = f"models:/{NAME}@{ALIAS}"
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "1"

    # the LoggedModel's params and metrics
    logged = client.get_logged_model(info.model_id)
    assert logged.source_run_id == run.info.run_id
    params = convnet_compiled.params
    assert logged.params["ckks.ring_dim"] == str(params.ring_dim)
    assert logged.params["ckks.multiplicative_depth"] == str(params.multiplicative_depth)
    assert logged.params["ckks.scale_bits"] == str(params.scale_bits)
    assert logged.params["ckks.security_level"] == "HEStd_128_classic"
    assert logged.params["ckks.params_fingerprint"] == params.fingerprint
    assert logged.params["h33.model_fingerprint"] == convnet_compiled.fingerprint
    assert _model_metrics(logged) == {f"accuracy.{k}": v for k, v in accuracy.items()}

    # the native flavor
    loaded = mlflow.h33.load_model(uri)
    assert loaded.fingerprint == convnet_compiled.fingerprint and loaded.params == params

    # pyfunc: base64 text in a list gives base64 text back; bytes (one per row) give bytes
    model = mlflow.pyfunc.load_model(uri, model_config={"key_store": str(key_store)})
    if request.node.callspec.params["backend"] == "tracking-server":
        (out,) = model.predict([_b64(envelope)])
        assert isinstance(out, str)
        out = base64.b64decode(out)
    else:
        (out,) = model.predict(pd.DataFrame({"ciphertext": [envelope]}))
        assert isinstance(out, bytes)
    _assert_same_logits(convnet_client.decrypt_logits(out), direct_logits)
    impl = model._model_impl
    assert list(impl._engines) == [convnet_client.keys.key_id]  # one cached Engine per key
    engine = impl._engines[convnet_client.keys.key_id]
    assert engine.cache is impl.cache and engine.keys.rotation_bytes == 0  # shared cache, no key blobs kept

    # what was stored: the native program, an h33 flavor section, no key material
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    _check_stored_model(local, convnet_compiled, convnet_client, accuracy)


def _check_stored_model(local: Path, compiled, client, accuracy) -> None:
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert sorted(p for p in files if p.startswith("model/")) == ["model/arrays.npz", "model/manifest.json"]
    assert not [p for p in files if p.endswith((".h33k", ".key"))], files
    keys = client.keys.evaluation_keys()
    probes = [blob[len(blob) // 2: len(blob) // 2 + 48] for blob in (keys.public_key, keys.mult_key, *keys.rotation_chunks())]
    for f in files:
        content = (local / f).read_bytes()
        assert not any(p in content for p in probes), f"key material in {f}"

    doc = yaml.safe_load((local / "MLmodel").read_text())
    h33 = doc["flavors"]["h33"]
    p = compiled.params
    assert h33["format_version"] == flavor.FLAVOR_FORMAT_VERSION and h33["model_data"] == "model"
    assert h33["ckks"] == {
        "ring_dim": p.ring_dim, "multiplicative_depth": p.multiplicative_depth, "scale_bits": p.scale_bits,
        "first_mod_bits": p.first_mod_bits, "modulus_bits": p.modulus_bits,
        "scaling_technique": p.scaling_technique, "security_level": p.security_level,
        "num_large_digits": p.num_large_digits, "slots": p.slots,
    }
    assert h33["lanes"] == 8
    assert h33["params_fingerprint"] == p.fingerprint and h33["model_fingerprint"] == compiled.fingerprint
    assert h33["evaluation_keys"] == {
        "relinearization": True, "rotation_indices": list(p.rotation_indices), "bootstrapping": None,
        "predicted_bundle_bytes": compiled.predicted_key_bundle_bytes,
    }
    assert h33["input"]["shape"] == [1, 28, 28] and h33["input"]["dtype"] == "float64"
    assert h33["output"]["shape"] == [10] and h33["labels"] == [str(i) for i in range(10)]
    assert h33["summary"] == compiled.summary()
    assert {"levels", "rotations_per_run", "predicted_latency_ms"} <= set(h33["summary"])
    assert h33["accuracy"] == accuracy

    pyfunc = doc["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "h33_bento.mlflow_flavor" and pyfunc["config"] == {"key_store": None}
    sig = doc["signature"]
    assert json.loads(sig["inputs"]) == [{"type": "binary", "required": True}]
    assert json.loads(sig["outputs"]) == [{"type": "binary", "name": "ciphertext", "required": True}]
    assert json.loads(sig["params"])[0]["name"] == "mode"
    assert "h33-bento==" in (local / "requirements.txt").read_text()

    def strings(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        else:
            assert not isinstance(node, (bytes, bytearray)), "bytes in the MLmodel"
            yield str(node)

    assert max(len(s) for s in strings(doc["flavors"])) < 200, "a long value (key material?) in the flavor"


def test_pyfunc_simulate_mode_matches_simulate(saved_model, convnet_compiled, mnist_test):
    x = mnist_test[0][:5]
    want = simulate(convnet_compiled, x)
    model = mlflow.pyfunc.load_model(str(saved_model))
    for plaintext in (pd.Series(list(x)), pd.DataFrame({"plaintext": list(x)})):
        got = model.predict(plaintext, params={"mode": "simulate"})
        assert isinstance(got, np.ndarray) and got.shape == (5, 10)
        np.testing.assert_array_equal(got, want)
    assert model.get_raw_model().fingerprint == convnet_compiled.fingerprint
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        model.predict(pd.Series(list(x)), params={"mode": "fast"})


def test_simulate_takes_a_bare_ndarray_without_input_schema(convnet_compiled, mnist_test, tmp_path):
    flavor.save_model(convnet_compiled, tmp_path / "m", signature=flavor.envelope_signature(input_schema=False))
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    x = mnist_test[0][:3]
    np.testing.assert_array_equal(model.predict(x, params={"mode": "simulate"}), simulate(convnet_compiled, x))


# ----------------------------------------------------------------------------- serving
def test_mlflow_models_serve_answers_an_encrypted_request(tracking_server, convnet_compiled, convnet_client,
                                                           key_store, envelope, direct_logits, tmp_path):
    """`mlflow models serve --env-manager local` on a registered model, base64 envelope in JSON."""
    name = f"{NAME}-served"
    with _tracking(tracking_server) as client, mlflow.start_run():
        info = mlflow.h33.log_model(convnet_compiled, name=name, registered_model_name=name)
        client.set_registered_model_alias(name, "prod", info.registered_model_version)
    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start(["models", "serve", "-m", f"models:/{name}@prod", "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port), "-t", "600"], log,
                  MLFLOW_TRACKING_URI=tracking_server,
                  MLFLOW_PYFUNC_INFERENCE_CONFIG=json.dumps({"key_store": str(key_store)}))
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
        url = f"http://127.0.0.1:{port}/invocations"
        answer = httpx.post(url, json={"inputs": [_b64(envelope)]}, timeout=600)
        assert answer.status_code == 200, answer.text[-3000:]
        (out,) = answer.json()["predictions"]
        _assert_same_logits(convnet_client.decrypt_logits(base64.b64decode(out)), direct_logits)

        refused = httpx.post(url, json={"inputs": ["bm90IGFuIGVudmVsb3Bl"]}, timeout=60)
        assert refused.status_code == 400 and "EnvelopeError" in refused.text
    finally:
        _stop(proc)


# ----------------------------------------------------------------------------- portable models
RUNTIME_REQUIREMENTS = {"mlflow", "h33-bento", "openfhe", "numpy", "pydantic"}


def _requirements(model_dir: Path) -> tuple[dict[str, str], list[str]]:
    """requirements.txt as {name: pin} and its option lines."""
    lines = [ln.strip() for ln in (model_dir / "requirements.txt").read_text().splitlines() if ln.strip()]
    options = [ln for ln in lines if ln.startswith("-")]
    pins = dict(ln.partition("==")[::2] for ln in lines if not ln.startswith("-"))
    return pins, options


def test_logged_model_ships_a_wheel_of_this_source(saved_model, convnet_compiled, tmp_path):
    """The model installs without an index carrying h33-bento: a wheel of the code under test rides along."""
    import zipfile

    pins, options = _requirements(saved_model)
    assert set(pins) == RUNTIME_REQUIREMENTS, pins  # no torch, no onnx, no bentoml
    (find_links,) = options
    assert find_links.startswith("--find-links wheels/")
    (wheel,) = (saved_model / find_links.split(maxsplit=1)[1]).glob("*.whl")
    assert wheel.name == f"h33_bento-{pins['h33-bento']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("h33_bento/mlflow_flavor/__init__.py") == Path(flavor.__file__).read_bytes()
        assert zf.read("h33_bento/runtime/engine.py") == (SOURCE / "h33_bento/runtime/engine.py").read_bytes()
        (dist_info,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "[mlflow.model_evaluator]\nh33 = h33_bento.mlflow_flavor.evaluate:H33Evaluator" in entry_points
    assert "[mlflow.run_context_provider]" in entry_points
    torch_reqs = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist: torch")]
    assert torch_reqs and all("extra ==" in ln for ln in torch_reqs), torch_reqs

    # same source, same wheel folder: MLflow names the environments it creates after these lines
    flavor.save_model(convnet_compiled, tmp_path / "again")
    assert _requirements(tmp_path / "again")[1] == options
    # requirements of the user's own replace the bundle
    flavor.save_model(convnet_compiled, tmp_path / "own", pip_requirements=["h33-bento==0.1.0", "openfhe"])
    assert not (tmp_path / "own" / "wheels").exists() and _requirements(tmp_path / "own")[1] == []


def test_pyfunc_never_imports_torch(saved_model, mnist_test, tmp_path):
    """Serving needs no torch (6 GB), ONNX or BentoML: load the pyfunc and run it in a fresh interpreter."""
    np.save(tmp_path / "x.npy", mnist_test[0][:2])
    code = textwrap.dedent(f"""
        import sys, mlflow, numpy as np, pandas as pd
        model = mlflow.pyfunc.load_model({str(saved_model)!r})
        logits = model.predict(pd.Series(list(np.load({str(tmp_path / "x.npy")!r}))), params={{"mode": "simulate"}})
        assert logits.shape == (2, 10)
        imported = [m for m in ("torch", "onnx", "bentoml") if m in sys.modules]
        assert not imported, f"the pyfunc path imported {{imported}}"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_generated_dockerfile_installs_libgomp_and_the_wheel(saved_model, tmp_path):
    """`mlflow models generate-dockerfile`: libgomp1 (openfhe links it) is installed, and the image's
    `pip install -r /opt/ml/model/requirements.txt`, run from another directory, finds the wheel."""
    out = tmp_path / "docker"
    proc = subprocess.run([str(BIN / "mlflow"), "models", "generate-dockerfile", "-m", str(saved_model), "-d", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    copy = dockerfile.index("COPY model_dir/")
    assert dockerfile.index("RUN apt-get install -y --no-install-recommends libgomp1") > copy, dockerfile
    (requirements,) = (out / "model_dir").glob("*/requirements.txt")

    # what C._install_pyfunc_deps(env_manager="local") runs in the image, resolved but not installed
    elsewhere = tmp_path / "workdir"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--force-reinstall",
                           "-r", str(requirements)], cwd=elsewhere, env=_bare_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"Processing \S*model_dir/[^/]+/wheels/[0-9a-f]{16}/h33_bento-\S+\.whl", proc.stdout), proc.stdout[-3000:]


@pytest.fixture(scope="module")
def venv_served(tracking_server, convnet_compiled, key_store, tmp_path_factory):
    """A registered model behind `mlflow models serve --env-manager virtualenv`: MLflow builds the
    model's environment from its requirements alone (pyenv's Python, PyPI, the bundled wheel)."""
    name = f"{NAME}-portable"
    with _tracking(tracking_server) as client:
        info = mlflow.h33.log_model(convnet_compiled, name=name, registered_model_name=name)
        client.set_registered_model_alias(name, "prod", info.registered_model_version)
    root = tmp_path_factory.mktemp("venv-serve")
    env = {"MLFLOW_TRACKING_URI": tracking_server, "MLFLOW_ENV_ROOT": str(root / "envs"),
           "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"key_store": str(key_store)})}
    port = _free_port()
    log = root / "serve.log"
    started = time.monotonic()
    proc = _start(["models", "serve", "-m", f"models:/{name}@prod", "--env-manager", "virtualenv",
                   "-h", "127.0.0.1", "-p", str(port), "-t", "600"], log, bare=True, **env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log, timeout=1500)
        print(f"virtualenv created and model served in {time.monotonic() - started:.0f} s")
        (env_dir,) = (root / "envs").iterdir()
        yield {"url": f"http://127.0.0.1:{port}", "uri": f"models:/{name}@prod", "env": env, "env_dir": env_dir,
               "root": root}
    finally:
        _stop(proc)


def test_virtualenv_served_model_round_trip(venv_served, convnet_compiled, convnet_client, envelope,
                                            direct_logits, mnist_test):
    """Client encrypts, the server in MLflow's virtualenv answers an envelope, the client decrypts."""
    answer = httpx.post(f"{venv_served['url']}/invocations", json={"inputs": [_b64(envelope)]}, timeout=600)
    assert answer.status_code == 200, answer.text[-3000:]
    (out,) = answer.json()["predictions"]
    logits = convnet_client.decrypt_logits(base64.b64decode(out))
    _assert_same_logits(logits, direct_logits)
    np.testing.assert_array_equal(logits.argmax(1), simulate(convnet_compiled, mnist_test[0][:8]).argmax(1))

    # the environment holds the bundled wheel's h33_bento and no torch
    python = venv_served["env_dir"] / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, h33_bento; "
                            "print(h33_bento.__file__); print(u.find_spec('torch'))"],
                           cwd=venv_served["root"], env=_bare_env(), capture_output=True, text=True, timeout=120)
    where, torch_spec = probe.stdout.split()
    assert where.startswith(str(venv_served["env_dir"])) and torch_spec == "None", probe.stdout + probe.stderr


def test_mlflow_models_predict_in_the_model_environment(venv_served, convnet_client, envelope, direct_logits):
    """`mlflow models predict` on an encrypted input, run by the MLflow that the model's environment
    installed from its requirements (`--env-manager virtualenv` would build CPython from source in
    a fresh pyenv root for each call: see docs/mlflow.md)."""
    root, bin_dir = venv_served["root"], venv_served["env_dir"] / "bin"
    (root / "input.json").write_text(json.dumps({"inputs": [_b64(envelope)]}))
    env = _bare_env(**venv_served["env"])
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(bin_dir / "mlflow"), "models", "predict", "-m", venv_served["uri"], "--env-manager",
                           "local", "-i", str(root / "input.json"), "-o", str(root / "output.json"), "-t", "json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = json.loads((root / "output.json").read_text())["predictions"]
    _assert_same_logits(convnet_client.decrypt_logits(base64.b64decode(out)), direct_logits)


# ----------------------------------------------------------------------------- mlflow.models.evaluate
@pytest.fixture(scope="module")
def h33_evaluator():
    """The evaluator the package's `mlflow.model_evaluator` entry point names (pyproject.toml).

    An install made before the entry point existed lacks it until `pip install -e .` runs again;
    then it is registered here from the same declaration."""
    import importlib

    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry as registry
    from setuptools.config.pyprojecttoml import read_configuration

    declared = read_configuration(SOURCE / "pyproject.toml")["project"]["entry-points"]["mlflow.model_evaluator"]
    module, attr = declared["h33"].split(":")
    evaluator = getattr(importlib.import_module(module), attr)
    if not registry.is_registered("h33"):
        registry.register("h33", evaluator)
    assert type(registry.get_evaluator("h33")) is evaluator
    return evaluator


def test_mlflow_models_evaluate_logs_h33_metrics(tracking_server, h33_evaluator, convnet_compiled, mnist_test,
                                                 direct_logits):
    """`mlflow.models.evaluate(uri, evaluators="h33")`: plaintext program on the whole set, the first
    ciphertext's worth encrypted; metrics on the run and the LoggedModel equal an independent count."""
    x, y = mnist_test[0][:256], mnist_test[1][:256]
    name = f"{NAME}-evaluated"
    with _tracking(tracking_server) as client:
        info = mlflow.h33.log_model(convnet_compiled, name=name)
        result = mlflow.models.evaluate(info.model_uri, x.reshape(len(x), -1), targets=y, model_type="classifier",
                                        evaluators="h33")
        run_metrics = client.get_run(result.run_id).data.metrics
        logged = client.get_logged_model(info.model_id)
        with pytest.raises(ValueError, match="encrypted_samples"):
            mlflow.models.evaluate(info.model_uri, x.reshape(len(x), -1), targets=y, model_type="classifier",
                                   evaluators="h33", evaluator_config={"encrypted_samples": -1})
        with pytest.raises(ValueError, match="no extra_metrics"):
            mlflow.models.evaluate(info.model_uri, x.reshape(len(x), -1), targets=y, model_type="classifier",
                                   evaluators="h33", extra_metrics=[mlflow.metrics.mae()])

    plain = simulate(convnet_compiled, x).argmax(1)
    encrypted = direct_logits.argmax(1)  # the same 8 images, encrypted under the fixture's keys
    m = result.metrics
    assert m["accuracy.polynomial"] == float(np.mean(plain == y))
    assert m["encrypted.samples"] == convnet_compiled.lanes == 8
    assert m["accuracy.encrypted"] == float(np.mean(encrypted == y[:8]))
    assert m["agreement.encrypted"] == float(np.mean(encrypted == plain[:8]))
    span = float(direct_logits.max() - direct_logits.min())
    assert 0 < m["error.encrypted_max_logit"] < 1e-3 * span  # CKKS noise: it really ran encrypted
    assert 50 < m["latency.encrypted_ms_per_ciphertext"] < 120_000 and m["latency.simulate_ms_per_input"] > 0
    assert run_metrics == m
    assert _model_metrics(logged) == m
    (digest,) = {metric.dataset_digest for metric in logged.metrics}  # linked to the evaluation dataset
    assert digest


# ----------------------------------------------------------------------------- clear errors
def _model_metrics(logged) -> dict[str, float]:
    """A LoggedModel's metrics by key, the latest value of each (as MLflow shows a run's)."""
    latest = sorted(logged.metrics or [], key=lambda m: m.timestamp)
    assert {m.model_id for m in latest} <= {logged.model_id}
    return {m.key: m.value for m in latest}


def test_log_model_needs_no_run(tracking_server, convnet_compiled):
    """As MLflow 3's own flavors: no run is started, and the LoggedModel loads back and registers."""
    name = f"{NAME}-no-run"
    with _tracking(tracking_server) as client:
        assert mlflow.active_run() is None
        info = mlflow.h33.log_model(convnet_compiled, name=name, registered_model_name=name)
        assert mlflow.active_run() is None and info.run_id is None
        logged = client.get_logged_model(info.model_id)
        assert not logged.source_run_id and logged.name == name  # the server sends "" for none
        assert logged.params["h33.model_fingerprint"] == convnet_compiled.fingerprint
        assert mlflow.h33.load_model(info.model_uri).fingerprint == convnet_compiled.fingerprint
        assert str(info.registered_model_version) == "1"
        assert mlflow.h33.load_model(f"models:/{name}/1").fingerprint == convnet_compiled.fingerprint


def test_several_models_in_one_run(tracking_server, convnet_compiled, cnn_compiled):
    """Two compiled models in one run: two LoggedModels, each with its own params, each loads back."""
    with _tracking(tracking_server) as client:
        with mlflow.start_run() as run:
            infos = [mlflow.h33.log_model(c, name=n) for c, n in ((convnet_compiled, "convnet"), (cnn_compiled, "cnn"))]
        assert infos[0].model_id != infos[1].model_id and {i.run_id for i in infos} == {run.info.run_id}
        outputs = client.get_run(run.info.run_id).outputs.model_outputs
        assert sorted(o.model_id for o in outputs) == sorted(i.model_id for i in infos)
        for info, compiled in zip(infos, (convnet_compiled, cnn_compiled)):
            assert mlflow.h33.load_model(info.model_uri).fingerprint == compiled.fingerprint
            params = client.get_logged_model(info.model_id).params
            assert params["h33.model_fingerprint"] == compiled.fingerprint
            assert params["ckks.params_fingerprint"] == compiled.params.fingerprint
    assert convnet_compiled.fingerprint != cnn_compiled.fingerprint


def test_accuracy_metrics_are_linked_to_their_logged_model(tracking_server, convnet_compiled, cnn_compiled):
    """Each model's accuracy is on its own LoggedModel, linked by model_id.

    MLflow copies the metrics a run holds at a step onto every model logged later at that step,
    so the second model is logged at its own step (docs/mlflow.md says so).
    """
    first, second = {"encrypted": 0.97, "plaintext": 0.98}, {"encrypted": 0.95}
    with _tracking(tracking_server) as client:
        with mlflow.start_run() as run:
            a = mlflow.h33.log_model(convnet_compiled, name="convnet", accuracy=first)
            b = mlflow.h33.log_model(cnn_compiled, name="cnn", accuracy=second, step=1)
        assert _model_metrics(client.get_logged_model(a.model_id)) == {"accuracy.encrypted": 0.97,
                                                                       "accuracy.plaintext": 0.98}
        assert _model_metrics(client.get_logged_model(b.model_id)) == {"accuracy.encrypted": 0.95}
        assert {a.run_id, b.run_id} == {run.info.run_id}

        # model metrics are stored through a run: with none active, one is made for the call only
        solo = mlflow.h33.log_model(convnet_compiled, name="solo", accuracy=second, step=3)
        assert mlflow.active_run() is None
        logged = client.get_logged_model(solo.model_id)
        assert _model_metrics(logged) == {"accuracy.encrypted": 0.95} and [m.step for m in logged.metrics] == [3]
        assert logged.source_run_id == solo.run_id and client.get_run(solo.run_id).info.status == "FINISHED"


def test_tampered_artifacts_are_refused(monkeypatch, tmp_path, convnet_compiled):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with _tracking((tmp_path / "mlruns").as_uri()) as client, mlflow.start_run():
        info = mlflow.h33.log_model(convnet_compiled, name=NAME)
        stored = Path(client.get_logged_model(info.model_id).artifact_location.removeprefix("file://")) / "model"
        pristine = {f: (stored / f).read_bytes() for f in ("arrays.npz", "manifest.json")}

        _flip_byte(stored / "arrays.npz")
        with pytest.raises(ModelFormatError, match="corrupted|unreadable|integrity"):
            mlflow.h33.load_model(info.model_uri)
        (stored / "arrays.npz").write_bytes(pristine["arrays.npz"])

        manifest = json.loads(pristine["manifest.json"])
        manifest["steps"][0]["level"] += 1
        (stored / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelFormatError, match="fails its integrity check"):
            mlflow.h33.load_model(info.model_uri)
        with pytest.raises(ModelFormatError, match="fails its integrity check"):
            mlflow.pyfunc.load_model(info.model_uri)

        (stored / "manifest.json").write_bytes(pristine["manifest.json"])
        assert mlflow.h33.load_model(info.model_uri).fingerprint == convnet_compiled.fingerprint


def test_unknown_flavor_format_version(model_copy):
    _edit_flavor(model_copy, format_version=99)
    with pytest.raises(flavor.FlavorFormatError, match=f"format version 99; .* reads version {flavor.FLAVOR_FORMAT_VERSION}"):
        mlflow.h33.load_model(str(model_copy))
    with pytest.raises(flavor.FlavorFormatError, match="format version 99"):
        mlflow.pyfunc.load_model(str(model_copy))


def test_params_fingerprint_mismatch(model_copy):
    _edit_flavor(model_copy, params_fingerprint="0" * 32)
    with pytest.raises(flavor.ParamsFingerprintMismatchError, match="params_fingerprint '0{32}'"):
        mlflow.h33.load_model(str(model_copy))
    with pytest.raises(flavor.ParamsFingerprintMismatchError):
        mlflow.pyfunc.load_model(str(model_copy))


def test_recorded_ckks_params_must_match(model_copy):
    _edit_flavor(model_copy, ckks__ring_dim=8192)
    with pytest.raises(flavor.ParamsFingerprintMismatchError, match="ckks.ring_dim 8192 .* 16384"):
        mlflow.h33.load_model(str(model_copy))


def test_model_fingerprint_mismatch(model_copy):
    _edit_flavor(model_copy, model_fingerprint="f" * 32)
    with pytest.raises(flavor.ModelFingerprintMismatchError, match="model_fingerprint 'f{32}'"):
        mlflow.h33.load_model(str(model_copy))


def test_pyfunc_predict_without_keys(saved_model, convnet_client, envelope, tmp_path, monkeypatch):
    monkeypatch.delenv(flavor.KEY_STORE_ENV, raising=False)
    key_id = convnet_client.keys.key_id

    model = mlflow.pyfunc.load_model(str(saved_model))
    with pytest.raises(flavor.EvaluationKeysNotFoundError, match=f"key_id {key_id}: no key store is configured"):
        model.predict([envelope])

    empty = tmp_path / "keys"
    empty.mkdir()
    model = mlflow.pyfunc.load_model(str(saved_model), model_config={"key_store": str(empty)})
    with pytest.raises(flavor.EvaluationKeysNotFoundError, match=f"key_id {key_id}: .* has no bundle for it") as err:
        model.predict([_b64(envelope)])
    assert err.value.key_id == key_id and isinstance(err.value, KeyMismatchError)

    monkeypatch.setenv(flavor.KEY_STORE_ENV, str(tmp_path / "missing"))
    model = mlflow.pyfunc.load_model(str(saved_model))
    with pytest.raises(flavor.EvaluationKeysNotFoundError, match="missing does not exist"):
        model.predict(envelope)


def test_bad_inputs_and_arguments(saved_model, convnet_compiled, envelope, key_store):
    model = mlflow.pyfunc.load_model(str(saved_model), model_config={"key_store": str(key_store)})
    with pytest.raises(EnvelopeError, match="not an h33 encrypted tensor"):
        model.predict(["bm90IGFuIGVudmVsb3Bl"])
    with pytest.raises(TamperedDataError):
        model.predict([envelope[:-1] + bytes([envelope[-1] ^ 1])])
    with pytest.raises(ValueError, match="unknown model_config keys"):
        flavor.save_model(convnet_compiled, saved_model.parent / "x", model_config={"keystore": "/k"})
    with pytest.raises(ValueError, match="accuracy"):
        flavor.log_model(convnet_compiled, name="m", accuracy={"encrypted": "high"})
    with pytest.raises(ValueError, match=r"accuracy\['encrypted'\] is a fraction in \[0, 1\], got 97.3"):
        flavor.save_model(convnet_compiled, saved_model.parent / "percent", accuracy={"encrypted": 97.3})
