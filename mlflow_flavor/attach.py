"""Makes ``mlflow.h33`` available as soon as MLflow is imported, through MLflow's own plugin hook.

The package registers this class under MLflow's ``mlflow.run_context_provider`` entry point
(``pyproject.toml``).  MLflow loads those entry points while ``import mlflow`` runs, which
imports this module, which attaches the flavor module as ``mlflow.h33`` (and ``mlflow.h33`` in
``sys.modules``, so ``import mlflow.h33`` works too).  The provider itself adds no tags to any
run.  The core package ``h33_bento`` contains no MLflow code and never imports MLflow.
"""
from __future__ import annotations

import sys

from mlflow.tracking.context.abstract_context import RunContextProvider

from h33_bento import mlflow_flavor


def _attach() -> None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and getattr(mlflow, "h33", None) is not mlflow_flavor:
        mlflow.h33 = mlflow_flavor
    sys.modules.setdefault("mlflow.h33", mlflow_flavor)


class FlavorAttachment(RunContextProvider):
    """The entry-point object MLflow instantiates; never in context, so it never tags a run."""

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict[str, str]:
        return {}


_attach()
