"""Untrusted OpenFHE bytes are deserialized first in child processes, never in a serving process.

Why: OpenFHE's deserializer trusts its input.  One flipped bit in a ciphertext, framed again with a
recomputed SHA-256 (anyone can compute it), made it raise SIGFPE and took down the worker with
every tenant's requests in it; a sweep of single-bit flips over a ciphertext's header killed the
process in 6% of the cases (SIGFPE, SIGABRT, SIGSEGV), and flipped public keys did the same.

So a :class:`Sandbox` child deserializes the bytes, checks them against the served parameters and
decides whether they are *canonical*: exactly what OpenFHE serializes for a well-formed object of
those parameters.  The serving process then only ever deserializes bytes that OpenFHE serialized
from a validated object.  A crash (the signal is logged), a timeout or any error in the child
refuses that one request with :class:`~h33_bento.errors.TamperedDataError`; the child is replaced
and the other requests never notice.

* Ciphertexts (:meth:`Sandbox.canonical_ciphertexts`) go to a pool of persistent children, each
  holding the served context.  A blob passes when its key tag, ring dimension, level, scale degree
  and slot count are those of a fresh input and ``Serialize(EvalAdd(zero, Deserialize(blob)))``
  equals the blob byte for byte, where ``zero`` is the trivial encryption of 0 made by the served
  context: the sum takes every parameter and field from ``zero`` and only the coefficients from
  the blob (which EvalAdd refuses if it belongs to another context), so equality means the blob
  carries this context, reduced coefficients, and no trailing or re-encoded bytes.  An honest
  client's ciphertext passes unchanged, so the child does not send it back.
* Encrypted weights (:meth:`Sandbox.canonical_weights`) are ciphertexts too, checked the same way
  at the level each one sits at (its step's, a bias one below), against ``zero`` level-reduced to
  it; they go in groups of at most ``WEIGHT_BATCH`` blobs, so one call stays within the child's
  memory and time limits whatever the model's size.
* Key bundles (:meth:`Sandbox.canonical_bundle`) are checked by a fresh child per bundle (OpenFHE's
  key maps cannot drop one key, so no child accumulates keys): the public key, relinearization key
  and rotation keys must carry the bundle's tag and no other; the rotation keys must be exactly
  those the served program needs (lane shifts included); re-serialized, each must have the
  *shape* of honest keys for the served parameters; and the re-serialized keys, loaded again as
  the serving process will load them, must encrypt, multiply (relinearize) and rotate by every
  needed index (the relinearization key must also serialize back to itself).  The child writes
  the re-serialized bundle to a file the caller names (bundles reach gigabytes: they go through
  files, not pipes), one rotation-key chunk at a time: each uploaded chunk is deserialized alone,
  re-serialized and dropped, so the child holds OpenFHE's one copy of the keys (for the
  rehearsal) plus one chunk, never the bundle's bytes.  The shape is
  learnt once per sandbox (:meth:`Sandbox.learn_key_shapes`): a child generates two key sets for
  the served parameters and keeps the 8-byte words on which they agree (their tags blanked), less
  one word at each end of every run, since random coefficients next to a field can agree by
  chance; that is every length, count, ring dimension, modulus and index in the encoding.  A
  bundle's re-serialized keys must have the same length and those same words.
* A bootstrapped program's bundle also holds the bootstrapping keys: rotation keys at the
  automorphisms OpenFHE's bootstrap uses, of several sizes (gigabytes at N=2^16).  The reference
  generates them once more, through a file, for their exact index set and length only; the
  rehearsal then bootstraps once at every slot count, which switches with every one of them.

Running this module (``python -m h33_bento.ckks.sandbox MODE MEMORY_BYTES``) is a child.  The
protocol on its stdin/stdout: a frame is an 8-byte big-endian length, a JSON header listing the
lengths of the blobs that follow, then the blobs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

from ..errors import (
    EnvelopeError,
    H33Error,
    KeyMismatchError,
    ParamsMismatchError,
    SandboxUnavailableError,
    TamperedDataError,
    TruncatedDataError,
    UnsupportedVersionError,
)
import numpy as np
import openfhe

from .context import (bootstrap_context, get_context, peak_rss_bytes, release_evaluation_keys,
                      release_rotation_keys, rss_bytes)
from .canonical import CiphertextChecker
from .keys import EvaluationKeys
from .serialization import KEYS_MAGIC, FrameWriter, frame_digest
from .params import CKKSParams

logger = logging.getLogger("h33_bento.sandbox")

_LEN = struct.Struct(">Q")
#: errors a child may report (anything else it raises is reported as TamperedDataError)
_ERRORS: dict[str, type[EnvelopeError]] = {cls.__name__: cls for cls in (
    EnvelopeError, TamperedDataError, TruncatedDataError, KeyMismatchError, ParamsMismatchError,
    UnsupportedVersionError)}
GiB = 1 << 30
#: weight ciphertexts checked per child call (about 1 MB each at N=2^14)
WEIGHT_BATCH = 64
#: what one more rotation-key chunk may add to the keys' encoding: a copy of the parameter objects
#: (measured: 520 bytes at N=2^12 with 5 moduli, 2,328 for a bootstrapped context's several levels)
CHUNK_PARAMS_BYTES = 64 << 10


# --------------------------------------------------------------------------------------- protocol
def _send(fh: IO[bytes], header: dict[str, Any], blobs: Sequence[bytes] = ()) -> None:
    head = json.dumps({**header, "lengths": [len(b) for b in blobs]}).encode()
    fh.write(_LEN.pack(len(head)))
    fh.write(head)
    for blob in blobs:
        fh.write(blob)
    fh.flush()


def _read_exact(fh: IO[bytes], n: int) -> bytes:
    data = fh.read(n)
    if data is None or len(data) != n:
        raise EOFError("the other end closed the pipe")
    return data


def _recv(fh: IO[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = _LEN.unpack(_read_exact(fh, _LEN.size))
    header = json.loads(_read_exact(fh, n))
    return header, [_read_exact(fh, k) for k in header.pop("lengths")]


# --------------------------------------------------------------------------------------- parent side
class _ChildFailed(Exception):
    """The child died, timed out or broke the protocol; ``reason`` says which (signal name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Child:
    """One child process; ``call`` sends a request and waits for its answer within a deadline.

    ``memory_bytes`` is the child's address-space limit (0: none, for children that read no
    untrusted bytes).
    """

    def __init__(self, mode: str, params: CKKSParams, memory_bytes: int, timeout_s: float) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the same h33_bento as this process
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, mode, str(memory_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.pid = self.proc.pid
        self._timed_out = False
        try:
            self.call({"params": params.model_dump(mode="json")}, (), timeout_s)  # answers once the context is built
        except _ChildFailed:
            self.close()
            raise

    def call(self, header: dict[str, Any], blobs: Sequence[bytes], timeout_s: float
             ) -> tuple[dict[str, Any], list[bytes]]:
        timer = threading.Timer(timeout_s, self._expire)
        timer.daemon = True
        timer.start()
        try:
            _send(self.proc.stdin, header, blobs)  # type: ignore[arg-type]
            return _recv(self.proc.stdout)  # type: ignore[arg-type]
        except (OSError, EOFError, ValueError, struct.error):
            raise _ChildFailed(self._death()) from None
        finally:
            timer.cancel()

    def _expire(self) -> None:
        self._timed_out = True
        self.proc.kill()

    def _death(self) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "stopped answering"
        if self._timed_out:
            return "timed out"
        if rc < 0:
            try:
                return signal.Signals(-rc).name
            except ValueError:
                return f"signal {-rc}"
        return f"exit status {rc}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for fh in (self.proc.stdin, self.proc.stdout):
            try:
                fh.close()  # type: ignore[union-attr]
            except OSError:
                pass


def _raise_reply(reply: dict[str, Any]) -> None:
    if not reply.get("ok"):
        raise _ERRORS.get(reply.get("error", ""), TamperedDataError)(reply.get("message", "refused"))


class Sandbox:
    """Validates untrusted ciphertexts and key bundles for ``params`` in child processes.

    ``processes`` persistent children serve :meth:`canonical_ciphertexts` (two by default: when one
    crashes on a malicious blob the other serves while a replacement starts, which takes about a
    second).  Thread-safe: each call checks out one child.  ``timeout_s`` bounds one ciphertext
    check and ``bundle_timeout_s`` one bundle; ``memory_bytes`` is each ciphertext child's
    address-space limit (a bundle child gets that plus eight times the bundle's size), so a blob
    announcing a huge allocation fails in the child instead of swapping the machine.  Bundles that
    need a scratch copy (:meth:`load_bundle`) and get no file for it are written under
    ``scratch_dir`` (default: the system's temporary directory).
    """

    def __init__(self, params: CKKSParams, processes: int = 2, timeout_s: float = 30.0,
                 bundle_timeout_s: float = 900.0, memory_bytes: int = 4 * GiB,
                 scratch_dir: str | os.PathLike | None = None) -> None:
        if processes < 1:
            raise ValueError("a sandbox needs at least one process")
        self.params = params
        self.processes = processes
        self.timeout_s = timeout_s
        self.bundle_timeout_s = bundle_timeout_s
        self.memory_bytes = memory_bytes
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        #: children that died on a request (crash, timeout, memory) since start
        self.crashes = 0
        self._count = threading.Lock()
        self._idle: queue.Queue[_Child] = queue.Queue()
        self._closed = False
        self._bundles = threading.Lock()  # one bundle child at a time: each may need gigabytes
        self._shapes: tuple[dict[str, Any], list[bytes]] | None = None
        self._canonical: set[bytes] = set()  # frame digests of bundles (and weights) a child wrote or confirmed
        #: the last bundle child's resident memory (bytes) before it read the bundle and at its peak:
        #: about OpenFHE's copy of the keys plus one rotation-key chunk, never the bundle twice
        self.bundle_memory: dict[str, int] = {}
        for _ in range(processes):
            self._replace()

    # ------------------------------------------------------------------ ciphertexts
    def canonical_ciphertexts(self, blobs: Sequence[bytes], key_tag: str, level: int = 0) -> list[bytes]:
        """The blobs, once a child has found each one a canonical ciphertext under ``key_tag`` at
        ``level`` with scale degree 1 (a fresh input: level 0).

        Raises ``KeyMismatchError`` (another key) or ``TamperedDataError`` (anything else, the
        child's crash included); ``SandboxUnavailableError`` if no child could be started.
        """
        child = self._checkout()
        try:
            reply, _ = child.call({"key_tag": key_tag, "level": level}, blobs, self.timeout_s)
        except _ChildFailed as exc:
            self._lost(child, exc.reason, "a ciphertext")
            raise TamperedDataError(f"the ciphertext made its validator fail ({exc.reason}); it was refused") from None
        if reply.get("retire") or self._closed:  # the child grew too large: replace it after this answer
            self._lost(child, "", "")
        else:
            self._idle.put(child)
        _raise_reply(reply)
        return list(blobs)

    def canonical_weights(self, digest: bytes, ciphertexts: Iterable[tuple[int, bytes]], key_tag: str) -> None:
        """Check encrypted-weight ciphertexts, given as a stream of (level, blob), each at its level,
        unless a child of this sandbox already passed the frame whose SHA-256 is ``digest``; raises
        as :meth:`canonical_ciphertexts`.  At most ``WEIGHT_BATCH`` blobs are held at a time (one
        child call), so a stream read from a file never has the whole file in memory."""
        if digest in self._canonical:
            return
        batch: list[bytes] = []
        level = -1
        for at, blob in ciphertexts:
            if batch and (at != level or len(batch) == WEIGHT_BATCH):
                self.canonical_ciphertexts(batch, key_tag, level)
                batch = []
            level = at
            batch.append(blob)
        if batch:
            self.canonical_ciphertexts(batch, key_tag, level)
        self._canonical.add(digest)  # only once the stream ended (a file's digest checked again)

    def _checkout(self) -> _Child:
        try:
            return self._idle.get(timeout=max(60.0, 2 * self.timeout_s))
        except queue.Empty:
            raise SandboxUnavailableError("no validator process is available (they keep failing to start, "
                                          "or all are busy); try again") from None

    def _crashed(self, pid: int, reason: str, what: str) -> None:
        with self._count:
            self.crashes += 1
        logger.warning("sandbox: validator process %d died (%s) on %s from an untrusted request; the request was "
                       "refused", pid, reason, what)

    def _lost(self, child: _Child, reason: str, what: str) -> None:
        child.close()
        if reason:
            self._crashed(child.pid, reason, what)
        self._replace()

    def _replace(self) -> None:
        if not self._closed:
            threading.Thread(target=self._spawn, name="h33-sandbox-spawn", daemon=True).start()

    def _spawn(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                child = _Child("ciphertexts", self.params, self.memory_bytes, max(120.0, self.timeout_s))
            except (_ChildFailed, OSError) as exc:
                logger.error("sandbox: a validator process failed to start (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closed:
                child.close()
            else:
                self._idle.put(child)
            return

    # ------------------------------------------------------------------ key bundles
    def learn_key_shapes(self) -> None:
        """Learn, once, what honest keys for these params look like (a child generates two key sets).

        The first bundle validation does it otherwise and waits for it (seconds: about as long as
        generating the keys twice).  A server calls it at start, in the background.
        """
        with self._bundles:
            if self._shapes is not None:
                return
            t0 = time.perf_counter()
            try:
                child = _Child("shapes", self.params, 0, self.bundle_timeout_s)
                try:
                    self._shapes = child.call({"scratch": str(self.scratch_dir)}, (), self.bundle_timeout_s)
                finally:
                    child.close()
            except (_ChildFailed, OSError) as exc:
                raise SandboxUnavailableError(f"the key-shape reference could not be computed ({exc})") from None
            logger.info("sandbox: learnt the shape of honest keys in %.1f s", time.perf_counter() - t0)

    def canonical_bundle(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Validate the bundle file ``src`` in a fresh child, which writes its re-serialized form to ``dst``.

        Raises the bundle's ``EnvelopeError`` (``ParamsMismatchError``, ``TruncatedDataError``,
        ``TamperedDataError`` for everything OpenFHE-related, the child's crash included), or
        ``SandboxUnavailableError``; ``dst`` exists only on success.
        """
        src, dst = Path(src), Path(dst)
        self.learn_key_shapes()
        assert self._shapes is not None
        shapes, shape_blobs = self._shapes
        memory = self.memory_bytes + 8 * src.stat().st_size
        t0 = time.perf_counter()
        with self._bundles:
            try:
                child = _Child("bundle", self.params, memory, max(120.0, self.timeout_s))
            except (_ChildFailed, OSError) as exc:
                raise SandboxUnavailableError(f"the key-bundle validator failed to start ({exc})") from None
            try:
                reply, _ = child.call({"src": str(src), "dst": str(dst), "shapes": shapes}, shape_blobs,
                                      self.bundle_timeout_s)
            except _ChildFailed as exc:
                self._crashed(child.pid, exc.reason, "a key bundle")
                dst.unlink(missing_ok=True)
                raise TamperedDataError(f"the key bundle made its validator fail ({exc.reason}); it was refused") \
                    from None
            finally:
                child.close()
        if not reply.get("ok"):
            dst.unlink(missing_ok=True)
        _raise_reply(reply)
        self._canonical.add(frame_digest(dst))  # src too, if it was canonical already (the same bytes)
        self.bundle_memory = {k: int(reply[k]) for k in ("rss_before", "peak_rss")}
        logger.info("sandbox: key bundle %s (%.0f MiB) validated in %.2f s; the validator's peak RSS %.0f MiB, "
                    "%.0f MiB before reading it", src.name, src.stat().st_size / 2**20, time.perf_counter() - t0,
                    reply["peak_rss"] / 2**20, reply["rss_before"] / 2**20)

    def load_bundle(self, path: str | os.PathLike, scratch: str | os.PathLike | None = None) -> EvaluationKeys:
        """A stored bundle, safe to install here: read directly if a child wrote or confirmed exactly
        these bytes, else validated first.  The child's re-serialized copy goes to ``scratch`` (the
        caller's file, e.g. a locked one in a key store) or to a temporary file in ``scratch_dir``;
        either is removed once read."""
        path = Path(path)
        if frame_digest(path) in self._canonical:
            return EvaluationKeys.from_file(path, self.params)
        if scratch is None:
            fd, scratch = tempfile.mkstemp(prefix="sandbox-", suffix=".h33k", dir=self.scratch_dir)
            os.close(fd)
        target = Path(scratch)
        try:
            self.canonical_bundle(path, target)
            return EvaluationKeys.from_file(target, self.params)  # stays readable once removed
        finally:
            target.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop every child (idle ones now; a busy one when its call returns)."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------- child side
_KINDS = ("public key", "relinearization key", "rotation keys")


@dataclasses.dataclass
class _Shape:
    """The encoding of one kind of honest key: its length and the words every such key shares."""

    length: int
    starts: np.ndarray  # byte offsets of the shared runs (multiples of 8)
    ends: np.ndarray
    words: bytes  # the reference's bytes over those runs, concatenated

    @classmethod
    def between(cls, a: bytes, b: bytes) -> "_Shape":
        """What two independently generated keys of one kind agree on, one word trimmed off each run."""
        if len(a) != len(b):
            raise RuntimeError("two reference keys of one kind differ in length")  # our own keys: a bug
        n = len(a) // 8
        same = np.frombuffer(a, np.uint64, n) == np.frombuffer(b, np.uint64, n)
        edges = np.diff(same.view(np.int8), prepend=0, append=0)
        starts, ends = np.flatnonzero(edges == 1) + 1, np.flatnonzero(edges == -1) - 1
        keep = ends > starts
        starts, ends = starts[keep] * 8, ends[keep] * 8
        view = memoryview(a)
        return cls(len(a), starts, ends, b"".join(view[s:e] for s, e in zip(starts.tolist(), ends.tolist())))

    def blobs(self) -> list[bytes]:
        return [self.starts.astype(">i8").tobytes(), self.ends.astype(">i8").tobytes(), self.words]

    @classmethod
    def from_blobs(cls, length: int, starts: bytes, ends: bytes, words: bytes) -> "_Shape":
        return cls(length, np.frombuffer(starts, ">i8").astype(np.int64), np.frombuffer(ends, ">i8").astype(np.int64),
                   words)

    def check(self, got: bytes | mmap.mmap, what: str, tag: str | None = None) -> None:
        """``got`` must have this length and these words; its key tag blanked already, or blanked here
        around each shared run when ``tag`` is given (so a mapped file is touched only there)."""
        if len(got) != self.length:
            raise TamperedDataError(f"{what} of the bundle: {len(got)} bytes where the model's parameters give "
                                    f"{self.length} (another ring dimension or moduli)")
        pad = len(tag) - 1 if tag else 0  # a tag overlapping a run lies within pad bytes of it
        words, at = memoryview(self.words), 0
        for s, e in zip(self.starts.tolist(), self.ends.tolist()):
            lo = max(0, s - pad)
            window = got[lo:e + pad]
            if tag:
                window = _blank(window, tag)
            if window[s - lo:e - lo] != words[at:at + e - s]:
                raise TamperedDataError(f"{what} of the bundle: not the encoding of keys for the model's parameters "
                                        f"at byte {s} (ring dimension, moduli, digits or layout)")
            at += e - s

    def check_file(self, path: str | os.PathLike, what: str, tag: str, chunks: int = 1) -> None:
        """:meth:`check` for keys serialized to a file (gigabytes), mapped rather than read.

        Keys installed from ``chunks`` > 1 serializations keep one copy of the parameter objects
        (moduli, roots of unity: kilobytes) per serialization they came from, so their encoding is
        no longer the reference's layout: it must then be at least the reference's length and at
        most ``CHUNK_PARAMS_BYTES`` per extra chunk longer.  A key of another ring dimension or
        with one tower more or less differs by at least ring dimension x 8 bytes.
        """
        size = os.path.getsize(path)
        if chunks > 1:
            if not self.length <= size <= self.length + (chunks - 1) * CHUNK_PARAMS_BYTES:
                raise TamperedDataError(f"{what} of the bundle: {size} bytes in {chunks} chunks where the model's "
                                        f"parameters give {self.length} in one (another ring dimension or moduli)")
            return
        if size == 0:
            return self.check(b"", what)
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            self.check(mm, what, tag)


def _blank(blob: bytes, tag: str) -> bytes:
    """``blob`` with its key tag (OpenFHE writes it as text) zeroed, so keys of different tags compare."""
    return blob.replace(tag.encode(), bytes(len(tag)))


def _key_shapes(params: CKKSParams, scratch: Path) -> tuple[dict[str, _Shape], list[int]]:
    """The shapes of honest keys for ``params``, from two key sets generated here, and the
    automorphism indices an honest bundle's rotation keys hold (rotations and bootstrapping).

    Bootstrapping keys are gigabytes and take tens of seconds at N=2^16, and their sizes differ
    from key to key: one more set is generated with them, written to a file in ``scratch`` (not
    held twice in memory), and gives the rotation keys' exact length and index set only.
    """
    cc, needed, BIN = get_context(params), list(params.rotation_indices), openfhe.BINARY
    # a bootstrapped program's rotation keys are measured with its bootstrapping keys, below
    shaped = needed if params.bootstrapping is None else []

    def generate() -> dict[str, bytes]:  # one key set, re-serialized as a bundle's keys are
        kp = cc.KeyGen()
        tag = kp.publicKey.GetKeyTag()
        cc.EvalMultKeyGen(kp.secretKey)
        if shaped:
            cc.EvalRotateKeyGen(kp.secretKey, shaped)
        mult = openfhe.SerializeEvalMultKeyString(BIN, tag)
        rot = openfhe.SerializeEvalAutomorphismKeyString(BIN, tag) if shaped else b""
        release_evaluation_keys()
        openfhe.DeserializeEvalMultKeyString(mult, BIN)
        if shaped:
            openfhe.DeserializeEvalAutomorphismKeyString(rot, BIN)
        out = {"public key": openfhe.Serialize(openfhe.DeserializePublicKeyString(
                   openfhe.Serialize(kp.publicKey, BIN), BIN), BIN),
               "relinearization key": openfhe.SerializeEvalMultKeyString(BIN, tag),
               "rotation keys": openfhe.SerializeEvalAutomorphismKeyString(BIN, tag) if shaped else b""}
        release_evaluation_keys()
        return {k: _blank(v, tag) for k, v in out.items()}

    a, b = generate(), generate()
    shapes = {k: _Shape.between(a[k], b[k]) for k in _KINDS}
    if params.bootstrapping is None:
        return shapes, sorted(cc.FindAutomorphismIndices(needed)) if needed else []
    kp = cc.KeyGen()
    tag = kp.publicKey.GetKeyTag()
    if needed:
        cc.EvalRotateKeyGen(kp.secretKey, needed)
    for slots in params.bootstrapping.slots:
        cc.EvalBootstrapKeyGen(kp.secretKey, slots)
    indices = sorted(cc.GetExistingEvalAutomorphismKeyIndices(tag))
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:  # re-serialized as a bundle's keys are
        path = os.path.join(tmp, "rotation-keys")
        for step in ("generated", "reloaded"):
            if not openfhe.CryptoContext.SerializeEvalAutomorphismKey(path, BIN, tag):
                raise RuntimeError(f"the {step} reference keys could not be serialized")  # our own keys: a bug
            release_evaluation_keys()
            if step == "generated" and not openfhe.CryptoContext.DeserializeEvalAutomorphismKey(path, BIN):
                raise RuntimeError("the reference keys could not be deserialized")
        length = os.path.getsize(path)
    shapes["rotation keys"] = _Shape(length, np.zeros(0, np.int64), np.zeros(0, np.int64), b"")  # the length only
    return shapes, indices


def _validate_bundle(params: CKKSParams, src: Path, dst: Path, shapes: dict[str, _Shape],
                     automorphisms: list[int]) -> None:
    """The child's whole job for one bundle (see the module docstring); raises an EnvelopeError.

    ``automorphisms`` are the indices honest rotation keys hold: the rotations the program needs
    and, for bootstrapped programs, the bootstrapping keys.  The bundle is read as a stream and
    re-serialized one rotation-key chunk at a time, so the child holds one chunk plus OpenFHE's
    own copy of the keys (once, for the rehearsal) -- never the bundle's bytes whole.
    """
    keys = EvaluationKeys.from_file(src, params)  # frame, digest, params, key_id <-> tag; chunks stay in the file
    tag = keys.key_tag
    needed = list(params.rotation_indices)
    if set(keys.rotation_indices) != set(needed):
        raise ParamsMismatchError("the bundle's rotation keys are not exactly those the model needs")
    cc, BIN = get_context(params), openfhe.BINARY

    def load(what: str, fn: Any, blob: bytes | str) -> Any:  # the bytes, or a file's path
        try:
            return fn(blob, BIN)
        except Exception as exc:  # OpenFHE's RuntimeError/ValueError/MemoryError on malformed bytes
            raise TamperedDataError(f"the bundle's {what} could not be deserialized: {exc}") from None

    release_evaluation_keys()
    public = load("public key", openfhe.DeserializePublicKeyString, keys.public_key)
    if public is None or public.GetKeyTag() != tag:
        raise TamperedDataError("the bundle's public key does not carry its key tag")
    public_c = openfhe.Serialize(public, BIN)
    shapes["public key"].check(_blank(public_c, tag), "public key")

    load("relinearization key", openfhe.DeserializeEvalMultKeyString, keys.mult_key)
    if set(cc.GetAllEvalMultKeys()) != {tag}:
        raise TamperedDataError("the bundle carries relinearization keys for other key tags")
    mult_c = openfhe.SerializeEvalMultKeyString(BIN, tag)
    shapes["relinearization key"].check(_blank(mult_c, tag), "relinearization key")

    with FrameWriter(dst, KEYS_MAGIC) as out, tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        out.add(public_c)
        out.add(mult_c)
        chunk_file = os.path.join(tmp, "chunk")
        if automorphisms:
            if not keys.rotation_bytes:
                raise TamperedDataError("the bundle has no rotation keys; the model needs them")
            have: set[int] = set()
            chunks = 0
            for path in keys.rotation_files():  # each alone in OpenFHE's map, re-serialized from there
                chunks += 1
                if not load("rotation keys", openfhe.CryptoContext.DeserializeEvalAutomorphismKey, str(path)):
                    raise TamperedDataError("the bundle's rotation keys could not be deserialized")
                if set(cc.GetAllEvalAutomorphismKeys()) != {tag}:
                    raise TamperedDataError("the bundle carries rotation keys for other key tags")
                have |= set(cc.GetExistingEvalAutomorphismKeyIndices(tag))
                if not openfhe.CryptoContext.SerializeEvalAutomorphismKey(chunk_file, BIN, tag):
                    raise TamperedDataError("the bundle's rotation keys could not be serialized again")
                release_rotation_keys()
                out.add_file(chunk_file)
                os.unlink(chunk_file)
            if have != set(automorphisms):
                missing = [r for r in needed if cc.FindAutomorphismIndex(r) not in have]
                raise TamperedDataError(
                    f"the bundle's rotation keys are not those its header lists and the model needs (missing rotations "
                    f"{missing[:8]}, {len(set(automorphisms) - have)} automorphisms missing, "
                    f"{len(have - set(automorphisms))} extra{'; bootstrapping keys included' if params.bootstrapping else ''})")
        elif keys.rotation_bytes:
            raise TamperedDataError("the bundle has rotation keys; the model needs none")
        out.commit(keys.header() | {"rotation_indices": needed})
        del keys, public
        release_evaluation_keys()

        # rehearse exactly what the serving process will do with the re-serialized bundle
        try:
            canonical = EvaluationKeys.from_file(dst, params)
            canonical.install(params)
            if openfhe.SerializeEvalMultKeyString(BIN, tag) != mult_c:
                raise TamperedDataError("the bundle's relinearization key does not serialize back to itself")
            if automorphisms:  # all of them at once, through a file: gigabytes for a bootstrapped program
                if not openfhe.CryptoContext.SerializeEvalAutomorphismKey(chunk_file, BIN, tag):
                    raise TamperedDataError("the bundle's rotation keys could not be serialized again")
                shapes["rotation keys"].check_file(chunk_file, "rotation keys", tag, chunks)
                os.unlink(chunk_file)
            public = openfhe.DeserializePublicKeyString(public_c, BIN)
            x = cc.Encrypt(public, cc.MakeCKKSPackedPlaintext(np.random.default_rng().uniform(-1, 1, params.slots)))
            cc.EvalMult(x, x)  # relinearizes with the bundle's key
            for r in needed:
                cc.EvalRotate(x, r)
            if params.bootstrapping is not None:  # one bootstrap per slot count uses every bootstrapping key
                bootstrap_context(params, precompute=True)
                for slots in params.bootstrapping.slots:
                    y = x.Clone()
                    y.SetSlots(slots)  # as the engine's sparse bootstraps do
                    cc.EvalBootstrap(y)
        except EnvelopeError:
            Path(dst).unlink(missing_ok=True)
            raise
        except Exception as exc:
            Path(dst).unlink(missing_ok=True)
            raise TamperedDataError(f"the bundle's keys do not work with the model's parameters: {exc}") from None


def _child(mode: str, memory_bytes: int) -> None:
    try:
        _serve(mode, memory_bytes)
    except (EOFError, BrokenPipeError):  # the parent went away (closed the sandbox, or exited)
        pass


def _serve(mode: str, memory_bytes: int) -> None:
    import resource

    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel; anything printed goes to stderr
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    header, _ = _recv(inp)
    params = CKKSParams.model_validate(header["params"])
    checker = CiphertextChecker(params) if mode == "ciphertexts" else None
    _send(out, {"ok": True})
    if mode == "shapes":
        header, _ = _recv(inp)
        shapes, automorphisms = _key_shapes(params, Path(header["scratch"]))
        _send(out, {"key_lengths": {kind: shapes[kind].length for kind in _KINDS}, "automorphisms": automorphisms},
              [b for k in _KINDS for b in shapes[k].blobs()])
        return
    while True:
        try:
            header, blobs = _recv(inp)
        except EOFError:  # the parent closed the pipe (or died): done
            return
        retire = False
        try:
            if checker is not None:
                for blob in blobs:
                    checker.check(blob, header["key_tag"], int(header.get("level", 0)))
            else:
                reference = header["shapes"]
                shapes = {kind: _Shape.from_blobs(reference["key_lengths"][kind], *blobs[3 * i:3 * i + 3])
                          for i, kind in enumerate(_KINDS)}
                get_context(params)
                before = rss_bytes()
                _validate_bundle(params, Path(header["src"]), Path(header["dst"]), shapes, reference["automorphisms"])
                memory = {"rss_before": before, "peak_rss": peak_rss_bytes()}
            reply: dict[str, Any] = {"ok": True, **(memory if checker is None else {})}
        except H33Error as exc:
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        except MemoryError:
            reply, retire = {"ok": False, "error": "TamperedDataError", "message": "the input needs too much memory"}, True
        except Exception as exc:
            reply = {"ok": False, "error": "TamperedDataError", "message": f"{type(exc).__name__}: {exc}"}
        retire = retire or (memory_bytes > 0 and rss_bytes() > memory_bytes // 2)
        _send(out, {**reply, "retire": retire})
        if retire or checker is None:
            return


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
