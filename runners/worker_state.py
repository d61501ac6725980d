"""The per-worker server state: model, tenants, key store, engines, lane packer and tasks.

The BentoML service constructs one ``Runtime`` per worker process and registers it here, so the
ASGI gate and the mounted routes (which BentoML builds before the service instance exists) can
reach it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import anyio

from ..ckks.context import rss_bytes
from ..ckks.sandbox import Sandbox
from ..ckks.serialization import WIRE_VERSION, EncryptedTensor
from ..program.diagonals import lane_shifts
from ..program.model import CompiledModel
from ..errors import EnvelopeError, EvaluationKeysNotFoundError, SandboxUnavailableError
from ..keystore import KeyRecord, StagedBundle
from ..keystore_s3 import S3Keys
from ..runtime.weights import load_weights
from .config import Authenticator, ServeConfig, TenantConfig
from .engines import EngineRunner, InferItem, LanePacker
from .http_errors import (HTTPError, busy, foreign_key, from_envelope_error, unknown_key, validator_unavailable,
                          weights_missing)
from .tasks import TaskStore
from .tenant_keys import TenantKeyStore
from .metrics import Metrics, create as create_metrics
from .source import load_compiled

logger = logging.getLogger("h33_bento.runners")

_current: "Runtime | None" = None


def current() -> "Runtime | None":
    return _current


class Admission:
    """In-flight caps on authenticated requests, per tenant and per worker (429 beyond them).

    The gate takes a slot after authentication and holds it until the answer is sent, so one
    tenant cannot take every slot, and unauthenticated requests (answered before they get this
    far) never take one.  A worker with every slot taken reports itself saturated (not ready).
    Only the event loop changes the counters, so they need no lock.
    """

    def __init__(self, max_total: int, max_per_tenant: int) -> None:
        self.max_total = max_total
        self.max_per_tenant = max_per_tenant
        self.in_flight = 0
        self._tenants: dict[str, int] = {}

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.max_total

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s slots for the duration of a request; 429 if none is free."""
        mine = self._tenants.get(tenant, 0)
        if mine >= self.max_per_tenant:
            raise busy(f"this tenant (at most {self.max_per_tenant})")
        if self.saturated:
            raise busy(f"this server (at most {self.max_total})")
        self.in_flight += 1
        self._tenants[tenant] = mine + 1
        try:
            yield
        finally:
            self.in_flight -= 1
            left = self._tenants[tenant] - 1
            if left:
                self._tenants[tenant] = left
            else:
                del self._tenants[tenant]


class Runtime:
    def __init__(self, config: ServeConfig, compiled: CompiledModel | None = None,
                 source: dict[str, str] | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        if compiled is None:
            compiled, source = load_compiled(config.model_uri, config.bento_model)
        if not compiled.runnable:
            raise ValueError("the model is a plan only (it needs bootstrapping) and cannot be served")
        self.compiled = compiled
        self.source = source or {"kind": "object"}
        self.auth = Authenticator(config.tenants)
        if not config.tenants:
            logger.warning("no tenants are configured: every authenticated endpoint will answer 401")
        self.scrapers = Authenticator({"metrics": TenantConfig(api_key_sha256=config.metrics_token_sha256)}
                                      if config.metrics_token_sha256 else {})
        if not config.metrics_public and not config.metrics_token_sha256:
            logger.warning("/metrics is not public and no scrape token is configured: it will answer 401")
        self.admission = Admission(config.max_concurrency, config.max_tenant_concurrency)
        remote = S3Keys.from_url(config.key_store_url) if config.key_store_url else None
        self.keystore = TenantKeyStore(config.key_store, config.max_keys_per_tenant, remote, config.key_revalidate_s)
        self.metrics = metrics or create_metrics(compiled.fingerprint)
        # every untrusted OpenFHE byte (request ciphertexts, uploaded and stored bundles) is validated
        # in these child processes first: a malformed one can crash OpenFHE, and this process serves
        # every tenant
        self.sandbox = Sandbox(compiled.params, processes=config.sandbox_processes,
                               timeout_s=config.sandbox_timeout_s)
        self.runner = EngineRunner(compiled, self.keystore, self.sandbox, config.max_engines,
                                   config.engine_cache_bytes, self.metrics, config.max_installed_keys)
        threading.Thread(target=self._learn_key_shapes, name="h33-key-shapes", daemon=True).start()
        self.packer = LanePacker(self.runner, config.lane_wait_ms / 1000.0, config.lane_max_wait_ms / 1000.0,
                                 self.metrics)
        self.tasks = TaskStore(config.task_ttl_s, config.max_tasks, config.max_tenant_tasks)
        self.started = time.time()
        self._model_info: dict[str, Any] | None = None
        logger.info("serving h33 model %s (%s) from %s; key store %s with %d bundles", compiled.fingerprint,
                    compiled.params.summary(), self.source, self.keystore.remote or self.keystore.root, len(self.keystore))

    def _learn_key_shapes(self) -> None:
        """Ready the sandbox for bundles now, not on the first upload (seconds of key generation)."""
        try:
            self.sandbox.learn_key_shapes()
        except SandboxUnavailableError as exc:  # the first bundle validation tries again
            logger.error("%s", exc)

    # ----------------------------------------------------------------- registration
    def activate(self) -> "Runtime":
        global _current
        _current = self
        return self

    async def close(self) -> None:
        global _current
        await self.packer.close()
        self.runner.close()
        self.sandbox.close()
        if _current is self:
            _current = None

    # ----------------------------------------------------------------- /model
    def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            m, p = self.compiled, self.compiled.params
            shifts = list(lane_shifts(p.lanes, p.slots))
            self._model_info = {
                "model": {
                    "fingerprint": m.fingerprint,
                    "weight_mode": m.weight_mode,
                    "input_name": m.input_name,
                    "input_shape": list(m.input_shape),
                    "output_shape": list(m.output_shape),
                    "labels": m.class_labels(),
                    "lanes": m.lanes,
                    "lane_length": m.lane_length,
                    "input_blocks": m.input_blocks,
                    "depth": m.depth,
                    "summary": m.summary(),
                    "source": self.source,
                },
                "params": {**p.model_dump(mode="json"), "fingerprint": p.fingerprint},
                "keys": {
                    "rotation_indices": list(p.rotation_indices),
                    "lane_shift_rotations": shifts,
                    "relinearization": True,
                    "predicted_bundle_bytes": m.predicted_key_bundle_bytes,
                },
                # the client's packing layout: where each input value goes and where each logit is read
                # (public; the weights stay on the server)
                "layout": {
                    "input_positions": [int(v) for v in m.input_positions.reshape(-1)],
                    "output_positions": [int(v) for v in m.output_positions.reshape(-1)],
                },
                "lane_packing": {
                    "enabled": self.runner.can_pack,
                    "lanes": p.lanes,
                    "wait_ms": self.config.lane_wait_ms,
                    "max_wait_ms": self.config.lane_max_wait_ms,
                },
                "limits": self.config.public_limits(),
                "wire_version": WIRE_VERSION,
            }
        return self._model_info

    def health(self) -> dict[str, Any]:
        return {
            "status": "saturated" if self.admission.saturated else "ok",
            "model_fingerprint": self.compiled.fingerprint,
            "uptime_s": round(time.time() - self.started, 1),
            "key_bundles": len(self.keystore),
            "engines_loaded": self.runner.engines_loaded,
            "engine_runs": self.runner.runs,
            "pending_requests": self.packer.pending,
            "tasks_kept": len(self.tasks),
            "tasks_unfinished": self.tasks.unfinished,
            "requests_in_flight": self.admission.in_flight,
            "max_concurrency": self.admission.max_total,
            "worker_pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "installed_keys": self.runner.installed_keys,
            "max_installed_keys": self.runner.max_installed_keys,
            "key_recycles": self.runner.recycles,
            "sandbox_crashes": self.sandbox.crashes,
        }

    # ----------------------------------------------------------------- /infer
    def prepare_infer(self, tenant: str, body: bytes, key_id_header: str | None = None) -> InferItem:
        """Parse and check an /infer body; raises HTTPError with the right status."""
        m = self.compiled
        try:
            env = EncryptedTensor.from_bytes(body)
            env.check(m.fingerprint, m.params.fingerprint)
        except EnvelopeError as exc:
            raise from_envelope_error(exc) from None
        if key_id_header and key_id_header != env.key_id:
            raise HTTPError(422, "invalid_envelope", "the X-H33-Key-Id header does not match the envelope's key_id")
        record = self.keystore.resolve(env.key_id, tenant)  # 404 unknown / 403 another tenant's
        if m.weight_mode == "encrypted" and not self.keystore.weights_path(env.key_id, m.fingerprint).is_file():
            raise weights_missing(env.key_id)
        shape = tuple(m.input_shape)
        problems = []
        if not 1 <= env.lanes_used <= m.lanes:
            problems.append(f"lanes_used must be 1..{m.lanes}, got {env.lanes_used}")
        if env.lane != 0:
            problems.append("requests must start in lane 0")
        if tuple(env.shape) not in (shape, (env.lanes_used, *shape)) or (tuple(env.shape) == shape and env.lanes_used != 1):
            problems.append(f"envelope holds shape {tuple(env.shape)}, the model takes {shape}")
        if len(env.ciphertexts) != m.input_blocks:
            problems.append(f"envelope holds {len(env.ciphertexts)} ciphertexts, the model takes {m.input_blocks}")
        if env.level != 0:
            problems.append("input ciphertexts must be fresh (level 0)")
        if problems:
            raise HTTPError(422, "invalid_envelope", "; ".join(problems))
        try:  # OpenFHE sees the ciphertexts in this process only once a sandbox child has vetted them
            env.ciphertexts = self.sandbox.canonical_ciphertexts(env.ciphertexts, record.key_tag)
        except EnvelopeError as exc:
            raise from_envelope_error(exc) from None
        except SandboxUnavailableError as exc:
            raise validator_unavailable(str(exc)) from None
        return InferItem(tenant=tenant, key_id=env.key_id, envelope=env, model_fingerprint=m.fingerprint)

    # ----------------------------------------------------------------- /keys
    async def register_keys(self, tenant: str, upload: Path, claimed_key_id: str | None = None
                            ) -> tuple[KeyRecord, bool]:
        """Validate an uploaded bundle, install it, and persist it bound to ``tenant``.

        A sandbox child validates the upload and writes its re-serialized form; only that form is
        installed here and stored (so the store holds bundles this process may load directly).
        ``claimed_key_id`` is the upload's ``X-H33-Key-Id`` header, which routers hash on: a
        bundle of another key would be stored by a replica its key's requests never reach.
        """
        with self.keystore.incoming() as canonical:  # locked against other processes' cleaning
            try:
                await anyio.to_thread.run_sync(self.sandbox.canonical_bundle, upload, canonical.path)
                staged: StagedBundle = await anyio.to_thread.run_sync(self.keystore.stage, canonical.path,
                                                                      self.compiled.params)
            except EnvelopeError as exc:
                raise from_envelope_error(exc, bundle=True) from None
            except SandboxUnavailableError as exc:
                raise validator_unavailable(str(exc)) from None
            keys = staged.keys
            if claimed_key_id is not None and claimed_key_id != keys.key_id:
                raise HTTPError(422, "invalid_bundle", "the X-H33-Key-Id header does not match the bundle's key_id")
            existing = self.keystore.get(keys.key_id)
            if existing is not None:
                if existing.tenant != tenant:
                    raise foreign_key(keys.key_id)
                return existing, False
            self.keystore.check_quota(tenant)
            if self.compiled.weight_mode == "plaintext":  # a weightless model's engine waits for its weights
                await self.runner.call(self.runner.install, keys)
            return await anyio.to_thread.run_sync(self.keystore.register, staged, tenant)

    # ----------------------------------------------------------------- /keys/{key_id}/weights
    def check_weights_upload(self, tenant: str, key_id: str) -> None:
        """Refuse a weights upload before its body is stored: the served model must be weightless and
        ``key_id`` the tenant's (404 unknown, 403 another tenant's)."""
        if self.compiled.weight_mode != "encrypted":
            raise HTTPError(409, "plaintext_weights", "this server's model holds its weights in the clear; it takes "
                                                      "no encrypted weights (serve its weightless artifact for that)")
        if self.keystore.remote is not None:
            raise HTTPError(501, "weights_not_shared", "encrypted weights are not stored on a shared (S3) key store "
                                                       "yet; serve encrypted-weight models from a local key store")
        self.keystore.resolve(key_id, tenant)

    async def register_weights(self, tenant: str, key_id: str, upload: Path) -> dict[str, Any]:
        """Check uploaded encrypted weights (frame, model, key, every ciphertext in the sandbox) and
        store them next to ``key_id``'s bundle, replacing earlier ones; the key's engine reloads."""
        record = self.keystore.resolve(key_id, tenant)
        try:
            data = await anyio.to_thread.run_sync(upload.read_bytes)
            weights = await anyio.to_thread.run_sync(load_weights, data, self.compiled, key_id, record.key_tag,
                                                     self.sandbox)
        except EnvelopeError as exc:
            raise from_envelope_error(exc) from None
        except SandboxUnavailableError as exc:
            raise validator_unavailable(str(exc)) from None
        size = len(data)
        del data
        try:
            await anyio.to_thread.run_sync(self.keystore.put_weights, key_id, self.compiled.fingerprint, upload)
        except EvaluationKeysNotFoundError:  # deleted while the weights were checked
            raise unknown_key(key_id) from None
        await self.runner.call(self.runner.forget, key_id)
        return {"key_id": key_id, "model_fingerprint": self.compiled.fingerprint, "size_bytes": size,
                "ciphertexts": sum(len(w.diagonals) + len(w.biases) for w in weights.steps.values())}

    async def delete_keys(self, tenant: str, key_id: str) -> KeyRecord:
        rec = await anyio.to_thread.run_sync(self.keystore.unregister, key_id, tenant)
        await self.runner.call(self.runner.forget, key_id)
        return rec
