"""The evaluation-key registry: bundles on disk, each bound to the tenant that uploaded it.

Layout (one directory per key, so a shared volume can be read by several replicas)::

    <root>/<key_id>/bundle.h33k   the bundle exactly as uploaded (public material only)
    <root>/<key_id>/meta.json     {"key_id", "tenant", "params_fingerprint", "key_tag", "size_bytes", ...}
    <root>/.incoming/             uploads in progress

A key directory appears atomically (written under a temporary name, then renamed), so a crash
never leaves a half-written bundle behind a valid name.  Lookups that miss the in-memory index
re-read the disk, which is what lets replicas sharing the volume see each other's uploads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..ckks.keys import EvaluationKeys
from .errors import HTTPError, foreign_key, unknown_key

KEY_ID_RE = re.compile(r"^[0-9a-f]{32}$")
BUNDLE_FILE = "bundle.h33k"
META_FILE = "meta.json"
INCOMING = ".incoming"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    params_fingerprint: str
    key_tag: str
    size_bytes: int
    created_at: float

    def public(self) -> dict:
        d = asdict(self)
        d.pop("key_tag")
        return d


class KeyStore:
    def __init__(self, root: str | os.PathLike, max_keys_per_tenant: int = 8) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / INCOMING).mkdir(exist_ok=True)
        self.max_keys_per_tenant = max_keys_per_tenant
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        for d in self.root.iterdir():
            if KEY_ID_RE.match(d.name):
                rec = self._read(d.name)
                if rec is not None:
                    self._records[rec.key_id] = rec
        for stale in (self.root / INCOMING).iterdir():  # uploads interrupted by a restart
            try:
                if time.time() - stale.stat().st_mtime > 3600:
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
            except OSError:  # another replica cleaned it up first
                pass

    # ----------------------------------------------------------------- lookups
    def _read(self, key_id: str) -> KeyRecord | None:
        d = self.root / key_id
        try:
            meta = json.loads((d / META_FILE).read_text())
            if not (d / BUNDLE_FILE).is_file():
                return None
            return KeyRecord(**{k: meta[k] for k in KeyRecord.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, key_id: str) -> KeyRecord | None:
        if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
            return None
        with self._lock:
            rec = self._records.get(key_id)
        if rec is None:
            rec = self._read(key_id)
            if rec is not None:
                with self._lock:
                    self._records[key_id] = rec
        elif not (self.root / key_id / BUNDLE_FILE).is_file():  # deleted by another replica
            with self._lock:
                self._records.pop(key_id, None)
            rec = None
        return rec

    def resolve(self, key_id: str, tenant: str) -> KeyRecord:
        """The record for ``key_id`` if ``tenant`` owns it; 404 if unknown, 403 if another tenant's."""
        rec = self.get(key_id)
        if rec is None:
            raise unknown_key(key_id)
        if rec.tenant != tenant:
            raise foreign_key(key_id)
        return rec

    def for_tenant(self, tenant: str) -> list[KeyRecord]:
        with self._lock:
            return sorted((r for r in self._records.values() if r.tenant == tenant), key=lambda r: r.created_at)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def bundle_path(self, key_id: str) -> Path:
        return self.root / key_id / BUNDLE_FILE

    def read_bundle(self, key_id: str) -> bytes:
        return self.bundle_path(key_id).read_bytes()

    # ----------------------------------------------------------------- writes
    def incoming_path(self) -> Path:
        return self.root / INCOMING / f"{uuid.uuid4().hex}.part"

    def check_quota(self, tenant: str) -> None:
        if len(self.for_tenant(tenant)) >= self.max_keys_per_tenant:
            raise HTTPError(403, "key_quota", f"tenant already has {self.max_keys_per_tenant} key bundles "
                                              "registered; DELETE /keys/<key_id> an old one first")

    def commit(self, upload: Path, keys: EvaluationKeys, tenant: str) -> tuple[KeyRecord, bool]:
        """Move a validated upload into place; returns (record, created)."""
        existing = self.get(keys.key_id)
        if existing is not None:
            if existing.tenant != tenant:
                raise foreign_key(keys.key_id)
            return existing, False
        self.check_quota(tenant)
        rec = KeyRecord(key_id=keys.key_id, tenant=tenant, params_fingerprint=keys.params_fingerprint,
                        key_tag=keys.key_tag, size_bytes=upload.stat().st_size, created_at=time.time())
        staging = self.root / INCOMING / f"{keys.key_id}.{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            os.replace(upload, staging / BUNDLE_FILE)
            (staging / META_FILE).write_text(json.dumps(asdict(rec), indent=1))
            for f in (staging / BUNDLE_FILE, staging / META_FILE):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(staging, self.root / keys.key_id)
            except OSError:  # another request (or replica) registered the same key_id meanwhile
                other = self._read(keys.key_id)
                if other is None:
                    raise
                if other.tenant != tenant:
                    raise foreign_key(keys.key_id) from None
                return other, False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self._records[rec.key_id] = rec
        return rec, True

    def delete(self, key_id: str, tenant: str) -> KeyRecord:
        rec = self.resolve(key_id, tenant)
        trash = self.root / INCOMING / f"deleted.{key_id}.{uuid.uuid4().hex}"
        os.rename(self.root / key_id, trash)
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._records.pop(key_id, None)
        return rec
