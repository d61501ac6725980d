"""The BentoML service end to end: a real ``bentoml serve`` subprocess on 127.0.0.1, over HTTP.

One MNIST MLP (784 -> 32 -> x^2 -> 10; N=2^14, 8 lanes, 26 rotation keys) is compiled once,
stored in a temporary BentoML home and served to two tenants, ``acme`` and ``globex``.  The
tests cover lane packing, tenant isolation, every bad-input status, persistence of the key
store across a restart, a load test, the remote client, and ``bentoml build`` + serving the
built Bento.  A small network keeps each encrypted run short: the server logic, not the
network size, is under test here (test_encrypted.py covers the larger networks).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openfhe
import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
yaml = pytest.importorskip("yaml")

from h33_bento import compile, simulate, zoo  # noqa: E402
from h33_bento.ckks.context import get_context  # noqa: E402
from h33_bento.ckks.keys import EvaluationKeys, KeyChain, key_id_for  # noqa: E402
from h33_bento.ckks.params import select_params  # noqa: E402
from h33_bento.ckks.serialization import EncryptedTensor  # noqa: E402
from h33_bento.program.diagonals import lane_shifts  # noqa: E402
from h33_bento.client import FHEInferenceClient, RemoteError  # noqa: E402
from h33_bento.errors import KeyMismatchError, ModelMismatchError  # noqa: E402
from h33_bento.runners.config import hash_api_key, new_api_key  # noqa: E402
from h33_bento.runtime.engine import Engine  # noqa: E402

from conftest import assert_logits_close  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BENTOML = next((str(p) for p in (Path(sys.executable).with_name("bentoml"), shutil.which("bentoml"))
                if p and Path(p).exists()), "bentoml")
MAX_INFER_BYTES = 4 << 20
TENANTS = ("acme", "globex")


class MnistMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 32)
        self.act = zoo.Square()
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


# --------------------------------------------------------------------------- server process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``bentoml serve`` subprocess (its own process group) and its log."""

    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        self.target, self.env, self.log = target, env, log
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [BENTOML, "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"bentoml serve did not become ready in {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # what is left in the group we created (BentoML's workers run in sessions of their own;
            # they stop when the serve process is gone, see runners/process.py)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclasses.dataclass
class Deployment:
    server: Server
    api_keys: dict[str, str]
    env: dict[str, str]
    root: Path

    @property
    def url(self) -> str:
        return self.server.url

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_keys[tenant]}"}


def post_infer(url: str, api_key: str | None, body, headers: dict | None = None) -> httpx.Response:
    h = {"Content-Type": "application/octet-stream", **(headers or {})}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return httpx.post(f"{url}/infer", content=body, headers=h, timeout=900)


def post_infer_multipart(url: str, api_key: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/infer", files={"envelope": ("request.h33t", body, "application/octet-stream")},
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=900)


def scrape(url: str, name: str) -> float:
    """Sum of a Prometheus counter/histogram-count over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def error_code(resp: httpx.Response) -> str:
    return resp.json()["error"]["code"]


def reframe(frame: bytes, edit) -> bytes:
    """``frame`` with its JSON header edited (bytes -> bytes) and the digest recomputed, as anyone can."""
    magic, version, head_len = struct.unpack_from(">4sHI", frame)
    head = edit(frame[10:10 + head_len])
    body = struct.pack(">4sHI", magic, version, len(head)) + head + frame[10 + head_len:-32]
    return body + hashlib.sha256(body).digest()


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent ``head`` (request line and headers) and the first ``body`` bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def parse_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a raw HTTP answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The HTTP answer on ``sock``, read until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return parse_answer(data)


class SlowClients:
    """Connections that send their request headers and then trickle the body, a byte every 0.5 s,
    until the server answers and closes (one thread watches them all)."""

    def __init__(self, port: int, heads: list[str]) -> None:
        self.start = time.monotonic()
        self.socks = [raw_request(port, head, b"\0" * 100) for head in heads]
        self.data = {sock: b"" for sock in self.socks}
        self.closed_after: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self.socks:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            next_byte = 0.0
            while sel.get_map() and not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    try:
                        chunk = key.fileobj.recv(65536)
                    except OSError:
                        chunk = b""
                    self.data[key.fileobj] += chunk
                    if not chunk:
                        sel.unregister(key.fileobj)
                        self.closed_after[key.fileobj] = time.monotonic() - self.start
                if time.monotonic() >= next_byte:
                    next_byte = time.monotonic() + 0.5
                    for key in list(sel.get_map().values()):
                        try:
                            key.fileobj.send(b"\0")
                        except OSError:
                            pass

    def finish(self) -> list[tuple[int, dict[str, str], bytes, float | None]]:
        """Stop trickling; (status, headers, body, seconds until the server closed) per connection."""
        self._stop.set()
        self._thread.join()
        out = []
        for sock in self.socks:
            sock.close()
            data = self.data[sock]
            out.append((*parse_answer(data), self.closed_after.get(sock)) if data else (0, {}, b"", None))
        return out


# --------------------------------------------------------------------------- configuration (no server)
def test_config_stores_hashes_and_maps_bearer_keys_to_tenants(tmp_path):
    from h33_bento.runners.config import Authenticator, ServeConfig

    keys = {"acme": new_api_key(), "globex": new_api_key()}
    assert all(k.startswith("h33_pk_") and len(k) > 40 for k in keys.values())
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"tenants": {"acme": [hash_api_key(keys["acme"])]}}))
    cfg = ServeConfig.from_env({"H33_API_KEYS_FILE": str(tmp_path / "keys.yaml"),
                                "H33_API_KEYS": f"globex:{hash_api_key(keys['globex'])}",
                                "H33_MAX_INFER_BYTES": "1048576", "H33_KEY_STORE": str(tmp_path / "ks")})
    assert cfg.max_infer_bytes == 1 << 20 and set(cfg.tenants) == {"acme", "globex"}
    assert keys["acme"] not in (tmp_path / "keys.yaml").read_text()
    auth = Authenticator(cfg.tenants)
    assert auth.authenticate(f"Bearer {keys['acme']}") == "acme"
    assert auth.authenticate(f"bearer {keys['globex']}") == "globex"
    for bad in (None, "", keys["acme"], f"Basic {keys['acme']}", f"Bearer {new_api_key()}", "Bearer h33_pk_"):
        assert auth.authenticate(bad) is None
    with pytest.raises(ValueError):  # a raw key where a hash belongs is refused
        ServeConfig.from_env({"H33_API_KEYS": f"acme:{keys['acme']}"})


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def service_model(mnist_train):
    x, y = mnist_train
    net = zoo.train(MnistMLP(), x, y, epochs=3)
    return compile(net, (1, 28, 28), calibration_data=x[:256], labels=[str(i) for i in range(10)])


def serve_env(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of a test server under ``root`` (its BentoML home, key store, the tenants' key
    hashes, limits) and the tenants' API keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("H33_")}
    api_keys = {t: new_api_key() for t in TENANTS}
    (root / "api-keys.yaml").write_text(yaml.safe_dump({"tenants": {t: [hash_api_key(k)] for t, k in api_keys.items()}}))
    env.update({
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "H33_API_KEYS_FILE": str(root / "api-keys.yaml"),
        "H33_KEY_STORE": str(root / "keystore"),
        "H33_MAX_INFER_BYTES": str(MAX_INFER_BYTES),
        # a generous lane-fill window keeps the packing assertions deterministic on a busy CI box
        "H33_LANE_WAIT_MS": "300",
        "H33_LANE_MAX_WAIT_MS": "3000",
    })
    return env, api_keys


def store_model(compiled, directory: Path, env: dict[str, str], name: str) -> None:
    """Save ``compiled`` to ``directory`` and put it in the BentoML model store of ``env`` as ``name``."""
    compiled.save(directory)
    subprocess.run([PYTHON, "-m", "h33_bento.runners.source", "save", str(directory), "--name", name],
                   env=env, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, service_model):
    root = tmp_path_factory.mktemp("h33-serve")
    env, api_keys = serve_env(root)
    store_model(service_model, root / "compiled", env, "h33-model")
    server = Server("h33_bento.runners.service:H33Inference", env, root / "server.log")
    server.start()
    yield Deployment(server, api_keys, env, root)
    server.stop()


@pytest.fixture(scope="module")
def acme(deployment):
    """A remote client without a local model: it packs with the layout the server publishes."""
    with FHEInferenceClient(url=deployment.url, api_key=deployment.api_keys["acme"]) as client:
        yield client


@pytest.fixture(scope="module")
def globex(deployment, service_model):
    """A remote client holding the compiled model: it checks the server serves exactly that model."""
    with FHEInferenceClient(service_model, url=deployment.url, api_key=deployment.api_keys["globex"]) as client:
        yield client


@pytest.fixture(scope="module")
def followups():
    """Good requests sent right after each bad input; checked together once the table is done."""
    pool = cf.ThreadPoolExecutor(4)
    pending: list = []
    yield pool, pending
    pool.shutdown(wait=True)


# --------------------------------------------------------------------------- /model, /keys
def test_model_endpoint_describes_what_a_client_needs(deployment, service_model, acme):
    anon = httpx.get(f"{deployment.url}/model", timeout=30)
    assert anon.status_code == 401 and error_code(anon) == "unauthorized"
    assert anon.headers["www-authenticate"].startswith("Bearer")
    info = httpx.get(f"{deployment.url}/model", headers=deployment.auth("acme"), timeout=30).json()
    p = service_model.params
    assert info["model"]["fingerprint"] == service_model.fingerprint
    assert info["params"]["fingerprint"] == p.fingerprint
    assert info["model"]["lanes"] == 8 and info["model"]["labels"] == [str(i) for i in range(10)]
    assert info["keys"]["rotation_indices"] == list(p.rotation_indices)
    assert set(info["keys"]["lane_shift_rotations"]) <= set(p.rotation_indices)
    assert info["lane_packing"]["enabled"] is True
    assert info["limits"]["max_infer_bytes"] == MAX_INFER_BYTES
    assert np.array_equal(info["layout"]["input_positions"], service_model.input_positions.reshape(-1))
    # the client built its layout-only view of the model from /model: same fingerprint and layout
    assert acme.model.fingerprint == service_model.fingerprint
    assert np.array_equal(acme.model.output_positions, service_model.output_positions)
    health = httpx.get(f"{deployment.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["model_fingerprint"] == service_model.fingerprint


def test_key_bundles_are_bound_to_the_uploading_tenant(deployment, acme, globex):
    url = deployment.url
    key_id = acme.upload_keys()
    assert key_id == acme.keys.key_id
    mine = httpx.get(f"{url}/keys/{key_id}", headers=deployment.auth("acme"), timeout=30)
    assert mine.status_code == 200 and mine.json()["tenant"] == "acme"
    theirs = httpx.get(f"{url}/keys/{key_id}", headers=deployment.auth("globex"), timeout=30)
    assert theirs.status_code == 403 and error_code(theirs) == "forbidden_key"
    bundle = acme.keys.evaluation_keys().to_bytes()
    octet = {"Content-Type": "application/octet-stream"}
    again = httpx.post(f"{url}/keys", content=bundle, headers={**deployment.auth("acme"), **octet}, timeout=600)
    assert again.status_code == 200 and again.json()["created"] is False  # idempotent
    stolen = httpx.post(f"{url}/keys", content=bundle, headers={**deployment.auth("globex"), **octet}, timeout=600)
    assert stolen.status_code == 403 and error_code(stolen) == "forbidden_key"
    assert globex.upload_keys() == globex.keys.key_id
    listed = httpx.get(f"{url}/keys", headers=deployment.auth("globex"), timeout=30).json()["keys"]
    assert [k["key_id"] for k in listed] == [globex.keys.key_id]


# --------------------------------------------------------------------------- lane packing
def test_eight_concurrent_single_image_requests_share_one_engine_run(deployment, acme, service_model, mnist_test):
    x, _ = mnist_test
    images = x[:8]
    envelopes = [acme.encrypt(img) for img in images]
    key = deployment.api_keys["acme"]
    acme.upload_keys()
    runs_before = scrape(deployment.url, "h33_engine_runs_total")
    with cf.ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda env: post_infer(deployment.url, key, env.to_bytes()), envelopes))
    assert [r.status_code for r in resps] == [200] * 8, [r.text[:200] for r in resps]
    assert len({r.headers["x-h33-engine-run"] for r in resps}) == 1
    assert sorted(int(r.headers["x-h33-lane"]) for r in resps) == list(range(8))
    assert {r.headers["x-h33-run-requests"] for r in resps} == {"8"}
    assert scrape(deployment.url, "h33_engine_runs_total") - runs_before == 1
    # the reference: the same eight images, packed by the client, through a local Engine
    direct = Engine(service_model, acme.keys.evaluation_keys()).run(acme.encrypt(images))
    want = acme.decrypt_logits(direct)
    for i, resp in enumerate(resps):
        out = EncryptedTensor.from_bytes(resp.content)
        assert out.lane == int(resp.headers["x-h33-lane"]) and out.lanes_used == 1 and not out.batched
        got = acme.decrypt_logits(out)[0]
        assert_logits_close(got, want[i])
        assert acme.decrypt(out).index == int(np.argmax(want[i]))


def test_two_tenants_at_once_are_never_packed_together(deployment, acme, globex, service_model, mnist_test):
    x, _ = mnist_test
    images = x[8:12]
    acme.upload_keys(), globex.upload_keys()
    jobs = [("acme", acme, acme.encrypt(img), i) for i, img in enumerate(images)]
    jobs += [("globex", globex, globex.encrypt(img), i) for i, img in enumerate(images)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        resps = list(pool.map(lambda j: post_infer(deployment.url, deployment.api_keys[j[0]], j[2].to_bytes()), jobs))
    assert [r.status_code for r in resps] == [200] * len(jobs), [r.text[:200] for r in resps]
    runs = {t: {r.headers["x-h33-engine-run"] for (tt, *_), r in zip(jobs, resps) if tt == t} for t in TENANTS}
    assert runs["acme"].isdisjoint(runs["globex"])
    assert all(int(r.headers["x-h33-run-requests"]) <= len(images) for r in resps)
    want = simulate(service_model, images).argmax(1)
    for (tenant, client, _, i), resp in zip(jobs, resps):
        assert client.decrypt(resp.content).index == want[i]
    acme_out = next(r for (t, *_), r in zip(jobs, resps) if t == "acme").content
    with pytest.raises(KeyMismatchError):
        globex.decrypt(acme_out)  # globex cannot read acme's answer
    # globex replaying acme's envelope (acme's key_id) is refused
    replay = post_infer(deployment.url, deployment.api_keys["globex"], jobs[0][2].to_bytes())
    assert replay.status_code == 403 and error_code(replay) == "forbidden_key"


# --------------------------------------------------------------------------- tasks (long runs)
def _poll_task(url: str, api_key: str, task_id: str, timeout: float = 300.0) -> list[dict]:
    """Every status GET /tasks/{task_id} answered, polled back to back until the task finishes."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http:
        while time.monotonic() < deadline:
            resp = http.get(f"/tasks/{task_id}")
            assert resp.status_code == 200, resp.text
            seen.append(resp.json())
            if seen[-1]["state"] in ("completed", "failed"):
                return seen
    raise AssertionError(f"task {task_id} did not finish in {timeout} s: {seen[-1:]}")


def test_a_task_reports_progress_and_returns_the_encrypted_answer(deployment, acme, service_model, mnist_test):
    x, _ = mnist_test
    image = x[300]
    acme.upload_keys()
    key = deployment.api_keys["acme"]
    steps = len(service_model.steps)
    submitted = httpx.post(f"{deployment.url}/tasks", content=acme.encrypt(image).to_bytes(), timeout=60,
                           headers={**deployment.auth("acme"), "Content-Type": "application/octet-stream"})
    assert submitted.status_code == 202, submitted.text
    task = submitted.json()
    task_id = task["task_id"]
    assert task["state"] == "queued" and (task["done"], task["total"]) == (0, steps)
    assert submitted.headers["location"] == f"/tasks/{task_id}"
    seen = _poll_task(deployment.url, key, task_id)
    done = [s["done"] for s in seen]
    assert seen[-1]["state"] == "completed" and done[-1] == steps, seen[-1]
    assert done == sorted(done), done  # progress never goes back
    assert any(0 < d < steps and s["state"] == "running" for d, s in zip(done, seen)), \
        f"no poll of {len(seen)} saw the run between its first and last step: {done}"
    result = httpx.get(f"{deployment.url}/tasks/{task_id}/result", headers=deployment.auth("acme"), timeout=60)
    assert result.status_code == 200 and result.headers["content-type"] == "application/octet-stream"
    assert result.headers["x-h33-engine-run"]
    out = EncryptedTensor.from_bytes(result.content)
    assert_logits_close(acme.decrypt_logits(out)[0], simulate(service_model, image[None])[0])
    assert acme.decrypt(out).index == int(simulate(service_model, image[None]).argmax())
    again = httpx.get(f"{deployment.url}/tasks/{task_id}/result", headers=deployment.auth("acme"), timeout=60)
    assert again.status_code == 200 and again.content == result.content  # kept until it expires
    # bound to its tenant; unknown ids are a clear 404; the gate's authentication comes first
    for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/result"):
        theirs = httpx.get(f"{deployment.url}{path}", headers=deployment.auth("globex"), timeout=30)
        assert theirs.status_code == 403 and error_code(theirs) == "forbidden_task", theirs.text
        anon = httpx.get(f"{deployment.url}{path}", timeout=30)
        assert anon.status_code == 401 and error_code(anon) == "unauthorized"
    for unknown in ("0" * 32, "not-a-task"):
        resp = httpx.get(f"{deployment.url}/tasks/{unknown}", headers=deployment.auth("acme"), timeout=30)
        assert resp.status_code == 404 and error_code(resp) == "unknown_task", resp.text
        assert "POST /tasks" in resp.json()["error"]["message"]
    # a bad envelope is refused at submission, with /infer's status and code
    tampered = bytearray(acme.encrypt(image).to_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    refused = httpx.post(f"{deployment.url}/tasks", content=bytes(tampered), timeout=60,
                         headers={**deployment.auth("acme"), "Content-Type": "application/octet-stream"})
    assert refused.status_code == 422 and error_code(refused) == "tampered"
    health = httpx.get(f"{deployment.url}/health", timeout=30).json()
    assert health["tasks_kept"] >= 1 and health["tasks_unfinished"] == 0


def test_a_task_whose_run_fails_reports_the_error_infer_would_answer(deployment, acme, service_model, mnist_test):
    """The task's keys are deleted before its run (queued behind a full 8-image run of another key, and
    waiting for lane filling): the run answers 404 unknown_key, as /infer would."""
    x, _ = mnist_test
    with FHEInferenceClient(url=deployment.url, api_key=deployment.api_keys["acme"],
                            keys=KeyChain.generate(service_model.params)) as client, cf.ThreadPoolExecutor(1) as pool:
        key_id = client.upload_keys()
        acme.upload_keys()
        busy = pool.submit(post_infer, deployment.url, deployment.api_keys["acme"], acme.encrypt(x[302:310]).to_bytes())
        time.sleep(0.1)
        submitted = httpx.post(f"{deployment.url}/tasks", content=client.encrypt(x[301]).to_bytes(), timeout=60,
                               headers={**deployment.auth("acme"), "Content-Type": "application/octet-stream"})
        assert submitted.status_code == 202, submitted.text
        deleted = httpx.delete(f"{deployment.url}/keys/{key_id}", headers=deployment.auth("acme"), timeout=30)
        assert deleted.status_code == 200
        seen = _poll_task(deployment.url, deployment.api_keys["acme"], submitted.json()["task_id"])
        assert busy.result().status_code == 200
    assert seen[-1]["state"] == "failed" and seen[-1]["error"]["code"] == "unknown_key", seen[-1]
    result = httpx.get(f"{deployment.url}/tasks/{seen[-1]['task_id']}/result", headers=deployment.auth("acme"),
                       timeout=30)
    assert result.status_code == 404 and error_code(result) == "unknown_key"


def test_the_client_runs_models_predicted_slow_as_tasks(deployment, acme, service_model, mnist_test):
    """With the threshold below the model's predicted latency the client polls a task; the default
    threshold (60 s) keeps this model on /infer, where its requests are lane-packed."""
    x, _ = mnist_test
    images = x[310:313]
    assert acme.uses_tasks is False
    with FHEInferenceClient(url=deployment.url, api_key=deployment.api_keys["acme"], keys=acme.keys,
                            task_threshold_s=0.0) as client:
        assert client.uses_tasks is True
        preds = client.infer_batch(images)
        assert [p.index for p in preds] == simulate(service_model, images).argmax(1).tolist()
        assert client.last_task["state"] == "completed"
        assert client.last_task["done"] == client.last_task["total"] == len(service_model.steps)
        assert client.last_run["run_lanes"] == "3"
    with FHEInferenceClient(url=deployment.url, api_key=deployment.api_keys["acme"], keys=acme.keys,
                            task_threshold_s=0.0, task_timeout_s=0.05, progress=False) as impatient:
        with pytest.raises(TimeoutError, match="did not finish within"):
            impatient.predict(images[0])


def test_task_store_expires_evicts_and_binds_tasks():
    """The store's bounds, on a clock the test moves: TTL after finishing, count, per-tenant cap."""
    import asyncio

    from h33_bento.runners.engines import InferResult
    from h33_bento.runners.http_errors import HTTPError
    from h33_bento.runners.tasks import TaskStore

    now = [0.0]
    store = TaskStore(ttl_s=10, max_tasks=2, max_tenant_tasks=1, clock=lambda: now[0])

    async def finish(task, result):
        fut = asyncio.get_running_loop().create_future()
        store.watch(task, fut)
        fut.set_result(result)
        await asyncio.sleep(0)

    def status(fn, *args):
        with pytest.raises(HTTPError) as err:
            fn(*args)
        return err.value.status, err.value.code, err.value.message

    a = store.create("acme", "k1", 3)
    assert status(store.create, "acme", "k1", 3)[:2] == (429, "too_many_tasks")  # one unfinished per tenant
    b = store.create("globex", "k2", 3)
    assert status(store.create, "initech", "k3", 3)[:2] == (429, "too_many_tasks")  # two kept, none finished
    assert status(store.get, a.task_id, "globex")[:2] == (403, "forbidden_task")
    a.progress(1, 3)
    assert (store.get(a.task_id, "acme").state, a.done) == ("running", 1)
    asyncio.run(finish(a, InferResult(error=HTTPError(404, "unknown_key", "gone"))))
    assert a.state == "failed" and a.public(10)["error"]["code"] == "unknown_key"
    c = store.create("initech", "k3", 3)  # evicts a, the only finished task
    assert status(store.get, a.task_id, "acme")[:2] == (410, "task_expired")
    assert "evicted" in status(store.get, a.task_id, "acme")[2]
    assert status(store.get, a.task_id, "globex")[:2] == (403, "forbidden_task")
    now[0] = 5.0
    asyncio.run(finish(b, InferResult(body=b"out")))
    now[0] = 14.5
    assert store.get(b.task_id, "globex").state == "completed"
    now[0] = 15.5
    assert status(store.get, b.task_id, "globex")[:2] == (410, "task_expired")
    assert "kept for 10 s" in status(store.get, b.task_id, "globex")[2]
    assert len(store) == 1 and store.unfinished == 1 and store.get(c.task_id, "initech") is c


# --------------------------------------------------------------------------- bad inputs
def _other_params_bundle() -> bytes:
    return KeyChain.generate(select_params(1, 1024, lanes=8, rotation_indices=(1, 2))).evaluation_keys().to_bytes()


def _bad_requests(dep: Deployment, acme: FHEInferenceClient, env: EncryptedTensor, params):
    url, key = dep.url, dep.api_keys["acme"]
    good = env.to_bytes()
    keys_headers = {**dep.auth("acme"), "Content-Type": "application/octet-stream"}

    def flip(data: bytes) -> bytes:
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        return bytes(b)

    def broken_ciphertext() -> bytes:  # the frame's digest is valid, the OpenFHE blob is not
        blob = bytearray(env.ciphertexts[0])
        blob[:64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        return dataclasses.replace(env, ciphertexts=[bytes(blob)]).to_bytes()

    def chunks():
        for _ in range(5):
            yield b"\0" * (1 << 20)

    def header(old: bytes, new: bytes) -> bytes:  # the envelope with one header edit, digest recomputed
        assert old in good
        return reframe(good, lambda head: head.replace(old, new))

    def small_bundle(key_tag_json: bytes) -> bytes:  # a bundle header naming a key tag; blobs never read
        tag = "0" * 32
        frame = EvaluationKeys(params.fingerprint, acme.keys.key_id, tag, params.rotation_indices, b"p", b"m", (b"r",))
        return reframe(frame.to_bytes(), lambda head: head.replace(f'"{tag}"'.encode(), key_tag_json))

    def public_key_tag_not_utf8() -> bytes:  # a fresh bundle whose public key's tag has a byte 0xFF
        keys = KeyChain.generate(params).evaluation_keys()
        at = keys.public_key.index(keys.key_tag.encode())
        public = keys.public_key[:at] + b"\xff" + keys.public_key[at + 1:]
        return dataclasses.replace(keys, public_key=public).to_bytes()

    def post_keys(body: bytes, headers: dict | None = None) -> httpx.Response:
        return httpx.post(f"{url}/keys", content=body, headers={**keys_headers, **(headers or {})}, timeout=600)

    multipart = {"Content-Type": "multipart/form-data; boundary=h33boundary"}
    return {
        "missing-api-key": (lambda: post_infer(url, None, good), 401, "unauthorized"),
        "wrong-api-key": (lambda: post_infer(url, new_api_key(), good), 401, "unauthorized"),
        "unknown-key-id": (lambda: post_infer(url, key, dataclasses.replace(env, key_id="0" * 32).to_bytes()),
                           404, "unknown_key"),
        "tampered-ciphertext": (lambda: post_infer(url, key, flip(good)), 422, "tampered"),
        "tampered-inside-valid-frame": (lambda: post_infer(url, key, broken_ciphertext()), 422,
                                        {"tampered", "key_mismatch"}),
        "truncated-ciphertext": (lambda: post_infer(url, key, good[: len(good) // 2]), 422, "truncated"),
        "wrong-model-fingerprint": (
            lambda: post_infer(url, key, dataclasses.replace(env, model_fingerprint="f" * 32).to_bytes()),
            409, "model_mismatch"),
        "oversized-body": (lambda: post_infer(url, key, b"\0" * (MAX_INFER_BYTES + (1 << 20))), 413, "too_large"),
        "oversized-chunked-body": (lambda: post_infer(url, key, chunks()), 413, "too_large"),
        "key-bundle-for-other-params": (  # sent as a multipart upload, the other accepted encoding
            lambda: httpx.post(f"{url}/keys", files={"bundle": ("keys.h33k", _other_params_bundle())},
                               headers=dep.auth("acme"), timeout=600),
            422, "params_mismatch"),
        "truncated-key-bundle": (lambda: post_keys(_other_params_bundle()[:-100]), 422, "truncated"),
        # numbers no integer holds, nesting deeper than any parser's stack, a header too long
        "infinity-in-header": (lambda: post_infer(url, key, header(b'"lanes_used":1', b'"lanes_used":Infinity')),
                               422, "tampered"),
        "1e999-in-header": (lambda: post_infer(url, key, header(b'"level":0', b'"level":1e999')), 422, "tampered"),
        "huge-integer-in-header": (lambda: post_infer(url, key, header(b'"lane":0', b'"lane":' + b"9" * 4000)),
                                   422, "tampered"),
        "deeply-nested-header": (
            lambda: post_infer(url, key, header(b'"extra":{}', b'"extra":' + b"[" * 50_000 + b"]" * 50_000)),
            422, "tampered"),
        "header-too-long": (lambda: post_infer(url, key, header(b'"extra":{}', b'"extra":{"x":"' + b"x" * 300_000 + b'"}')),
                            422, "tampered"),
        "malformed-multipart-infer": (
            lambda: post_infer(url, key, b"--h33boundary\r\nno headers, no end", multipart), 400, "invalid_multipart"),
        "multipart-without-boundary": (
            lambda: post_keys(b"--x\r\n\r\n", {"Content-Type": "multipart/form-data"}), 400, "invalid_multipart"),
        "key-tag-not-a-string": (lambda: post_keys(small_bundle(b"12345")), 422, "tampered"),
        "key-tag-lone-surrogate": (lambda: post_keys(small_bundle(b'"\\ud800"')), 422, "tampered"),
        "public-key-tag-not-utf8": (lambda: post_keys(public_key_tag_not_utf8()), 422, "tampered"),
        # routers hash uploads on this header: a bundle of another key must not be stored where it lands
        "key-id-header-of-another-key": (
            lambda: post_keys(acme.keys.evaluation_keys().to_bytes(), {"X-H33-Key-Id": "0" * 32}),
            422, "invalid_bundle"),
    }


BAD_CASES = ["missing-api-key", "wrong-api-key", "unknown-key-id", "tampered-ciphertext",
             "tampered-inside-valid-frame", "truncated-ciphertext", "wrong-model-fingerprint", "oversized-body",
             "oversized-chunked-body", "key-bundle-for-other-params", "truncated-key-bundle", "infinity-in-header",
             "1e999-in-header", "huge-integer-in-header", "deeply-nested-header", "header-too-long",
             "malformed-multipart-infer", "multipart-without-boundary", "key-tag-not-a-string",
             "key-tag-lone-surrogate", "public-key-tag-not-utf8", "key-id-header-of-another-key"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(case, deployment, acme, followups, mnist_test,
                                                                 service_model):
    """Each bad input gets its JSON error, with the request id, in under 5 s (never a hang or a text 500)."""
    x, _ = mnist_test
    acme.upload_keys()
    send, status, code = _bad_requests(deployment, acme, acme.encrypt(x[20]), service_model.params)[case]
    resp = send()
    assert resp.status_code == status, resp.text[:300]
    assert error_code(resp) in (code if isinstance(code, set) else {code})
    assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"]
    assert resp.elapsed.total_seconds() < 5
    # right afterwards: a good encrypted request (answered in the next test, so they can share
    # engine runs) and a synchronous authenticated request
    pool, pending = followups
    i = 30 + BAD_CASES.index(case)
    env = acme.encrypt(x[i])
    send_good = post_infer_multipart if BAD_CASES.index(case) % 2 else post_infer  # both body encodings
    pending.append((case, i, pool.submit(send_good, deployment.url, deployment.api_keys["acme"], env.to_bytes())))
    ok = httpx.get(f"{deployment.url}/keys/{acme.keys.key_id}", headers=deployment.auth("acme"), timeout=30)
    assert ok.status_code == 200


def test_server_answered_every_request_sent_after_a_bad_input(followups, acme, service_model, mnist_test):
    _, pending = followups
    assert len(pending) == len(BAD_CASES)
    x, _ = mnist_test
    for case, i, fut in pending:
        resp = fut.result(timeout=900)
        assert resp.status_code == 200, f"after {case}: {resp.text[:300]}"
        got = acme.decrypt_logits(resp.content)[0]
        assert_logits_close(got, simulate(service_model, x[i:i + 1])[0])


# --------------------------------------------------------------------------- error messages
def test_error_answers_carry_no_server_paths_or_source_lines(deployment, service_model, mnist_test):
    """OpenFHE's messages start with its build path and source line (here: a bundle whose header promises
    a rotation key its blob lacks, which fails in the engine unless the upload refuses it).  The client
    gets a clean message and the request id; the server log has the detail under that id."""
    params = service_model.params
    shifts = set(lane_shifts(params.lanes, params.slots))
    dropped = next(r for r in params.rotation_indices if r not in shifts)
    cc = get_context(params)
    pair = cc.KeyGen()
    cc.EvalMultKeyGen(pair.secretKey)
    cc.EvalRotateKeyGen(pair.secretKey, [r for r in params.rotation_indices if r != dropped])
    liar = FHEInferenceClient(service_model, keys=KeyChain(params, pair.publicKey, pair.secretKey))
    tag, binary = pair.publicKey.GetKeyTag(), openfhe.BINARY
    lie = EvaluationKeys(params.fingerprint, key_id_for(tag), tag, tuple(params.rotation_indices),  # claims them all
                         openfhe.Serialize(pair.publicKey, binary), openfhe.SerializeEvalMultKeyString(binary, tag),
                         (openfhe.SerializeEvalAutomorphismKeyString(binary, tag),))
    url, headers = deployment.url, {**deployment.auth("globex"), "Content-Type": "application/octet-stream"}
    x, _ = mnist_test
    answers = [httpx.post(f"{url}/keys", content=lie.to_bytes(), headers=headers, timeout=600)]
    if answers[0].status_code in (200, 201):
        answers.append(post_infer(url, deployment.api_keys["globex"], liar.encrypt(x[90]).to_bytes()))
    refused = answers[-1]
    assert refused.status_code in (422, 500), refused.text[:300]
    error = refused.json()["error"]
    assert not re.search(r"\.(cpp|h|hpp)\b|openfhe-development|/root/|\[called from", error["message"]), error
    assert error["request_id"] == refused.headers["x-request-id"]
    logged = [line for line in deployment.server.log.read_text(errors="replace").splitlines()
              if error["request_id"] in line]
    assert logged and error["code"] in logged[0]
    if refused.status_code == 500:  # the engine failed: OpenFHE's full message is in the log only
        assert ".cpp" in logged[0], logged
    assert httpx.delete(f"{url}/keys/{liar.keys.key_id}", headers=deployment.auth("globex"),
                        timeout=30).status_code in (200, 404)


# --------------------------------------------------------------------------- gate order, metrics
def test_slow_unauthenticated_connections_do_not_lock_out_tenants(deployment, acme, service_model, mnist_test):
    """130 connections that send headers and trickle a body without a valid API key (BentoML's limiter
    allowed 128 requests) are answered 401 at once, the body unread, and closed; authenticated requests
    sent while they trickle all succeed, and the server stays ready."""
    url = deployment.url
    x, _ = mnist_test
    acme.upload_keys()
    envelope = acme.encrypt(x[95]).to_bytes()
    heads = [f"POST /infer HTTP/1.1\nHost: h33\nContent-Type: application/octet-stream\nContent-Length: {1 << 20}\n"
             + (f"Authorization: Bearer {new_api_key()}\n" if i % 2 else "") for i in range(130)]
    slow = SlowClients(deployment.server.port, heads)
    try:
        with httpx.Client(base_url=url, headers=deployment.auth("acme"), timeout=60) as client:
            answers = [client.get(f"/keys/{acme.keys.key_id}") for _ in range(20)]
            answers.append(client.post("/infer", content=envelope, headers={"Content-Type": "application/octet-stream"}))
            ready = client.get("/readyz").status_code
        time.sleep(max(0.0, 5.0 - (time.monotonic() - slow.start)))  # trickle for 5 s at least
    finally:
        results = slow.finish()
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text[:200] for r in answers]
    assert acme.decrypt(answers[-1].content).index == simulate(service_model, x[95:96]).argmax(1)[0]
    assert ready == 200
    for status, headers, body, closed_after in results:
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        assert headers["connection"] == "close" and closed_after is not None and closed_after < 5


def test_metrics_stay_bounded_after_a_flood_of_401s(deployment):
    """1,000 unauthenticated requests to random /keys/<hex> and unknown paths add no series: metrics are
    labelled by route template, never by the raw path (BentoML's were: 6,084 series after 300 401s)."""
    url = deployment.url
    paths = [f"/keys/{os.urandom(16).hex()}" for _ in range(500)] + [f"/{os.urandom(8).hex()}" for _ in range(500)]

    def series() -> tuple[str, list[str]]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return text, [line for line in text.splitlines() if line and not line.startswith("#")]

    with httpx.Client(base_url=url, timeout=30) as client, cf.ThreadPoolExecutor(4) as pool:
        for path in (paths[0], paths[-1]):  # the label sets the flood can reach exist from here on
            client.get(path)
        series()
        before_text, before = series()
        statuses = list(pool.map(lambda path: client.get(path).status_code, paths))
    assert statuses.count(401) == 500 and statuses.count(404) == 500
    text, after = series()
    assert len(after) <= len(before) + 5, set(after) - set(before)
    assert len(text) < len(before_text) + 2000
    assert not any(path.rsplit("/", 1)[1] in text for path in paths)
    assert 'endpoint="/keys/{key_id}"' in text and 'endpoint="other"' in text


# --------------------------------------------------------------------------- persistence
def test_keys_survive_a_server_restart(deployment, acme, service_model, mnist_test):
    key_id = acme.upload_keys()
    deployment.server.restart()
    health = httpx.get(f"{deployment.url}/health", timeout=30).json()
    assert health["key_bundles"] >= 1 and health["engines_loaded"] == 0
    assert httpx.get(f"{deployment.url}/keys/{key_id}", headers=deployment.auth("acme"), timeout=30).status_code == 200
    x, _ = mnist_test
    resp = post_infer(deployment.url, deployment.api_keys["acme"], acme.encrypt(x[40]).to_bytes())
    assert resp.status_code == 200, resp.text[:300]
    assert acme.decrypt(resp.content).index == simulate(service_model, x[40:41]).argmax(1)[0]


# --------------------------------------------------------------------------- one key store, two servers
def test_the_service_and_the_mlflow_flavor_share_one_key_store(deployment, acme, service_model, mnist_test,
                                                                tmp_path):
    """Bundles saved by ``mlflow.h33.save_evaluation_keys`` are served over HTTP, and bundles uploaded
    with ``POST /keys`` serve the MLflow pyfunc: one layout, real files in the running server's store."""
    mlflow = pytest.importorskip("mlflow")
    from h33_bento import mlflow_flavor
    from h33_bento.keystore import DEFAULT_TENANT, KeyStore

    store = deployment.root / "keystore"
    x, _ = mnist_test
    want = simulate(service_model, x[70:72]).argmax(1)
    key = deployment.api_keys["acme"]

    # flavor -> service.  Keys made here and never sent over HTTP; saved without a tenant they
    # belong to the default tenant, so acme may not use them
    local = FHEInferenceClient(service_model)
    key_id = mlflow_flavor.save_evaluation_keys(local, store)
    assert KeyStore(store, create=False).get(key_id).tenant == DEFAULT_TENANT
    refused = post_infer(deployment.url, key, local.encrypt(x[70]).to_bytes())
    assert refused.status_code == 403 and error_code(refused) == "forbidden_key"
    # saved again for acme (by another process than the server, which re-reads the store)
    KeyStore(store).delete(key_id)
    assert mlflow_flavor.save_evaluation_keys(local, store, tenant="acme") == key_id
    record = httpx.get(f"{deployment.url}/keys/{key_id}", headers=deployment.auth("acme"), timeout=30)
    assert record.status_code == 200 and record.json()["tenant"] == "acme"
    resp = post_infer(deployment.url, key, local.encrypt(x[70]).to_bytes())
    assert resp.status_code == 200, resp.text[:300]
    assert local.decrypt(resp.content).index == want[0]

    # service -> flavor: acme's bundle, uploaded with POST /keys, runs the MLflow pyfunc
    acme_key = acme.upload_keys()
    assert (store / acme_key / "bundle.h33k").is_file()
    mlflow_flavor.save_model(service_model, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"key_store": str(store)})
    (out,) = model.predict([acme.encrypt(x[71]).to_bytes()])
    assert acme.decrypt(out).index == want[1]


# --------------------------------------------------------------------------- remote client
def test_remote_client_batch_request_runs_as_is_and_checks_the_model(deployment, globex, service_model, mnist_test):
    x, _ = mnist_test
    images = x[200:208]
    preds = globex.infer_batch(images)
    assert [p.index for p in preds] == simulate(service_model, images).argmax(1).tolist()
    assert globex.last_run["run_requests"] == "1" and globex.last_run["run_lanes"] == "8"
    other = dataclasses.replace(service_model, labels=list("abcdefghij"), _fingerprint=None)
    with pytest.raises(ModelMismatchError):
        FHEInferenceClient(other, url=deployment.url, api_key=deployment.api_keys["globex"])
    with pytest.raises(RemoteError) as err:
        FHEInferenceClient(url=deployment.url, api_key=new_api_key())
    assert err.value.status == 401


# --------------------------------------------------------------------------- load
def test_load_64_requests_from_4_concurrent_clients(deployment, acme, globex, service_model, mnist_test):
    """4 clients (2 per tenant, each pair sharing its tenant's keys), 16 single-image requests each,
    4 in flight per client; no request lost, no answer mixed up; throughput and p50/p95 reported."""
    x, _ = mnist_test
    per_client, in_flight = 16, 4
    owners = [("acme", acme), ("acme", acme), ("globex", globex), ("globex", globex)]
    clients = [FHEInferenceClient(url=deployment.url, api_key=deployment.api_keys[t], keys=owner.keys)
               for t, owner in owners]
    work = []  # (client index, image index, envelope)
    for c, client in enumerate(clients):
        for j in range(per_client):
            i = 1000 + c * per_client + j
            work.append((c, i, client.encrypt(x[i])))
    reference = simulate(service_model, x[1000:1000 + len(work)])
    runs_before = scrape(deployment.url, "h33_engine_runs_total")

    def one(job):
        c, i, env = job
        t0 = time.perf_counter()
        out = clients[c].infer(env)
        return c, i, out, time.perf_counter() - t0

    pools = [cf.ThreadPoolExecutor(in_flight) for _ in clients]
    start = time.perf_counter()
    futures = [pools[job[0]].submit(one, job) for job in work]
    results = [f.result(timeout=900) for f in futures]
    wall = time.perf_counter() - start
    for p in pools:
        p.shutdown()
    assert len(results) == len(work) == 64
    for c, i, out, _ in results:
        got = clients[c].decrypt_logits(out)[0]
        assert_logits_close(got, reference[i - 1000])  # its own image's answer, not a neighbour's
    with pytest.raises(KeyMismatchError):  # and never readable with the other tenant's key
        clients[2].decrypt_logits(results[0][2])
    latencies = np.array([r[3] for r in results])
    run_lanes = {out.extra["engine_run"]: int(out.extra["run_lanes"]) for _, _, out, _ in results}
    report = {
        "requests": len(results),
        "clients": len(clients),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 3),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 2),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 2),
        "engine_runs": len(run_lanes),
        "mean_lane_fill": round(float(np.mean(list(run_lanes.values()))) / 8, 3),
        "server_runs_metric": scrape(deployment.url, "h33_engine_runs_total") - runs_before,
    }
    (deployment.root / "load.json").write_text(json.dumps(report, indent=1))
    print("\nload test:", json.dumps(report))
    assert report["server_runs_metric"] == report["engine_runs"]
    assert report["engine_runs"] <= 16  # at least half of the lanes filled on average
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- MLflow source
LOG_TO_MLFLOW = """
import sys, mlflow
from h33_bento import mlflow_flavor
from h33_bento.program.model import CompiledModel
info = mlflow_flavor.log_model(CompiledModel.load(sys.argv[1]), name="model", registered_model_name="h33-served")
mlflow.MlflowClient().set_registered_model_alias("h33-served", "prod", info.registered_model_version)
"""


def test_serves_a_registered_mlflow_model(deployment, acme, service_model, mnist_test, tmp_path):
    pytest.importorskip("mlflow")
    acme.upload_keys()  # into the key store this second server shares
    env = {**deployment.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    logged = subprocess.run([PYTHON, "-c", LOG_TO_MLFLOW, str(deployment.root / "compiled")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert logged.returncode == 0, logged.stderr[-3000:]
    server = Server("h33_bento.runners.service:H33Inference", {**env, "H33_MODEL_URI": "models:/h33-served@prod"},
                    tmp_path / "mlflow-serve.log")
    try:
        server.start()
        info = httpx.get(f"{server.url}/model", headers=deployment.auth("acme"), timeout=30).json()
        assert info["model"]["fingerprint"] == service_model.fingerprint
        assert info["model"]["source"] == {"kind": "mlflow", "uri": "models:/h33-served@prod"}
        x, _ = mnist_test
        resp = post_infer(server.url, deployment.api_keys["acme"], acme.encrypt(x[60]).to_bytes())
        assert resp.status_code == 200, resp.text[:300] + server.tail()
        assert acme.decrypt(resp.content).index == simulate(service_model, x[60:61]).argmax(1)[0]
    finally:
        server.stop()


# --------------------------------------------------------------------------- build
def _copy_source(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for name in ("h33_bento", "runners", "mlflow_flavor"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


def test_bentoml_build_produces_a_bento_that_serves(deployment, acme, service_model, mnist_test, tmp_path):
    pytest.importorskip("setuptools")  # builds the h33-bento wheel the Bento ships
    env = deployment.env
    acme.upload_keys()
    ctx = tmp_path / "bentos"
    shutil.copytree(REPO / "bentos", ctx, ignore=shutil.ignore_patterns("dist", "__pycache__"))
    subprocess.run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(_copy_source(tmp_path / "src")), "-w", str(ctx / "dist")],
                   check=True, capture_output=True, timeout=600)
    built = subprocess.run([BENTOML, "build", "-f", str(ctx / "bentofile.yaml"), str(ctx), "-o", "tag"],
                           cwd=ctx, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    tag = next(line.split("__tag__:", 1)[1].strip() for line in built.stdout.splitlines() if "__tag__:" in line)
    info = json.loads(subprocess.run([BENTOML, "get", tag, "-o", "json"], env=env, capture_output=True,
                                     text=True, check=True, timeout=120).stdout)
    assert [m["tag"].split(":")[0] for m in info["models"]] == ["h33-model"]
    server = Server(tag, env, tmp_path / "bento.log")  # same key store: a second replica of the service
    try:
        server.start()
        model = httpx.get(f"{server.url}/model", headers=deployment.auth("acme"), timeout=30).json()
        assert model["model"]["fingerprint"] == service_model.fingerprint
        x, _ = mnist_test
        resp = post_infer(server.url, deployment.api_keys["acme"], acme.encrypt(x[50]).to_bytes())
        assert resp.status_code == 200, resp.text[:300] + server.tail()
        assert acme.decrypt(resp.content).index == simulate(service_model, x[50:51]).argmax(1)[0]
    finally:
        server.stop()


# --------------------------------------------------------------------------- a server with tight limits
SCRAPE_TOKEN = new_api_key()


@pytest.fixture(scope="module")
def strict(deployment, tmp_path_factory):
    """A second server with tight limits: 2 requests in flight (1 per tenant), 4 s for a small body, 1 MiB
    key bundles, /metrics behind a scrape token.  Its own BentoML home (a copy of the model store, so its
    start-up does not reset the first server's metrics directory) and its own key store."""
    root = tmp_path_factory.mktemp("h33-strict")
    shutil.copytree(deployment.root / "bentoml" / "models", root / "bentoml" / "models")
    env = {**deployment.env, "BENTOML_HOME": str(root / "bentoml"), "H33_KEY_STORE": str(root / "keystore"),
           "H33_MAX_CONCURRENCY": "2", "H33_MAX_TENANT_CONCURRENCY": "1", "H33_BODY_TIMEOUT_S": "4",
           "H33_MAX_KEY_BYTES": str(1 << 20), "H33_METRICS_PUBLIC": "false",
           "H33_METRICS_TOKEN_SHA256": hash_api_key(SCRAPE_TOKEN)}
    server = Server("h33_bento.runners.service:H33Inference", env, root / "server.log")
    server.start()
    yield Deployment(server, deployment.api_keys, env, root)
    server.stop()


def _held(dep: Deployment, tenant: str, path: str = "/infer") -> socket.socket:
    """An authenticated request whose body never arrives (10 of 100,000 bytes)."""
    return raw_request(dep.server.port, f"POST {path} HTTP/1.1\nHost: h33\nContent-Type: application/octet-stream\n"
                                        f"Authorization: Bearer {dep.api_keys[tenant]}\nContent-Length: 100000\n",
                       b"\0" * 10)


def _in_flight(dep: Deployment, n: int) -> dict:
    """/health once the server counts ``n`` requests in flight."""
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{dep.url}/health", timeout=30).json())["requests_in_flight"] != n:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_a_body_that_does_not_arrive_in_time_gets_a_json_408(strict):
    """/infer (read by the gate) and /keys (streamed by the route) alike: 408 after the body timeout."""
    t0 = time.monotonic()
    socks = [_held(strict, "acme", "/infer"), _held(strict, "globex", "/keys")]
    for sock in socks:
        status, headers, body = read_answer(sock)
        sock.close()
        assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert 4 <= time.monotonic() - t0 < 10
    for tenant in TENANTS:
        assert httpx.get(f"{strict.url}/model", headers=strict.auth(tenant), timeout=30).status_code == 200


def test_in_flight_caps_answer_429_and_readiness_reports_saturation(strict):
    """1 request in flight per tenant, 2 per server: beyond them 429 with Retry-After; at the server's
    cap /readyz is 503 and /health says saturated, until the held requests end (here: their 408)."""
    url = strict.url
    model = {t: (lambda t=t: httpx.get(f"{url}/model", headers=strict.auth(t), timeout=30)) for t in TENANTS}
    acme_held = _held(strict, "acme")
    assert _in_flight(strict, 1)["status"] == "ok"
    busy = model["acme"]()
    assert busy.status_code == 429 and error_code(busy) == "too_many_requests" and busy.headers["retry-after"] == "1"
    assert model["globex"]().status_code == 200  # the other tenant still gets in
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    globex_held = _held(strict, "globex")
    assert _in_flight(strict, 2)["status"] == "saturated"
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503
    assert model["globex"]().status_code == 429
    assert [read_answer(sock)[0] for sock in (acme_held, globex_held)] == [408, 408]
    assert _in_flight(strict, 0)["status"] == "ok"
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    assert model["acme"]().status_code == 200


def test_chunked_key_uploads_over_the_limit_get_a_json_413(strict):
    """No Content-Length to check up front: the limit trips while the bundle streams, octet-stream and
    multipart alike, and the partial upload is removed."""
    def octets():
        for _ in range(3):
            yield b"\0" * (1 << 20)

    def multipart():
        yield b'--h33b\r\nContent-Disposition: form-data; name="bundle"; filename="k.h33k"\r\n\r\n'
        yield from octets()
        yield b"\r\n--h33b--\r\n"

    for body, content_type in ((octets(), "application/octet-stream"), (multipart(), "multipart/form-data; boundary=h33b")):
        resp = httpx.post(f"{strict.url}/keys", content=body, timeout=60,
                          headers={**strict.auth("acme"), "Content-Type": content_type})
        assert resp.status_code == 413 and error_code(resp) == "too_large", resp.text[:300]
        assert resp.headers["connection"] == "close"
    assert list((strict.root / "keystore" / ".incoming").iterdir()) == []
    assert httpx.get(f"{strict.url}/keys", headers=strict.auth("acme"), timeout=30).status_code == 200


def test_metrics_need_the_scrape_token_when_not_public(strict):
    url = strict.url
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", headers=strict.auth("acme"), timeout=30).status_code == 401  # not a tenant's
    scraped = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}, timeout=30)
    assert scraped.status_code == 200 and 'h33_requests_total{endpoint="/metrics",method="GET",model="",status="401"}' in scraped.text


def test_an_unexpected_failure_is_a_json_500_with_its_request_id_in_the_log(strict):
    """A fault no input check foresees (here: the key store's .incoming is a file, as on a volume mounted
    wrongly) is a JSON 500 at once, logged with its traceback under the request id; the server goes on."""
    incoming = strict.root / "keystore" / ".incoming"
    shutil.rmtree(incoming)
    incoming.write_text("not a directory")
    try:
        resp = httpx.post(f"{strict.url}/keys", content=b"\0" * 100, timeout=30,
                          headers={**strict.auth("acme"), "Content-Type": "application/octet-stream"})
    finally:
        incoming.unlink()
        incoming.mkdir()
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == "internal_error" and error["request_id"] == resp.headers["x-request-id"]
    assert resp.elapsed.total_seconds() < 5
    deadline = time.monotonic() + 10  # logged once the answer is out
    while error["request_id"] not in (log := strict.server.log.read_text(errors="replace")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "FileExistsError" in log[log.index(error["request_id"]):]
    assert httpx.get(f"{strict.url}/keys", headers=strict.auth("acme"), timeout=30).status_code == 200


def test_the_worker_stops_when_bentoml_serve_is_killed(strict):
    """SIGKILL of the ``bentoml serve`` process (nothing can clean up after it) leaves no orphaned worker
    holding the port and answering /readyz: the worker notices and stops, and a restart can bind."""
    psutil = pytest.importorskip("psutil")
    serve = psutil.Process(strict.server.proc.pid)
    workers = serve.children(recursive=True)
    assert workers and httpx.get(f"{strict.url}/readyz", timeout=30).status_code == 200
    serve.kill()
    strict.server.proc.wait()
    t0 = time.monotonic()

    def alive(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(p) for p in workers):
        assert time.monotonic() - t0 < 30, [p.cmdline() for p in workers if alive(p)]
        time.sleep(0.2)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{strict.url}/readyz", timeout=5)
    with socket.socket() as sock:  # what a restarted server does first
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", strict.server.port))
        sock.listen()


# --------------------------------------------------------------------------- one key store for two replicas
@pytest.fixture(scope="module")
def replicas(deployment, tmp_path_factory):
    """Two more servers that share only a key store on S3 (moto's server on 127.0.0.1): each has its
    own BentoML home and its own local key cache, as two pods without a shared volume."""
    import boto3
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    aws = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "h33-test",
           "AWS_SECRET_ACCESS_KEY": "h33-test", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL_S3"], aws_access_key_id="h33-test",
                          aws_secret_access_key="h33-test", region_name="us-east-1")
    bucket.create_bucket(Bucket="h33-keys")
    servers = []
    for name in ("pod-a", "pod-b"):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(deployment.root / "bentoml" / "models", root / "bentoml" / "models")
        env = {**deployment.env, **aws, "BENTOML_HOME": str(root / "bentoml"), "H33_KEY_STORE": str(root / "cache"),
               "H33_KEY_STORE_URL": "s3://h33-keys/prod"}
        servers.append(Deployment(Server("h33_bento.runners.service:H33Inference", env, root / "server.log"),
                                  deployment.api_keys, env, root))
    for dep in servers:
        dep.server.start()
    yield servers, bucket
    for dep in servers:
        dep.server.stop()
    s3.stop()


def _stored_key_ids(bucket) -> set[str]:
    listed = bucket.list_objects_v2(Bucket="h33-keys", Prefix="prod/").get("Contents", [])
    return {o["Key"].split("/")[1] for o in listed if o["Key"].endswith("/meta.json")}


def test_a_key_uploaded_through_one_replica_serves_through_the_other(replicas, service_model, mnist_test):
    (a, b), bucket = replicas
    x, _ = mnist_test
    with FHEInferenceClient(url=a.url, api_key=a.api_keys["acme"]) as client:
        key_id = client.upload_keys()
        assert _stored_key_ids(bucket) == {key_id}
        listed = httpx.get(f"{b.url}/keys", headers=b.auth("acme"), timeout=30).json()["keys"]
        assert [k["key_id"] for k in listed] == [key_id]
        theirs = httpx.get(f"{b.url}/keys/{key_id}", headers=b.auth("globex"), timeout=30)
        assert theirs.status_code == 403  # the tenant binding travels with the key
        resp = post_infer(b.url, b.api_keys["acme"], client.encrypt(x[0]).to_bytes())
        assert resp.status_code == 200, resp.text[:300]
        assert client.decrypt(resp.content).index == int(simulate(service_model, x[:1]).argmax(1)[0])
        gone = httpx.delete(f"{a.url}/keys/{key_id}", headers=a.auth("acme"), timeout=30)
        assert gone.status_code == 200 and _stored_key_ids(bucket) == set()


def test_a_replica_killed_mid_upload_leaves_no_visible_key(replicas, service_model):
    (a, b), bucket = replicas
    chain = KeyChain.generate(service_model.params)
    bundle = chain.evaluation_keys().to_bytes()
    sock = raw_request(a.server.port, f"POST /keys HTTP/1.1\nHost: h33\nContent-Type: application/octet-stream\n"
                                      f"Authorization: Bearer {a.api_keys['acme']}\nContent-Length: {len(bundle)}\n",
                       bundle[: len(bundle) // 2])
    time.sleep(1.0)  # the first half is being written to the pod's cache
    os.killpg(a.server.proc.pid, signal.SIGKILL)
    sock.close()
    a.server.proc.wait(timeout=60)
    a.server.proc = None
    assert chain.key_id not in _stored_key_ids(bucket)
    unknown = httpx.get(f"{b.url}/keys/{chain.key_id}", headers=b.auth("acme"), timeout=30)
    assert unknown.status_code == 404 and error_code(unknown) == "unknown_key"
