"""h33-bento: encrypted (CKKS) neural-network inference that deploys like any other model.

Public API (imported lazily, so ``import h33_bento`` stays light and never pulls in torch):
``compile``, ``CompiledModel``, ``simulate``, ``Engine``, ``FHEInferenceClient``, ``Prediction``,
``KeyChain``, ``EvaluationKeys``, ``KeyStore``, ``EncryptedTensor``, ``CKKSParams``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._omp import apply_defaults as _apply_omp_defaults

_apply_omp_defaults()  # OpenMP reads its settings when openfhe loads: set safe defaults before that

__version__ = "0.1.0"

_EXPORTS = {
    "compile": "h33_bento.compiler",
    "CompiledModel": "h33_bento.compiler.program",
    "simulate": "h33_bento.runtime.simulate",
    "Engine": "h33_bento.runtime.engine",
    "FHEInferenceClient": "h33_bento.client",
    "Prediction": "h33_bento.client",
    "KeyChain": "h33_bento.ckks.keys",
    "EvaluationKeys": "h33_bento.ckks.keys",
    "KeyStore": "h33_bento.keystore",
    "EncryptedTensor": "h33_bento.ckks.serialization",
    "CKKSParams": "h33_bento.ckks.params",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'h33_bento' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# ``mlflow.h33``: the MLflow flavor (h33_bento.mlflow_flavor) is attached to mlflow as soon as
# both are imported, in either order, without this module importing mlflow (seconds) itself.
# If mlflow is already loaded it is attached now; otherwise a meta-path finder wraps mlflow's
# loader once, attaches the flavor right after mlflow's own module body has run, and then
# restores mlflow's original loader.  ``import mlflow.h33`` works too (sys.modules entry).
def _attach_mlflow_flavor(mlflow_module: Any) -> None:
    import sys

    try:
        from . import mlflow_flavor
    except Exception as exc:  # never break `import mlflow` because of the flavor
        import warnings

        warnings.warn(f"h33_bento: the MLflow flavor could not be attached as mlflow.h33: {exc}", stacklevel=2)
        return
    mlflow_module.h33 = mlflow_flavor
    sys.modules.setdefault("mlflow.h33", mlflow_flavor)


class _MlflowImportHook:
    """Meta-path finder that only answers for the top-level ``mlflow`` package."""

    _busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        import sys

        if name != "mlflow" or self._busy:
            return None
        self._busy = True  # a finder that itself looks mlflow up must not recurse into this one
        try:
            for finder in sys.meta_path:  # let the real finders locate mlflow
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader

        class _Loader:
            def create_module(self, spec: Any) -> Any:
                return original.create_module(spec)

            def exec_module(self, module: Any) -> None:
                module.__spec__.loader = module.__loader__ = original
                original.exec_module(module)
                _attach_mlflow_flavor(module)

        spec.loader = _Loader()
        return spec


def _install_mlflow_hook() -> None:
    import sys

    if "mlflow" in sys.modules:
        _attach_mlflow_flavor(sys.modules["mlflow"])
    if not any(type(f).__name__ == "_MlflowImportHook" for f in sys.meta_path):
        sys.meta_path.insert(0, _MlflowImportHook())


_install_mlflow_hook()
