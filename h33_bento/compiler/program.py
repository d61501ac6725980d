"""CompiledModel: the program the engine runs, its parameters, and its plan report.

Saved in a native format (``manifest.json`` + ``arrays.npz``, never pickle) and fingerprinted
over both, so a tampered artifact is refused at load time and every envelope can name the exact
model it was made for.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..ckks.params import BootstrapConfig, CKKSParams
from ..errors import ModelFormatError
from .activations import chebyshev_depth
from .cost_model import DEFAULT_CACHE_BYTES, CostModel
from .diagonals import DiagonalPlan

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"


@dataclass
class Step:
    """One instruction.  ``level`` is the number of levels consumed before it starts."""

    name: str
    op: str  # linear | poly | square | add | mul
    inputs: list[str]
    level: int
    attrs: dict[str, Any] = field(default_factory=dict)
    linear: DiagonalPlan | None = None


@dataclass
class CompiledModel:
    """A network compiled to CKKS: layouts, diagonals, polynomials and parameters."""

    params: CKKSParams
    input_shape: tuple[int, ...]
    input_name: str
    input_positions: np.ndarray
    output_shape: tuple[int, ...]
    output_positions: np.ndarray
    steps: list[Step]
    labels: list[str] | None = None
    depth: int = 0
    primitive_costs_ms: dict[str, Any] = field(default_factory=dict)
    key_sizes: dict[str, int] = field(default_factory=dict)
    runnable: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- derived facts
    @property
    def lanes(self) -> int:
        return self.params.lanes

    @property
    def lane_length(self) -> int:
        return self.params.lane_length

    @property
    def input_blocks(self) -> int:
        return int(self.input_positions.max()) // self.lane_length + 1

    @property
    def output_blocks(self) -> int:
        return int(self.output_positions.max()) // self.lane_length + 1

    @property
    def output(self) -> str:
        return self.steps[-1].name

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            manifest, arrays = self._serialize()
            self._fingerprint = _fingerprint(manifest, arrays)
        return self._fingerprint

    @property
    def num_classes(self) -> int:
        return int(np.prod(self.output_shape))

    def class_labels(self) -> list[str]:
        return list(self.labels) if self.labels else [str(i) for i in range(self.num_classes)]

    # ----------------------------------------------------------------- plan report
    def blocks(self) -> dict[str, int]:
        """Ciphertexts each step's output spans (element-wise steps run once per block)."""
        out = {self.input_name: self.input_blocks}
        for s in self.steps:
            out[s.name] = s.linear.out_blocks if s.linear is not None else out[s.inputs[0]]
        return out

    def step_counts(self, step: Step) -> dict[str, int]:
        if step.op == "linear" and step.linear is not None:
            return step.linear.counts()
        blocks = self.blocks()[step.name]
        if step.op == "poly":
            return {"chebyshev_degree": len(step.attrs["coeffs"]) - 1, "ciphertexts": blocks}
        if step.op in ("square", "mul"):
            return {"mult_cipher": blocks, "rescale": blocks}
        return {"add": blocks}

    def plaintext_runs(self, step: Step) -> list[tuple[int, int]]:
        """(bytes, count) runs of the plaintexts a linear step encodes, in the engine's order: for
        every output block its diagonals (at the step's level), then its bias if it has one (one
        level down, after the rescale)."""
        plan = step.linear
        diagonal, bias = self.params.plaintext_bytes(step.level), self.params.plaintext_bytes(step.level + 1)
        per_block = np.bincount(plan.terms[:, 0], minlength=plan.out_blocks)
        runs = []
        for ob in range(plan.out_blocks):
            runs.append((diagonal, int(per_block[ob])))
            if np.any(plan.bias[ob]):
                runs.append((bias, 1))
        return runs

    def uncached_plaintexts(self, cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, int]:
        """Plaintexts per linear step that an engine with this cache budget encodes on every run.

        The engine's cache keeps each plaintext it encodes while it fits the budget, in program
        order (see ``runtime.engine``), so which ones spill is known at compile time.
        """
        used, out = 0, {}
        for s in self.steps:
            if s.linear is None:
                continue
            spilled = 0
            for size, count in self.plaintext_runs(s):
                kept = max(0, min(count, (cache_bytes - used) // size))
                used += kept * size
                spilled += count - kept
            out[s.name] = spilled
        return out

    @property
    def cost_model(self) -> CostModel:
        return CostModel(self.primitive_costs_ms, self.params.multiplicative_depth)

    def predicted_ms(self, step: Step, cache_bytes: int = DEFAULT_CACHE_BYTES) -> float:
        """Predicted time of one step from the primitive costs measured at compile time, in the
        steady state of an engine with ``cache_bytes`` of plaintext cache (diagonals beyond it
        are encoded on every run)."""
        costs = self.primitive_costs_ms
        if not costs:
            return float("nan")
        depth = self.params.multiplicative_depth
        level = step.level
        if level > depth:  # a plan past the ring's depth: assume the level right after a bootstrap
            refresh = (self.params.bootstrapping or BootstrapConfig()).levels_after
            level = depth - refresh + (level - depth) % refresh
        counts = self.step_counts(step)
        if step.op == "poly":
            key = f"chebyshev_{counts['chebyshev_degree']}"
            return costs.get(key, float("nan")) * (depth + 1 - level) / (depth + 1) * counts["ciphertexts"]
        if step.linear is not None:
            counts = {**counts, "encode": self.uncached_plaintexts(cache_bytes)[step.name]}
        return self.cost_model.total(counts, level)

    def bootstrap_estimate(self) -> tuple[int, int]:
        """(bootstrap operations, ciphertext bootstraps) per run: 0 when the depth fits.

        An estimate for plans deeper than the ring allows: a fresh ciphertext has the parameters'
        full depth, each bootstrap restores ``BootstrapConfig.levels_after`` levels (10 by default:
        an assumption until bootstrapping lands and is measured), and a tensor is bootstrapped
        lazily, right before the first step that would run out of levels.  Every ciphertext block
        of the tensor is bootstrapped (the second number).
        """
        budget = self.params.multiplicative_depth
        if self.depth <= budget:
            return 0, 0
        refresh = (self.params.bootstrapping or BootstrapConfig()).levels_after
        remaining = {self.input_name: budget}
        blocks = self.blocks()
        ops = cts = 0
        for s in self.steps:
            need = (chebyshev_depth(len(s.attrs["coeffs"]) - 1, s.attrs["lower"], s.attrs["upper"])
                    if s.op == "poly" else int(s.op != "add"))
            for i in s.inputs:
                if remaining[i] < need:
                    remaining[i] = refresh
                    ops += 1
                    cts += blocks[i]
            remaining[s.name] = min(remaining[i] for i in s.inputs) - need
        return ops, cts

    def plan_summary(self) -> dict[str, Any]:
        """Machine-readable plan: what MLflow records and ``/model`` returns."""
        rotations = sum(c.get("rotate", 0) + c.get("fast_rotate", 0) + c.get("rotate_ext", 0)
                        for c in map(self.step_counts, self.steps))
        predicted = sum(self.predicted_ms(s) for s in self.steps)
        bootstraps, ct_bootstraps = self.bootstrap_estimate()
        c = self.primitive_costs_ms
        client = (self.input_blocks * (self.cost_model.ms("encode", 0) + c.get("encrypt", float("nan"))
                                       + c.get("serialize_input", 0.0))
                  + self.output_blocks * (c.get("deserialize_output", 0.0) + c.get("decrypt", float("nan"))))
        # the server's share beyond the steps: take the input off the wire, put the output on it
        predicted += (self.input_blocks * (c.get("deserialize_input", 0.0) + self.cost_model.ms("add", 0))
                      + self.output_blocks * c.get("serialize_output", 0.0))
        return {
            "levels": self.depth,
            "bootstraps": bootstraps,
            "ciphertext_bootstraps": ct_bootstraps,
            "steps": len(self.steps),
            "rotations_per_run": rotations,
            "rotation_keys": len(self.params.rotation_indices),
            "key_bundle_bytes": self.predicted_key_bundle_bytes,
            "predicted_latency_ms": round(predicted, 2) if predicted == predicted else None,
            "predicted_client_ms": round(client, 2) if client == client else None,
            "plaintext_bytes": sum(size * count for s in self.steps if s.linear for size, count in self.plaintext_runs(s)),
            "encodes_per_run": sum(self.uncached_plaintexts().values()),
        }

    @property
    def predicted_key_bundle_bytes(self) -> int:
        ks = self.key_sizes
        if not ks:
            return 0
        return ks.get("public", 0) + ks.get("mult", 0) + ks.get("rotation", 0) * len(self.params.rotation_indices)

    @property
    def plan(self) -> str:
        """Human-readable plan report, one line per step."""
        p = self.params
        lines = [
            f"h33 compiled model {self.fingerprint}",
            f"CKKS: N={p.ring_dim}, depth={p.multiplicative_depth}, scale=2^{p.scale_bits}, "
            f"log2 Q={p.modulus_bits}, {p.scaling_technique}, {p.security_level}",
            f"lanes: {p.lanes} inputs per ciphertext, {p.lane_length} values per lane, "
            f"input {self.input_shape} in {self.input_blocks} ciphertext(s)",
            "",
            f"{'step':<28}{'op':<8}{'level':>6}{'diags':>7}{'baby':>6}{'giant':>7}{'pmult':>7}{'pred ms':>10}",
        ]
        for s in self.steps:
            c = self.step_counts(s)
            extra = f"  deg {c['chebyshev_degree']} on [{s.attrs['lower']:.3g}, {s.attrs['upper']:.3g}]" \
                if s.op == "poly" else ""
            if s.linear is not None and s.linear.fold:
                extra = f"  fold mod {s.linear.fold}"
            lines.append(
                f"{s.name[:27]:<28}{s.op:<8}{s.level:>6}{c.get('diagonals', 0):>7}{c.get('fast_rotate', 0):>6}"
                f"{c.get('rotate', 0) + c.get('rotate_ext', 0):>7}{c.get('mult_plain', 0):>7}"
                f"{self.predicted_ms(s):>10.1f}{extra}"
            )
        summ = self.plan_summary()
        lines += [
            "",
            f"levels: {summ['levels']}"
            + (f" (the largest 128-bit ring holds {p.multiplicative_depth})" if summ["bootstraps"] else "")
            + f", bootstraps: {summ['bootstraps']}"
            + (f" (estimate: {summ['ciphertext_bootstraps']} ciphertext bootstraps, "
               f"{(p.bootstrapping or BootstrapConfig()).levels_after} levels each; latency excludes them)"
               if summ["bootstraps"] else "")
            + f", rotations per run: {summ['rotations_per_run']}",
            f"rotation keys: {summ['rotation_keys']} "
            f"(indices {list(p.rotation_indices)[:12]}{' ...' if len(p.rotation_indices) > 12 else ''})",
            f"key bundle: {summ['key_bundle_bytes'] / 2**20:.1f} MiB, predicted latency "
            f"{summ['predicted_latency_ms']} ms per ciphertext ({p.lanes} inputs) on the server, "
            f"{summ['predicted_client_ms']} ms to encrypt and decrypt on the client",
            f"plaintext diagonals and biases: {summ['plaintext_bytes'] / 2**20:.0f} MiB encoded"
            + (f"; {summ['encodes_per_run']} re-encoded per run with the default "
               f"{DEFAULT_CACHE_BYTES / 2**30:.0f} GiB engine cache (included above)" if summ["encodes_per_run"] else
               f", all kept by the default {DEFAULT_CACHE_BYTES / 2**30:.0f} GiB engine cache"),
        ]
        return "\n".join(lines)

    # ----------------------------------------------------------------- persistence
    def _serialize(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {
            "input_positions": self.input_positions.astype(np.int64),
            "output_positions": self.output_positions.astype(np.int64),
        }
        steps = []
        for i, s in enumerate(self.steps):
            entry: dict[str, Any] = {"name": s.name, "op": s.op, "inputs": s.inputs, "level": s.level}
            if s.op == "poly":
                arrays[f"{i}.coeffs"] = np.asarray(s.attrs["coeffs"], dtype=np.float64)
                entry["lower"], entry["upper"] = float(s.attrs["lower"]), float(s.attrs["upper"])
                entry["replaces"] = s.attrs.get("replaces")
            if s.linear is not None:
                lp = s.linear
                arrays[f"{i}.terms"], arrays[f"{i}.diags"], arrays[f"{i}.bias"] = lp.terms, lp.diags, lp.bias
                entry.update(fold=lp.fold, baby_step=lp.baby_step, fold_chunk=lp.fold_chunk, in_blocks=lp.in_blocks,
                             out_blocks=lp.out_blocks)
            steps.append(entry)
        manifest = {
            "format_version": FORMAT_VERSION,
            "params": self.params.model_dump(mode="json"),
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "float64"},
            "output": {"shape": list(self.output_shape)},
            "labels": self.labels,
            "depth": self.depth,
            "runnable": self.runnable,
            "steps": steps,
            "primitive_costs_ms": self.primitive_costs_ms,
            "key_sizes": self.key_sizes,
            "metadata": self.metadata,
        }
        return manifest, arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and ``arrays.npz`` into directory ``path``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        manifest, arrays = self._serialize()
        manifest["fingerprint"] = _fingerprint(manifest, arrays)
        np.savez(d / ARRAYS, **arrays)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompiledModel":
        """Read a saved model, refusing unknown versions and anything whose fingerprint is off."""
        d = Path(path)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            with np.load(d / ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError as exc:
            raise ModelFormatError(f"{d} is not a compiled h33 model: {exc.filename} is missing") from exc
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ModelFormatError(f"compiled model at {d} is unreadable: {exc}") from exc
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFormatError(
                f"compiled model at {d} has format version {version!r}; this build reads version {FORMAT_VERSION}"
            )
        recorded = manifest.pop("fingerprint", None)
        actual = _fingerprint(manifest, arrays)
        if recorded != actual:
            raise ModelFormatError(
                f"compiled model at {d} fails its integrity check (fingerprint {actual}, manifest says "
                f"{recorded}): the artifacts were modified"
            )
        try:
            model = cls._from_manifest(manifest, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"compiled model at {d} has a malformed manifest: {exc}") from exc
        model._fingerprint = actual
        return model

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CompiledModel":
        params = CKKSParams.model_validate(manifest["params"])
        steps = []
        for i, e in enumerate(manifest["steps"]):
            attrs: dict[str, Any] = {}
            linear = None
            if e["op"] == "poly":
                attrs = {"coeffs": arrays[f"{i}.coeffs"], "lower": e["lower"], "upper": e["upper"],
                         "replaces": e.get("replaces")}
            if f"{i}.terms" in arrays:
                linear = DiagonalPlan(n=params.lane_length, in_blocks=e["in_blocks"], out_blocks=e["out_blocks"],
                                      fold=e["fold"], terms=arrays[f"{i}.terms"], diags=arrays[f"{i}.diags"],
                                      bias=arrays[f"{i}.bias"], baby_step=e["baby_step"],
                                      fold_chunk=e.get("fold_chunk", 1))
            steps.append(Step(e["name"], e["op"], list(e["inputs"]), int(e["level"]), attrs, linear))
        return cls(
            params=params,
            input_shape=tuple(manifest["input"]["shape"]),
            input_name=manifest["input"]["name"],
            input_positions=arrays["input_positions"],
            output_shape=tuple(manifest["output"]["shape"]),
            output_positions=arrays["output_positions"],
            steps=steps,
            labels=manifest.get("labels"),
            depth=int(manifest["depth"]),
            primitive_costs_ms=manifest.get("primitive_costs_ms", {}),
            key_sizes=manifest.get("key_sizes", {}),
            runnable=bool(manifest.get("runnable", True)),
            metadata=manifest.get("metadata", {}),
        )


def _fingerprint(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]
