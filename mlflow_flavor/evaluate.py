"""``mlflow.models.evaluate`` for ``mlflow.h33`` models: what the compiled program scores, in the clear and encrypted.

MLflow's built-in evaluators call ``model.predict`` on the plaintext features, which an h33 model
refuses (it takes encrypted envelopes).  This evaluator, registered under MLflow's
``mlflow.model_evaluator`` entry point as ``h33`` (``pyproject.toml``), runs instead::

    mlflow.models.evaluate(model_uri, x, targets=y, model_type="classifier", evaluators="h33")

It runs the compiled program in plaintext (``simulate``) on the whole set, then encrypts the first
``encrypted_samples`` inputs (``evaluator_config``; default: one ciphertext, ``lanes`` inputs)
under a fresh key chain of its own, runs them through the ``Engine`` with the evaluation keys only
and decrypts them.  It logs, linked to the evaluated LoggedModel and the dataset:

``accuracy.polynomial``      top-1 accuracy of the program in plaintext, whole set
``accuracy.encrypted``       top-1 accuracy of the encrypted runs
``agreement.encrypted``      share of the encrypted sample whose top-1 equals the plaintext run's
``error.encrypted_max_logit``  largest |encrypted - plaintext| logit on the sample
``latency.simulate_ms_per_input``     plaintext run time per input
``latency.encrypted_ms_per_ciphertext`` Engine run time per ciphertext (the first one also encodes
                                        the plaintext diagonals, as a server's first request does)
``encrypted.samples``        how many inputs ran encrypted

The ``accuracy.*`` keys are the ones ``log_model(accuracy=...)`` records, so measured values sit
where recorded ones do.  Models of other flavors are left to the other evaluators.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator

#: ``evaluator_config`` keys this evaluator reads.
CONFIG_KEYS = ("encrypted_samples",)


def _encrypted_samples(config: dict[str, Any], lanes: int, available: int) -> int:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown evaluator_config keys {unknown} for the h33 evaluator; it reads {list(CONFIG_KEYS)}")
    n = config.get("encrypted_samples", lanes)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"evaluator_config['encrypted_samples'] must be an integer >= 0, got {n!r}")
    return min(int(n), available)


def _top1(logits: np.ndarray, labels: list[str], targets: np.ndarray) -> np.ndarray:
    """Predicted classes in the targets' terms: indices for integer targets, else label strings."""
    index = logits.argmax(axis=1)
    if targets.dtype.kind in "iu":
        return index
    return np.asarray(labels, dtype=object)[index].astype(str)


def _run_encrypted(compiled: Any, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Logits of ``x`` through encrypt -> Engine (evaluation keys only) -> decrypt, and run times (ms)."""
    from h33_bento.client import FHEInferenceClient
    from h33_bento.runtime.engine import Engine

    client = FHEInferenceClient(compiled)
    engine = Engine(compiled, client.keys.evaluation_keys())
    logits, times = [], []
    for start in range(0, len(x), client.lanes):
        envelope = client.encrypt(x[start:start + client.lanes])
        t0 = time.perf_counter()
        out = engine.run(envelope)
        times.append((time.perf_counter() - t0) * 1e3)
        logits.append(client.decrypt_logits(out))
    return np.concatenate(logits), times


def _measure(compiled: Any, features: Any, targets: Any, config: dict[str, Any]) -> dict[str, float]:
    """The h33 evaluation metrics of ``compiled`` on ``features`` and ``targets`` (see the module doc)."""
    from h33_bento.mlflow_flavor import _plaintext_batch
    from h33_bento.runtime.simulate import simulate

    x = _plaintext_batch(features, tuple(compiled.input_shape))
    y = np.asarray(targets).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(y)} targets")
    n_enc = _encrypted_samples(config, compiled.lanes, len(x))
    labels = compiled.class_labels()
    y = y if y.dtype.kind in "iu" else y.astype(str)

    t0 = time.perf_counter()
    plain = simulate(compiled, x)
    metrics = {
        "accuracy.polynomial": float(np.mean(_top1(plain, labels, y) == y)),
        "latency.simulate_ms_per_input": (time.perf_counter() - t0) * 1e3 / len(x),
        "encrypted.samples": float(n_enc),
    }
    if n_enc:
        enc, times = _run_encrypted(compiled, x[:n_enc])
        top1 = _top1(enc, labels, y)
        metrics.update({
            "accuracy.encrypted": float(np.mean(top1 == y[:n_enc])),
            "agreement.encrypted": float(np.mean(top1 == _top1(plain[:n_enc], labels, y))),
            "error.encrypted_max_logit": float(np.abs(enc - plain[:n_enc]).max()),
            "latency.encrypted_ms_per_ciphertext": float(np.mean(times)),
        })
    if not all(math.isfinite(v) for v in metrics.values()):
        raise ValueError(f"non-finite evaluation metrics {metrics}")
    return metrics


class H33Evaluator(ModelEvaluator):
    """The ``h33`` evaluator: classifiers whose MLmodel has an ``h33`` flavor."""

    @classmethod
    def can_evaluate(cls, *, model_type: str | None, evaluator_config: dict[str, Any], **kwargs: Any) -> bool:
        return model_type == "classifier"

    def evaluate(self, *, model_type: str, dataset: Any, run_id: str, evaluator_config: dict[str, Any],
                 model: Any = None, extra_metrics: Any = None, custom_artifacts: Any = None,
                 predictions: Any = None, **kwargs: Any) -> EvaluationResult | None:
        """Evaluate ``model`` on ``dataset`` and log the metrics to ``run_id`` (``None``: not an h33 model)."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
        from mlflow.utils.time import get_current_time_millis

        from h33_bento.mlflow_flavor import FLAVOR_NAME

        if model is None or FLAVOR_NAME not in (getattr(model.metadata, "flavors", None) or {}):
            return None
        if extra_metrics or custom_artifacts:
            raise ValueError("the h33 evaluator logs its own metrics; it takes no extra_metrics or custom_artifacts")
        if dataset.labels_data is None:
            raise ValueError("the h33 evaluator needs targets: mlflow.models.evaluate(..., targets=...)")
        metrics = _measure(model.get_raw_model(), dataset.features_data, dataset.labels_data, evaluator_config or {})
        model_id = kwargs.get("model_id") or getattr(model, "model_id", None)
        timestamp = get_current_time_millis()
        MlflowClient().log_batch(run_id, metrics=[
            Metric(key=k, value=v, timestamp=timestamp, step=0, model_id=model_id, dataset_name=dataset.name,
                   dataset_digest=dataset.digest, run_id=run_id)
            for k, v in metrics.items()
        ])
        return EvaluationResult(metrics=metrics, artifacts={}, run_id=run_id)
