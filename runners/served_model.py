"""One served model: its compiled program, key store, engines, lane packer and tasks.

A service holds one ``ServedModel`` per configured name (``runners/config.py``, ``H33_MODELS``);
the worker's ``Runtime`` (``worker_state.py``) holds what they share: tenants, admission, the
sandboxes and OpenFHE's key state.  Everything a model's requests touch is its own: its keys
(a key uploaded for one model is unknown to the others), its lane groups, its tasks, and the
``model`` label of its metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio

from ..ckks.sandbox import Sandbox
from ..ckks.serialization import WIRE_VERSION, EncryptedTensor
from ..program.diagonals import lane_shifts
from ..program.model import CompiledModel
from ..errors import EnvelopeError, EvaluationKeysNotFoundError, SandboxUnavailableError
from ..keystore import KeyRecord, StagedBundle
from ..keystore_s3 import S3Keys
from ..runtime.weights import load_weights
from .config import ServeConfig
from .engines import EngineRunner, InferItem, KeyState, LanePacker
from .http_errors import HTTPError, foreign_key, from_envelope_error, unknown_key, validator_unavailable, weights_missing
from .metrics import Metrics
from .tasks import TaskStore
from .tenant_keys import TenantKeyStore

logger = logging.getLogger("h33_bento.runners")


def unknown_model(name: str, served: list[str]) -> HTTPError:
    """404, answered by the gate before the body is read (so the connection closes)."""
    return HTTPError(404, "unknown_model", f"this server serves no model named {name!r} "
                                           f"(GET /models lists them: {', '.join(served)})", close=True)


class ServedModel:
    """One model of the service, addressed as ``/models/{name}/...`` (or un-prefixed, as the default)."""

    def __init__(self, name: str, compiled: CompiledModel, source: dict[str, str], config: ServeConfig,
                 sandbox: Sandbox, key_state: KeyState, metrics: Metrics, engine_cache_bytes: int) -> None:
        if not compiled.runnable:
            raise ValueError(f"model {name!r} is a plan only (it needs bootstrapping) and cannot be served")
        self.name, self.compiled, self.source, self.config, self.sandbox = name, compiled, source, config, sandbox
        root, url = config.key_store_for(name)
        remote = S3Keys.from_url(url) if url else None
        self.keystore = TenantKeyStore(root, config.max_keys_per_tenant, remote, config.key_revalidate_s)
        self.metrics = metrics.for_model(name)
        self.runner = EngineRunner(compiled, self.keystore, sandbox, key_state, config.max_engines,
                                   engine_cache_bytes, self.metrics)
        self.packer = LanePacker(self.runner, config.lane_wait_ms / 1000.0, config.lane_max_wait_ms / 1000.0,
                                 self.metrics)
        self.tasks = TaskStore(config.task_ttl_s, config.max_tasks, config.max_tenant_tasks)
        self._model_info: dict[str, Any] | None = None
        logger.info("serving h33 model %r: %s (%s) from %s; key store %s with %d bundles", name, compiled.fingerprint,
                    compiled.params.summary(), source, self.keystore.remote or self.keystore.root, len(self.keystore))

    def summary(self) -> dict[str, Any]:
        """The model's line in ``GET /models``."""
        m = self.compiled
        return {"name": self.name, "fingerprint": m.fingerprint, "params_fingerprint": m.params.fingerprint,
                "weight_mode": m.weight_mode, "input_shape": list(m.input_shape),
                "output_shape": list(m.output_shape), "lanes": m.lanes,
                "predicted_latency_ms": m.summary()["predicted_latency_ms"], "source": self.source}

    def counters(self) -> dict[str, Any]:
        """The model's part of ``GET /health``."""
        return {"model_fingerprint": self.compiled.fingerprint, "key_bundles": len(self.keystore),
                "engines_loaded": self.runner.engines_loaded, "engine_runs": self.runner.runs,
                "pending_requests": self.packer.pending, "tasks_kept": len(self.tasks),
                "tasks_unfinished": self.tasks.unfinished, "installed_keys": len(self.runner.loaded_tags)}

    async def close(self) -> None:
        await self.packer.close()

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
                    "name": self.name,
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
        if m.weight_mode == "encrypted" and self.keystore.weights_digest(env.key_id, m.fingerprint) is None:
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
        self.keystore.resolve(key_id, tenant)

    async def register_weights(self, tenant: str, key_id: str, upload: Path) -> dict[str, Any]:
        """Check uploaded encrypted weights (frame, model, key, every ciphertext in the sandbox), read
        from the upload's file a batch at a time, and store them next to ``key_id``'s bundle (with a
        shared store: on the object store), replacing earlier ones; the key's engine reloads."""
        record = self.keystore.resolve(key_id, tenant)
        try:
            weights = await anyio.to_thread.run_sync(load_weights, upload, self.compiled, key_id, record.key_tag,
                                                     self.sandbox)
        except EnvelopeError as exc:
            raise from_envelope_error(exc) from None
        except SandboxUnavailableError as exc:
            raise validator_unavailable(str(exc)) from None
        size = upload.stat().st_size
        try:
            await anyio.to_thread.run_sync(self.keystore.put_weights, key_id, self.compiled.fingerprint, upload)
        except EvaluationKeysNotFoundError:  # deleted while the weights were checked
            raise unknown_key(key_id) from None
        await self.runner.call(self.runner.forget, key_id)
        return {"key_id": key_id, "model_fingerprint": self.compiled.fingerprint, "size_bytes": size,
                "ciphertexts": weights.count}

    async def delete_keys(self, tenant: str, key_id: str) -> KeyRecord:
        rec = await anyio.to_thread.run_sync(self.keystore.unregister, key_id, tenant)
        await self.runner.call(self.runner.forget, key_id)
        return rec
