"""Estimates and the text report of a compiled program: primitive counts, predicted time per step
(bootstraps included), key-bundle size, peak memory and plaintext-cache use.

Predictions price each step's primitive counts (its ``OpSpec.counts``) with the model's
``PrimitiveCosts`` at the level where the step runs.  Without measured costs they come from the
stored table (``cost_model.STORED_MS``, measured once on another machine), and key sizes from the
parameters; the report says so.  For a ring the table lacks, predictions are None.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .cost_model import DEFAULT_CACHE_BYTES
from .ops import OPS, Op

if TYPE_CHECKING:
    from ..ckks.params import CKKSParams
    from ..ckks.timing import PrimitiveCosts
    from .model import CompiledModel, Step


def step_counts(model: "CompiledModel", step: "Step") -> dict[str, int]:
    """Primitive operations one run of ``step`` performs."""
    return OPS[step.op].counts(step, model.blocks()[step.name])


def plaintext_runs(model: "CompiledModel", step: "Step") -> list[tuple[int, int]]:
    """(bytes, count) runs of the plaintexts a linear step encodes, in the engine's order: for
    every output block its diagonals (at the step's level), then its bias if it has one (one
    level down, after the rescale).  Encrypted-weight steps encode none: their weights are ciphertexts."""
    plan = step.linear
    if step.op is Op.ENCRYPTED_LINEAR:
        return []
    diagonal, bias = model.params.plaintext_bytes(step.level), model.params.plaintext_bytes(step.level + 1)
    per_block = np.bincount(plan.terms[:, 0], minlength=plan.out_blocks)
    runs = []
    for ob in range(plan.out_blocks):
        runs.append((diagonal, int(per_block[ob])))
        if np.any(plan.bias[ob]):
            runs.append((bias, 1))
    return runs


def uncached_plaintexts(model: "CompiledModel", cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, int]:
    """Plaintexts per linear step that an engine with this cache budget encodes on every run.

    The engine's cache keeps each plaintext it encodes while it fits the budget, in program
    order (see ``runtime.engine``), so which ones spill is known at compile time.
    """
    used, out = 0, {}
    for s in model.steps:
        if s.linear is None:
            continue
        spilled = 0
        for size, count in plaintext_runs(model, s):
            kept = max(0, min(count, (cache_bytes - used) // size))
            used += kept * size
            spilled += count - kept
        out[s.name] = spilled
    return out


def predicted_ms(model: "CompiledModel", step: "Step", cache_bytes: int = DEFAULT_CACHE_BYTES) -> float:
    """Predicted time of one step from the model's primitive costs, in the steady state of an
    engine with ``cache_bytes`` of plaintext cache (diagonals beyond it are encoded on every run)."""
    cost_model = model.cost_model
    if not cost_model.costs:
        return float("nan")
    counts = step_counts(model, step)
    if step.linear is not None:
        counts = {**counts, "encode": uncached_plaintexts(model, cache_bytes)[step.name]}
    return cost_model.total(counts, step.level)


def _keys_measured(costs: "PrimitiveCosts | None") -> bool:
    return costs is not None and bool(costs.key_bytes)


def key_sizes(params: "CKKSParams", costs: "PrimitiveCosts | None") -> Mapping[str, int]:
    """Serialized key sizes: measured at compile time, else predicted from the parameters."""
    return costs.key_bytes if _keys_measured(costs) else params.estimated_key_bytes()


def _bootstrap_stats(costs: "PrimitiveCosts | None") -> dict[str, Any]:
    """What ``ckks.timing.with_bootstrap`` measured of the bootstraps (empty where nothing was)."""
    return (costs.ms.get("bootstraps") or {}) if costs is not None else {}


def bootstrap_keys(params: "CKKSParams", costs: "PrimitiveCosts | None") -> int:
    """Rotation keys the bootstraps add (only measured: 0 without bootstrap measurements)."""
    boot = params.bootstrapping
    measured = _bootstrap_stats(costs).get("keys", {})
    return sum(int(measured.get(str(s), 0)) for s in boot.slots) if boot else 0


def bundle_bytes(params: "CKKSParams", costs: "PrimitiveCosts | None", rotations: int) -> int:
    """Size of an evaluation-key bundle with ``rotations`` program rotation keys (plus the
    bootstrapping keys; an upper bound: the sets may overlap)."""
    ks = key_sizes(params, costs)
    return ks.get("public", 0) + ks.get("mult", 0) + ks.get("rotation", 0) * (rotations
                                                                              + bootstrap_keys(params, costs))


def key_bundle_bytes(model: "CompiledModel") -> int:
    """Predicted size of the evaluation-key bundle: from the key sizes measured at compile time,
    else from the parameters (without the bootstrapping keys, whose count is only measured)."""
    return bundle_bytes(model.params, model.costs, len(model.params.rotation_indices))


#: a Python process with h33_bento, numpy and OpenFHE imported and one context built (measured: 70 MB
#: at N=2^13, a few hundred MB at N=2^16 with its NTT tables), rounded up
PROCESS_BYTES = 512 << 20


def peak_memory(model: "CompiledModel", cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, int]:
    """Predicted peak RSS of the client's key generation (``keygen``) and of a server process that
    installs the bundle and runs once (``server``), in bytes.

    Key generation holds one chunk of rotation keys at a time (``ckks.keys.ROTATION_CHUNK_BYTES``,
    or one slot count's bootstrapping keys, which OpenFHE makes at once).  The server holds the
    whole bundle once installed (each chunk is deserialized from a file, which costs nothing
    beyond the keys it builds), the plaintext cache, and the ciphertexts of the widest step: its
    input, hoisted baby-step rotations and output per block, and the bootstrapping precomputations
    measured per slot count (``ckks.timing.measure_bootstrap``; none where they were not measured,
    see :func:`_precomputations_measured`).
    """
    from ..ckks.keys import ROTATION_CHUNK_BYTES

    params = model.params
    ks = key_sizes(params, model.costs)
    per_chunk = max(1, ROTATION_CHUNK_BYTES // params.estimated_key_bytes()["rotation"])  # as keygen chunks
    rotations = len(params.rotation_indices)
    chunk = min(per_chunk, rotations) * ks.get("rotation", 0)
    boot = params.bootstrapping
    stats = _bootstrap_stats(model.costs)
    measured = stats.get("keys", {})
    boot_chunk = max((int(measured.get(str(s), 0)) for s in boot.slots), default=0) * ks.get("rotation", 0) \
        if boot else 0
    precomputed = sum(int(stats.get("precompute", {}).get(str(s), 0)) for s in boot.slots) if boot else 0
    largest = max(chunk, boot_chunk)
    ct = ks.get("ciphertext", params.estimated_key_bytes()["ciphertext"])
    blocks = model.blocks()
    working = max(((step_counts(model, s).get("fast_rotate", 0) + 2) * blocks[s.name] * ct
                   for s in model.steps), default=0)
    plaintexts = sum(size * n for s in model.steps if s.linear for size, n in plaintext_runs(model, s))
    return {
        "keygen": PROCESS_BYTES + ks.get("public", 0) + ks.get("mult", 0) + largest,
        "server": PROCESS_BYTES + key_bundle_bytes(model) + min(cache_bytes, plaintexts) + working + precomputed,
    }


def _precomputations_measured(model: "CompiledModel") -> bool:
    """Whether ``peak_memory`` counts the bootstrapping precomputations of every slot count."""
    boot = model.params.bootstrapping
    return boot is None or all(str(s) in _bootstrap_stats(model.costs).get("precompute", {}) for s in boot.slots)


def _rounded(value: float) -> float | None:
    return round(value, 2) if value == value else None


def summary(model: "CompiledModel") -> dict[str, Any]:
    """Machine-readable estimates: what MLflow records and ``/model`` returns."""
    counts = [step_counts(model, s) for s in model.steps]
    rotations = sum(c.get("rotate", 0) + c.get("fast_rotate", 0) + c.get("rotate_ext", 0) for c in counts)
    predicted = sum(predicted_ms(model, s) for s in model.steps)
    blocks = model.blocks()
    boots = [s for s in model.steps if s.op is Op.BOOTSTRAP]
    cm = model.cost_model
    c = cm.costs
    memory = peak_memory(model)
    client = (model.input_blocks * (cm.ms("encode", 0) + c.get("encrypt", float("nan")) + c.get("serialize_input", 0.0))
              + model.output_blocks * (c.get("deserialize_output", 0.0) + c.get("decrypt", float("nan"))))
    # the server's share beyond the steps: take the input off the wire, put the output on it
    predicted += (model.input_blocks * (c.get("deserialize_input", 0.0) + cm.ms("add", 0))
                  + model.output_blocks * c.get("serialize_output", 0.0))
    return {
        "levels": model.depth,
        "bootstraps": len(boots),
        "ciphertext_bootstraps": sum(blocks[s.name] for s in boots),
        "steps": len(model.steps),
        "rotations_per_run": rotations,
        "rotation_keys": len(model.params.rotation_indices),
        "key_bundle_bytes": key_bundle_bytes(model),
        "predicted_keygen_peak_bytes": memory["keygen"],
        "predicted_server_peak_bytes": memory["server"],
        "key_sizes": "measured" if _keys_measured(model.costs) else "parameters",
        # where the predictions come from: "measured" at compile time, "cached" (measured on this
        # machine by an earlier compile, ``ckks.timing.cached_primitives``), the "stored" table, or None
        "costs": model.costs.origin if model.costs is not None else ("stored" if c else None),
        "predicted_latency_ms": _rounded(predicted),
        "predicted_client_ms": _rounded(client),
        "plaintext_bytes": sum(size * n for s in model.steps if s.linear for size, n in plaintext_runs(model, s)),
        "encodes_per_run": sum(uncached_plaintexts(model).values()),
        **key_trade(model, _rounded(predicted)),
    }


def key_trade(model: "CompiledModel", predicted_ms: float | None) -> dict[str, Any]:
    """What a key budget cost: the budget, and the bundle, rotation keys and predicted latency of
    the program compiled without it (the default's choice), priced with the same costs."""
    other = model.unbudgeted()
    if other is None:
        return {"key_budget_bytes": None}
    theirs = summary(other)
    cost = (predicted_ms - theirs["predicted_latency_ms"]
            if predicted_ms is not None and theirs["predicted_latency_ms"] is not None else None)
    return {"key_budget_bytes": model.metadata["key_budget"]["budget_bytes"],
            "unbudgeted_rotation_keys": theirs["rotation_keys"],
            "unbudgeted_key_bundle_bytes": theirs["key_bundle_bytes"],
            "unbudgeted_predicted_latency_ms": theirs["predicted_latency_ms"],
            "key_budget_cost_ms": _rounded(cost) if cost is not None else None}


def render(model: "CompiledModel") -> str:
    """The text report: parameters, one line per step, then the totals."""
    p = model.params
    lines = [
        f"h33 compiled model {model.fingerprint}",
        f"CKKS: N={p.ring_dim}, depth={p.multiplicative_depth}, scale=2^{p.scale_bits}, "
        f"log2 Q={p.modulus_bits}, {p.scaling_technique}, {p.security_level}",
        f"lanes: {p.lanes} inputs per ciphertext, {p.lane_length} values per lane, "
        f"input {model.input_shape} in {model.input_blocks} ciphertext(s)",
        "",
        f"{'step':<28}{'op':<8}{'level':>6}{'diags':>7}{'baby':>6}{'giant':>7}{'pmult':>7}{'pred ms':>10}",
    ]
    for s in model.steps:
        c = step_counts(model, s)
        describe = OPS[s.op].describe
        extra = describe(s) if describe is not None else ""
        lines.append(
            f"{s.name[:27]:<28}{s.op.value:<8}{s.level:>6}{c.get('diagonals', 0):>7}{c.get('fast_rotate', 0):>6}"
            f"{c.get('rotate', 0) + c.get('rotate_ext', 0):>7}{c.get('mult_plain', 0):>7}"
            f"{predicted_ms(model, s):>10.1f}{'  ' + extra if extra else ''}"
        )
    summ = summary(model)
    lines += [
        "",
        f"levels: {summ['levels']} of {p.multiplicative_depth}"
        + ("" if model.runnable else " (too deep for these parameters without bootstrapping: an estimate)")
        + f", bootstraps: {summ['bootstraps']}"
        + (f" ({summ['ciphertext_bootstraps']} ciphertext bootstraps at {list(p.bootstrapping.slots)} slots, "
           f"{p.bootstrapping.secret_key_dist}, level budget {list(p.bootstrapping.level_budget)})"
           if summ["bootstraps"] else "")
        + f", rotations per run: {summ['rotations_per_run']}",
        f"rotation keys: {summ['rotation_keys']} "
        f"(indices {list(p.rotation_indices)[:12]}{' ...' if len(p.rotation_indices) > 12 else ''})",
        f"key bundle: {summ['key_bundle_bytes'] / 2**20:.1f} MiB"
        + ("" if summ["key_sizes"] == "measured" else
           " (estimated from the parameters" + (", bootstrapping keys not included)" if p.bootstrapping else ")"))
        + f", predicted latency {summ['predicted_latency_ms']} ms per ciphertext ({p.lanes} inputs) on the server, "
        f"{summ['predicted_client_ms']} ms to encrypt and decrypt on the client"
        + ("" if summ["costs"] == "measured" else
           f" (from this machine's cost cache, measured {model.costs.measured_at}; "
           "--remeasure-costs measures again)" if summ["costs"] == "cached" else
           " (from the stored cost table, not measured on this machine)" if summ["costs"] == "stored" else
           f" (no costs measured, none stored for N={p.ring_dim})")
        + (f"; costs measured while the machine was busy (load average {model.costs.load:g}), so these "
           "over-predict a quiet machine" if model.costs is not None and model.costs.busy else ""),
        *([f"key budget {summ['key_budget_bytes'] / 2**20:.1f} MiB: {summ['rotation_keys']} rotation keys "
           f"({summ['key_bundle_bytes'] / 2**20:.1f} MiB) instead of {summ['unbudgeted_rotation_keys']} "
           f"({summ['unbudgeted_key_bundle_bytes'] / 2**20:.1f} MiB) without it, for "
           f"{summ['key_budget_cost_ms']:+} ms predicted per ciphertext ({summ['unbudgeted_predicted_latency_ms']} ms "
           "without it)"] if summ["key_budget_bytes"] is not None else []),
        f"predicted peak memory: {summ['predicted_keygen_peak_bytes'] / 2**30:.2f} GiB to generate the keys "
        f"(client), {summ['predicted_server_peak_bytes'] / 2**30:.2f} GiB to install them and run (server)"
        + ("" if _precomputations_measured(model) else " (bootstrapping precomputations not measured, not included)"),
        f"plaintext diagonals and biases: {summ['plaintext_bytes'] / 2**20:.0f} MiB encoded"
        + (f"; {summ['encodes_per_run']} re-encoded per run with the default "
           f"{DEFAULT_CACHE_BYTES / 2**30:.0f} GiB engine cache (included above)" if summ["encodes_per_run"] else
           f", all kept by the default {DEFAULT_CACHE_BYTES / 2**30:.0f} GiB engine cache"),
    ]
    return "\n".join(lines)
