"""Serving: the BentoML service for encrypted inference (installed as ``h33_bento.runners``).

* ``service``  -- ``H33Inference``, the ``@bentoml.service`` (``bentoml serve h33_bento.runners.service:H33Inference``)
* ``engines``  -- ``EngineRunner`` (executes programs, one engine per key), ``LanePacker`` (8-lane batching)
  and ``KeyState`` (OpenFHE's process-wide key maps and the one thread that touches them)
* ``worker_state`` -- the worker (tenants, admission, sandboxes, served models by name);
  ``served_model`` -- one model's keys, engines, packer and tasks
* ``http``     -- auth/limits gate and the routes (/infer, /keys, /model, /models, /tasks, /health)
* ``tasks``    -- long runs as tasks: submitted, polled for progress, fetched later
* ``config``   -- ``ServeConfig`` (pydantic) and API-key helpers; ``tenant_keys`` -- tenants and quota on the key store
* ``source``   -- loading the model from MLflow or the BentoML store, and storing it there

Submodules are imported lazily so ``import h33_bento.runners`` does not pull in BentoML.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": "config",
    "new_api_key": "config",
    "hash_api_key": "config",
    "TenantKeyStore": "tenant_keys",
    "EngineRunner": "engines",
    "LanePacker": "engines",
    "save_to_bentoml": "source",
    "import_from_mlflow": "source",
    "load_compiled": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
