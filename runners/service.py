"""The BentoML service: encrypted inference over HTTP.

Serve it from source with ``bentoml serve h33_bento.runners.service:H33Inference`` or build the
Bento in ``bentos/``.  Configuration comes from the environment (see ``runners/config.py``).

Endpoints (contracts in ``docs/deploy.md``)::

    POST /infer            octet-stream EncryptedTensor -> octet-stream EncryptedTensor  (batchable)
    POST /keys             octet-stream evaluation-key bundle -> {"key_id", ...}
    GET  /keys, GET|DELETE /keys/{key_id}
    GET  /model            what a client needs: params, lanes, keys, labels, layout, fingerprints
    GET  /health           liveness + counters (BentoML also serves /livez, /readyz)
    GET  /metrics          Prometheus text (public unless H33_METRICS_PUBLIC=false)

Request path of ``/infer``: the ``H33Gate`` middleware authenticates the caller and checks the
envelope; BentoML's adaptive batcher hands up to 8 such requests at a time to ``infer``; ``infer``
groups them by (model, tenant, key_id) and queues each group on the ``LanePacker``, which packs
up to 8 single-input requests into the lanes of one ciphertext per engine run (groups also keep
filling across consecutive BentoML batches while the engine is busy).  ``infer`` returns one
awaitable per request, resolved when that request's engine run finishes, so BentoML's batcher is
never blocked behind a 1-second encrypted run.

Two BentoML features are switched off because the gate does their job at the right place (see
``http.py``): ``traffic.max_concurrency`` (BentoML's limiter runs outside every middleware a
service adds, so slow unauthenticated requests used up the slots tenants needed; the gate caps
in-flight requests after authentication instead) and BentoML's HTTP metrics (labelled by raw
path: a series per key id and per unknown path; the gate labels by route template).
"""
from __future__ import annotations

import asyncio
import logging
import os
import typing as t

import bentoml
from _bentoml_sdk.io_models import IORootModel
from bentoml.exceptions import InvalidArgument

from .config import ServeConfig
from .engines import InferItem, InferResult
from .http_errors import log_error
from .http import H33Gate, routes_app
from .process import exit_with_parent
from .worker_state import Runtime, current

REQUEST_TIMEOUT_S = float(os.environ.get("H33_REQUEST_TIMEOUT_S", "900"))
MAX_BATCH_SIZE = 8


class EnvelopeInput(IORootModel[bytes]):
    """An encrypted tensor in the h33 wire format, as the raw request body (application/octet-stream).

    The H33Gate middleware has already read and checked the body; this hands the checked request
    (tenant, key_id, envelope) to BentoML's batcher as a one-item batch.
    """

    media_type = "application/octet-stream"

    @classmethod
    async def from_http_request(cls, request: t.Any, serde: t.Any) -> list[InferItem]:  # type: ignore[override]
        item = request.scope.get("h33", {}).get("item")
        if not isinstance(item, InferItem):
            raise InvalidArgument("the request did not pass the h33 gate")
        return [item]


EnvelopeInput.__root_input__ = True  # the body is the whole input, not a JSON object of fields


class EnvelopeOutput(IORootModel[bytes]):
    """The output envelope (application/octet-stream) with run facts in X-H33-* headers."""

    media_type = "application/octet-stream"

    @classmethod
    async def to_http_response(cls, obj: t.Any, serde: t.Any) -> t.Any:  # type: ignore[override]
        (pending,) = obj  # this request's slice of the batch output: one awaitable
        result: InferResult = await pending
        if result.error is not None:
            log_error(result.error)
        return result.response()


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
        predicted = self.runtime.compiled.summary()["predicted_latency_ms"]
        if predicted and 2 * predicted / 1000.0 > REQUEST_TIMEOUT_S:
            logging.getLogger("h33_bento.runners").warning(
                "one encrypted run of this model is predicted to take %.0f s; H33_REQUEST_TIMEOUT_S=%.0f would "
                "cut requests off (set it to at least %.0f)", predicted / 1000.0, REQUEST_TIMEOUT_S,
                3 * predicted / 1000.0)

    def __is_ready__(self) -> bool:
        """Ready once the model is loaded, and while a request could still be admitted (not saturated)."""
        return current() is self.runtime and not self.runtime.admission.saturated

    @bentoml.api(route="/infer", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=60_000,
                 input_spec=EnvelopeInput, output_spec=EnvelopeOutput)
    async def infer(self, requests: list[InferItem]) -> list[asyncio.Future]:
        """Run encrypted inference on a batch of checked requests; one awaitable answer per request."""
        rt = self.runtime
        rt.metrics.dispatch_size.labels(rt.metrics.model).observe(len(requests))
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, item in enumerate(requests):
            groups.setdefault(item.group, []).append(i)
        answers: list[asyncio.Future | None] = [None] * len(requests)
        for indices in groups.values():
            for i, fut in zip(indices, rt.packer.submit([requests[i] for i in indices])):
                answers[i] = fut
        return t.cast(list, answers)

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.runtime.close()


H33Inference.add_asgi_middleware(H33Gate)
