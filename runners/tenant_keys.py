"""The service's view of the key store: every bundle bound to the tenant that uploaded it.

The layout, atomic writes and bundle validation are the core ``h33_bento.keystore.KeyStore``'s
(the same store ``mlflow.h33.save_evaluation_keys`` writes and the MLflow pyfunc reads).  This
layer adds what only the service needs: a tenant sees and uses only its own bundles (404 for an
unknown key_id, 403 for another tenant's), and holds at most ``max_keys_per_tenant`` of them.
"""
from __future__ import annotations

import os

from ..errors import EvaluationKeysNotFoundError
from ..keystore import KeyRecord, KeyStore, StagedBundle
from ..keystore_s3 import S3Keys
from .http_errors import HTTPError, foreign_key, unknown_key


class TenantKeyStore(KeyStore):
    """A :class:`KeyStore` whose lookups and writes are made on behalf of an authenticated tenant."""

    def __init__(self, root: str | os.PathLike, max_keys_per_tenant: int = 8, remote: S3Keys | None = None,
                 revalidate_s: float = 5.0) -> None:
        super().__init__(root, remote=remote, revalidate_s=revalidate_s)
        self.max_keys_per_tenant = max_keys_per_tenant

    def resolve(self, key_id: str, tenant: str) -> KeyRecord:
        """The record for ``key_id`` if ``tenant`` owns it; 404 if unknown, 403 if another tenant's."""
        rec = self.get(key_id)
        if rec is None:
            raise unknown_key(key_id)
        if rec.tenant != tenant:
            raise foreign_key(key_id)
        return rec

    def check_quota(self, tenant: str) -> None:
        """403 ``key_quota`` if ``tenant`` cannot register another bundle."""
        if len(self.for_tenant(tenant)) >= self.max_keys_per_tenant:
            raise HTTPError(403, "key_quota", f"tenant already has {self.max_keys_per_tenant} key bundles "
                                              "registered; DELETE /keys/<key_id> an old one first")

    def register(self, staged: StagedBundle, tenant: str) -> tuple[KeyRecord, bool]:
        """Store a validated upload as ``tenant``'s; returns (record, created), 403 if another tenant's."""
        rec, created = self.commit(staged, tenant)
        if rec.tenant != tenant:  # stored first by another tenant (possibly by a concurrent request)
            raise foreign_key(rec.key_id)
        return rec, created

    def unregister(self, key_id: str, tenant: str) -> KeyRecord:
        """Delete ``tenant``'s bundle ``key_id``; 404 if unknown, 403 if another tenant's."""
        self.resolve(key_id, tenant)
        try:
            return self.delete(key_id)
        except EvaluationKeysNotFoundError:  # deleted by a concurrent request or another replica
            raise unknown_key(key_id) from None
