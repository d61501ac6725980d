"""Property-based tests of the wire-format parsers: whatever the bytes, a valid object or an EnvelopeError.

The parsers (``unpack_frame``, ``EncryptedTensor.from_bytes``, ``EvaluationKeys.from_bytes``)
face untrusted bytes on the server.  Hypothesis feeds them arbitrary bytes and mutated valid
frames -- bit flips, truncations, and header edits re-framed with a recomputed digest (anyone
can compute it) so that they reach the header parser: huge numbers, ``Infinity``/``NaN``/``1e999``,
deep nesting, wrong types, lone surrogates, bytes that are not UTF-8, missing and unknown fields.
Any exception other than an ``EnvelopeError`` would be a 500 (or worse) on the server.  Blobs
are random bytes: nothing here reaches OpenFHE.
"""
from __future__ import annotations

import hashlib
import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h33_bento.ckks.keys import EvaluationKeys, key_id_for
from h33_bento.ckks.serialization import (
    KEYS_MAGIC,
    MAX_LEVEL,
    MAX_SLOTS,
    TENSOR_MAGIC,
    EncryptedTensor,
    unpack_frame,
)
from h33_bento.errors import EnvelopeError

PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIX = struct.Struct(">4sHI")

hexes = st.text("0123456789abcdef", min_size=1, max_size=64)
blobs = st.lists(st.binary(max_size=64), min_size=1, max_size=4)
tensors = st.builds(
    EncryptedTensor,
    model_fingerprint=hexes, params_fingerprint=hexes, key_id=hexes,
    shape=st.lists(st.integers(1, 64), max_size=4).map(tuple),
    lanes_used=st.integers(1, 8), level=st.integers(0, 30), ciphertexts=blobs, batched=st.booleans(),
    lane=st.integers(0, 7),
    extra=st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers(-10, 10), st.booleans()),
                          max_size=3),
)
bundles = st.builds(
    lambda tag, fp, rot, pk, mk, rk: EvaluationKeys(fp, key_id_for(tag), tag, tuple(rot), pk, mk, rk),
    st.text(max_size=32), hexes, st.lists(st.integers(1, 4095), max_size=8),
    st.binary(max_size=64), st.binary(max_size=64), st.lists(st.binary(min_size=1, max_size=64), max_size=3).map(tuple),
)

# raw JSON text put where a header value was: numbers out of any range, non-numbers, nesting,
# wrong types, lone surrogates, and bytes that are not UTF-8
hostile_scalars = st.one_of(
    st.sampled_from([b"Infinity", b"-Infinity", b"NaN", b"1e999", b"-1e999", b"1.5", b"true", b"null", b'"7"',
                     b"[]", b"{}", b'"\\ud800"', b'"\\udfff x"', b'"\xff\xfe"', b'"\xc3"', b"\xed\xa0\x80",
                     b'{"a":{"b":[1,2,{"c":null}]}}']),
    st.integers(1, 5000).map(lambda n: b"9" * n),
    st.integers(1, 5000).map(lambda n: b"-" + b"9" * n),
    st.integers(-(1 << 70), 1 << 70).map(lambda n: str(n).encode()),
    st.integers(1, 20_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 20_000).map(lambda d: b'{"x":' * d + b"1" + b"}" * d),
    st.binary(max_size=32).map(lambda b: json.dumps(b.decode("latin-1")).encode()),
    st.lists(st.one_of(st.integers(-(1 << 65), 1 << 65), st.just(1e308)), max_size=5).map(lambda v: json.dumps(v).encode()),
)
hostile_values = st.one_of(hostile_scalars, hostile_scalars.map(lambda v: b"[1," + v + b"]"))  # also inside lists


def _frame(magic: bytes, head: bytes, blob_bytes: bytes) -> bytes:
    body = PREFIX.pack(magic, 1, len(head)) + head + blob_bytes
    return body + hashlib.sha256(body).digest()


def _split(frame: bytes) -> tuple[bytes, dict, bytes]:
    magic, _, head_len = PREFIX.unpack_from(frame)
    head = frame[PREFIX.size:PREFIX.size + head_len]
    return magic, json.loads(head), frame[PREFIX.size + head_len:-32]


@st.composite
def mutated_header(draw, valid: st.SearchStrategy) -> bytes:
    """A valid frame whose JSON header was edited, re-framed with a correct digest."""
    magic, header, blob_bytes = _split(draw(valid).to_bytes())
    field = draw(st.sampled_from(sorted(header) + ["unknown_field"]))
    action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "whole"]))
    if action == "drop":
        header.pop(field, None)
        head = json.dumps(header).encode()
    elif action == "whole":
        head = draw(st.one_of(hostile_values, st.binary(max_size=256)))
    else:
        header[field] = "\0MUTATION\0"
        head = json.dumps(header).encode().replace(b'"\\u0000MUTATION\\u0000"', draw(hostile_values))
    return _frame(magic, head, blob_bytes)


@st.composite
def damaged(draw, valid: st.SearchStrategy) -> bytes:
    """A valid frame with bit flips, a truncation, or a header length that lies (digest recomputed)."""
    data = bytearray(draw(valid).to_bytes())
    how = draw(st.sampled_from(["flip", "truncate", "length", "length"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    struct.pack_into(">I", data, 6, draw(st.integers(0, (1 << 32) - 1)))
    return bytes(data[:-32]) + hashlib.sha256(bytes(data[:-32])).digest()


def _tensor_or_envelope_error(data: bytes) -> None:
    try:
        env = EncryptedTensor.from_bytes(data)
    except EnvelopeError:
        return
    assert all(isinstance(v, str) for v in (env.model_fingerprint, env.params_fingerprint, env.key_id))
    assert all(type(d) is int and d >= 1 for d in env.shape)
    assert type(env.lanes_used) is int and 1 <= env.lanes_used <= MAX_SLOTS
    assert type(env.level) is int and 0 <= env.level <= MAX_LEVEL and type(env.lane) is int
    assert isinstance(env.batched, bool) and isinstance(env.extra, dict)
    assert all(isinstance(b, bytes) for b in env.ciphertexts)
    assert EncryptedTensor.from_bytes(env.to_bytes()) == env


def _bundle_or_envelope_error(data: bytes) -> None:
    try:
        keys = EvaluationKeys.from_bytes(data)
    except EnvelopeError:
        return
    assert isinstance(keys.key_tag, str) and keys.key_id == key_id_for(keys.key_tag)
    assert all(type(r) is int and 0 < r < MAX_SLOTS for r in keys.rotation_indices)
    assert all(isinstance(b, bytes) and b for b in keys.rotation_keys)
    assert all(isinstance(b, bytes) for b in (keys.public_key, keys.mult_key))


@PROPERTIES
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=64).map(lambda b: TENSOR_MAGIC + b"\0\1" + b),
                 st.binary(max_size=64).map(lambda b: KEYS_MAGIC + b"\0\1" + b)))
def test_arbitrary_bytes_parse_or_raise_an_envelope_error(data):
    _tensor_or_envelope_error(data)
    _bundle_or_envelope_error(data)
    for magic in (TENSOR_MAGIC, KEYS_MAGIC):
        try:
            unpack_frame(data, magic, "frame")
        except EnvelopeError:
            pass


@PROPERTIES
@given(st.one_of(mutated_header(tensors), damaged(tensors)))
def test_mutated_encrypted_tensors_parse_or_raise_an_envelope_error(data):
    _tensor_or_envelope_error(data)


@PROPERTIES
@given(st.one_of(mutated_header(bundles), damaged(bundles)))
def test_mutated_key_bundles_parse_or_raise_an_envelope_error(data):
    _bundle_or_envelope_error(data)


@PROPERTIES
@given(tensors, bundles)
def test_valid_frames_round_trip(env, keys):
    assert EncryptedTensor.from_bytes(env.to_bytes()) == env
    assert EvaluationKeys.from_bytes(keys.to_bytes()) == keys
