"""CompiledModel: the program the engine runs, its parameters, and how it is saved.

Saved in a native format (``manifest.json`` + ``arrays.npz``, never pickle).  Two hashes:

* the **fingerprint** names what the engine executes -- parameters, layouts, steps, diagonals,
  polynomials, labels -- and nothing else, so recompiling a network with the same cost table
  gives the same identity, and re-pricing a program (``with_costs``) keeps it.  Envelopes and
  MLflow records carry it.
* the **digest** covers the whole saved manifest and arrays (costs and metadata included), so
  any edit of an artifact is refused at load time.

``without_weights`` gives the artifact of encrypted-weight mode: every linear step becomes an
``encrypted_linear`` step whose plan keeps its structure (terms, schedule, folds) but no diagonal
or bias values, and the manifest records ``weight_mode: "encrypted"``.  Its own fingerprint is the
identity that encrypted weights (``runtime.weights``) and envelopes name in that mode.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..ckks.params import CKKSParams
from ..errors import ModelFormatError
from ..ckks.timing import PrimitiveCosts
from .cost_model import DEFAULT_CACHE_BYTES, CostModel, stored_costs
from .diagonals import DiagonalPlan, rotation_indices
from .ops import OPS, Op

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
#: Manifest entries that describe a program without being part of it (not fingerprinted).
_DESCRIPTIVE = ("costs", "metadata")
WeightMode = Literal["plaintext", "encrypted"]


@dataclass
class Step:
    """One instruction.  ``level`` is the number of levels consumed before it starts."""

    name: str
    op: Op
    inputs: list[str]
    level: int
    attrs: dict[str, Any] = field(default_factory=dict)
    linear: DiagonalPlan | None = None

    def __post_init__(self) -> None:
        self.op = Op(self.op)


@dataclass
class CompiledModel:
    """A network compiled to CKKS: layouts, diagonals, polynomials and parameters.

    ``costs`` (the primitive costs it was compiled with) only feed predictions; ``runnable`` is
    False for an estimate of a network deeper than the parameters allow.
    """

    params: CKKSParams
    input_shape: tuple[int, ...]
    input_name: str
    input_positions: np.ndarray
    output_shape: tuple[int, ...]
    output_positions: np.ndarray
    steps: list[Step]
    labels: list[str] | None = None
    depth: int = 0
    costs: PrimitiveCosts | None = None
    runnable: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    #: encrypted-weight mode: a hash of the full artifact, naming its weights without revealing them
    weights_id: str | None = None
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
            self._fingerprint = _hash({k: v for k, v in manifest.items() if k not in _DESCRIPTIVE}, arrays)
        return self._fingerprint

    @property
    def weight_mode(self) -> WeightMode:
        """"encrypted" when the linear steps' weights are ciphertexts provisioned apart from the program."""
        return "encrypted" if any(s.op is Op.ENCRYPTED_LINEAR for s in self.steps) else "plaintext"

    def without_weights(self) -> "CompiledModel":
        """The weightless artifact of encrypted-weight mode (see the module docstring); the model
        owner keeps this full one and provisions its weights encrypted for each client key.

        It records ``weights_id``, a hash of this artifact's fingerprint, so two models of one
        architecture (two trainings, two versions) have two weightless fingerprints and weights
        provisioned for one are refused by the other.
        """
        if self.weight_mode == "encrypted":
            return self
        steps = [replace(s, op=Op.ENCRYPTED_LINEAR, linear=s.linear.without_values()) if s.op is Op.LINEAR else s
                 for s in self.steps]
        weights_id = hashlib.sha256(f"h33-weights:{self.fingerprint}".encode()).hexdigest()[:32]
        return replace(self, steps=steps, weights_id=weights_id, _fingerprint=None)

    def unbudgeted(self) -> "CompiledModel | None":
        """The program the same compile chooses without its key budget (the default trade of key
        bytes against time), for the report to price against; None when compiled without one."""
        trade = self.metadata.get("key_budget")
        if not trade:
            return None
        schedules = trade["unbudgeted_schedules"]
        steps = [replace(s, linear=replace(s.linear, baby_step=schedules[s.name][0], fold_chunk=schedules[s.name][1]))
                 if s.name in schedules else s for s in self.steps]
        rotations = rotation_indices((s.linear for s in steps if s.linear is not None), self.lanes, self.params.slots)
        return replace(self, steps=steps, params=self.params.model_copy(update={"rotation_indices": rotations}),
                       metadata={k: v for k, v in self.metadata.items() if k != "key_budget"}, _fingerprint=None)

    @property
    def num_classes(self) -> int:
        return int(np.prod(self.output_shape))

    def class_labels(self) -> list[str]:
        return list(self.labels) if self.labels else [str(i) for i in range(self.num_classes)]

    @property
    def chebyshev_degrees(self) -> tuple[int, ...]:
        """Distinct polynomial degrees of the program (the costs a re-pricing must measure)."""
        return tuple(sorted({len(s.attrs["coeffs"]) - 1 for s in self.steps if "coeffs" in s.attrs}))

    def blocks(self) -> dict[str, int]:
        """Ciphertexts each step's output spans (element-wise steps run once per block)."""
        out = {self.input_name: self.input_blocks}
        for s in self.steps:
            out[s.name] = s.linear.out_blocks if s.linear is not None else out[s.inputs[0]]
        return out

    # ----------------------------------------------------------------- predictions and report
    @property
    def cost_model(self) -> CostModel:
        """What predictions price with: the costs measured at compile time, else the stored table."""
        costs = self.costs if self.costs is not None else stored_costs(self.params, self.chebyshev_degrees)
        return CostModel(costs, self.params.multiplicative_depth)

    def with_costs(self, costs: PrimitiveCosts) -> "CompiledModel":
        """The same program (same fingerprint) priced with other costs, e.g. measured again now."""
        return replace(self, costs=costs)

    def repriced(self) -> "CompiledModel":
        """The same program with its primitive costs measured again on this machine, now.

        A shared machine's speed drifts by 10-20% within minutes, so a benchmark that compares a
        run with the prediction re-prices just before the run rather than trusting compile-time costs.
        """
        from ..ckks.timing import measure_primitives

        return self.with_costs(measure_primitives(self.params, self.chebyshev_degrees))

    def predicted_ms(self, step: Step, cache_bytes: int = DEFAULT_CACHE_BYTES) -> float:
        """Predicted time of one step (see ``program.report``)."""
        from .report import predicted_ms

        return predicted_ms(self, step, cache_bytes)

    def summary(self) -> dict[str, Any]:
        """Machine-readable estimates: what MLflow records and ``/model`` returns."""
        from .report import summary

        return summary(self)

    @property
    def report(self) -> str:
        """Human-readable report, one line per step."""
        from .report import render

        return render(self)

    @property
    def predicted_key_bundle_bytes(self) -> int:
        from .report import key_bundle_bytes

        return key_bundle_bytes(self)

    # ----------------------------------------------------------------- persistence
    def _serialize(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {
            "input_positions": self.input_positions.astype(np.int64),
            "output_positions": self.output_positions.astype(np.int64),
        }
        steps = []
        for i, s in enumerate(self.steps):
            entry: dict[str, Any] = {"name": s.name, "op": s.op.value, "inputs": s.inputs, "level": s.level,
                                     "attrs": {}, "arrays": []}
            for key, value in s.attrs.items():
                if isinstance(value, np.ndarray):
                    arrays[f"{i}.attrs.{key}"] = np.asarray(value, dtype=np.float64)
                    entry["arrays"].append(key)
                else:
                    entry["attrs"][key] = value
            if s.linear is not None:
                lp = s.linear
                for name in ("terms", "diags", "bias"):
                    arrays[f"{i}.{name}"] = getattr(lp, name)
                entry["linear"] = {"fold": lp.fold, "baby_step": lp.baby_step, "fold_chunk": lp.fold_chunk,
                                   "in_blocks": lp.in_blocks, "out_blocks": lp.out_blocks}
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
            "costs": self.costs.to_json() if self.costs is not None else None,
            "metadata": self.metadata,
        }
        if self.weight_mode == "encrypted":  # plaintext manifests stay as before: same fingerprints
            manifest.update(weight_mode="encrypted", weights_id=self.weights_id)
        return manifest, arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``manifest.json`` and ``arrays.npz`` into directory ``path``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        manifest, arrays = self._serialize()
        manifest["digest"] = _hash(manifest, arrays)
        manifest["fingerprint"] = self.fingerprint
        np.savez(d / ARRAYS, **arrays)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompiledModel":
        """Read a saved model, refusing other format versions and anything whose digest is off."""
        d = Path(path)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            with np.load(d / ARRAYS, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError as exc:
            raise ModelFormatError(f"{d} is not a compiled h33 model: {exc.filename} is missing") from exc
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ModelFormatError(f"compiled model at {d} is unreadable: {exc}") from exc
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            hint = (" (written before programs and their costs were separated); recompile it with this build"
                    if version == 1 else "")
            raise ModelFormatError(f"compiled model at {d} has format version {version!r}; this build reads "
                                   f"version {FORMAT_VERSION}{hint}")
        recorded = manifest.pop("digest", None), manifest.pop("fingerprint", None)
        digest = _hash(manifest, arrays)
        if recorded[0] != digest:
            raise ModelFormatError(
                f"compiled model at {d} fails its integrity check (digest {digest}, manifest says "
                f"{recorded[0]}): the artifacts were modified"
            )
        try:
            model = cls._from_manifest(manifest, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"compiled model at {d} has a malformed manifest: {exc}") from exc
        if manifest.get("weight_mode", "plaintext") != model.weight_mode or (model.weights_id is None) == (
                model.weight_mode == "encrypted"):
            raise ModelFormatError(f"compiled model at {d} records weight_mode {manifest.get('weight_mode')!r} "
                                   f"and weights_id {model.weights_id!r}, but its steps are {model.weight_mode}")
        if model.fingerprint != recorded[1]:
            raise ModelFormatError(f"compiled model at {d} records fingerprint {recorded[1]}, but its program "
                                   f"hashes to {model.fingerprint}: the artifacts were modified")
        return model

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CompiledModel":
        params = CKKSParams.model_validate(manifest["params"])
        steps = []
        for i, e in enumerate(manifest["steps"]):
            op = Op(e["op"])
            if not OPS[op].in_program:
                raise ValueError(f"step {e['name']!r} has op {op.value!r}, which a program cannot hold")
            attrs = {**e["attrs"], **{key: arrays[f"{i}.attrs.{key}"] for key in e["arrays"]}}
            linear = None
            if "linear" in e:
                lp = e["linear"]
                width = 0 if op is Op.ENCRYPTED_LINEAR else params.lane_length
                if arrays[f"{i}.diags"].shape[1:] not in ((width,), (0,)) or arrays[f"{i}.bias"].shape[1:] != (width,):
                    raise ValueError(f"step {e['name']!r} ({op.value}) holds weights of the wrong shape")
                linear = DiagonalPlan(n=params.lane_length, in_blocks=lp["in_blocks"], out_blocks=lp["out_blocks"],
                                      fold=lp["fold"], terms=arrays[f"{i}.terms"], diags=arrays[f"{i}.diags"],
                                      bias=arrays[f"{i}.bias"],
                                      baby_step=lp["baby_step"], fold_chunk=lp["fold_chunk"])
            steps.append(Step(e["name"], op, list(e["inputs"]), int(e["level"]), attrs, linear))
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
            costs=PrimitiveCosts.from_json(manifest["costs"]) if manifest.get("costs") else None,
            runnable=bool(manifest["runnable"]),
            metadata=manifest.get("metadata") or {},
            weights_id=manifest.get("weights_id"),
        )


def _hash(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]
