"""Where the served CompiledModel comes from: an MLflow model URI or the BentoML model store.

Store helpers (also a small CLI)::

    python -m h33_bento.runners.source save COMPILED_DIR [--name h33-model]
    python -m h33_bento.runners.source import-mlflow models:/mnist@prod [--name h33-model]

A BentoML model written by ``save_to_bentoml`` holds the compiled model under ``compiled/``
(``manifest.json`` + ``arrays.npz``, no pickle).  Models imported with ``bentoml.mlflow.import_model``
(an ``mlflow_model/`` folder) are read through the h33 MLflow flavor.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..program.model import MANIFEST, CompiledModel
from ..errors import ModelFormatError

DEFAULT_MODEL_NAME = "h33-model"
COMPILED_DIR = "compiled"
MLFLOW_DIR = "mlflow_model"


def _flavor_load(uri: str) -> CompiledModel:
    try:
        from .. import mlflow_flavor
    except ImportError as exc:  # pragma: no cover - the package is part of h33-bento
        raise RuntimeError("the h33 MLflow flavor is not importable") from exc
    load = getattr(mlflow_flavor, "load_model", None)
    if load is None:
        raise RuntimeError("h33_bento.mlflow_flavor.load_model is not available in this build; "
                           "serve from the BentoML model store (H33_BENTO_MODEL) instead")
    model = load(uri)
    if not isinstance(model, CompiledModel):
        raise ModelFormatError(f"{uri} did not load as an h33 CompiledModel (got {type(model).__name__})")
    return model


def load_from_bento_model(model: Any) -> CompiledModel:
    """The CompiledModel inside a BentoML store model (ours, or an imported MLflow model)."""
    root = Path(model.path)
    if (root / COMPILED_DIR / MANIFEST).is_file():
        return CompiledModel.load(root / COMPILED_DIR)
    if (root / MANIFEST).is_file():
        return CompiledModel.load(root)
    if (root / MLFLOW_DIR / "MLmodel").is_file():
        return _flavor_load(str(root / MLFLOW_DIR))
    raise ModelFormatError(f"BentoML model {model.tag} holds no h33 compiled model "
                           f"(expected {COMPILED_DIR}/{MANIFEST} or {MLFLOW_DIR}/MLmodel)")


def load_compiled(model_uri: str | None, bento_model: str) -> tuple[CompiledModel, dict[str, str]]:
    """Load from ``model_uri`` (MLflow) when given, else from the BentoML store tag/alias."""
    if model_uri:
        return _flavor_load(model_uri), {"kind": "mlflow", "uri": model_uri}
    import bentoml

    stored = bentoml.models.get(bento_model)
    return load_from_bento_model(stored), {"kind": "bentoml", "tag": str(stored.tag)}


def save_to_bentoml(compiled: CompiledModel, name: str = DEFAULT_MODEL_NAME,
                    labels: dict[str, str] | None = None, metadata: dict[str, Any] | None = None):
    """Write ``compiled`` to the BentoML model store; returns the bentoml Model (``.tag``)."""
    import bentoml

    meta = {"h33_fingerprint": compiled.fingerprint, "params_fingerprint": compiled.params.fingerprint,
            **{f"params.{k}": v for k, v in compiled.params.summary().items()},
            **{f"summary.{k}": v for k, v in compiled.summary().items() if v is not None}}
    meta.update(metadata or {})
    with bentoml.models.create(name, labels={"framework": "h33", **(labels or {})}, metadata=meta) as model:
        compiled.save(Path(model.path) / COMPILED_DIR)
    return model


def import_from_mlflow(model_uri: str, name: str = DEFAULT_MODEL_NAME):
    """Load an h33 model from MLflow (``models:/name@alias``) and store it natively in BentoML."""
    compiled = _flavor_load(model_uri)
    return save_to_bentoml(compiled, name, labels={"source": "mlflow"}, metadata={"mlflow_uri": model_uri})


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m h33_bento.runners.source",
                                     description="put an h33 compiled model into the BentoML model store")
    sub = parser.add_subparsers(dest="cmd", required=True)
    save = sub.add_parser("save", help="store a saved CompiledModel directory")
    save.add_argument("compiled_dir")
    save.add_argument("--name", default=DEFAULT_MODEL_NAME)
    save.add_argument("--weightless", action="store_true",
                      help="store the model without its weights, to serve it in encrypted-weight mode "
                           "(the model owner keeps the full directory and provisions each tenant's weights)")
    imp = sub.add_parser("import-mlflow", help="store a model logged with the h33 MLflow flavor")
    imp.add_argument("model_uri")
    imp.add_argument("--name", default=DEFAULT_MODEL_NAME)
    args = parser.parse_args(argv)
    if args.cmd == "save":
        compiled = CompiledModel.load(args.compiled_dir)
        model = save_to_bentoml(compiled.without_weights() if args.weightless else compiled, args.name)
    else:
        model = import_from_mlflow(args.model_uri, args.name)
    print(model.tag)


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()
