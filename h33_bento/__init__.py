"""h33-bento: encrypted (CKKS) neural-network inference that deploys like any other model.

Public API (imported lazily, so ``import h33_bento`` stays light and never pulls in torch,
MLflow or BentoML; ``mlflow.h33`` is attached by MLflow's plugin hook, see
``h33_bento/mlflow_flavor/attach.py``):
``compile``, ``CompiledModel``, ``simulate``, ``Engine``, ``FHEInferenceClient``, ``Prediction``,
``KeyChain``, ``EvaluationKeys``, ``KeyStore``, ``EncryptedTensor``, ``CKKSParams``,
``PrimitiveCosts``, ``measure_primitives``, ``provision_weights``, ``EncryptedWeights``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._omp import apply_defaults as _apply_omp_defaults

_apply_omp_defaults()  # OpenMP reads its settings when openfhe loads: set safe defaults before that

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "h33_bento.compiler",
    "CompiledModel": "h33_bento.program.model",
    "simulate": "h33_bento.runtime.simulate",
    "Engine": "h33_bento.runtime.engine",
    "FHEInferenceClient": "h33_bento.client",
    "Prediction": "h33_bento.client",
    "ModelOwner": "h33_bento.client",
    "KeyChain": "h33_bento.ckks.keys",
    "EvaluationKeys": "h33_bento.ckks.keys",
    "KeyStore": "h33_bento.keystore",
    "PrimitiveCosts": "h33_bento.ckks.timing",
    "measure_primitives": "h33_bento.ckks.timing",
    "EncryptedTensor": "h33_bento.ckks.serialization",
    "CKKSParams": "h33_bento.ckks.params",
    "provision_weights": "h33_bento.runtime.weights",
    "EncryptedWeights": "h33_bento.runtime.weights",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'h33_bento' has no attribute {name!r}")
