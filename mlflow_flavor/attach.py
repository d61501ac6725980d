"""Makes ``mlflow.h33`` available as soon as MLflow is imported, through MLflow's own plugin hook.

The package registers this class under MLflow's ``mlflow.run_context_provider`` entry point
(``pyproject.toml``).  MLflow loads those entry points while ``import mlflow`` runs, which
imports this module, which attaches the flavor module as ``mlflow.h33`` (and ``mlflow.h33`` in
``sys.modules``, so ``import mlflow.h33`` works too).  The provider itself adds no tags to any
run.  It also declares the system library the serving image needs (:func:`_declare_apt_packages`).
The core package ``h33_bento`` contains no MLflow code and never imports MLflow.
"""
from __future__ import annotations

import sys
from types import ModuleType

from mlflow.tracking.context.abstract_context import RunContextProvider
from mlflow.utils.import_hooks import register_post_import_hook

from h33_bento import mlflow_flavor

#: System packages a serving image needs (Debian/Ubuntu names).
APT_PACKAGES = ("libgomp1",)


def _attach() -> None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and getattr(mlflow, "h33", None) is not mlflow_flavor:
        mlflow.h33 = mlflow_flavor
    sys.modules.setdefault("mlflow.h33", mlflow_flavor)
    register_post_import_hook(_declare_apt_packages, "mlflow.pyfunc.backend", overwrite=True)


def _declare_apt_packages(backend: ModuleType) -> None:
    """openfhe's shared libraries link libgomp: have ``mlflow models generate-dockerfile`` install it.

    MLflow offers flavors no public way to declare system packages; its Dockerfile step installs
    ``FLAVOR_SPECIFIC_APT_PACKAGES[flavor]`` for each flavor in the MLmodel (lightgbm and paddle
    list libgomp1 there).  ``tests/test_mlflow.py`` checks the generated Dockerfile text, so an
    MLflow that drops the table fails there rather than in a container.
    """
    table = getattr(backend, "FLAVOR_SPECIFIC_APT_PACKAGES", None)
    if isinstance(table, dict):
        table.setdefault(mlflow_flavor.FLAVOR_NAME, list(APT_PACKAGES))


class FlavorAttachment(RunContextProvider):
    """The entry-point object MLflow instantiates; never in context, so it never tags a run."""

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict[str, str]:
        return {}


_attach()
