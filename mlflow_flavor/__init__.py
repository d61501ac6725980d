"""MLflow flavor ``h33``: log, register, load and serve FHE-compiled models.

With h33-bento installed, ``import mlflow`` makes this module available as ``mlflow.h33``
(``attach.py``, through MLflow's plugin entry points), so a compiled model is logged like any other::

    import mlflow

    with mlflow.start_run():
        info = mlflow.h33.log_model(compiled, name="mnist-fhe", registered_model_name="mnist-fhe",
                                    accuracy={"plaintext": 0.981, "encrypted": 0.979})

An MLflow model written by this flavor holds

* ``model/``: the :class:`~h33_bento.program.model.CompiledModel` in its native format
  (``manifest.json`` + ``arrays.npz``, never pickle);
* ``MLmodel``: an ``h33`` flavor section recording the format version, the CKKS parameters, the
  lanes, the params and model fingerprints, the evaluation-key requirements, the input and
  output shapes, the labels and the plan summary (and, for a weightless model,
  ``weight_mode: encrypted`` and its ``weights_id``), and a ``python_function`` section whose
  ``loader_module`` is this module, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
  work without importing ``h33_bento`` first;
* ``requirements.txt`` (mlflow, h33-bento, openfhe, numpy, pydantic) and, when h33-bento runs from a
  source checkout, ``wheels/<digest>/`` with a wheel of it (``wheel.py``), so MLflow's virtualenv
  and Docker tools install the model where no package index has h33-bento.

It never holds key material.  The pyfunc model runs encrypted envelopes with evaluation keys
taken from a *key store* (``h33_bento.keystore.KeyStore``, the layout the BentoML service uses
too; see :func:`save_evaluation_keys`), named by ``model_config={"key_store": DIR}`` at load
time (or at log time), by MLflow's ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` environment variable, or
by ``H33_KEY_STORE``.  See ``docs/mlflow.md``.

Module-level imports are light (numpy, ``h33_bento.errors``): mlflow, pandas, OpenFHE and the
engine are imported inside the functions that need them, so attaching ``mlflow.h33`` is free.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import struct
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from h33_bento import __version__ as _H33_VERSION
from h33_bento.errors import EnvelopeError, EvaluationKeysNotFoundError, ModelFormatError

__all__ = [
    "FLAVOR_NAME",
    "FLAVOR_FORMAT_VERSION",
    "save_model",
    "log_model",
    "load_model",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "envelope_signature",
    "flavor_metadata",
    "save_evaluation_keys",
    "FlavorFormatError",
    "FingerprintMismatchError",
    "ParamsFingerprintMismatchError",
    "ModelFingerprintMismatchError",
    "EvaluationKeysNotFoundError",
]

FLAVOR_NAME = "h33"
#: Version of the ``h33`` section of the MLmodel file (not of the compiled-model format).
#: 2: the compile estimates are recorded under ``summary`` (``CompiledModel.summary()``).
FLAVOR_FORMAT_VERSION = 2
#: Where the compiled model lives inside the MLflow model directory.
MODEL_DATA_SUBPATH = "model"
#: Fallback for the key store when the pyfunc model_config names none.
KEY_STORE_ENV = "H33_KEY_STORE"
#: Name of the envelope column in the model signature's output (and accepted on input).
ENVELOPE_COLUMN = "ciphertext"
MODES = ("encrypted", "simulate")
#: Engines (one per key_id) a pyfunc model keeps; the least recently used is dropped beyond this.
MAX_CACHED_ENGINES = 8
#: Keys a pyfunc model_config may carry.  All are saved (possibly as null) so that MLflow lets
#: load-time model_config and MLFLOW_PYFUNC_INFERENCE_CONFIG override them.
MODEL_CONFIG_KEYS = ("key_store",)

_LOADER_MODULE = "h33_bento.mlflow_flavor"


# ----------------------------------------------------------------------------- errors
class FlavorFormatError(ModelFormatError):
    """The MLmodel's ``h33`` section is malformed or of a format version this build cannot read."""


class FingerprintMismatchError(ModelFormatError):
    """The compiled model does not match what its MLmodel recorded."""

    def __init__(self, field: str, recorded: Any, actual: Any, where: str) -> None:
        super().__init__(
            f"MLflow model at {where}: the MLmodel records {field} {recorded!r} but the compiled "
            f"model under {MODEL_DATA_SUBPATH}/ has {actual!r}; the MLmodel or the artifacts were "
            "edited, or they come from different models"
        )
        self.field, self.recorded, self.actual = field, recorded, actual


class ParamsFingerprintMismatchError(FingerprintMismatchError):
    """The recorded CKKS params (fingerprint or any recorded field) differ from the model's."""


class ModelFingerprintMismatchError(FingerprintMismatchError):
    """The recorded model fingerprint differs from the compiled model's."""


# ----------------------------------------------------------------------------- metadata
def _plain(value: Any) -> Any:
    """Round-trip through JSON so only YAML-safe builtins reach the MLmodel file."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (tuple, np.ndarray)):
            return list(o)
        raise TypeError(f"not serializable: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default))


def _ckks_section(params: Any) -> dict[str, Any]:
    return {
        "ring_dim": params.ring_dim,
        "multiplicative_depth": params.multiplicative_depth,
        "scale_bits": params.scale_bits,
        "first_mod_bits": params.first_mod_bits,
        "modulus_bits": params.modulus_bits,
        "scaling_technique": params.scaling_technique,
        "security_level": params.security_level,
        "num_large_digits": params.num_large_digits,
        "slots": params.slots,
    }


def _key_requirements(compiled: Any) -> dict[str, Any]:
    p = compiled.params
    return {
        "relinearization": True,
        "rotation_indices": list(p.rotation_indices),
        "bootstrapping": p.bootstrapping.model_dump(mode="json") if p.bootstrapping else None,
        "predicted_bundle_bytes": compiled.predicted_key_bundle_bytes,
    }


def flavor_metadata(compiled: Any) -> dict[str, Any]:
    """The ``h33`` section of the MLmodel file for ``compiled``: descriptive, never key material."""
    from h33_bento.program.model import FORMAT_VERSION

    # a weightless artifact (encrypted-weight mode) says so; a plaintext model's section is unchanged
    weights = ({"weight_mode": "encrypted", "weights_id": compiled.weights_id}
               if compiled.weight_mode == "encrypted" else {})
    return _plain({
        "format_version": FLAVOR_FORMAT_VERSION,
        "h33_bento_version": _H33_VERSION,
        "model_data": MODEL_DATA_SUBPATH,
        "model_format_version": FORMAT_VERSION,
        "ckks": _ckks_section(compiled.params),
        "lanes": compiled.lanes,
        "params_fingerprint": compiled.params.fingerprint,
        "model_fingerprint": compiled.fingerprint,
        "evaluation_keys": _key_requirements(compiled),
        "input": {"name": compiled.input_name, "shape": list(compiled.input_shape), "dtype": "float64"},
        "output": {"shape": list(compiled.output_shape)},
        "labels": compiled.class_labels(),
        "runnable": compiled.runnable,
        "summary": compiled.summary(),
        **weights,
    })


def envelope_signature(input_schema: bool = True) -> Any:
    """The default model signature: encrypted envelopes in, encrypted envelopes out.

    The input column is unnamed so a plain list (or a single envelope) passes MLflow's schema
    enforcement as well as a DataFrame (a column named ``ciphertext`` is preferred when there
    are several).  ``binary`` makes MLflow's scoring server base64-decode ``dataframe_split`` /
    ``dataframe_records`` requests and base64-encode the answers.  The ``mode`` param selects
    ``"encrypted"`` (default) or ``"simulate"``.

    MLflow enforces the input schema before the model sees the data, so with it simulate mode
    takes plaintext one input per row (a ``pd.Series`` or an object column).  A model logged with
    ``envelope_signature(input_schema=False)`` (output and params only) is not input-checked by
    MLflow and takes bare numpy arrays in simulate mode too.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary)]) if input_schema else None,
        outputs=Schema([ColSpec(DataType.binary, ENVELOPE_COLUMN)]),
        params=ParamSchema([ParamSpec("mode", DataType.string, "encrypted")]),
    )


def _model_params(compiled: Any) -> dict[str, Any]:
    params = {f"ckks.{k}": v for k, v in compiled.params.summary().items()}
    params["ckks.num_large_digits"] = compiled.params.num_large_digits
    params["ckks.params_fingerprint"] = compiled.params.fingerprint
    params["h33.model_fingerprint"] = compiled.fingerprint
    return params


def _accuracy_metrics(accuracy: dict[str, float] | None) -> dict[str, float]:
    if not accuracy:
        return {}
    if not isinstance(accuracy, dict):
        raise TypeError('accuracy must be a dict such as {"plaintext": 0.98, "encrypted": 0.97}')
    metrics = {}
    for kind, value in accuracy.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(kind)):
            raise ValueError(f"accuracy key {kind!r} must be a plain name such as 'plaintext' or 'encrypted'")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"accuracy[{kind!r}] must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"accuracy[{kind!r}] must be finite, got {value}")
        if not 0.0 <= value <= 1.0:  # one unit everywhere: val_accuracy, h33 run and these are fractions
            raise ValueError(f"accuracy[{kind!r}] is a fraction in [0, 1], got {value} (97.5% is 0.975)")
        metrics[f"accuracy.{kind}"] = value
    return metrics


def _as_compiled(h33_model: Any) -> Any:
    from h33_bento.program.model import CompiledModel

    if isinstance(h33_model, CompiledModel):
        return h33_model
    if isinstance(h33_model, (str, os.PathLike)):
        return CompiledModel.load(h33_model)
    raise TypeError(f"expected a CompiledModel or the directory one was saved to, got {type(h33_model).__name__}")


def _pyfunc_model_config(model_config: dict[str, Any] | None) -> dict[str, Any]:
    model_config = dict(model_config or {})
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown model_config keys {unknown}; the h33 flavor accepts {list(MODEL_CONFIG_KEYS)}")
    config = {k: model_config.get(k) for k in MODEL_CONFIG_KEYS}
    if config["key_store"] is not None:
        config["key_store"] = os.fspath(config["key_store"])
    return config


# ----------------------------------------------------------------------------- environment
def _runtime_requirements() -> list[str]:
    """What the pyfunc imports besides h33-bento and mlflow (never torch: only compiling needs it)."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement(name) for name in ("openfhe", "numpy", "pydantic")]


def get_default_pip_requirements() -> list[str]:
    """Pip requirements of models written by this flavor (mlflow itself is added by MLflow).

    ``save_model`` replaces the ``h33-bento`` pin by the wheel it bundles when h33-bento runs
    from a source checkout (see ``wheel.py``).
    """
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement("h33-bento", module="h33_bento"), *_runtime_requirements()]


def get_default_conda_env() -> dict[str, Any]:
    """The conda environment of models written by this flavor."""
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


# ----------------------------------------------------------------------------- save / log
def save_model(
    h33_model: Any,
    path: str | os.PathLike,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    mlflow_model: Any = None,
    signature: Any = None,
    input_example: Any = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    metadata: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    accuracy: dict[str, float] | None = None,
) -> None:
    """Save a compiled model as an MLflow model directory at ``path``.

    Args:
        h33_model: a :class:`CompiledModel`, or the directory one was saved to.
        path: local directory to create; it must not exist or be empty.
        signature: defaults to :func:`envelope_signature`; ``False`` saves none (MLflow then
            drops ``params`` such as ``mode`` at predict time).
        model_config: pyfunc configuration; ``{"key_store": DIR}`` records a default key store.
        accuracy: optional ``{"plaintext": ..., "polynomial": ..., "encrypted": ...}``, fractions in
            [0, 1], recorded in the flavor section.
        conda_env, code_paths, mlflow_model, input_example, pip_requirements,
        extra_pip_requirements, metadata: as for every MLflow flavor.
    """
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _CONSTRAINTS_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_conda_env,
        _process_pip_requirements,
        _PythonEnv,
        _validate_env_arguments,
    )
    from mlflow.utils.file_utils import get_total_file_size, write_to
    from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path

    from h33_bento.mlflow_flavor.wheel import bundle as bundle_wheel

    compiled = _as_compiled(h33_model)
    config = _pyfunc_model_config(model_config)
    metrics = _accuracy_metrics(accuracy)
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)

    path = os.path.abspath(os.fspath(path))
    _validate_and_prepare_target_save_path(path)
    code_dir = _validate_and_copy_code_paths(code_paths, path)

    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, input_example, path)
    if signature is None:
        signature = envelope_signature()
    if signature is not False:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata

    compiled.save(os.path.join(path, MODEL_DATA_SUBPATH))
    default_reqs = None
    if conda_env is None and pip_requirements is None:
        bundled = bundle_wheel(path)  # before the size is taken: the wheel is part of the model
        default_reqs = [*bundled, *_runtime_requirements()] if bundled else get_default_pip_requirements()

    pyfunc.add_to_model(
        mlflow_model,
        loader_module=_LOADER_MODULE,
        data=MODEL_DATA_SUBPATH,
        code=code_dir,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        model_config=config,
    )
    conf = flavor_metadata(compiled)
    if metrics:
        conf["accuracy"] = {k.split(".", 1)[1]: v for k, v in metrics.items()}
    if code_dir:
        conf["code"] = code_dir
    mlflow_model.add_flavor(FLAVOR_NAME, **conf)
    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as fh:
        yaml.safe_dump(conda_env, stream=fh, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def log_model(
    h33_model: Any,
    name: str | None = None,
    registered_model_name: str | None = None,
    signature: Any = None,
    input_example: Any = None,
    metadata: dict[str, Any] | None = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    accuracy: dict[str, float] | None = None,
    model_config: dict[str, Any] | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    await_registration_for: int | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    artifact_path: str | None = None,
    **kwargs: Any,
) -> Any:
    """Log a compiled model as an MLflow 3 LoggedModel, in the active run if there is one.

    Like MLflow's own flavors (``Model.log``) it needs no run, and a run may hold several models
    (distinct ``name``s).  The CKKS parameters are params of the LoggedModel, not of the run
    (``ckks.ring_dim``, ..., ``ckks.params_fingerprint``, ``h33.model_fingerprint``): run params
    cannot change, and MLflow would copy one model's onto the next.  ``accuracy`` (e.g.
    ``{"plaintext": 0.98, "polynomial": 0.98, "encrypted": 0.97}``) is logged as metrics
    ``accuracy.<kind>`` linked to this model's ``model_id``; MLflow stores model metrics through a
    run, so with no active run one is started and ended around the call, and only then.

    Args:
        h33_model: a :class:`CompiledModel`, or the directory one was saved to.
        name: the model's name (MLflow 3; ``artifact_path`` is the deprecated form).
        registered_model_name: also register a new version under this name.
        model_config: pyfunc configuration, e.g. ``{"key_store": DIR}`` (a default the loader or
            ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` can override).
        await_registration_for: seconds to wait for the version to be READY (MLflow's default).
        params: more LoggedModel params, next to the CKKS ones.
        signature, input_example, metadata, pip_requirements, extra_pip_requirements, conda_env,
        code_paths, tags, model_type, step, model_id, kwargs: as for every MLflow flavor.

    Returns:
        MLflow's ``ModelInfo`` (``model_id``, ``model_uri``, ``registered_model_version``, ...).
    """
    from contextlib import nullcontext

    import mlflow
    from mlflow.models import Model
    from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

    compiled = _as_compiled(h33_model)
    metrics = _accuracy_metrics(accuracy)
    _pyfunc_model_config(model_config)  # fail before anything is logged

    with mlflow.start_run() if metrics and mlflow.active_run() is None else nullcontext():
        info = Model.log(
            artifact_path=artifact_path,
            name=name,
            flavor=sys.modules[__name__],
            flavor_name="mlflow.h33",
            registered_model_name=registered_model_name,
            await_registration_for=(DEFAULT_AWAIT_MAX_SLEEP_SECONDS if await_registration_for is None
                                    else await_registration_for),
            metadata=metadata,
            params={**_model_params(compiled), **(params or {})},
            tags=tags,
            model_type=model_type,
            step=step,
            model_id=model_id,
            h33_model=compiled,
            conda_env=conda_env,
            code_paths=code_paths,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            model_config=model_config,
            accuracy=accuracy,
            **kwargs,
        )
        if metrics:
            mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    return info


# ----------------------------------------------------------------------------- load
def _load_verified(model_dir: str | os.PathLike, conf: dict[str, Any]) -> Any:
    """Load the compiled model under ``model_dir`` and check it against its flavor section."""
    from h33_bento.program.model import CompiledModel

    where = os.fspath(model_dir)
    version = conf.get("format_version")
    if version != FLAVOR_FORMAT_VERSION:
        raise FlavorFormatError(
            f"MLflow model at {where} has h33 flavor format version {version!r}; this build of "
            f"h33-bento ({_H33_VERSION}) reads version {FLAVOR_FORMAT_VERSION}"
        )
    data = conf.get("model_data")
    if not isinstance(data, str) or not data or os.path.isabs(data) or ".." in Path(data).parts:
        raise FlavorFormatError(f"MLflow model at {where} has an invalid h33 model_data entry {data!r}")
    compiled = CompiledModel.load(os.path.join(where, data))  # ModelFormatError if tampered

    p = compiled.params
    if conf.get("params_fingerprint") != p.fingerprint:
        raise ParamsFingerprintMismatchError("params_fingerprint", conf.get("params_fingerprint"), p.fingerprint, where)
    for key, actual in [*_ckks_section(p).items(), ("lanes", p.lanes)]:
        recorded = conf.get(key) if key == "lanes" else (conf.get("ckks") or {}).get(key)
        if recorded != actual:
            raise ParamsFingerprintMismatchError(f"ckks.{key}" if key != "lanes" else key, recorded, actual, where)
    recorded_rot = (conf.get("evaluation_keys") or {}).get("rotation_indices")
    if recorded_rot != list(p.rotation_indices):
        raise ParamsFingerprintMismatchError("evaluation_keys.rotation_indices", recorded_rot,
                                             list(p.rotation_indices), where)
    if conf.get("model_fingerprint") != compiled.fingerprint:
        raise ModelFingerprintMismatchError("model_fingerprint", conf.get("model_fingerprint"),
                                            compiled.fingerprint, where)
    if conf.get("weight_mode", "plaintext") != compiled.weight_mode:
        raise ModelFingerprintMismatchError("weight_mode", conf.get("weight_mode", "plaintext"),
                                            compiled.weight_mode, where)
    return compiled


def load_model(model_uri: str, dst_path: str | None = None) -> Any:
    """Load the :class:`CompiledModel` of an MLflow model (``runs:/``, ``models:/name@alias``, path...).

    Raises:
        FlavorFormatError: unknown flavor format version.
        ModelFormatError: tampered or missing artifacts (from ``CompiledModel.load``).
        ParamsFingerprintMismatchError / ModelFingerprintMismatchError: the artifacts do not
            match the fingerprints the MLmodel recorded.
    """
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri
    from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _get_flavor_configuration

    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_path, conf)
    return _load_verified(local_path, conf)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> "_H33PyfuncModel":
    """Called by ``mlflow.pyfunc.load_model`` with the model's data path (``<model>/model``)."""
    from mlflow.utils.model_utils import _get_flavor_configuration

    p = Path(path)
    root = p if (p / "MLmodel").is_file() else p.parent
    conf = _get_flavor_configuration(model_path=str(root), flavor_name=FLAVOR_NAME)
    compiled = _load_verified(root, conf)
    key_store = (model_config or {}).get("key_store") or os.environ.get(KEY_STORE_ENV) or None
    return _H33PyfuncModel(compiled, key_store)


# ----------------------------------------------------------------------------- key store
def save_evaluation_keys(keys: Any, key_store_dir: str | os.PathLike, tenant: str | None = None) -> str:
    """Put an evaluation-key bundle into a key store; returns its key_id.

    ``keys`` is an ``EvaluationKeys``, its ``to_bytes()``, a ``KeyChain`` or an
    ``FHEInferenceClient``: only the evaluation bundle is written, never a secret key.  The store
    is the one the BentoML service uses (``<key_id>/bundle.h33k`` + ``meta.json``, written
    atomically); ``tenant`` is the service tenant that may use the bundle there (the pyfunc
    ignores tenants), ``h33_bento.keystore.DEFAULT_TENANT`` when not given.  Saving a key_id the
    store already holds leaves it, and its tenant, unchanged.
    """
    from h33_bento.ckks.keys import EvaluationKeys
    from h33_bento.keystore import DEFAULT_TENANT, KeyStore

    if hasattr(keys, "keys") and hasattr(keys.keys, "evaluation_keys"):  # FHEInferenceClient
        keys = keys.keys
    if hasattr(keys, "evaluation_keys"):  # KeyChain
        keys = keys.evaluation_keys()
    if not isinstance(keys, (EvaluationKeys, bytes, bytearray, memoryview)):
        raise TypeError(f"expected EvaluationKeys, their bytes, a KeyChain or a client, got {type(keys).__name__}")
    record, _ = KeyStore(key_store_dir).put(keys, tenant or DEFAULT_TENANT)
    return record.key_id


# ----------------------------------------------------------------------------- pyfunc
_FRAME_PREFIX = struct.Struct(">4sHI")


def _restore_trailing_nuls(data: bytes) -> bytes:
    """numpy ``S`` arrays drop trailing NUL bytes; pad a frame back to the length its header states."""
    try:
        _, _, head_len = _FRAME_PREFIX.unpack_from(data)
        head_end = _FRAME_PREFIX.size + head_len
        header = json.loads(data[_FRAME_PREFIX.size:head_end])
        expected = head_end + sum(int(n) for n in header["blob_lengths"]) + 32
    except (struct.error, ValueError, KeyError, TypeError):
        return data
    missing = expected - len(data)
    return data + b"\0" * missing if 0 < missing <= 4096 else data


def _decode_envelope(value: Any, row: int) -> tuple[bytes, bool]:
    """One input item -> (envelope bytes, whether it came as base64 text)."""
    from h33_bento.ckks.serialization import TENSOR_MAGIC

    if isinstance(value, str):
        text: bytes | None = value.encode("ascii", "replace")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if raw.startswith(TENSOR_MAGIC):
            return (_restore_trailing_nuls(raw) if isinstance(value, np.bytes_) else raw), False
        text = raw  # base64 text delivered as bytes (MLflow's "inputs" JSON path casts str -> bytes)
    else:
        raise EnvelopeError(f"input row {row}: expected an encrypted envelope as bytes or a base64 string, "
                            f"got {type(value).__name__}; plaintext runs with params={{'mode': 'simulate'}}, and "
                            "mlflow.models.evaluate takes evaluators='h33' for this flavor")
    try:
        decoded = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"input row {row}: not an h33 envelope and not valid base64 ({exc})") from None
    if not decoded.startswith(TENSOR_MAGIC) and not isinstance(value, str):
        return bytes(value), False  # let the envelope parser report what is wrong with it
    return decoded, True


def _envelope_values(data: Any) -> list[Any]:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 0:
            raise EnvelopeError("the input has no column of envelopes")
        if ENVELOPE_COLUMN in data.columns:
            return list(data[ENVELOPE_COLUMN])
        if data.shape[1] != 1:
            raise EnvelopeError(f"expected one column of envelopes (named {ENVELOPE_COLUMN!r}), "
                                f"got columns {list(data.columns)}")
        return list(data.iloc[:, 0])
    if isinstance(data, pd.Series):
        return list(data)
    if isinstance(data, dict):
        if ENVELOPE_COLUMN not in data:
            raise EnvelopeError(f"expected a {ENVELOPE_COLUMN!r} entry, got keys {list(data)}")
        return _envelope_values(data[ENVELOPE_COLUMN])
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        return [data]
    if isinstance(data, np.ndarray):
        return list(data.reshape(-1))
    if isinstance(data, (list, tuple)):
        return list(data)
    raise EnvelopeError(f"expected encrypted envelopes (bytes or base64 strings: one, a list, or one per "
                        f"DataFrame row), got {type(data).__name__}")


def _plaintext_batch(data: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 1 and data.iloc[:, 0].dtype == object:
            data = data.iloc[:, 0]
        else:
            data = data.to_numpy(dtype=np.float64)
    if isinstance(data, pd.Series) or (isinstance(data, np.ndarray) and data.dtype == object):
        data = [np.asarray(v, dtype=np.float64) for v in data]
    try:
        x = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"simulate mode takes plaintext inputs of shape {tuple(input_shape)}: {exc}") from None
    size = int(np.prod(input_shape))
    if x.size == 0 or x.size % size:
        raise ValueError(f"simulate mode takes inputs of shape {tuple(input_shape)} (or a batch of them), "
                         f"got {x.size} values")
    return x.reshape(-1, *input_shape)


class _H33PyfuncModel:
    """The pyfunc implementation: encrypted envelopes in, encrypted envelopes out.

    One Engine per key_id is built from the key store on first use and kept (up to
    ``MAX_CACHED_ENGINES``, least recently used first out).  The engines share one plaintext
    cache (the diagonals do not depend on the key) and drop their serialized keys once OpenFHE
    holds them.  A scoring server runs this for every caller, so untrusted bytes reach OpenFHE
    here only through a :class:`~h33_bento.ckks.sandbox.Sandbox` (started on the first encrypted
    request): bundles read from the key store and every envelope's ciphertexts are validated in
    its child processes first.
    """

    def __init__(self, compiled: Any, key_store: str | os.PathLike | None) -> None:
        from h33_bento.keystore import KeyStore
        from h33_bento.runtime.engine import PlaintextCache

        self.compiled = compiled
        self.key_store = KeyStore(key_store, create=False) if key_store else None
        self.cache = PlaintextCache(compiled)
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._sandbox: Any = None
        self._lock = threading.Lock()

    def get_raw_model(self) -> Any:
        """The CompiledModel."""
        return self.compiled

    def engine(self, key_id: str) -> Any:
        """The Engine for ``key_id``, built from the key store on first use."""
        from h33_bento.ckks.sandbox import Sandbox
        from h33_bento.runtime.engine import Engine

        with self._lock:
            engine = self._engines.get(key_id)
            if engine is None:
                if self.key_store is None:
                    raise EvaluationKeysNotFoundError(
                        key_id, "no key store is configured; load the model with model_config={'key_store': DIR} "
                        f"(or set {KEY_STORE_ENV}) where DIR is a key store holding it")
                if self._sandbox is None:
                    self._sandbox = Sandbox(self.compiled.params)
                keys = self.key_store.load(key_id, self.compiled.params, sandbox=self._sandbox)
                engine = self._engines[key_id] = Engine(self.compiled, keys, cache=self.cache,
                                                        keep_serialized_keys=False, sandbox=self._sandbox,
                                                        weights=self._weights(keys))
                while len(self._engines) > MAX_CACHED_ENGINES:
                    self._engines.popitem(last=False)
            self._engines.move_to_end(key_id)
            return engine

    def _weights(self, keys: Any) -> Any:
        """A weightless model's encrypted weights for ``keys`` from the key store (stored there by the
        service's ``POST /keys/{key_id}/weights``), validated in the sandbox; None for a plaintext model."""
        from h33_bento.errors import WeightsNotProvisionedError
        from h33_bento.runtime.weights import load_weights

        if self.compiled.weight_mode == "plaintext":
            return None
        path = self.key_store.weights_file(keys.key_id, self.compiled.fingerprint)
        if path is None:
            raise WeightsNotProvisionedError(f"the key store holds no encrypted weights of model "
                                             f"{self.compiled.fingerprint} for key {keys.key_id}")
        return load_weights(path, self.compiled, keys.key_id, keys.key_tag, self._sandbox)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Run envelopes (``mode="encrypted"``) or plaintext inputs (``mode="simulate"``).

        Encrypted mode returns a list with one output envelope per input envelope: base64 text
        for base64 input, bytes for bytes.  Simulate mode returns the logits as a numpy array
        of shape (batch, *output_shape).
        """
        mode = (params or {}).get("mode") or "encrypted"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {list(MODES)}")
        if mode == "simulate":
            from h33_bento.runtime.simulate import simulate

            return simulate(self.compiled, _plaintext_batch(model_input, tuple(self.compiled.input_shape)))

        from h33_bento.ckks.serialization import EncryptedTensor

        items = [_decode_envelope(v, i) for i, v in enumerate(_envelope_values(model_input))]
        outputs: list[Any] = []
        for raw, as_text in items:
            envelope = EncryptedTensor.from_bytes(raw)
            out = self.engine(envelope.key_id).run(envelope).to_bytes()
            outputs.append(base64.b64encode(out).decode("ascii") if as_text else out)
        return outputs
