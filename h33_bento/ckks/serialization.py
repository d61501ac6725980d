"""Versioned wire formats: encrypted tensors and evaluation-key bundles.

Layout of every frame (integers big-endian):

    magic (4 bytes) | version (u16) | header length (u32) | header (UTF-8 JSON) |
    blob 0 | blob 1 | ... | SHA-256 of everything before it (32 bytes)

The header lists the blob lengths, so truncation is detected before anything reaches OpenFHE,
and the trailing digest catches corrupted or edited bytes.  The digest is an integrity check,
not a signature: anyone can recompute it, so the server still treats every blob as untrusted.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    EnvelopeError,
    KeyMismatchError,
    ModelMismatchError,
    ParamsMismatchError,
    TamperedDataError,
    TruncatedDataError,
    UnsupportedVersionError,
)

WIRE_VERSION = 1
TENSOR_MAGIC = b"H33T"
KEYS_MAGIC = b"H33K"
_PREFIX = struct.Struct(">4sHI")
_DIGEST_LEN = 32


def pack_frame(magic: bytes, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    """Frame ``blobs`` behind a JSON header; the blob lengths are recorded in the header."""
    header = dict(header, blob_lengths=[len(b) for b in blobs])
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join([_PREFIX.pack(magic, WIRE_VERSION, len(head)), head, *blobs])
    return body + hashlib.sha256(body).digest()


def _header_end(prefix: bytes, magic: bytes, what: str) -> int:
    """Check a frame's prefix (magic, version); returns the offset where its JSON header ends."""
    if len(prefix) < _PREFIX.size:
        raise TruncatedDataError(f"{what} is truncated: {len(prefix)} bytes is shorter than the frame prefix")
    got_magic, version, head_len = _PREFIX.unpack_from(prefix)
    if got_magic != magic:
        raise EnvelopeError(f"not an h33 {what}: magic {got_magic!r}, expected {magic!r}")
    if version != WIRE_VERSION:
        raise UnsupportedVersionError(
            f"{what} uses wire format version {version}; this build reads version {WIRE_VERSION}"
        )
    return _PREFIX.size + head_len


def _parse_header(head: bytes, what: str) -> tuple[dict[str, Any], list[int]]:
    try:
        header = json.loads(head)
        lengths = [int(n) for n in header["blob_lengths"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise TamperedDataError(f"{what} header is not valid: {exc}") from exc
    return header, lengths


def unpack_frame(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], list[bytes]]:
    """Validate a frame and return (header, blobs), raising a specific EnvelopeError on any fault."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    head_end = _header_end(data, magic, what)
    if len(data) < head_end + _DIGEST_LEN:
        raise TruncatedDataError(f"{what} is truncated inside its header ({len(data)} bytes)")
    header, lengths = _parse_header(data[_PREFIX.size:head_end], what)
    expected = head_end + sum(lengths) + _DIGEST_LEN
    if len(data) < expected:
        raise TruncatedDataError(f"{what} is truncated: {len(data)} of {expected} bytes")
    if len(data) > expected:
        raise TamperedDataError(f"{what} has {len(data) - expected} unexpected trailing bytes")
    if hashlib.sha256(data[:-_DIGEST_LEN]).digest() != data[-_DIGEST_LEN:]:
        raise TamperedDataError(f"{what} does not match its digest: the bytes were modified")
    blobs, offset = [], head_end
    for n in lengths:
        blobs.append(data[offset:offset + n])
        offset += n
    return header, blobs


@dataclass
class EncryptedTensor:
    """Ciphertexts of one tensor (one per slot block) plus the metadata that binds them.

    ``lanes_used`` inputs are interleaved in the lanes of each ciphertext; ``lane`` is set on
    answers to lane-packed requests and says which lane holds the requester's result.
    """

    model_fingerprint: str
    params_fingerprint: str
    key_id: str
    shape: tuple[int, ...]
    lanes_used: int
    level: int
    ciphertexts: list[bytes]
    batched: bool = False
    lane: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        header = {
            "model_fingerprint": self.model_fingerprint,
            "params_fingerprint": self.params_fingerprint,
            "key_id": self.key_id,
            "shape": list(self.shape),
            "lanes_used": self.lanes_used,
            "level": self.level,
            "batched": self.batched,
            "lane": self.lane,
            "extra": self.extra,
        }
        return pack_frame(TENSOR_MAGIC, header, self.ciphertexts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedTensor":
        header, blobs = unpack_frame(data, TENSOR_MAGIC, "encrypted tensor")
        try:
            return cls(
                model_fingerprint=str(header["model_fingerprint"]),
                params_fingerprint=str(header["params_fingerprint"]),
                key_id=str(header["key_id"]),
                shape=tuple(int(s) for s in header["shape"]),
                lanes_used=int(header["lanes_used"]),
                level=int(header["level"]),
                ciphertexts=blobs,
                batched=bool(header.get("batched", False)),
                lane=int(header.get("lane", 0)),
                extra=dict(header.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TamperedDataError(f"encrypted tensor header is missing or has a bad field: {exc}") from exc

    def check(self, model_fingerprint: str, params_fingerprint: str, key_ids: set[str] | None = None) -> None:
        """Raise the specific mismatch error if this envelope is not for this model/params/key."""
        if self.params_fingerprint != params_fingerprint:
            raise ParamsMismatchError(
                f"envelope was made for CKKS params {self.params_fingerprint}, this model uses {params_fingerprint}"
            )
        if self.model_fingerprint != model_fingerprint:
            raise ModelMismatchError(
                f"envelope was made for model {self.model_fingerprint}, this is model {model_fingerprint}"
            )
        if key_ids is not None and self.key_id not in key_ids:
            raise KeyMismatchError(f"envelope is encrypted under key {self.key_id}, which is not loaded here")
