"""Versioned wire formats: encrypted tensors, evaluation-key bundles and encrypted weights.

Layout of every frame (integers big-endian):

    magic (4 bytes) | version (u16) | header length (u32) | header (UTF-8 JSON) |
    blob 0 | blob 1 | ... | SHA-256 of everything before it (32 bytes)

The header lists the blob lengths, so truncation is detected before anything reaches OpenFHE,
and the trailing digest catches corrupted or edited bytes.  The digest is an integrity check,
not a signature: anyone can recompute it, so the server still treats every blob as untrusted.

Headers are untrusted too.  Each magic has a strict pydantic model of its header
(:class:`TensorHeader`, :class:`KeyBundleHeader`, :class:`WeightsHeader`): the header is at most
``MAX_HEADER_BYTES``, parsed by pydantic's JSON parser (nesting depth bounded, no
``NaN``/``Infinity``, no lone surrogates or invalid UTF-8, integers of bounded size) and validated
field by field (exact types, bounded integers and lengths, no unknown fields).  Every fault is an
``EnvelopeError``.

A key bundle (``H33K``) is gigabytes for a deep model, so it can also be written and read as a
stream: :class:`FrameWriter` appends blobs to a temporary file and frames them at the end,
:class:`FrameFile` validates a file (length, header, digest) and yields its blobs one at a time.
Its blobs are the public key, the relinearization key, then one or more rotation-key chunks; a
bundle with a single chunk is the layout of every earlier bundle, so the version stays 1 (a build
before chunking refuses a bundle of several chunks: "has N parts, expected 3").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Iterator, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

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
WEIGHTS_MAGIC = b"H33W"
_PREFIX = struct.Struct(">4sHI")
_DIGEST_LEN = 32
#: Upper bounds for header fields.  Generous for every real frame (a header is a few hundred bytes
#: to a few KB), small enough that no header can cost the parser more than a few milliseconds.
MAX_HEADER_BYTES = 256 * 1024
MAX_BLOBS = 4096
MAX_BLOB_BYTES = 1 << 40
MAX_SLOTS = 1 << 16  # ring dimension 2^17 at most (CKKSParams)
MAX_LEVEL = 1024
MAX_DIMS = 16
MAX_WEIGHT_BLOBS = 1 << 15  # diagonals and biases of a whole model (LeNet-5: about 5,000)

_Name = Annotated[StrictStr, Field(max_length=256)]
_Count = Annotated[StrictInt, Field(ge=0, le=MAX_SLOTS)]
_Extra = Union[Annotated[StrictStr, Field(max_length=1024)], StrictBool,
               Annotated[StrictInt, Field(ge=-(1 << 63), lt=1 << 63)], StrictFloat]


class FrameHeader(BaseModel):
    """What every frame header holds: the lengths of the blobs that follow it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
    blob_lengths: list[Annotated[StrictInt, Field(ge=0, le=MAX_BLOB_BYTES)]] = Field(max_length=MAX_BLOBS)


class TensorHeader(FrameHeader):
    """The header of an :class:`EncryptedTensor` frame."""

    model_fingerprint: _Name
    params_fingerprint: _Name
    key_id: _Name
    shape: list[Annotated[StrictInt, Field(ge=1, lt=1 << 31)]] = Field(max_length=MAX_DIMS)
    lanes_used: Annotated[StrictInt, Field(ge=1, le=MAX_SLOTS)]
    level: Annotated[StrictInt, Field(ge=0, le=MAX_LEVEL)]
    batched: StrictBool = False
    lane: _Count = 0
    extra: dict[Annotated[StrictStr, Field(max_length=64)], _Extra] = Field(default_factory=dict, max_length=64)


class KeyBundleHeader(FrameHeader):
    """The header of an evaluation-key bundle frame (``EvaluationKeys``)."""

    params_fingerprint: _Name
    key_id: _Name
    key_tag: _Name
    rotation_indices: list[Annotated[StrictInt, Field(ge=1, lt=MAX_SLOTS)]] = Field(max_length=MAX_SLOTS)


class WeightStep(BaseModel):
    """One linear step's share of an encrypted-weights frame: its diagonal blobs, then its bias blobs."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    name: _Name
    level: Annotated[StrictInt, Field(ge=0, le=MAX_LEVEL)]
    diagonals: Annotated[StrictInt, Field(ge=0, le=MAX_WEIGHT_BLOBS)]
    biases: Annotated[StrictInt, Field(ge=0, le=MAX_WEIGHT_BLOBS)]


class WeightsHeader(FrameHeader):
    """The header of an encrypted-weights frame (``runtime.weights.EncryptedWeights``)."""

    blob_lengths: list[Annotated[StrictInt, Field(ge=0, le=MAX_BLOB_BYTES)]] = Field(max_length=MAX_WEIGHT_BLOBS)
    model_fingerprint: _Name
    params_fingerprint: _Name
    key_id: _Name
    steps: list[WeightStep] = Field(max_length=MAX_WEIGHT_BLOBS)


HEADER_MODELS: dict[bytes, type[FrameHeader]] = {TENSOR_MAGIC: TensorHeader, KEYS_MAGIC: KeyBundleHeader,
                                                 WEIGHTS_MAGIC: WeightsHeader}


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
    if head_len > MAX_HEADER_BYTES:
        raise TamperedDataError(f"{what} header is {head_len} bytes, more than the {MAX_HEADER_BYTES} allowed")
    return _PREFIX.size + head_len


def _parse_header(head: bytes, magic: bytes, what: str) -> dict[str, Any]:
    """The validated header (see the module docstring) as a dict of plain, bounded values."""
    try:
        return HEADER_MODELS[magic].model_validate_json(head).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'header'}: {e['msg']}"
                             for e in exc.errors(include_url=False)[:3])
        raise TamperedDataError(f"{what} header is not valid: {problems}") from None


def _check_length(size: int, head_end: int, lengths: list[int], what: str) -> None:
    """A frame of ``size`` bytes must be exactly its header plus the blobs it lists plus the digest."""
    expected = head_end + sum(lengths) + _DIGEST_LEN
    if size < expected:
        raise TruncatedDataError(f"{what} is truncated: {size} of {expected} bytes")
    if size > expected:
        raise TamperedDataError(f"{what} has {size - expected} unexpected trailing bytes")


def unpack_frame(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], list[bytes]]:
    """Validate a frame and return (header, blobs), raising a specific EnvelopeError on any fault."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    head_end = _header_end(data, magic, what)
    if len(data) < head_end + _DIGEST_LEN:
        raise TruncatedDataError(f"{what} is truncated inside its header ({len(data)} bytes)")
    header = _parse_header(data[_PREFIX.size:head_end], magic, what)
    lengths = header["blob_lengths"]
    _check_length(len(data), head_end, lengths, what)
    if hashlib.sha256(data[:-_DIGEST_LEN]).digest() != data[-_DIGEST_LEN:]:
        raise TamperedDataError(f"{what} does not match its digest: the bytes were modified")
    blobs, offset = [], head_end
    for n in lengths:
        blobs.append(data[offset:offset + n])
        offset += n
    return header, blobs


_COPY_BYTES = 8 << 20  # what streaming a frame file holds in memory at once


class FrameFile:
    """A frame in a file, validated without reading it whole: the header is parsed, the length
    checked and the digest recomputed incrementally when it is opened.

    :meth:`blobs` reads the blobs one at a time and hashes the file again on the way, so bytes
    that changed since it was opened are reported (``TamperedDataError`` once the last blob is
    read) rather than silently used.
    """

    def __init__(self, path: str | os.PathLike, magic: bytes, what: str) -> None:
        self.path, self.what = Path(path), what
        #: what owns the file (a temporary directory), kept alive as long as this object
        self.owner: object = None
        # the file stays open while this object lives: a key store renaming the path into place, or
        # a validator removing its scratch copy, leaves the blobs readable
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        with self.open() as fh:
            prefix = fh.read(_PREFIX.size)
            head_end = _header_end(prefix, magic, what)
            size = os.fstat(fh.fileno()).st_size
            if size < head_end + _DIGEST_LEN:
                raise TruncatedDataError(f"{what} is truncated inside its header ({size} bytes)")
            self.header = _parse_header(fh.read(head_end - _PREFIX.size), magic, what)
            self.lengths: list[int] = self.header["blob_lengths"]
            _check_length(size, head_end, self.lengths, what)
            self._head_end = head_end
            fh.seek(0)
            digest = _hash_stream(fh, size - _DIGEST_LEN)
            if digest.digest() != fh.read(_DIGEST_LEN):
                raise TamperedDataError(f"{what} does not match its digest: the bytes were modified")
        #: the SHA-256 the frame ends with (what a sandbox remembers frames it passed by)
        self.digest: bytes = digest.digest()

    def open(self) -> IO[bytes]:
        """The frame file, opened again with its own offset (Linux: through ``/proc``, so a path
        renamed or removed since this object was made still reads)."""
        return open(f"/proc/self/fd/{self._fd}", "rb")

    def stored_at(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is this frame's file (the same inode), wherever it was opened from."""
        try:
            st, mine = os.stat(path), os.fstat(self._fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def blobs(self) -> Iterator[bytes]:
        """Every blob in order, one in memory at a time (the caller keeps what it needs)."""
        with self.open() as fh:
            digest = _hash_stream(fh, self._head_end)
            for n in self.lengths:
                blob = _read_exact_stream(fh, n, self.what)
                digest.update(blob)
                yield blob
                del blob
            if digest.digest() != fh.read(_DIGEST_LEN):
                raise TamperedDataError(f"{self.what} was modified since it was opened")

    def blob_files(self, first: int = 0) -> Iterator[Path]:
        """The blobs from index ``first`` on, each copied (a bounded block at a time) to a temporary
        file that lives until the next one is asked for: what OpenFHE's file deserializers read,
        which hold only the object they build, where a string holds the bytes twice more.  The
        digest is checked as :meth:`blobs` does."""
        with self.open() as fh, tempfile.TemporaryDirectory(prefix="h33-blob-") as tmp:
            digest = _hash_stream(fh, self._head_end)
            path = Path(tmp) / "blob"
            for i, n in enumerate(self.lengths):
                if i < first:
                    digest.update(_read_exact_stream(fh, n, self.what))
                    continue
                with open(path, "wb") as out:
                    left = n
                    while left:
                        block = _read_exact_stream(fh, min(left, _COPY_BYTES), self.what)
                        digest.update(block)
                        out.write(block)
                        left -= len(block)
                yield path
                path.unlink(missing_ok=True)
            if digest.digest() != fh.read(_DIGEST_LEN):
                raise TamperedDataError(f"{self.what} was modified since it was opened")


def frame_digest(path: str | os.PathLike) -> bytes:
    """The SHA-256 a framed file ends with (which unpacking it checks against its contents)."""
    with open(path, "rb") as fh:
        fh.seek(-_DIGEST_LEN, os.SEEK_END)
        return fh.read(_DIGEST_LEN)


def _read_exact_stream(fh: IO[bytes], n: int, what: str) -> bytes:
    block = fh.read(n)
    if len(block) != n:
        raise TruncatedDataError(f"{what} was truncated since it was opened")
    return block


def _hash_stream(fh: IO[bytes], n: int) -> "hashlib._Hash":
    """SHA-256 of the next ``n`` bytes of ``fh``, read a bounded block at a time."""
    digest = hashlib.sha256()
    while n > 0:
        block = fh.read(min(n, _COPY_BYTES))
        if not block:
            raise TruncatedDataError("the file ended early")
        digest.update(block)
        n -= len(block)
    return digest


class FrameWriter:
    """Writes a frame to ``path`` blob by blob, never holding it in memory.

    The blob lengths (which the header lists) are known only at the end, so the blobs go to a
    temporary file next to ``path``; :meth:`commit` writes prefix, header, blobs and digest to a
    second temporary file, hashing on the way, and renames it over ``path`` (readers never see a
    partial frame).  Use it as a context manager: leaving without :meth:`commit` removes both.
    """

    def __init__(self, path: str | os.PathLike, magic: bytes) -> None:
        self.path, self.magic = Path(path), magic
        self.lengths: list[int] = []
        fd, body = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".blobs", dir=self.path.parent)
        self._body_path = Path(body)
        self._body = os.fdopen(fd, "w+b")

    def add(self, blob: bytes) -> None:
        self._body.write(blob)
        self.lengths.append(len(blob))

    def add_file(self, path: str | os.PathLike) -> None:
        """Append a file's contents as one blob (copied a bounded block at a time)."""
        with open(path, "rb") as src:
            n = os.fstat(src.fileno()).st_size
            shutil.copyfileobj(src, self._body, _COPY_BYTES)
        self.lengths.append(n)

    def commit(self, header: dict[str, Any]) -> Path:
        head = json.dumps(dict(header, blob_lengths=self.lengths), sort_keys=True, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                start = _PREFIX.pack(self.magic, WIRE_VERSION, len(head)) + head
                digest = hashlib.sha256(start)
                out.write(start)
                self._body.flush()
                self._body.seek(0)
                while block := self._body.read(_COPY_BYTES):
                    digest.update(block)
                    out.write(block)
                out.write(digest.digest())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

    def close(self) -> None:
        self._body.close()
        self._body_path.unlink(missing_ok=True)

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        return cls(
            model_fingerprint=header["model_fingerprint"],
            params_fingerprint=header["params_fingerprint"],
            key_id=header["key_id"],
            shape=tuple(header["shape"]),
            lanes_used=header["lanes_used"],
            level=header["level"],
            ciphertexts=blobs,
            batched=header["batched"],
            lane=header["lane"],
            extra=header["extra"],
        )

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
