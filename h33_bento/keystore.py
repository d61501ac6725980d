"""The evaluation-key store: one on-disk layout for every server (BentoML service, MLflow pyfunc).

Layout::

    <root>/<key_id>/bundle.h33k   EvaluationKeys.to_bytes(), exactly as received (public material only)
    <root>/<key_id>/meta.json     {"key_id", "tenant", "params_fingerprint", "key_tag", "size_bytes", "created_at"}
    <root>/<key_id>/weights/<model_fingerprint>.h33w
                                  encrypted weights of a weightless model under this key
                                  (``EncryptedWeights.to_bytes()``, ciphertexts only)
    <root>/.incoming/             uploads and key directories being written

One directory per key, so that several processes (service replicas on a shared volume, an
``mlflow models serve`` next to them) can read and write the same store.  A key directory
appears atomically: it is written under ``.incoming``, fsynced and renamed into place, so a
crash never leaves a half-written bundle behind a valid name.  Whoever writes an entry of
``.incoming`` holds an exclusive ``flock`` on it until it is done; opening a store removes every
entry there that it can lock -- what crashed writers left behind -- and never one that a live
process (another replica on the same volume included) is still writing.  Every lookup checks with one
``stat`` that its indexed record is still what the disk holds and re-reads it otherwise, which
is how one process sees another's writes and deletions.

Every bundle is validated on the way in and on the way out (``load`` also checks that the bundle
is the one its key_id names), as a stream (``EvaluationKeys.from_file``): a deep model's bundle is
tens of GB and is never read whole.  A bundle belongs to a
tenant, recorded in ``meta.json``: the BentoML service records the uploading tenant and serves
a key only to it; writers without tenants (``mlflow.h33.save_evaluation_keys``) record
``DEFAULT_TENANT`` unless told otherwise.
The first writer of a key_id owns it: storing it again returns the existing record unchanged.

Encrypted weights live in their key's directory, so deleting a key deletes them.  A weights file
is written under ``.incoming`` and renamed into place like a bundle; its contents are checked by
whoever stores and loads it (``runtime.weights.load_weights``), the store only names the files
and tells which weights are current by the SHA-256 their frame ends with (:meth:`KeyStore.weights_digest`).

Replicas that do not share a volume share a store on object storage: with ``remote=S3Keys(...)``
(``keystore_s3.py``) a key exists when the object store has it, and the local directory is this
process's cache of the bundles and weights it has used.  Lookups of a cached key ask the object
store again after ``revalidate_s``, so a deletion through another replica shows within that time;
so do the weights' digests, so weights replaced through another replica are fetched again
(:meth:`KeyStore.weights_file`) within that time too.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .ckks.keys import EvaluationKeys
from .ckks.params import CKKSParams
from .ckks.sandbox import Sandbox
from .ckks.serialization import frame_digest
from .errors import EnvelopeError, EvaluationKeysNotFoundError, KeyMismatchError, TamperedDataError
from .keystore_s3 import S3Keys

KEY_ID_RE = re.compile(r"^[0-9a-f]{32}$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A served model's name: a URL path segment (``/models/{name}/``) and a key-store directory name.
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The tenant recorded for bundles stored without one.
DEFAULT_TENANT = "default"
BUNDLE_FILE = "bundle.h33k"
WEIGHTS_DIR = "weights"
MODEL_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16,64}$")
META_FILE = "meta.json"
INCOMING = ".incoming"


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows about one bundle without reading it (the contents of ``meta.json``)."""

    key_id: str
    tenant: str
    params_fingerprint: str
    key_tag: str
    size_bytes: int
    created_at: float

    def public(self) -> dict[str, Any]:
        """The record as shown to its tenant (the OpenFHE key tag is an internal detail)."""
        d = asdict(self)
        d.pop("key_tag")
        return d


@dataclass(frozen=True)
class StagedBundle:
    """A validated bundle in ``.incoming``, ready for :meth:`KeyStore.commit`.

    Made only by :meth:`KeyStore.stage`, so the parsed keys are always those of the file.
    """

    path: Path
    keys: EvaluationKeys


@dataclass(frozen=True)
class Upload:
    """A file being written under ``.incoming`` by :meth:`KeyStore.incoming` (locked while open)."""

    path: Path
    file: BinaryIO


def _create_locked(name: Callable[[], Path], directory: bool = False) -> tuple[Path, int]:
    """Create a fresh entry (file or directory) at ``name()`` and flock it; returns (path, fd).

    An entry that a cleaner removed between its creation and the lock (it has no links left)
    is given up for a new name, so a writer never writes into a removed file.
    """
    while True:
        path = name()
        if directory:
            path.mkdir()
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return path, fd
        os.close(fd)


class KeyStore:
    """Evaluation-key bundles under ``root`` (see the module docstring for the layout).

    ``create=False`` opens a store for reading without touching the disk: a missing root is an
    empty store whose lookups say it does not exist (the MLflow pyfunc's case).  With ``remote``,
    ``root`` is a local cache and the object store holds the keys (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, create: bool = True, remote: S3Keys | None = None,
                 revalidate_s: float = 5.0) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._records: dict[str, tuple[KeyRecord, tuple[int, ...]]] = {}  # key_id -> (record, stamp)
        self._writable = create
        self.remote = remote
        self.revalidate_s = revalidate_s
        self._confirmed: dict[str, tuple[float, KeyRecord]] = {}  # key_id -> (when the remote said so, record)
        # (key_id, model fingerprint) -> (when the remote said so, its weights record or None)
        self._weights_seen: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        if create:
            self._incoming_dir()
            self._clean_incoming()
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if KEY_ID_RE.match(entry.name):
                    self.get(entry.name)

    def _clean_incoming(self) -> None:
        """Remove what crashed writers left in ``.incoming``: every entry no live process holds locked."""
        for entry in (self.root / INCOMING).iterdir():
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # removed meanwhile, or not a plain file or directory
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer (possibly another replica) holds it
                os.close(fd)
                continue
            try:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            finally:
                os.close(fd)

    # ----------------------------------------------------------------- lookups
    def bundle_path(self, key_id: str) -> Path:
        """Where ``key_id``'s bundle is."""
        return self.root / key_id / BUNDLE_FILE

    def weights_path(self, key_id: str, model_fingerprint: str) -> Path:
        """Where ``key_id``'s encrypted weights for model ``model_fingerprint`` are (or would be)."""
        if not KEY_ID_RE.match(key_id) or not MODEL_FINGERPRINT_RE.match(model_fingerprint):
            raise ValueError("a key id is 32 hex digits and a model fingerprint 16 to 64")
        return self.root / key_id / WEIGHTS_DIR / f"{model_fingerprint}.h33w"

    def put_weights(self, key_id: str, model_fingerprint: str, upload: Path) -> None:
        """Move a checked upload (from :meth:`incoming`) into place as ``key_id``'s weights for
        the model, replacing what was there (with a remote: on the object store first, and locally
        only if this cache holds the key); ``EvaluationKeysNotFoundError`` if the key is gone."""
        if Path(upload).resolve().parent != self.root / INCOMING:
            raise ValueError(f"{upload} is not an upload of this store; write it in incoming()")
        rec = self.require(key_id)
        target = self.weights_path(rec.key_id, model_fingerprint)
        if self.remote is not None:
            self.remote.publish_weights(key_id, model_fingerprint, upload, frame_digest(upload).hex())
            with self._lock:
                self._weights_seen.pop((key_id, model_fingerprint), None)
            if not target.parent.parent.is_dir():  # this replica never used the key: it fetches them on use
                return
        self._place(upload, target, key_id)

    def _place(self, file: Path, target: Path, key_id: str) -> None:
        """Rename a written file of ``.incoming`` over ``target`` in a key's directory, durably."""
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(file, target)
        except FileNotFoundError:  # the key was deleted meanwhile
            raise EvaluationKeysNotFoundError(key_id, f"it was removed from {self.root}") from None
        _fsync_dir(target.parent)

    def weights_digest(self, key_id: str, model_fingerprint: str) -> bytes | None:
        """The SHA-256 that ``key_id``'s current weights for the model end with, or None if none are
        stored.  With a remote, the object store's record (asked again after ``revalidate_s``)."""
        if self.remote is None:
            try:
                return frame_digest(self.weights_path(key_id, model_fingerprint))
            except OSError:
                return None
        meta = self._weights_meta(key_id, model_fingerprint)
        return None if meta is None else bytes.fromhex(meta["sha256"])

    def _weights_meta(self, key_id: str, model_fingerprint: str, fresh: bool = False) -> dict[str, Any] | None:
        now, key = time.monotonic(), (key_id, model_fingerprint)
        with self._lock:
            seen = self._weights_seen.get(key)
        if seen is not None and not fresh and now - seen[0] < self.revalidate_s:
            return seen[1]
        meta = self.remote.weights_meta(key_id, model_fingerprint)
        with self._lock:
            self._weights_seen[key] = (now, meta)
        return meta

    def weights_file(self, key_id: str, model_fingerprint: str) -> Path | None:
        """The local file of ``key_id``'s current weights for the model, or None if none are stored.

        With a remote, a cached copy whose digest is not the object store's (asked again after
        ``revalidate_s``) is replaced by the object store's, fetched into ``.incoming`` and renamed
        into place; the key's bundle must be in the cache (:meth:`load`) first.
        """
        target = self.weights_path(key_id, model_fingerprint)
        if self.remote is None:
            return target if target.is_file() else None
        try:
            return self._cached_weights(key_id, target, self._weights_meta(key_id, model_fingerprint))
        except EvaluationKeysNotFoundError:  # replaced between reading its record and downloading it
            return self._cached_weights(key_id, target, self._weights_meta(key_id, model_fingerprint, fresh=True))

    def _cached_weights(self, key_id: str, target: Path, meta: dict[str, Any] | None) -> Path | None:
        """``target``, made to hold the weights object ``meta`` names (None: there are none)."""
        if meta is None:
            return None
        try:
            if frame_digest(target).hex() == meta["sha256"]:
                return target
        except OSError:  # not cached
            pass
        with self.incoming() as upload:
            self.remote.download_weights(meta, key_id, upload.file)
            upload.file.flush()
            if frame_digest(upload.path).hex() != meta["sha256"]:
                raise TamperedDataError(f"{self.remote} holds weights for key_id {key_id} that do not end with "
                                        "the digest their record names")
            self._place(upload.path, target, key_id)
        return target

    def _stamp(self, key_id: str) -> tuple[int, ...] | None:
        """Identity of what is stored for ``key_id`` now: the stat of its meta.json."""
        try:
            st = (self.root / key_id / META_FILE).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def _read(self, key_id: str) -> KeyRecord | None:
        d = self.root / key_id
        try:
            meta = json.loads((d / META_FILE).read_text())
            if meta["key_id"] == key_id and (d / BUNDLE_FILE).is_file():
                return KeyRecord(**{k: meta[k] for k in KeyRecord.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id``, or None.

        One ``stat`` tells whether the indexed record is still what the disk holds; if another
        process wrote, replaced or deleted the key since, the disk is read again.
        """
        if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
            return None
        stamp = self._stamp(key_id)  # taken before reading, so a concurrent change shows next time
        with self._lock:
            cached = self._records.get(key_id)
        if cached is not None and stamp is not None and cached[1] == stamp:
            return cached[0] if self.remote is None else self._shared(key_id, cached[0])
        rec = self._read(key_id) if stamp is not None else None
        with self._lock:
            if rec is None:
                self._records.pop(key_id, None)
            else:
                self._records[key_id] = (rec, stamp)
        return rec if self.remote is None else self._shared(key_id, rec)

    def _shared(self, key_id: str, cached: KeyRecord | None) -> KeyRecord | None:
        """The object store's record of ``key_id`` (asked again after ``revalidate_s``); a cached
        copy it no longer has, or has under another record, is dropped from the cache."""
        now = time.monotonic()
        with self._lock:
            seen = self._confirmed.get(key_id)
        if seen is not None and now - seen[0] < self.revalidate_s and seen[1] == cached:
            return seen[1]
        meta = self.remote.meta(key_id)
        rec = None if meta is None else KeyRecord(**{k: meta[k] for k in KeyRecord.__dataclass_fields__})
        if cached is not None and cached != rec:
            self._drop_local(key_id)
        with self._lock:
            if rec is None:
                self._confirmed.pop(key_id, None)
            else:
                self._confirmed[key_id] = (now, rec)
        return rec

    def require(self, key_id: str) -> KeyRecord:
        """The record of ``key_id``; ``EvaluationKeysNotFoundError`` naming it and why otherwise."""
        rec = self.get(key_id)
        if rec is not None:
            return rec
        if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
            raise EvaluationKeysNotFoundError(str(key_id), "not a valid key id (32 hex digits)")
        if self.remote is not None:
            raise EvaluationKeysNotFoundError(key_id, f"the key store {self.remote} has no bundle for it")
        if not self.root.is_dir():
            raise EvaluationKeysNotFoundError(key_id, f"the key store {self.root} does not exist")
        raise EvaluationKeysNotFoundError(key_id, f"the key store {self.root} has no bundle for it "
                                                  f"(expected {self.root / key_id / BUNDLE_FILE})")

    def load(self, key_id: str, params: CKKSParams | None = None, sandbox: Sandbox | None = None) -> EvaluationKeys:
        """Read and validate ``key_id``'s bundle (against ``params`` when given).

        With a ``sandbox`` (a server: the file may come from anyone who could write the store, an
        older release, or a provisioning script) the bundle is validated in its child processes
        before OpenFHE reads it here, unless a child of that sandbox wrote or confirmed exactly
        these bytes already.  Raises ``EvaluationKeysNotFoundError`` if it is not stored, ``KeyMismatchError`` if the
        file holds another key's bundle, and the bundle's own ``EnvelopeError`` (tampered,
        truncated, other params) with the key_id in its message.
        """
        rec = self.require(key_id)
        path = self.bundle_path(key_id)
        if self.remote is not None and not path.is_file():
            self._fetch(rec)
        try:
            if sandbox is None:
                keys = EvaluationKeys.from_file(path, params)
            elif self._writable:  # the child's copy stays on this file system, locked against cleaning
                with self.incoming() as scratch:
                    keys = sandbox.load_bundle(path, scratch.path)
            else:
                keys = sandbox.load_bundle(path)
        except FileNotFoundError:  # deleted between the lookup and the read
            raise EvaluationKeysNotFoundError(key_id, f"its bundle was removed from {self.root}") from None
        except EnvelopeError as exc:
            raise type(exc)(f"the stored bundle for key_id {key_id} ({path}): {exc}") from exc
        if keys.key_id != key_id:
            raise KeyMismatchError(f"{path} holds evaluation keys for key_id {keys.key_id}, not {key_id}")
        return keys

    def for_tenant(self, tenant: str) -> list[KeyRecord]:
        """The records of ``tenant`` this process knows (with a remote: the object store has), oldest first."""
        if self.remote is not None:
            records = [r for r in map(self.get, self.remote.key_ids()) if r is not None]
        else:
            with self._lock:
                records = [r for r, _ in self._records.values()]
        return sorted((r for r in records if r.tenant == tenant), key=lambda r: r.created_at)

    def __len__(self) -> int:
        """Bundles in the store (with a remote: in the object store)."""
        if self.remote is not None:
            return len(self.remote.key_ids())
        with self._lock:
            return len(self._records)

    # ----------------------------------------------------------------- writes
    def _incoming_dir(self) -> Path:
        """``.incoming``, made on first use (a store opened with ``create=False`` has none yet)."""
        d = self.root / INCOMING
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def incoming(self) -> Iterator[Upload]:
        """A fresh, locked upload file under ``.incoming`` (same file system as the keys).

        Write the bundle to ``upload.file``, flush it, then :meth:`stage` and :meth:`commit`
        ``upload.path`` inside the block: the lock keeps other processes' cleaning away until
        the block ends, and then whatever was not committed is removed.
        """
        incoming = self._incoming_dir()
        path, fd = _create_locked(lambda: incoming / f"{uuid.uuid4().hex}.part")
        file = os.fdopen(fd, "wb")
        try:
            yield Upload(path, file)
        finally:
            try:
                path.unlink(missing_ok=True)  # while still locked; a committed upload was moved away
            finally:
                file.close()

    def stage(self, upload: Path, params: CKKSParams | None = None) -> StagedBundle:
        """Validate an uploaded file (from :meth:`incoming`) as a bundle, for ``params`` if given."""
        upload = Path(upload)
        if upload.resolve().parent != self.root / INCOMING:
            raise ValueError(f"{upload} is not an upload of this store; write it in incoming()")
        return StagedBundle(upload, EvaluationKeys.from_file(upload, params))  # not read whole

    def commit(self, staged: StagedBundle, tenant: str = DEFAULT_TENANT) -> tuple[KeyRecord, bool]:
        """Move a staged bundle into place as ``tenant``'s; returns (record, created).

        If the key_id is already stored (by anyone), nothing is written and the
        existing record comes back with ``created`` False: callers that bind keys to tenants
        compare its ``tenant`` with theirs.
        """
        if not TENANT_RE.match(tenant):
            raise ValueError(f"tenant name {tenant!r} must match {TENANT_RE.pattern}")
        keys = staged.keys
        existing = self.get(keys.key_id)
        if existing is not None:
            return existing, False
        rec = KeyRecord(key_id=keys.key_id, tenant=tenant, params_fingerprint=keys.params_fingerprint,
                        key_tag=keys.key_tag, size_bytes=staged.path.stat().st_size, created_at=time.time())
        if self.remote is not None:
            other = self.remote.publish(rec, staged.path)
            if other is not None:  # another replica stored the same key_id meanwhile
                return self.get(keys.key_id) or rec, False
        return self._commit_local(staged, rec)

    def _commit_local(self, staged: StagedBundle, rec: KeyRecord) -> tuple[KeyRecord, bool]:
        """Move a staged bundle into the local directory under ``rec`` (fsynced, renamed into place)."""
        keys = staged.keys
        incoming = self._incoming_dir()
        staging, lock = _create_locked(lambda: incoming / f"{keys.key_id}.{uuid.uuid4().hex}", directory=True)
        try:
            os.replace(staged.path, staging / BUNDLE_FILE)
            (staging / META_FILE).write_text(json.dumps(asdict(rec), indent=1))
            for f in (staging / BUNDLE_FILE, staging / META_FILE):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(staging, self.root / keys.key_id)
            except OSError:  # another request or process stored the same key_id meanwhile
                other = self.get(keys.key_id)
                if other is None:
                    raise
                return other, False
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(lock)
        self.get(rec.key_id)  # index it
        return rec, True

    def _fetch(self, rec: KeyRecord) -> None:
        """Copy ``rec``'s bundle from the object store into the local cache."""
        meta = self.remote.meta(rec.key_id)
        if meta is None:
            raise EvaluationKeysNotFoundError(rec.key_id, f"it was removed from {self.remote}")
        with self.incoming() as upload:
            self.remote.download(meta, upload.file)
            upload.file.flush()
            staged = StagedBundle(upload.path, EvaluationKeys.from_file(upload.path))  # not read whole
            if staged.keys.key_id != rec.key_id:
                raise KeyMismatchError(f"{self.remote} holds evaluation keys for key_id {staged.keys.key_id} "
                                       f"under {rec.key_id}")
            self._commit_local(staged, rec)

    def put(self, bundle: EvaluationKeys | bytes, tenant: str = DEFAULT_TENANT,
            params: CKKSParams | None = None) -> tuple[KeyRecord, bool]:
        """Validate and store a bundle held in memory; returns (record, created) as :meth:`commit`."""
        data = bundle.to_bytes() if isinstance(bundle, EvaluationKeys) else bytes(bundle)
        keys = EvaluationKeys.from_bytes(data, params)
        existing = self.get(keys.key_id)
        if existing is not None:
            return existing, False
        with self.incoming() as upload:
            upload.file.write(data)
            upload.file.flush()
            return self.commit(StagedBundle(upload.path, keys), tenant)

    def delete(self, key_id: str) -> KeyRecord:
        """Remove ``key_id``'s bundle (from the object store first, with a remote); returns its record."""
        rec = self.require(key_id)
        if self.remote is not None:
            self.remote.remove(key_id)
            with self._lock:
                self._confirmed.pop(key_id, None)
                for seen in [k for k in self._weights_seen if k[0] == key_id]:
                    del self._weights_seen[seen]
        self._drop_local(key_id)
        return rec

    def _drop_local(self, key_id: str) -> None:
        key_dir = self.root / key_id
        if key_dir.is_dir():
            trash = self._incoming_dir() / f"deleted.{key_id}.{uuid.uuid4().hex}"
            try:
                os.rename(key_dir, trash)
            except FileNotFoundError:  # removed meanwhile by another process
                pass
            shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._records.pop(key_id, None)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
