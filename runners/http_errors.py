"""HTTP errors of the service: one JSON shape, ``{"error": {"code", "message", "request_id"}}``.

``code`` is stable and machine-readable; the remote client maps it back to the library's
exception classes (``tampered`` -> TamperedDataError, ...).  ``request_id`` is the id the gate
gave the request (also in the ``X-Request-Id`` header and in the server's log lines about it).

Messages sent to clients never carry server file paths or C++ source locations: an
``HTTPError`` built from an exception (OpenFHE's messages start with its build path and source
line) keeps the full text as ``detail`` for the server log and sends the scrubbed ``message``.
"""
from __future__ import annotations

import contextvars
import logging
import re

from starlette.responses import JSONResponse

from ..errors import (
    EnvelopeError,
    KeyMismatchError,
    ModelMismatchError,
    ParamsMismatchError,
    TamperedDataError,
    TruncatedDataError,
    UnsupportedVersionError,
)

logger = logging.getLogger("h33_bento.runners")

#: The id of the request being handled (set by the gate for the whole request task).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("h33_request_id", default="")

# OpenFHE: "/root/.../base-leveledshe.cpp:l.392:EvalAutomorphism(): EvalKey ... [called from: ...cpp:EvalAtIndex():l.492]"
_CALLED_FROM = re.compile(r"\s*\[called from:[^\]]*\]")
_SOURCE_LOCATION = re.compile(r"(?:[\w.+-]*/)*[\w.+-]+\.(?:cpp|cc|cxx|hpp|hh|h|c|py)\b(?::[\w.~()<>]*)*:?\s*")
_SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]+")


def scrub(message: str) -> str:
    """``message`` without source locations and absolute server paths (they stay in the server log)."""
    text = _SOURCE_LOCATION.sub("", _CALLED_FROM.sub("", message))
    return " ".join(_SERVER_PATH.sub("<path>", text).split())


class HTTPError(Exception):
    """An error with an HTTP status and a stable code.

    ``close`` asks the server to close the connection after the answer: set on answers given
    before the request body was read, so the unread body is never parsed as a next request.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = message
        self.message = scrub(message)
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer, tagged with the current request's id."""
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id.get()}},
                        status_code=status, headers=headers)


def log_error(err: HTTPError) -> None:
    """One log line per error answer, with the request id and the unscrubbed detail."""
    level = logging.ERROR if err.status >= 500 else logging.INFO
    logger.log(level, "request %s: %d %s: %s", request_id.get(), err.status, err.code, err.detail)


def internal_error() -> HTTPError:
    return HTTPError(500, "internal_error", "the server failed to handle the request (its log has the details "
                                            "under the request id)", close=True)


def unauthorized(message: str = "missing or invalid API key (send 'Authorization: Bearer h33_pk_...')") -> HTTPError:
    return HTTPError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="h33"'}, close=True)


def too_large(limit: int, what: str) -> HTTPError:
    return HTTPError(413, "too_large", f"{what} exceeds the server limit of {limit} bytes", close=True)


def body_timeout(seconds: float) -> HTTPError:
    return HTTPError(408, "body_timeout", f"the request body did not arrive within {seconds:.0f} s", close=True)


def validator_unavailable(message: str) -> HTTPError:
    """503: no sandbox process could vet the request's bytes in time (a server condition; retry)."""
    return HTTPError(503, "validator_unavailable", message, {"Retry-After": "1"})


def busy(scope: str) -> HTTPError:
    return HTTPError(429, "too_many_requests", f"too many requests in flight for {scope}; retry shortly",
                     {"Retry-After": "1"}, close=True)


def unknown_key(key_id: str) -> HTTPError:
    return HTTPError(404, "unknown_key", f"no evaluation keys with key_id {key_id!r} are registered; "
                                         "upload them to POST /keys first")


def weights_missing(key_id: str) -> HTTPError:
    """409: the model runs with encrypted weights and none were provisioned for this key yet."""
    return HTTPError(409, "weights_missing", f"this model runs with encrypted weights and none were provisioned "
                                             f"for key_id {key_id!r}; its model owner uploads them to "
                                             f"POST /keys/{key_id}/weights (h33 provision)")


def foreign_key(key_id: str) -> HTTPError:
    return HTTPError(403, "forbidden_key", f"key_id {key_id!r} belongs to another tenant")


def from_envelope_error(exc: EnvelopeError, *, bundle: bool = False) -> HTTPError:
    """Status and code for an envelope / key-bundle fault.

    A ciphertext made for another model or parameter set conflicts with the served model (409);
    a key bundle for other parameters, and any corrupted, truncated or malformed bytes, are
    unprocessable (422).
    """
    msg = str(exc)
    if isinstance(exc, ModelMismatchError):
        return HTTPError(409, "model_mismatch", msg)
    if isinstance(exc, ParamsMismatchError):
        return HTTPError(422 if bundle else 409, "params_mismatch", msg)
    if isinstance(exc, KeyMismatchError):
        return HTTPError(422, "key_mismatch", msg)
    if isinstance(exc, TruncatedDataError):
        return HTTPError(422, "truncated", msg)
    if isinstance(exc, TamperedDataError):
        return HTTPError(422, "tampered", msg)
    if isinstance(exc, UnsupportedVersionError):
        return HTTPError(422, "unsupported_version", msg)
    return HTTPError(422, "invalid_envelope" if not bundle else "invalid_bundle", msg)
