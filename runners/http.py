"""HTTP plumbing around the BentoML service: the gate middleware and the non-batched routes.

``H33Gate`` (an ASGI middleware added to the service) runs before every request:

* ``/infer``, ``/keys...``, ``/model...`` need ``Authorization: Bearer h33_pk_...`` (401 otherwise);
  the tenant is attached to the ASGI scope as ``scope["h33"]["tenant"]``;
* request bodies are limited (``max_infer_bytes`` for /infer, ``max_key_bundle_bytes`` for
  POST /keys, 64 KiB elsewhere) and an oversized body gets 413, from ``Content-Length`` before
  reading or while streaming;
* an /infer body is read and checked here (envelope framing, model and parameter fingerprints,
  key_id ownership), so the batchable endpoint only ever sees valid requests of known tenants;
  the checked ``InferItem`` travels in ``scope["h33"]["item"]``.

The routes BentoML's ``@bentoml.api`` cannot express (GET, streamed uploads) live in a Starlette
app mounted at ``/``: ``GET /model``, ``GET /health``, ``POST /keys``, ``GET /keys``,
``GET|DELETE /keys/{key_id}``.
"""
from __future__ import annotations

import logging
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import HTTPError, error_response, too_large, unauthorized
from .runtime import current

logger = logging.getLogger("h33_bento.runners")

SMALL_BODY = 64 * 1024
DRAIN_CAP = 256 * 1024 * 1024
ENVELOPE_FIELD = "envelope"
BUNDLE_FIELD = "bundle"


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")
        self.limit = limit


def _classify(method: str, path: str) -> str | None:
    """Which protected route a request is for (None: public)."""
    path = path.rstrip("/") or "/"
    if path == "/infer":
        return "infer" if method == "POST" else "protected"
    if path == "/keys":
        return "keys_upload" if method == "POST" else "protected"
    if path.startswith("/keys/") or path == "/model" or path.startswith("/model/"):
        return "protected"
    return None


async def _drain(receive: Any, cap: int = DRAIN_CAP) -> None:
    """Read and discard the rest of a request body, so the early answer reaches the client."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _LimitedReceive:
    def __init__(self, receive: Any, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0

    async def __call__(self) -> Any:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise BodyTooLarge(self.limit)
        return message


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _form_file(scope: dict, body: bytes, field: str) -> bytes:
    """The bytes of one part of a multipart/form-data body that was already read."""

    async def no_more() -> Any:
        return {"type": "http.disconnect"}

    request = Request(scope, _replay(body, no_more))
    form = await request.form(max_files=4, max_fields=16)
    try:
        part = form.get(field)
        if isinstance(part, UploadFile):
            return await part.read()
        if isinstance(part, str):
            return part.encode("latin-1")
        raise HTTPError(422, "invalid_envelope", f"multipart body has no part named {field!r}")
    finally:
        await form.close()


class H33Gate:
    """ASGI middleware: authentication, body limits and /infer pre-validation (see module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        kind = _classify(scope.get("method", "GET"), scope.get("path", "/"))
        if kind is None:
            return await self.app(scope, receive, send)
        rt = current()
        if rt is None:
            await _drain(receive)
            return await error_response(503, "starting", "the model is still loading")(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        endpoint = "infer" if kind == "infer" else "keys" if kind == "keys_upload" else "other"
        try:
            tenant = rt.auth.authenticate(headers.get("authorization"))
            if tenant is None:
                await _drain(receive)
                raise unauthorized()
            scope["h33"] = {"tenant": tenant}
            limit = (rt.config.max_infer_bytes if kind == "infer"
                     else rt.config.max_key_bundle_bytes if kind == "keys_upload" else SMALL_BODY)
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _drain(receive, min(int(declared), DRAIN_CAP))
                raise too_large(limit, "the request body")
            if kind != "infer":
                return await self.app(scope, _LimitedReceive(receive, limit), send)
            try:
                body = await _read_body(receive, limit)
            except BodyTooLarge:
                await _drain(receive)
                raise too_large(limit, "the request body") from None
            except ConnectionError:
                return
            if headers.get("content-type", "").startswith("multipart/form-data"):
                body = await _form_file(scope, body, ENVELOPE_FIELD)
            item = await anyio.to_thread.run_sync(rt.prepare_infer, tenant, body, headers.get("x-h33-key-id"))
            del body
            scope["h33"]["item"] = item
            # the body has been consumed here; BentoML's endpoint reads the checked item from the scope
            return await self.app(scope, _replay(b"", receive), send)
        except HTTPError as err:
            rt.metrics.request(endpoint, err.status)
            return await err.response()(scope, receive, send)


# --------------------------------------------------------------------------- mounted routes
def _tenant(request: Request) -> str:
    return request.scope["h33"]["tenant"]


def _runtime():
    rt = current()
    if rt is None:
        raise HTTPError(503, "starting", "the model is still loading")
    return rt


def _handle(fn):
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as err:
            return err.response()
    endpoint.__name__ = fn.__name__
    return endpoint


@_handle
async def get_model(request: Request) -> Response:
    return JSONResponse(_runtime().model_info())


@_handle
async def get_health(request: Request) -> Response:
    rt = current()
    if rt is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse(rt.health())


@_handle
async def upload_keys(request: Request) -> Response:
    """POST /keys: the body is an evaluation-key bundle (octet-stream, or multipart part 'bundle')."""
    rt = _runtime()
    tenant = _tenant(request)
    try:
        with rt.keystore.incoming() as upload:
            write = upload.file.write
            try:
                if request.headers.get("content-type", "").startswith("multipart/form-data"):
                    form = await request.form(max_files=1, max_fields=4)
                    try:
                        part = form.get(BUNDLE_FIELD)
                        if not isinstance(part, UploadFile):
                            raise HTTPError(422, "invalid_bundle", f"multipart body has no file part {BUNDLE_FIELD!r}")
                        while chunk := await part.read(8 << 20):
                            await anyio.to_thread.run_sync(write, chunk)
                    finally:
                        await form.close()
                else:
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
            except BodyTooLarge as exc:
                await _drain(request.receive)
                raise too_large(exc.limit, "the key bundle") from None
            await anyio.to_thread.run_sync(upload.file.flush)
            record, created = await rt.register_keys(tenant, upload.path)
        rt.metrics.request("keys", 201 if created else 200)
        return JSONResponse({**record.public(), "created": created}, status_code=201 if created else 200)
    except HTTPError as err:
        rt.metrics.request("keys", err.status)
        raise


@_handle
async def list_keys(request: Request) -> Response:
    rt = _runtime()
    return JSONResponse({"keys": [r.public() for r in rt.keystore.for_tenant(_tenant(request))]})


@_handle
async def get_key(request: Request) -> Response:
    rt = _runtime()
    rec = rt.keystore.resolve(request.path_params["key_id"], _tenant(request))
    return JSONResponse(rec.public())


@_handle
async def delete_key(request: Request) -> Response:
    rt = _runtime()
    rec = await rt.delete_keys(_tenant(request), request.path_params["key_id"])
    return JSONResponse({**rec.public(), "deleted": True})


routes_app = Starlette(routes=[
    Route("/model", get_model, methods=["GET"]),
    Route("/health", get_health, methods=["GET"]),
    Route("/keys", upload_keys, methods=["POST"]),
    Route("/keys", list_keys, methods=["GET"]),
    Route("/keys/{key_id}", get_key, methods=["GET"]),
    Route("/keys/{key_id}", delete_key, methods=["DELETE"]),
])

__all__ = ["H33Gate", "routes_app", "BodyTooLarge"]
