"""The shared half of a key store: bundles on object storage through the S3 API.

Every replica of a service keeps its own local ``KeyStore`` directory; with an ``S3Keys`` remote
(``KeyStore(root, remote=S3Keys.from_url("s3://bucket/prefix"))``) that directory is a cache, and
the object store is where a key exists.  Layout under the prefix::

    <key_id>/meta.json              the KeyRecord plus "bundle": the name of the bundle object
    <key_id>/bundle-<uuid>.h33k     the canonical bundle bytes

A key becomes visible atomically: its bundle object is uploaded first (a multipart upload is not
visible until it completes), then ``meta.json`` is written with ``If-None-Match: *``, so the first
writer of a key_id owns it and a crash before that write leaves only an unnamed bundle object
that no lookup ever reads (and nothing here deletes: docs/deploy.md says how to sweep them).  Deleting removes ``meta.json`` first, so the key disappears at once.

Endpoint, region and credentials come from boto3's usual sources (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto; ``AWS_ACCESS_KEY_ID`` ...).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from .errors import EvaluationKeysNotFoundError

META = "meta.json"


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
        try:
            self.client.download_fileobj(self.bucket, self._key(meta["bundle"]), out)
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                raise EvaluationKeysNotFoundError(meta["key_id"], f"its bundle was removed from {self}") from None
            raise

    def remove(self, key_id: str) -> None:
        """Delete ``key_id``: its meta.json first (the key is gone from then on), then its bundles."""
        meta = self.meta(key_id)
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key_id, META))
        if meta is not None:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(meta["bundle"]))
