"""HTTP plumbing around the BentoML service: the gate middleware and the service's routes.

``H33Gate`` (an ASGI middleware added to the service) sees every HTTP request.  In BentoML 1.4
it runs inside BentoML's request-timeout middleware; ``service.py`` switches off BentoML's
concurrency limiter and its per-path HTTP metrics, and the gate does both jobs itself:

* every request gets a request id (``X-Request-Id`` on the answer, ``request_id`` in error
  bodies, in every log line about it) and is counted in ``h33_requests_total`` /
  ``h33_request_seconds`` under its model and route template; any exception becomes a JSON answer;
* ``/infer``, ``/tasks...``, ``/keys...``, ``/model``, ``/models`` need ``Authorization: Bearer h33_pk_...``,
  checked before a byte of the body is read; so is the declared ``Content-Length`` against the route's limit
  (``max_infer_bytes`` for /infer and POST /tasks, ``max_key_bundle_bytes`` for POST /keys,
  ``max_weights_bytes`` for POST /keys/{key_id}/weights, 64 KiB elsewhere).
  401, 404 ``unknown_model``, 413, 429 and 503 are answered at once with ``Connection: close``, the body unread;
* a model's routes exist un-prefixed, for the default model, and under ``/models/{name}`` for each
  served model (``GET /models/{name}`` is its ``/model``); the gate resolves the name after
  authentication (404 ``unknown_model``) and hands the ``ServedModel`` on in ``scope["h33"]["model"]``;
* an authenticated request then takes an in-flight slot of its tenant and of the worker
  (:class:`~h33_bento.runners.worker_state.Admission`, 429 when none is free), held until it is answered;
* its body must arrive within ``body_timeout_s`` plus its size at ``body_min_rate`` (408), and may
  not outgrow the limit while it streams (413);
* an /infer (or ``POST /tasks``) body is read and checked here (envelope framing, model and
  parameter fingerprints, key_id ownership), so those routes only ever see valid requests of known
  tenants; the checked ``InferItem`` travels in ``scope["h33"]["item"]``.

The routes live in a Starlette app mounted at ``/`` through BentoML's public ``@bentoml.asgi_app``:
``GET /models`` (the served models), and per model (un-prefixed or under ``/models/{name}``)
``POST /infer`` (raw octet-stream bodies, handed to the lane packer, which does the batching:
see docs/deploy.md for why BentoML's batcher cannot), ``GET /model``, ``POST /keys`` (streamed),
``GET /keys``, ``GET|DELETE /keys/{key_id}``, for a model served in encrypted-weight mode ``POST /keys/{key_id}/weights`` (streamed), and the
task routes of long runs, ``POST /tasks``, ``GET /tasks/{task_id}``, ``GET /tasks/{task_id}/result``
(``tasks.py``; docs/deploy.md says why they are not BentoML's ``@bentoml.task``); and for the
worker ``GET /health`` and ``GET /metrics``.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from .config import ServeConfig
from .http_errors import HTTPError, body_timeout, internal_error, log_error, request_id, too_large, unauthorized
from .metrics import exposition
from .served_model import ServedModel
from .worker_state import current

logger = logging.getLogger("h33_bento.runners")

SMALL_BODY = 64 * 1024
ENVELOPE_FIELD = "envelope"
BUNDLE_FIELD = "bundle"
_ROUTES = frozenset({"/infer", "/keys", "/tasks", "/model", "/models", "/health", "/metrics", "/livez", "/readyz",
                     "/healthz"})
#: the routes of one model, un-prefixed (the default model) or under /models/{name}
MODEL_ROUTES = frozenset({"/infer", "/keys", "/keys/{key_id}", "/keys/{key_id}/weights", "/tasks", "/tasks/{task_id}",
                          "/tasks/{task_id}/result", "/model"})
MODELS_PREFIX = "/models/"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def route_of(path: str) -> tuple[str, str | None]:
    """(route template, model name) of a request path: ``/models/{name}/infer`` is ("/infer", name),
    ``GET /models/{name}`` ("/model", name), an un-prefixed path (template, None)."""
    path = path.rstrip("/") or "/"
    if not path.startswith(MODELS_PREFIX):
        return route_template(path), None
    name, _, rest = path[len(MODELS_PREFIX):].partition("/")
    route = route_template("/" + rest) if rest else "/model"
    return (route, name) if route in MODEL_ROUTES else ("other", None)


def route_template(path: str) -> str:
    """The route a request path belongs to: one of a fixed set, never a key or task id or an unknown path."""
    path = path.rstrip("/") or "/"
    if path in _ROUTES:
        return path
    if path.startswith("/keys/") and path.count("/") == 2:
        return "/keys/{key_id}"
    if path.startswith("/tasks/") and path.count("/") == 2:
        return "/tasks/{task_id}"
    if path.startswith("/tasks/") and path.count("/") == 3 and path.endswith("/result"):
        return "/tasks/{task_id}/result"
    if path.startswith("/keys/") and path.count("/") == 3 and path.endswith("/weights"):
        return "/keys/{key_id}/weights"
    return "other"


def _kind(method: str, route: str, metrics_public: bool) -> str | None:
    """What the gate does with a request: None (public), "metrics", "infer", "upload", "weights" or
    "protected"."""
    if route in ("/infer", "/tasks"):
        return "infer" if method == "POST" else "protected"
    if route == "/keys":
        return "upload" if method == "POST" else "protected"
    if route == "/keys/{key_id}/weights":
        return "weights" if method == "POST" else "protected"
    if route in ("/keys/{key_id}", "/model", "/models", "/tasks/{task_id}", "/tasks/{task_id}/result"):
        return "protected"
    if route == "/metrics" and not metrics_public:
        return "metrics"
    return None


class _Body:
    """A request's receive channel under its size limit (413) and arrival deadline (408).

    A body of n bytes (the declared Content-Length, or what a chunked body has sent so far) may
    take ``body_timeout_s + n / body_min_rate`` seconds from the moment the gate admitted it.
    """

    def __init__(self, receive: Any, limit: int, declared: int, config: ServeConfig) -> None:
        self.receive = receive
        self.limit = limit
        self.declared = declared
        self.config = config
        self.started = time.monotonic()
        self.seen = 0
        self.done = False

    async def __call__(self) -> Any:
        if self.done:
            return await self.receive()
        allowed = self.config.body_seconds(max(self.declared, self.seen))
        try:
            with anyio.fail_after(max(0.0, self.started + allowed - time.monotonic())):
                message = await self.receive()
        except TimeoutError:
            raise body_timeout(allowed) from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise too_large(self.limit, "the request body")
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    async def read(self) -> bytes:
        """The whole body."""
        chunks: list[bytes] = []
        while True:
            message = await self()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def read_form(request: Request, max_files: int, max_fields: int) -> FormData:
    """The request's multipart form; a malformed one is a 400 ``invalid_multipart``."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, HTTPException) as exc:
        detail = exc.message if isinstance(exc, MultiPartException) else exc.detail
        raise HTTPError(400, "invalid_multipart", f"malformed multipart body: {detail}") from None


async def _form_file(scope: dict, body: bytes, field: str) -> bytes:
    """The bytes of one part of a multipart/form-data body that was already read."""

    async def no_more() -> Any:
        return {"type": "http.disconnect"}

    form = await read_form(Request(scope, _replay(body, no_more)), max_files=4, max_fields=16)
    try:
        part = form.get(field)
        if isinstance(part, UploadFile):
            return await part.read()
        if isinstance(part, str):
            return part.encode("latin-1")
        raise HTTPError(422, "invalid_envelope", f"multipart body has no part named {field!r}")
    finally:
        await form.close()


def _content_length(headers: Headers) -> int:
    """The declared body size (0 if none; the HTTP server has already refused a malformed one)."""
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else 0


class H33Gate:
    """ASGI middleware: request ids, metrics, authentication, admission, body limits, /infer checks."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        route, name = route_of(scope.get("path", "/"))
        method = scope.get("method", "GET")
        status = 0
        start = time.perf_counter()

        async def send_tagged(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self._handle(scope, receive, send_tagged, headers, route, name)
        except ClientDisconnect:
            logger.info("request %s: the client went away before sending its body", rid)
        except Exception as exc:  # one JSON answer for every failure, and a log line with the request id
            if isinstance(exc, HTTPError):
                err = exc
                log_error(err)
            else:
                err = internal_error()
                logger.exception("request %s (%s %s) failed", rid, method, route)
            if not status:
                await err.response()(scope, receive, send_tagged)
        finally:
            rt = current()
            if rt is not None:
                model = (name if name in rt.models else "") if name is not None else (
                    rt.default.name if route in MODEL_ROUTES else "")
                rt.metrics.http(model, route, method if method in _METHODS else "other", status,
                                time.perf_counter() - start)
            request_id.reset(token)

    async def _handle(self, scope: dict, receive: Any, send: Any, headers: Headers, route: str,
                      name: str | None) -> None:
        rt = current()
        kind = _kind(scope.get("method", "GET"), route, rt is None or rt.config.metrics_public)
        if kind is None:
            return await self.app(scope, receive, send)
        if rt is None:
            raise HTTPError(503, "starting", "the model is still loading", {"Retry-After": "5"}, close=True)
        if kind == "metrics":
            if rt.scrapers.authenticate(headers.get("authorization")) is None:
                raise unauthorized("/metrics needs the scrape token (send 'Authorization: Bearer <token>')")
            return await self.app(scope, receive, send)
        tenant = rt.auth.authenticate(headers.get("authorization"))
        if tenant is None:
            raise unauthorized()
        config = rt.config
        limit = {"infer": config.max_infer_bytes, "upload": config.max_key_bundle_bytes,
                 "weights": config.max_weights_bytes}.get(kind, SMALL_BODY)
        declared = _content_length(headers)
        if declared > limit:
            raise too_large(limit, "the request body")
        served = rt.model(name) if route in MODEL_ROUTES else None  # 404 unknown_model
        with rt.admission.slot(tenant):
            scope["h33"] = {"tenant": tenant, "model": served}
            body = _Body(receive, limit, declared, config)
            if kind != "infer":
                return await self.app(scope, body, send)
            data = await body.read()
            if headers.get("content-type", "").startswith("multipart/form-data"):
                data = await _form_file(scope, data, ENVELOPE_FIELD)
            item = await anyio.to_thread.run_sync(served.prepare_infer, tenant, data, headers.get("x-h33-key-id"))
            del data
            scope["h33"]["item"] = item
            # the body has been consumed here; BentoML's endpoint reads the checked item from the scope
            return await self.app(scope, _replay(b"", body), send)


# --------------------------------------------------------------------------- mounted routes
def _tenant(request: Request) -> str:
    return request.scope["h33"]["tenant"]


def _model(request: Request) -> ServedModel:
    """The served model the gate resolved for this request (the default one for un-prefixed routes)."""
    return request.scope["h33"]["model"]


async def infer(request: Request) -> Response:
    """POST /infer: the gate has checked the envelope; the lane packer runs it, with up to 7 others
    of the same tenant and key, in one engine run (see ``LanePacker``)."""
    model = _model(request)
    (pending,) = model.packer.submit([request.scope["h33"]["item"]])
    result = await pending  # a disconnect cancels this task, and with it the future: the packer drops it
    if result.error is not None:
        log_error(result.error)
    return result.response()


async def submit_task(request: Request) -> Response:
    """POST /tasks: the same checked envelope as /infer, queued on the lane packer; 202 at once."""
    model = _model(request)
    item = request.scope["h33"]["item"]
    task = model.tasks.create(item.tenant, item.key_id, len(model.compiled.steps))
    item.progress = task.progress
    (pending,) = model.packer.submit([item])
    model.tasks.watch(task, pending)
    return JSONResponse(task.public(model.tasks.ttl_s), status_code=202,
                        headers={"Location": f"{request.url.path.rstrip('/')}/{task.task_id}"})


async def get_task(request: Request) -> Response:
    """GET /tasks/{task_id}: state and steps done of steps total (the error, once a run failed)."""
    model = _model(request)
    task = model.tasks.get(request.path_params["task_id"], _tenant(request))
    return JSONResponse(task.public(model.tasks.ttl_s))


async def get_task_result(request: Request) -> Response:
    """GET /tasks/{task_id}/result: what /infer would have answered; 409 while the task runs."""
    model = _model(request)
    task = model.tasks.get(request.path_params["task_id"], _tenant(request))
    if task.result is None:
        raise HTTPError(409, "task_not_finished", f"task {task.task_id} is {task.state}: {task.done} of "
                                                  f"{task.total} steps done", {"Retry-After": "1"})
    return task.result.response()


async def get_model(request: Request) -> Response:
    return JSONResponse(_model(request).model_info())


async def list_models(request: Request) -> Response:
    """GET /models: the served models (name, fingerprints, weight mode, shapes) and the default one."""
    rt = current()
    assert rt is not None  # the gate answered 503 while starting
    return JSONResponse(rt.models_info())


async def get_health(request: Request) -> Response:
    rt = current()
    if rt is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse(rt.health())


async def get_metrics(request: Request) -> Response:
    """Prometheus text of this service's metrics (BentoML's own /metrics is off, see metrics.py)."""
    body, media_type = await anyio.to_thread.run_sync(exposition)
    return Response(body, media_type=media_type)


async def upload_keys(request: Request) -> Response:
    """POST /keys: the body is an evaluation-key bundle (octet-stream, or multipart part 'bundle')."""
    model = _model(request)
    tenant = _tenant(request)
    with model.keystore.incoming() as upload:
        write = upload.file.write
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await read_form(request, max_files=1, max_fields=4)
            try:
                part = form.get(BUNDLE_FIELD)
                if not isinstance(part, UploadFile):
                    raise HTTPError(422, "invalid_bundle", f"multipart body has no file part {BUNDLE_FIELD!r}")
                while chunk := await part.read(8 << 20):
                    await anyio.to_thread.run_sync(write, chunk)
            finally:
                await form.close()
        else:
            await _stream_body(request, write)
        await anyio.to_thread.run_sync(upload.file.flush)
        record, created = await model.register_keys(tenant, upload.path, request.headers.get("x-h33-key-id"))
    return JSONResponse({**record.public(), "created": created}, status_code=201 if created else 200)


async def _stream_body(request: Request, write: Any) -> None:
    """Write a raw body to a file in 8 MiB pieces, off the event loop (the gate bounds its size)."""
    buf: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        buf.append(chunk)
        size += len(chunk)
        if size >= 8 << 20:
            await anyio.to_thread.run_sync(write, b"".join(buf))
            buf, size = [], 0
    if buf:
        await anyio.to_thread.run_sync(write, b"".join(buf))


async def upload_weights(request: Request) -> Response:
    """POST /keys/{key_id}/weights: encrypted weights (octet-stream) of the served weightless model
    under the tenant's key ``key_id``, made by the model owner (``ModelOwner.provision``)."""
    model = _model(request)
    tenant, key_id = _tenant(request), request.path_params["key_id"]
    try:
        model.check_weights_upload(tenant, key_id)  # nothing of the body is stored for a refused upload
    except HTTPError:
        async for _ in request.stream():  # read to its end (the gate bounds it), so the client gets the answer
            pass
        raise
    with model.keystore.incoming() as upload:
        await _stream_body(request, upload.file.write)
        await anyio.to_thread.run_sync(upload.file.flush)
        answer = await model.register_weights(tenant, key_id, upload.path)
    return JSONResponse(answer, status_code=201)


async def list_keys(request: Request) -> Response:
    model = _model(request)
    return JSONResponse({"keys": [r.public() for r in model.keystore.for_tenant(_tenant(request))]})


async def get_key(request: Request) -> Response:
    model = _model(request)
    rec = model.keystore.resolve(request.path_params["key_id"], _tenant(request))
    return JSONResponse(rec.public())


async def delete_key(request: Request) -> Response:
    model = _model(request)
    rec = await model.delete_keys(_tenant(request), request.path_params["key_id"])
    return JSONResponse({**rec.public(), "deleted": True})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    log_error(exc)
    return exc.response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette answers with this and re-raises; the gate logs the exception with the request id
    return internal_error().response()


_model_routes: list[BaseRoute] = [
    Route("/infer", infer, methods=["POST"]),
    Route("/model", get_model, methods=["GET"]),
    Route("/keys", upload_keys, methods=["POST"]),
    Route("/keys", list_keys, methods=["GET"]),
    Route("/keys/{key_id}", get_key, methods=["GET"]),
    Route("/keys/{key_id}", delete_key, methods=["DELETE"]),
    Route("/tasks", submit_task, methods=["POST"]),
    Route("/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/tasks/{task_id}/result", get_task_result, methods=["GET"]),
    Route("/keys/{key_id}/weights", upload_weights, methods=["POST"]),
]

routes_app = Starlette(
    routes=[
        *_model_routes,  # the default model's
        Route("/health", get_health, methods=["GET"]),
        Route("/metrics", get_metrics, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/models/{model}", get_model, methods=["GET"]),
        Mount("/models/{model}", routes=_model_routes),
    ],
    exception_handlers={HTTPError: _http_error, Exception: _unexpected},
)

__all__ = ["H33Gate", "routes_app", "route_of", "route_template"]
