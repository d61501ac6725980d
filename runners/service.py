"""The BentoML service: encrypted inference over HTTP.

Serve it from source with ``bentoml serve h33_bento.runners.service:H33Inference`` or build the
Bento in ``bentos/``.  Configuration comes from the environment (see ``runners/config.py``).

Endpoints (contracts in ``docs/deploy.md``).  One service serves one model or several by name
(``H33_MODELS``); each model's routes exist under ``/models/{name}`` and, for the default model
(``H33_DEFAULT_MODEL``, else the first), un-prefixed as well::

    POST /infer            octet-stream EncryptedTensor -> octet-stream EncryptedTensor  (lane-packed)
    POST /keys             octet-stream evaluation-key bundle -> {"key_id", ...}
    GET  /keys, GET|DELETE /keys/{key_id}
    POST /keys/{key_id}/weights  encrypted weights, for a model served in encrypted-weight mode
    POST /tasks            the /infer body -> 202 {"task_id", ...}: a long run, answered later (tasks.py)
    GET  /tasks/{task_id}  state and steps done of steps total; GET /tasks/{task_id}/result: /infer's answer
    GET  /model            what a client needs: params, lanes, keys, labels, layout, fingerprints
                           (GET /models/{name} is /models/{name}/model)
    GET  /models           the served models: name, fingerprints, weight mode, shapes; the default one
    GET  /health           liveness + counters, summed and by model (BentoML also serves /livez, /readyz)
    GET  /metrics          Prometheus text (public unless H33_METRICS_PUBLIC=false), labelled by model

A name the service does not serve answers 404 ``unknown_model`` (after authentication).

Request path of ``/infer``: the ``H33Gate`` middleware authenticates the caller and checks the
envelope; the route (``http.py``) queues it on its model's ``LanePacker`` under its (model, tenant,
key_id) group, and the packer packs up to 8 single-input requests of a group into the lanes of
one ciphertext per engine run (groups keep filling while the engine is busy).  Only BentoML's
public API is used: the routes are a Starlette app mounted with ``@bentoml.asgi_app``, and the
request body is read raw.  BentoML's adaptive batcher is not used, because it cannot group by key
nor keep filling during a run (docs/deploy.md, "Adaptive batching into 8 lanes").

Two BentoML features are switched off because the gate does their job at the right place (see
``http.py``): ``traffic.max_concurrency`` (BentoML's limiter runs outside every middleware a
service adds, so slow unauthenticated requests used up the slots tenants needed; the gate caps
in-flight requests after authentication instead) and BentoML's HTTP metrics (labelled by raw
path: a series per key id and per unknown path; the gate labels by route template).
"""
from __future__ import annotations

import logging
import os

import bentoml

from .config import ServeConfig
from .http import H33Gate, routes_app
from .process import exit_with_parent
from .worker_state import Runtime, current

REQUEST_TIMEOUT_S = float(os.environ.get("H33_REQUEST_TIMEOUT_S", "900"))


@bentoml.asgi_app(routes_app, path="/")
@bentoml.service(
    name="h33-inference",
    workers=1,  # lane packing needs every request of a key in one process: scale out with replicas
    traffic={"timeout": REQUEST_TIMEOUT_S},  # no max_concurrency: the gate admits after authentication
    metrics={"enabled": False, "namespace": "bentoml_service"},  # per-path series; the gate's are per route
    resources={"cpu": "4", "memory": "16Gi"},
)
class H33Inference:
    """Encrypted (CKKS) inference: the server sees only ciphertexts and evaluation keys."""

    def __init__(self) -> None:
        package_logger = logging.getLogger("h33_bento")
        if package_logger.level == logging.NOTSET:  # BentoML's log config shows only its own INFO lines
            package_logger.setLevel(logging.INFO)
        exit_with_parent()
        self.runtime = Runtime(ServeConfig.from_env()).activate()
        for name, served in self.runtime.models.items():
            predicted = served.compiled.summary()["predicted_latency_ms"]
            if predicted and 2 * predicted / 1000.0 > REQUEST_TIMEOUT_S:
                logging.getLogger("h33_bento.runners").warning(
                    "one encrypted run of model %r is predicted to take %.0f s; H33_REQUEST_TIMEOUT_S=%.0f would "
                    "cut requests off (set it to at least %.0f)", name, predicted / 1000.0, REQUEST_TIMEOUT_S,
                    3 * predicted / 1000.0)

    def __is_ready__(self) -> bool:
        """Ready once the model is loaded, and while a request could still be admitted (not saturated)."""
        return current() is self.runtime and not self.runtime.admission.saturated

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.runtime.close()


H33Inference.add_asgi_middleware(H33Gate)
