"""The h33-bento wheel a logged model carries, so it installs where no package index has h33-bento.

When ``h33_bento`` runs from a source checkout (its parent directory holds the ``pyproject.toml``
of h33-bento: an editable install, a clone, a worktree), :func:`bundle` builds a wheel of that
source, once per process and source content, and copies it into the model as
``wheels/<digest>/h33_bento-<version>-py3-none-any.whl``.  The model's requirements then name it
with ``--find-links wheels/<digest>`` and ``h33-bento==<version>``:

* pip resolves a ``--find-links`` path relative to the requirements file, so the same lines work
  for ``mlflow models serve/predict --env-manager virtualenv`` (MLflow installs from a copy of the
  model directory) and in the image ``mlflow models generate-dockerfile`` writes (it runs
  ``pip install -r /opt/ml/model/requirements.txt`` from another directory); a plain relative
  wheel path resolves against the current directory and fails there;
* ``<digest>`` is the source content's, so MLflow, which names the environments it creates after
  the requirement lines, builds a new one when the code changes rather than reusing a stale one;
* pip ranks local files before index files of the same version and tags (``PackageFinder``), so
  an index's ``h33-bento`` of that version is not taken instead (one with a build tag would be).

An installed (non-source) h33-bento returns ``None``: the model then pins ``h33-bento==<version>``
from the package index, as other flavors pin their library.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

#: Where a model keeps the wheel (MLflow's ``add_libraries_to_model`` uses the same folder).
WHEELS_DIR = "wheels"
#: Distribution name, as the wheel file and the requirement spell it.
DIST_NAME = "h33-bento"
BUILD_TIMEOUT_S = 600

_built: dict[str, Path] = {}
_lock = threading.Lock()
_workdir: Path | None = None


class WheelBuildError(RuntimeError):
    """The h33-bento source checkout could not be built into a wheel."""


def source_root() -> Path | None:
    """The source checkout the running ``h33_bento`` was imported from, or ``None`` if installed."""
    import h33_bento

    root = Path(h33_bento.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    if not re.search(rf'^name\s*=\s*"{DIST_NAME}"\s*$', pyproject.read_text(), re.MULTILINE):
        return None
    return root


def _build_inputs(root: Path) -> list[Path]:
    """The files a wheel build reads: pyproject.toml, the readme and the package directories."""
    try:
        from setuptools.config.pyprojecttoml import read_configuration
    except ImportError:
        raise WheelBuildError(f"h33-bento runs from the source checkout {root}; bundling a wheel of it into the "
                              "model needs setuptools and wheel (pip install setuptools wheel), or pass "
                              "pip_requirements=[...]") from None
    config = read_configuration(root / "pyproject.toml")
    files = [root / "pyproject.toml"]
    readme = config["project"].get("readme")
    if isinstance(readme, str):
        files.append(root / readme)
    for package_dir in sorted(set(config["tool"]["setuptools"]["package-dir"].values())):
        for dirpath, dirnames, filenames in os.walk(root / package_dir):
            # symlinked folders are not part of the source (setuptools maps each package itself)
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not os.path.islink(os.path.join(dirpath, d)))
            files.extend(Path(dirpath, f) for f in sorted(filenames) if not f.endswith((".pyc", ".pyo")))
    return files


def _digest(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _build(root: Path) -> tuple[Path, str]:
    """A wheel of the checkout at ``root`` and its source digest (built once per content)."""
    global _workdir
    files = _build_inputs(root)
    digest = _digest(root, files)
    with _lock:
        if digest in _built:
            return _built[digest], digest
        if _workdir is None:
            _workdir = Path(tempfile.mkdtemp(prefix="h33-wheel-"))
            atexit.register(shutil.rmtree, _workdir, True)
        src, out = _workdir / digest / "src", _workdir / digest / "dist"
        for f in files:  # build a copy: no build/ or egg-info left in the checkout, nothing stale
            target = src / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
             "--quiet", "--wheel-dir", str(out), str(src)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        wheels = sorted(out.glob("h33_bento-*.whl")) if proc.returncode == 0 else []
        if len(wheels) != 1:
            raise WheelBuildError(
                f"building the h33-bento wheel from {root} failed (pip exit {proc.returncode}; it needs "
                f"setuptools and wheel installed): {(proc.stderr or proc.stdout)[-2000:]}\n"
                "Pass pip_requirements=[...] to log the model with requirements of your own instead.")
        _built[digest] = wheels[0]
        return wheels[0], digest


def bundle(model_dir: str | os.PathLike) -> list[str] | None:
    """Copy a wheel of the source checkout into ``model_dir``; its requirement lines, or ``None``."""
    root = source_root()
    if root is None:
        return None
    wheel, digest = _build(root)
    version = wheel.name.split("-")[1]
    target = Path(model_dir, WHEELS_DIR, digest)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, target / wheel.name)
    return [f"--find-links {WHEELS_DIR}/{digest}", f"{DIST_NAME}=={version}"]
