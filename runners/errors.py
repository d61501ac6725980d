"""HTTP errors of the service: one JSON shape, ``{"error": {"code": ..., "message": ...}}``.

``code`` is stable and machine-readable; the remote client maps it back to the library's
exception classes (``tampered`` -> TamperedDataError, ...).
"""
from __future__ import annotations

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


class HTTPError(Exception):
    """An error with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def unauthorized(message: str = "missing or invalid API key (send 'Authorization: Bearer h33_pk_...')") -> HTTPError:
    return HTTPError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="h33"'})


def too_large(limit: int, what: str) -> HTTPError:
    return HTTPError(413, "too_large", f"{what} exceeds the server limit of {limit} bytes")


def unknown_key(key_id: str) -> HTTPError:
    return HTTPError(404, "unknown_key", f"no evaluation keys with key_id {key_id!r} are registered; "
                                         "upload them to POST /keys first")


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
