"""The package's shape: a one-way import graph, op kinds spelled once, every stage covering every op."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "h33_bento"


def _module_name(path: Path, root: Path = REPO) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, root: Path = REPO, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(*parts: str) -> list[Path]:
    root = CORE.joinpath(*parts)
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


def _offenders(files: list[Path], forbidden: tuple[str, ...], top_level_only: bool = False,
               root: Path = REPO) -> dict[str, list[str]]:
    """The forbidden imports of each file (module-level imports only with ``top_level_only``)."""
    out = {}
    for f in files:
        bad = sorted(m for m in _imports(f, root, top_level_only)
                     if any(m == p or m.startswith(p + ".") for p in forbidden))
        if bad:
            out[str(f.relative_to(root))] = bad
    return out


def test_import_graph_runs_one_way():
    """ckks <- program <- compiler, and ckks <- program <- runtime / client."""
    assert not _offenders(_files("ckks"), ("h33_bento.program", "h33_bento.compiler", "h33_bento.runtime",
                                           "h33_bento.client", "h33_bento.keystore"))
    assert not _offenders(_files("program"), ("h33_bento.compiler", "h33_bento.runtime", "h33_bento.client"))
    assert not _offenders(_files("runtime") + _files("client"), ("h33_bento.compiler",))
    # running a compiled model needs openfhe, numpy and pydantic only
    assert not _offenders(_files("ckks") + _files("program") + _files("runtime") + _files("client"),
                          ("torch", "onnx", "scipy"))


def test_the_core_never_imports_mlflow_or_bentoml_at_import_time():
    core = [f for f in CORE.rglob("*.py")]
    assert not _offenders(core, ("mlflow", "bentoml", "_bentoml_sdk", "_bentoml_impl", "h33_bento.mlflow_flavor",
                                 "h33_bento.runners"), top_level_only=True)
    modules = sorted({_module_name(f) for f in core})
    probe = (f"import sys, importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
             "print(sorted(m for m in ('mlflow', 'bentoml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_import_check_can_fail(tmp_path):
    """The same check flags a module that imports what it must not."""
    bad = tmp_path / "h33_bento" / "program" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..compiler import compile\n\ndef f():\n    import mlflow\n")
    assert _offenders([bad], ("h33_bento.compiler",), root=tmp_path) == {
        "h33_bento/program/bad.py": ["h33_bento.compiler", "h33_bento.compiler.compile"]}
    assert _offenders([bad], ("mlflow",), root=tmp_path)
    assert not _offenders([bad], ("mlflow",), top_level_only=True, root=tmp_path)


def test_op_kinds_are_spelled_once():
    """No stage compares op kinds as strings: they are ``program.ops.Op`` members."""
    pattern = re.compile(r'op (==|!=) "')
    hits = [f"{f.relative_to(REPO)}:{i}" for d in ("h33_bento", "runners", "mlflow_flavor")
            for f in (REPO / d).rglob("*.py") for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line) and f != CORE / "program" / "ops.py"]
    assert hits == []


def test_every_stage_covers_every_program_op():
    pytest.importorskip("openfhe")
    from h33_bento.program.ops import OPS, PROGRAM_OPS
    from h33_bento.runtime.engine import Engine

    assert set(Engine.EVALUATORS) == set(PROGRAM_OPS)
    for op in PROGRAM_OPS:
        spec = OPS[op]
        assert spec.evaluate is not None and spec.counts is not None, op
    assert set(OPS) >= set(PROGRAM_OPS)
