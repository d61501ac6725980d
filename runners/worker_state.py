"""The per-worker server state: tenants, admission, sandboxes, OpenFHE's key state and the served models.

The BentoML service constructs one ``Runtime`` per worker process and registers it here, so the
ASGI gate and the mounted routes (which BentoML builds before the service instance exists) can
reach it.  Each served model's own state (keys, engines, lane packer, tasks) is a
``ServedModel`` (``served_model.py``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from ..ckks.context import rss_bytes
from ..ckks.sandbox import Sandbox
from ..errors import SandboxUnavailableError
from ..program.model import CompiledModel
from .config import Authenticator, ServeConfig, TenantConfig
from .engines import KeyState
from .http_errors import busy
from .metrics import create as create_metrics
from .served_model import ServedModel, unknown_model
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
    """The worker: who may call (tenants, admission) and the models it serves, by name."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.auth = Authenticator(config.tenants)
        if not config.tenants:
            logger.warning("no tenants are configured: every authenticated endpoint will answer 401")
        self.scrapers = Authenticator({"metrics": TenantConfig(api_key_sha256=config.metrics_token_sha256)}
                                      if config.metrics_token_sha256 else {})
        if not config.metrics_public and not config.metrics_token_sha256:
            logger.warning("/metrics is not public and no scrape token is configured: it will answer 401")
        self.admission = Admission(config.max_concurrency, config.max_tenant_concurrency)
        self.metrics = create_metrics()
        self.key_state = KeyState(config.max_installed_keys)
        # every untrusted OpenFHE byte (request ciphertexts, uploaded and stored bundles) is validated
        # in these child processes first: a malformed one can crash OpenFHE, and this process serves
        # every tenant; models with the same CKKS parameters share one sandbox
        self.sandboxes: dict[str, Sandbox] = {}
        sources = config.served_models()
        cache_bytes = config.engine_cache_bytes // len(sources)  # the plaintext-cache budget is the worker's
        self.models: dict[str, ServedModel] = {}
        for name, spec in sources.items():
            compiled, source = load_compiled(spec.model_uri, spec.bento_model)
            self.models[name] = ServedModel(name, compiled, source, config, self._sandbox(compiled), self.key_state,
                                            self.metrics, cache_bytes)
        self.default = self.models[config.default_model_name]
        self.started = time.time()

    def _sandbox(self, compiled: CompiledModel) -> Sandbox:
        params = compiled.params
        sandbox = self.sandboxes.get(params.fingerprint)
        if sandbox is None:
            sandbox = self.sandboxes[params.fingerprint] = Sandbox(params, processes=self.config.sandbox_processes,
                                                                   timeout_s=self.config.sandbox_timeout_s)
            threading.Thread(target=_learn_key_shapes, args=(sandbox,), name="h33-key-shapes", daemon=True).start()
        return sandbox

    def model(self, name: str | None) -> ServedModel:
        """The model ``name`` (None: the default one); 404 ``unknown_model`` if none is served under it."""
        if name is None:
            return self.default
        served = self.models.get(name)
        if served is None:
            raise unknown_model(name, list(self.models))
        return served

    # ----------------------------------------------------------------- registration
    def activate(self) -> "Runtime":
        global _current
        _current = self
        return self

    async def close(self) -> None:
        global _current
        for served in self.models.values():
            await served.close()
        self.key_state.close()
        for sandbox in self.sandboxes.values():
            sandbox.close()
        if _current is self:
            _current = None

    # ----------------------------------------------------------------- /models, /health
    def models_info(self) -> dict[str, Any]:
        return {"default": self.default.name, "models": [m.summary() for m in self.models.values()]}

    def health(self) -> dict[str, Any]:
        """The worker's counters; the per-model ones summed (the default model's fingerprint), and by model."""
        per_model = {name: m.counters() for name, m in self.models.items()}
        totals = {k: sum(c[k] for c in per_model.values())
                  for k in ("key_bundles", "engines_loaded", "engine_runs", "pending_requests", "tasks_kept",
                            "tasks_unfinished")}
        return {
            "status": "saturated" if self.admission.saturated else "ok",
            "model_fingerprint": self.default.compiled.fingerprint,
            "default_model": self.default.name,
            "uptime_s": round(time.time() - self.started, 1),
            **totals,
            "requests_in_flight": self.admission.in_flight,
            "max_concurrency": self.admission.max_total,
            "worker_pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "installed_keys": self.key_state.installed_keys,
            "max_installed_keys": self.key_state.max_installed_keys,
            "key_recycles": self.key_state.recycles,
            "sandbox_crashes": sum(s.crashes for s in self.sandboxes.values()),
            "models": per_model,
        }


def _learn_key_shapes(sandbox: Sandbox) -> None:
    """Ready a sandbox for bundles now, not on the first upload (seconds of key generation)."""
    try:
        sandbox.learn_key_shapes()
    except SandboxUnavailableError as exc:  # the first bundle validation tries again
        logger.error("%s", exc)
