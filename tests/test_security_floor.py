"""The client refuses CKKS parameters below 128-bit security (or the level it was asked for) before
it makes or sends anything: against a server publishing weak or falsely labelled parameters, for a
local model, for key generation, and on the command line.

The weak servers are real HTTP servers on 127.0.0.1 (``http.server`` in a thread) serving a crafted
``GET /model``: a server that publishes weak parameters is the fault we cannot produce otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from h33_bento.ckks.keys import KeyChain
from h33_bento.ckks.params import CKKSParams, check_security, select_params
from h33_bento.client import FHEInferenceClient
from h33_bento.errors import InsecureParametersError

H33 = str(Path(sys.executable).parent / "h33")

#: what the issue's weak server published: no security level, N=4096, log2 Q = 60 + 10 x 50 = 560
WEAK = dict(ring_dim=4096, multiplicative_depth=10, scale_bits=50, first_mod_bits=60, lanes=8)


def model_info(params: CKKSParams) -> dict:
    """A ``GET /model`` answer for a one-block 16-input, 4-output model under ``params``."""
    return {
        "model": {"fingerprint": "ab" * 16, "input_name": "input", "input_shape": [16], "output_shape": [4],
                  "labels": list("abcd"), "depth": params.multiplicative_depth},
        "params": {**params.model_dump(mode="json"), "fingerprint": params.fingerprint},
        "layout": {"input_positions": list(range(16)), "output_positions": list(range(4))},
    }


class FakeServer:
    """An HTTP server publishing ``info`` at /model; records every request it gets."""

    def __init__(self, info: dict) -> None:
        self.requests: list[tuple[str, str]] = []
        body = json.dumps(info).encode()
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, payload: bytes) -> None:
                seen.append((self.command, self.path))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._answer(200, body) if self.path == "/model" else self._answer(404, b'{"error": {}}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(201, b"{}")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(params: CKKSParams) -> FakeServer:
        servers.append(FakeServer(model_info(params)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("label", ["HEStd_NotSet", "HEStd_128_classic"])
def test_client_refuses_a_weak_server_before_sending_anything(serve, label):
    """N=4096 with log2 Q=560 is far below 128 bits: published unlabelled, or falsely labelled
    HEStd_128_classic (OpenFHE refuses that ring for that modulus chain at 128 bits)."""
    server = serve(CKKSParams(**WEAK, security_level=label))
    with pytest.raises(InsecureParametersError, match="N=4096" if label == "HEStd_NotSet" else "requires at least 32768"):
        FHEInferenceClient(url=server.url, api_key="h33_pk_test")
    assert server.requests == [("GET", "/model")]  # no key upload, no /infer


def test_opting_out_is_explicit_and_a_higher_floor_can_be_asked_for(serve):
    weak = serve(CKKSParams(**WEAK, security_level="HEStd_NotSet"))
    client = FHEInferenceClient(url=weak.url, api_key="h33_pk_test", min_security_level="HEStd_NotSet")
    assert client.model.params.ring_dim == 4096
    client.close()
    # the opt-out does not make a false label true: OpenFHE cannot build that context at 128 bits
    lying = serve(CKKSParams(**WEAK, security_level="HEStd_128_classic"))
    with pytest.raises(InsecureParametersError, match="claim HEStd_128_classic"):
        FHEInferenceClient(url=lying.url, api_key="h33_pk_test", min_security_level="HEStd_NotSet")
    secure = serve(select_params(2, 512))
    with pytest.raises(InsecureParametersError, match="below the required HEStd_192_classic"):
        FHEInferenceClient(url=secure.url, api_key="h33_pk_test", min_security_level="HEStd_192_classic")
    assert secure.requests == [("GET", "/model")]
    with FHEInferenceClient(url=secure.url, api_key="h33_pk_test") as ok:  # 128-bit passes the default floor
        assert ok.model.params.security_level == "HEStd_128_classic"


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory):
    """A real compiled model at HEStd_NotSet (the compiler allows it when asked explicitly)."""
    torch = pytest.importorskip("torch")
    from h33_bento import compile

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    compiled = compile(net, (1, 4, 4), np.random.default_rng(0).normal(size=(32, 1, 4, 4)),
                       security_level="HEStd_NotSet", measure_costs=False)
    path = tmp_path_factory.mktemp("weak") / "model"
    compiled.save(path)
    return compiled, path


def test_local_model_and_key_generation_apply_the_floor(weak_model):
    compiled, _ = weak_model
    with pytest.raises(InsecureParametersError, match="HEStd_NotSet"):
        FHEInferenceClient(compiled)
    with pytest.raises(InsecureParametersError):
        KeyChain.generate(compiled.params)
    client = FHEInferenceClient(compiled, min_security_level="HEStd_NotSet")
    x = np.random.default_rng(1).normal(size=(1, 4, 4))
    assert client.decrypt_logits(client.infer(client.encrypt(x))).shape == (1, 4)
    check_security(select_params(2, 512))  # 128-bit parameters pass


def test_cli_keygen_refuses_weak_parameters_unless_told(weak_model, tmp_path):
    _, path = weak_model
    refused = subprocess.run([H33, "keygen", str(path), "--keys", str(tmp_path / "keys")], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "below the required HEStd_128_classic" in refused.stderr
    assert not (tmp_path / "keys").exists()
    ok = subprocess.run([H33, "keygen", str(path), "--keys", str(tmp_path / "keys"), "--min-security-level",
                         "HEStd_NotSet"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "keys" / "secret.key").exists()
