"""The shared half of a key store: bundles on object storage through the S3 API.

Every replica of a service keeps its own local ``KeyStore`` directory; with an ``S3Keys`` remote
(``KeyStore(root, remote=S3Keys.from_url("s3://bucket/prefix"))``) that directory is a cache, and
the object store is where a key exists.  Layout under the prefix::

    <key_id>/meta.json              the KeyRecord plus "bundle": the name of the bundle object
    <key_id>/bundle-<uuid>.h33k     the canonical bundle bytes
    <key_id>/weights/<model_fingerprint>.json
                                    {"object", "sha256", "size_bytes"}: which object holds the key's
                                    encrypted weights for that model, and the digest its frame ends with
    <key_id>/weights/<model_fingerprint>-<uuid>.h33w
                                    the encrypted weights (``EncryptedWeights.to_bytes()``)

A key becomes visible atomically: its bundle object is uploaded first (a multipart upload is not
visible until it completes), then ``meta.json`` is written with ``If-None-Match: *``, so the first
writer of a key_id owns it and a crash before that write leaves only an unnamed bundle object
that no lookup ever reads (and nothing here deletes: docs/deploy.md says how to sweep them).  Deleting removes ``meta.json`` first, so the key disappears at once,
then every object under the key's prefix (its weights, and what crashed writers left there).

Weights are replaced, not owned: a new upload's object goes first, then its record overwrites the
old one (an S3 write of one object is atomic: readers see the old record or the new), then the
old object is removed.  The record's digest is how a replica tells its cached copy is stale.

Endpoint, region and credentials come from boto3's usual sources (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto; ``AWS_ACCESS_KEY_ID`` ...).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from .errors import EvaluationKeysNotFoundError

META = "meta.json"
WEIGHTS = "weights"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class S3Keys:
    """Key records and bundle objects under ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if client is None:
            import boto3  # the serve extra's dependency; only a store with a remote needs it

            client = boto3.client("s3")
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    @classmethod
    def from_url(cls, url: str) -> "S3Keys":
        """``s3://bucket`` or ``s3://bucket/prefix``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"a shared key store is an s3://bucket[/prefix] URL, got {url!r}")
        return cls(parsed.netloc, parsed.path)

    def __repr__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("NoSuchKey", "404", "NotFound")

    def meta(self, key_id: str) -> dict[str, Any] | None:
        """``key_id``'s meta.json (its KeyRecord fields and its bundle object's name), or None."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key_id, META))["Body"].read()
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                return None
            raise
        try:
            meta = json.loads(body)
            if meta["key_id"] != key_id or not str(meta["bundle"]).startswith(f"{key_id}/bundle-"):
                return None
        except (ValueError, KeyError, TypeError):
            return None  # not a record this code wrote: the key does not exist here
        return meta

    def key_ids(self) -> list[str]:
        """Every key_id with a meta.json under the prefix."""
        ids, pages = [], self.client.get_paginator("list_objects_v2")
        start = self._key("") + "/" if self.prefix else ""
        for page in pages.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(start):]
                if rest.count("/") == 1 and rest.endswith("/" + META):
                    ids.append(rest.split("/")[0])
        return ids

    def publish(self, record: Any, bundle: Path) -> dict[str, Any] | None:
        """Upload ``bundle`` and then, if no one has yet, ``record``'s meta.json.

        Returns None when this call created the key, else the meta.json another writer put first
        (this upload's bundle object is then removed).
        """
        name = f"{record.key_id}/bundle-{uuid.uuid4().hex}.h33k"
        self.client.upload_file(str(bundle), self.bucket, self._key(name))  # multipart: atomic on completion
        meta = dict(asdict(record), bundle=name)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(record.key_id, META),
                                   Body=json.dumps(meta, indent=1).encode(), IfNoneMatch="*")
            return None
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        return self.meta(record.key_id)

    def download(self, meta: dict[str, Any], out: BinaryIO) -> None:
        """Write ``meta``'s bundle object to the open file ``out``."""
        self._download(meta["bundle"], meta["key_id"], "bundle", out)

    def _download(self, name: str, key_id: str, what: str, out: BinaryIO) -> None:
        try:
            self.client.download_fileobj(self.bucket, self._key(name), out)
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                raise EvaluationKeysNotFoundError(key_id, f"its {what} was removed from {self}") from None
            raise

    def _weights_record(self, key_id: str, model_fingerprint: str) -> str:
        return self._key(key_id, WEIGHTS, f"{model_fingerprint}.json")

    def weights_meta(self, key_id: str, model_fingerprint: str) -> dict[str, Any] | None:
        """The record of ``key_id``'s weights for the model (``object``, ``sha256``, ``size_bytes``), or None."""
        try:
            body = self.client.get_object(Bucket=self.bucket,
                                          Key=self._weights_record(key_id, model_fingerprint))["Body"].read()
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                return None
            raise
        try:
            meta = json.loads(body)
            if (not str(meta["object"]).startswith(f"{key_id}/{WEIGHTS}/{model_fingerprint}-")
                    or not _SHA256_HEX.match(str(meta["sha256"])) or not isinstance(meta["size_bytes"], int)):
                return None
        except (ValueError, KeyError, TypeError):
            return None  # not a record this code wrote
        return meta

    def publish_weights(self, key_id: str, model_fingerprint: str, path: Path, sha256: str) -> None:
        """Upload the weights file ``path`` (whose frame ends with ``sha256``, hex), then point the
        key's record for the model at it, then remove the object it replaced.

        ``EvaluationKeysNotFoundError`` (and nothing left behind) if the key was deleted meanwhile.
        """
        name = f"{key_id}/{WEIGHTS}/{model_fingerprint}-{uuid.uuid4().hex}.h33w"
        self.client.upload_file(str(path), self.bucket, self._key(name))  # multipart: atomic on completion
        old = self.weights_meta(key_id, model_fingerprint)
        record = {"object": name, "sha256": sha256, "size_bytes": Path(path).stat().st_size}
        self.client.put_object(Bucket=self.bucket, Key=self._weights_record(key_id, model_fingerprint),
                               Body=json.dumps(record, indent=1).encode())
        if old is not None and old["object"] != name:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(old["object"]))
        if self.meta(key_id) is None:  # deleted while uploading: its sweep may have run before this write
            self.client.delete_object(Bucket=self.bucket, Key=self._weights_record(key_id, model_fingerprint))
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
            raise EvaluationKeysNotFoundError(key_id, f"it was removed from {self}")

    def download_weights(self, meta: dict[str, Any], key_id: str, out: BinaryIO) -> None:
        """Write the weights object ``meta`` (from :meth:`weights_meta`) names to the open file ``out``."""
        self._download(meta["object"], key_id, "weights", out)

    def remove(self, key_id: str) -> None:
        """Delete ``key_id``: its meta.json first (the key is gone from then on), then every object
        under its prefix (bundles, weights and their records)."""
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key_id, META))
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self._key(key_id) + "/"):
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
