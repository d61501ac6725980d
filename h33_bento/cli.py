"""The ``h33`` command line: compile, inspect, keygen, encrypt, infer, decrypt, run, provision.

The split mirrors the deployment: ``keygen``/``encrypt``/``decrypt`` are the data owner's and use
the secret key; ``infer`` is the server's and reads only the evaluation-key bundle; ``provision``
is the model owner's (encrypted-weight mode) and reads only the data owner's public key.
"""
from __future__ import annotations

import importlib
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from tqdm.auto import tqdm

from .errors import H33Error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Encrypted (CKKS) inference: compile a network once, run it on ciphertexts.")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"expected a shape like 1,28,28, got {text!r}") from None


def _load_model_source(model: str, weights: Optional[Path]):
    """An ONNX file path, or ``package.module:Class`` (a torch module) plus a state-dict file."""
    if model.endswith(".onnx") or Path(model).is_file():
        return model
    if ":" not in model:
        raise typer.BadParameter(f"{model!r} is neither an ONNX file nor a 'package.module:Class' spec")
    import torch

    mod_name, cls_name = model.split(":", 1)
    module = getattr(importlib.import_module(mod_name), cls_name)()
    if weights is not None:
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return module.eval()


def _min_security() -> typer.models.OptionInfo:
    return typer.Option("HEStd_128_classic", "--min-security-level",
                        help="refuse a model whose CKKS parameters are weaker (HEStd_NotSet: accept any)")


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read {path} as a .npy array: {exc}") from exc


def _degrees(values: list[str]) -> dict[str, int]:
    """``relu=7,silu=5`` (repeatable) -> {"relu": 7, "silu": 5}, for the activations the compiler replaces."""
    from .compiler.activations import DEFAULT_DEGREE

    degrees: dict[str, int] = {}
    for item in (part.strip() for value in values for part in value.split(",") if part.strip()):
        kind, _, degree = item.partition("=")
        kind = kind.strip().lower()
        try:
            degrees[kind] = int(degree)
        except ValueError:
            raise typer.BadParameter(f"expected activation=degree like relu=7, got {item!r}",
                                     param_hint="--degrees") from None
        if kind not in DEFAULT_DEGREE:
            raise typer.BadParameter(f"unknown activation {kind!r} (one of {', '.join(DEFAULT_DEGREE)})",
                                     param_hint="--degrees")
        if degrees[kind] < 1:
            raise typer.BadParameter(f"a degree is at least 1, got {item!r}", param_hint="--degrees")
    return degrees


#: byte units --key-budget accepts (binary and decimal)
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def _bytes(text: str) -> int:
    """``200MiB``, ``1.5GiB``, ``250MB`` or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise typer.BadParameter(f"expected a size like 200MiB, 1.5GiB, 250MB or bytes, got {text!r}",
                                 param_hint="--key-budget")
    return int(float(match.group(1)) * _UNITS[unit])


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="ONNX file, or package.module:Class of a torch module"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="directory to write the compiled model to (not with --plan-only)"),
    input_shape: str = typer.Option(..., "--input-shape", help="input shape without batch, e.g. 1,28,28"),
    weights: Optional[Path] = typer.Option(None, help="torch state_dict for a module spec"),
    calibration: Optional[Path] = typer.Option(None, help=".npy batch of inputs to calibrate activation ranges"),
    lanes: int = typer.Option(8, help="inputs per ciphertext"),
    labels: Optional[str] = typer.Option(None, help="comma-separated class labels"),
    degrees: list[str] = typer.Option([], "--degrees",
                                      help="Chebyshev degree per replaced activation, e.g. relu=7,silu=5 (repeatable)"),
    margin: float = typer.Option(0.1, "--margin", min=0.0,
                                 help="widen each calibrated activation range by this fraction of its width"),
    plan_only: bool = typer.Option(False, "--plan-only",
                                   help="print the plan and its estimates (stored cost table, nothing measured); "
                                        "write nothing, even for networks too deep to run"),
    remeasure_costs: bool = typer.Option(False, "--remeasure-costs",
                                         help="measure this machine's primitive costs again instead of reading "
                                              "its cost cache (e.g. after the machine's load changed)"),
    key_budget: Optional[str] = typer.Option(None, "--key-budget",
                                             help="largest evaluation-key bundle to allow, e.g. 200MiB: schedules "
                                                  "trade predicted time for fewer rotation keys to fit it"),
) -> None:
    """Compile a network to a CKKS program (128-bit parameters)."""
    from .compiler import compile as compile_model

    if (out is None) != plan_only:
        raise typer.BadParameter("give --out, or --plan-only to print the plan and write nothing", param_hint="--out")
    try:
        source = _load_model_source(model, weights)
        data = _load_array(calibration) if calibration else None
        t0 = time.perf_counter()
        compiled = compile_model(source, _shape(input_shape), data, lanes=lanes,
                                 labels=labels.split(",") if labels else None, progress=True,
                                 activation_degrees=_degrees(degrees) or None, range_margin=margin,
                                 estimate_only=plan_only, measure_costs=not plan_only,
                                 remeasure_costs=remeasure_costs,
                                 key_budget_bytes=_bytes(key_budget) if key_budget is not None else None)
        if not plan_only:
            compiled.save(out)
    except H33Error as exc:
        _fail(exc)
    typer.echo(compiled.report)
    typer.echo(f"\n{'planned' if plan_only else 'compiled'} in {time.perf_counter() - t0:.1f} s"
               + ("" if plan_only else f" -> {out}"))


@app.command()
def inspect(model_dir: Path = typer.Argument(..., help="compiled model directory")) -> None:
    """Print the plan: levels, diagonals, rotations and predicted time per layer."""
    from .program.model import CompiledModel

    try:
        typer.echo(CompiledModel.load(model_dir).report)
    except H33Error as exc:
        _fail(exc)


@app.command()
def keygen(
    model_dir: Path = typer.Argument(..., help="compiled model directory"),
    keys: Path = typer.Option(..., "--keys", help="directory for this client's keys (holds the secret key)"),
    min_security_level: str = _min_security(),
    ignore_memory_check: bool = typer.Option(False, "--ignore-memory-check",
                                             help="generate even if the predicted peak memory exceeds what is available"),
) -> None:
    """Generate a key pair and the evaluation-key bundle the model needs, written a chunk at a time."""
    from .ckks.keys import EVAL_KEYS_FILE, KeyChain
    from .memory import check_memory
    from .program.model import CompiledModel
    from .program.report import peak_memory

    try:
        compiled = CompiledModel.load(model_dir)
        if not ignore_memory_check:
            check_memory("generating this model's keys", peak_memory(compiled)["keygen"], "--ignore-memory-check")
        with tqdm(total=1, desc="keygen", leave=False):
            chain = KeyChain.generate(compiled.params, min_security_level, directory=keys)
    except H33Error as exc:
        _fail(exc)
    size = (keys / EVAL_KEYS_FILE).stat().st_size
    typer.echo(f"key_id {chain.key_id}; evaluation keys {size / 2**20:.1f} MiB in {keys / EVAL_KEYS_FILE} "
               "(upload this file; keep secret.key on this machine: decrypt reads it, encrypt only public.key)")


@app.command()
def encrypt(
    model_dir: Path = typer.Argument(...),
    keys: Path = typer.Option(..., "--keys"),
    input: Path = typer.Option(..., "--input", help=".npy with one input or up to `lanes` inputs"),
    out: Path = typer.Option(..., "--out", "-o"),
    min_security_level: str = _min_security(),
) -> None:
    """Encrypt inputs into one envelope (up to `lanes` inputs share a ciphertext); reads only the public key."""
    from .ckks.keys import KeyChain
    from .client import FHEInferenceClient

    try:
        client = FHEInferenceClient(str(model_dir), keys=KeyChain.load(keys, only="public"),
                                    min_security_level=min_security_level)
        out.write_bytes(client.encrypt(_load_array(input)).to_bytes())
    except (H33Error, ValueError) as exc:
        _fail(exc)
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def infer(
    model_dir: Path = typer.Argument(...),
    eval_keys: Path = typer.Option(..., "--eval-keys", help="evaluation-key bundle (no secret key)"),
    input: Path = typer.Option(..., "--input", help="encrypted envelope"),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """Server side: run the program on an encrypted envelope with evaluation keys only (installed
    from the bundle file a chunk at a time)."""
    from .ckks.keys import EvaluationKeys
    from .program.model import CompiledModel
    from .runtime.engine import Engine

    try:
        compiled = CompiledModel.load(model_dir)
        engine = Engine(compiled, EvaluationKeys.from_file(eval_keys, compiled.params))
        t0 = time.perf_counter()
        out.write_bytes(engine.run(input.read_bytes()).to_bytes())
    except H33Error as exc:
        _fail(exc)
    typer.echo(f"ran in {time.perf_counter() - t0:.2f} s -> {out}")


@app.command()
def decrypt(
    model_dir: Path = typer.Argument(...),
    keys: Path = typer.Option(..., "--keys"),
    input: Path = typer.Option(..., "--input", help="encrypted result envelope"),
    top_k: int = typer.Option(3, help="how many classes to show"),
    min_security_level: str = _min_security(),
) -> None:
    """Decrypt a result envelope and print predictions; reads only the secret key."""
    from .ckks.keys import KeyChain
    from .client import FHEInferenceClient

    try:
        client = FHEInferenceClient(str(model_dir), keys=KeyChain.load(keys, only="secret"),
                                    min_security_level=min_security_level)
        preds = client.decrypt(input.read_bytes())
    except H33Error as exc:
        _fail(exc)
    for i, p in enumerate(preds if isinstance(preds, list) else [preds]):
        typer.echo(f"[{i}] {p.label} ({p.confidence:.3f})  top-{top_k}: {p.top_k(top_k)}")


@app.command()
def provision(
    model_dir: Path = typer.Argument(..., help="the full compiled model (with its weights)"),
    public_key: Path = typer.Option(..., "--public-key",
                                    help="the client's key directory, or a copy of its params.json and public.key"),
    url: Optional[str] = typer.Option(None, "--url", help="the server serving the weightless model"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="H33_API_KEY",
                                          help="an API key of the client's tenant (or H33_API_KEY)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the encrypted weights here instead"),
) -> None:
    """Model owner: encrypt the weights under a client's public key and upload them to the server
    (POST /keys/{key_id}/weights), or write them to --out."""
    from .client import ModelOwner

    if (url is None) == (out is None):
        raise typer.BadParameter("give --url to upload the weights, or --out to write them", param_hint="--url")
    try:
        owner = ModelOwner(model_dir, url, api_key)
        if out is not None:
            weights = owner.encrypt_weights(public_key)
            out.write_bytes(weights.to_bytes())
            typer.echo(f"key_id {weights.key_id}: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
            return
        answer = owner.provision(public_key)
    except (H33Error, ValueError) as exc:
        _fail(exc)
    typer.echo(f"key_id {answer['key_id']}: {answer['ciphertexts']} weight ciphertexts "
               f"({answer['size_bytes'] / 2**20:.1f} MiB) stored for model {answer['model_fingerprint']}")


@app.command()
def run(
    model_dir: Path = typer.Argument(...),
    input: Path = typer.Option(..., "--input", help=".npy batch of inputs"),
    labels: Optional[Path] = typer.Option(None, help=".npy of true labels, to report accuracy"),
    min_security_level: str = _min_security(),
) -> None:
    """Local end to end: keygen, encrypt, infer, decrypt; prints predictions and timings."""
    from .client import FHEInferenceClient

    try:
        client = FHEInferenceClient(str(model_dir), min_security_level=min_security_level)
    except H33Error as exc:
        _fail(exc)
    x = _load_array(input).reshape(-1, *client.model.input_shape)
    preds, t0 = [], time.perf_counter()
    for start in tqdm(range(0, len(x), client.lanes), desc="encrypted passes", unit="ct"):
        preds += client.infer_batch(x[start:start + client.lanes])
    elapsed = time.perf_counter() - t0
    for i, p in enumerate(preds):
        typer.echo(f"[{i}] {p.label} ({p.confidence:.3f})")
    typer.echo(f"{len(x)} inputs in {elapsed:.2f} s: {1000 * elapsed / len(x):.1f} ms/input amortized")
    if labels is not None:
        truth = _load_array(labels).reshape(-1)
        acc = np.mean([p.index == t for p, t in zip(preds, truth)])
        typer.echo(f"accuracy {acc:.4f}")


if __name__ == "__main__":
    app()
