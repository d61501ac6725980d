"""Execution: ``EngineRunner`` runs one model's encrypted programs; ``LanePacker`` fills the lanes of each
run; ``KeyState`` is the process's OpenFHE key state, shared by every served model's runner.

Lane packing.  A ciphertext holds ``lanes`` (8) independent inputs.  A client encrypting a single
input puts it in lane 0; the packer collects pending requests per (model, tenant, key_id) and,
for one engine run, rotates request i into lane ``offset_i`` and adds the ciphertexts
(``Engine.pack_lanes``).  The program runs once; every requester gets the same output
ciphertexts with ``lane = offset_i`` in its envelope (its answer is in its own lane(s)).
Requests carrying k > 1 inputs (lanes 0..k-1) are packed the same way into k contiguous lanes;
a request carrying 8 inputs runs as it is.  Requests of different tenants or keys are never
packed together: they could not be, since a ciphertext can only be added to another under the
same key, and the answer's other lanes are readable by whoever holds that key.

When does a group run?  The engine runs one group at a time (OpenFHE already uses every core).
A group becomes ready when its lanes are full, when no new request for it arrived for
``wait_s`` (the burst is over), or when its oldest request has waited ``max_wait_s``.  Among
ready groups the one with the oldest request runs first.  While the engine is busy, groups keep
filling, so under load runs are full without any waiting.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import openfhe
from starlette.responses import Response

from ..ckks.context import release_evaluation_keys, rss_bytes
from ..ckks.keys import EvaluationKeys
from ..ckks.sandbox import Sandbox
from ..ckks.serialization import EncryptedTensor
from ..program.diagonals import lane_shifts
from ..program.model import CompiledModel
from ..errors import EnvelopeError, EvaluationKeysNotFoundError, SandboxUnavailableError
from ..keystore import KeyStore
from ..runtime.engine import DEFAULT_CACHE_BYTES, Engine, PlaintextCache
from ..runtime.weights import WeightsFile, load_weights
from .http_errors import HTTPError, from_envelope_error, unknown_key, validator_unavailable, weights_missing
from .metrics import Metrics, NullMetrics

logger = logging.getLogger("h33_bento.runners")


@dataclass
class InferItem:
    """One authenticated, validated /infer request: who sent it and the envelope it carries.

    ``progress`` (a task's, see ``runners/tasks.py``) hears ``(steps done, steps total)`` from the
    engine thread while the run holding this request executes.
    """

    tenant: str
    key_id: str
    envelope: EncryptedTensor
    model_fingerprint: str
    received: float = field(default_factory=time.monotonic)
    progress: Callable[[int, int], None] | None = None

    @property
    def lanes(self) -> int:
        return self.envelope.lanes_used

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.model_fingerprint, self.tenant, self.key_id)


@dataclass
class InferResult:
    """What one requester gets back: the output envelope (or an error) plus run facts."""

    body: bytes | None = None
    error: HTTPError | None = None
    lane: int = 0
    run_id: str = ""
    requests_in_run: int = 0
    lanes_in_run: int = 0
    engine_ms: float = 0.0
    queue_ms: float = 0.0

    def headers(self) -> dict[str, str]:
        if not self.run_id:
            return {}
        return {
            "X-H33-Engine-Run": self.run_id,
            "X-H33-Lane": str(self.lane),
            "X-H33-Run-Requests": str(self.requests_in_run),
            "X-H33-Run-Lanes": str(self.lanes_in_run),
            "X-H33-Engine-Ms": f"{self.engine_ms:.1f}",
            "X-H33-Queue-Ms": f"{self.queue_ms:.1f}",
        }

    def response(self) -> Response:
        if self.error is not None:
            resp = self.error.response()
            resp.headers.update(self.headers())
            return resp
        return Response(self.body, media_type="application/octet-stream", headers=self.headers())


class KeyState:
    """OpenFHE's process-wide evaluation-key maps, and the one thread allowed to touch them.

    OpenFHE keeps evaluation keys in maps keyed by key tag that every context of the process shares,
    and can only clear them whole.  So every served model's runner runs on this one thread (a key is
    never installed while another model's program reads the maps), and the installed-keys cap is the
    worker's: once ``max_installed_keys`` distinct keys were installed since the last flush,
    installing another first *recycles* (:meth:`recycle`: every model's keys and engines dropped,
    memory returned to the OS); the keys still in use are installed again on their next request.
    """

    def __init__(self, max_installed_keys: int = 16) -> None:
        self.max_installed_keys = max_installed_keys
        self.runners: list[EngineRunner] = []
        self.tags: set[str] = set()  # key tags in OpenFHE's maps since the last recycle (engine thread writes)
        self.recycles = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h33-engine")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def installed_keys(self) -> int:
        """Distinct keys in OpenFHE's maps (and in this process's memory) since the last recycle."""
        return len(self.tags)

    def make_room(self, key_tag: str) -> bool:
        """Before ``key_tag`` is installed (engine thread): recycle if it is new and the cap is reached."""
        if key_tag in self.tags or len(self.tags) < self.max_installed_keys:
            return False
        self.recycle()
        return True

    def recycle(self) -> None:
        """Flush OpenFHE's key state: every model's keys and engines go; engines reload lazily from the stores."""
        before, dropped = rss_bytes(), self.installed_keys
        for runner in self.runners:
            runner.drop_engines()
        self.tags.clear()
        release_evaluation_keys()
        self.recycles += 1
        for runner in self.runners:
            runner.observe_memory()
        logger.info("recycled OpenFHE key state: %d keys dropped, RSS %.0f -> %.0f MiB", dropped,
                    before / 2**20, rss_bytes() / 2**20)


class EngineRunner:
    """Owns one model's engines (one per key_id, LRU) and runs them on the key state's thread.

    Every OpenFHE operation that touches evaluation keys -- installing a bundle, running a
    program, recycling the key state -- happens on that one thread (``KeyState``), so the
    process-wide key maps are never mutated while a program reads them.  Plaintext diagonals do
    not depend on the key, so the model's engines share one plaintext cache.

    Bundles reach OpenFHE here only as the ``sandbox`` re-serialized them (``KeyStore.load`` with
    the sandbox).  OpenFHE's key maps cannot drop one key, so a worker would grow by a bundle's
    size per distinct key it ever installed; instead the key state recycles at its cap
    (``KeyState.recycle``), and the keys still in use are installed again from the key store on
    their next request.

    A weightless model (encrypted-weight mode) runs each key with the encrypted weights stored next
    to its bundle, validated by the sandbox like the bundle (``runtime.weights.load_weights``) and
    read from their file a batch at a time.  An engine is rebuilt when the store's weights for its
    key are no longer those it loaded (replaced here, by another process on the volume, or by
    another replica on a shared store: ``KeyStore.weights_digest``).
    """

    def __init__(self, compiled: CompiledModel, keystore: KeyStore, sandbox: Sandbox, key_state: KeyState,
                 max_engines: int = 8, cache_bytes: int = DEFAULT_CACHE_BYTES, metrics: Metrics | None = None) -> None:
        if key_state.max_installed_keys < max_engines:
            raise ValueError("max_installed_keys must be at least max_engines")
        self.compiled = compiled
        self.params = compiled.params
        self.keystore = keystore
        self.sandbox = sandbox
        self.key_state = key_state
        self.max_engines = max_engines
        self.cache = PlaintextCache(compiled, cache_bytes)
        self.metrics = metrics or NullMetrics()
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._installed: dict[str, EvaluationKeys] = {}  # key_id -> bundle without its serialized keys
        self._weights_loaded: dict[str, bytes] = {}  # key_id -> digest of the weights its engine runs with
        self.loaded_tags: set[str] = set()  # key tags this model put in OpenFHE's maps since the last recycle
        self.runs = 0
        missing = sorted(set(lane_shifts(self.params.lanes, self.params.slots)) - set(self.params.rotation_indices))
        self.can_pack = not missing
        if missing:
            logger.warning("the model's rotation keys lack the lane shifts %s: requests run one per engine "
                           "run (recompile the model to enable lane packing)", missing)
        key_state.runners.append(self)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread (shared with every served model)."""
        return await self.key_state.call(fn, *args)

    @property
    def engines_loaded(self) -> int:
        return len(self._engines)

    # ----------------------------------------------------------------- engines (engine thread)
    def engine_for(self, key_id: str) -> Engine:
        engine = self._engines.get(key_id)
        if engine is not None and not self._stale_weights(key_id):
            self._engines.move_to_end(key_id)
            return engine
        self._engines.pop(key_id, None)
        if self.keystore.get(key_id) is None:
            raise unknown_key(key_id)
        slim = self._installed.get(key_id)
        if slim is not None:  # evicted from the LRU, but its keys are still in OpenFHE's maps
            return self.install(slim)
        try:
            keys = self.keystore.load(key_id, self.params, sandbox=self.sandbox)
        except EvaluationKeysNotFoundError:  # deleted since the lookup
            raise unknown_key(key_id) from None
        return self.install(keys)

    def install(self, keys: EvaluationKeys) -> Engine:
        """Install a bundle the sandbox validated (recycling first at the cap); returns its engine."""
        engine = self._engines.get(keys.key_id)
        if engine is not None and not self._stale_weights(keys.key_id):
            return engine
        weights = self._weights(keys.key_id, keys.key_tag)
        if self.key_state.make_room(keys.key_tag):
            self.metrics.key_recycles.labels(self.metrics.model).inc()
        # once OpenFHE's maps hold the keys the engine drops its serialized copy (hundreds of MB
        # per bundle); plaintext diagonals do not depend on the key, so all engines share a cache
        engine = Engine(self.compiled, keys, cache=self.cache, keep_serialized_keys=False, weights=weights)
        self.loaded_tags.add(keys.key_tag)
        self.key_state.tags.add(keys.key_tag)
        self._installed[keys.key_id] = engine.keys
        self._engines[keys.key_id] = engine
        if weights is not None:
            self._weights_loaded[keys.key_id] = weights.digest
        while len(self._engines) > self.max_engines:
            self._engines.popitem(last=False)
        self.metrics.key_installs.labels(self.metrics.model).inc()
        self.observe_memory()
        return engine

    def _weights(self, key_id: str, key_tag: str) -> WeightsFile | None:
        """The key's encrypted weights for the served weightless model, validated; None in plaintext
        mode, 409 ``weights_missing`` if none are stored."""
        if self.compiled.weight_mode == "plaintext":
            return None
        try:
            path = self.keystore.weights_file(key_id, self.compiled.fingerprint)
            if path is None:
                raise weights_missing(key_id)
            return load_weights(path, self.compiled, key_id, key_tag, self.sandbox)
        except (FileNotFoundError, EvaluationKeysNotFoundError):  # the key was deleted meanwhile
            raise unknown_key(key_id) from None

    def _stale_weights(self, key_id: str) -> bool:
        """Whether the store's weights for ``key_id`` are other than those its engine loaded."""
        loaded = self._weights_loaded.get(key_id)
        return loaded is not None and self.keystore.weights_digest(key_id, self.compiled.fingerprint) != loaded

    def drop_engines(self) -> None:
        """Forget every engine and installed key (the key state is being flushed)."""
        self._engines.clear()
        self._installed.clear()
        self._weights_loaded.clear()
        self.loaded_tags.clear()

    def observe_memory(self) -> None:
        self.metrics.installed_keys.labels(self.metrics.model).set(len(self.loaded_tags))
        self.metrics.rss_bytes.labels(self.metrics.model).set(rss_bytes())

    def forget(self, key_id: str) -> None:
        """Drop the engine of a deleted key (its OpenFHE keys stay, and count, until the next recycle)."""
        self._engines.pop(key_id, None)
        self._installed.pop(key_id, None)
        self._weights_loaded.pop(key_id, None)

    # ----------------------------------------------------------------- runs (engine thread)
    def run_group(self, key_id: str, assignments: Sequence[tuple[InferItem, int]]) -> list[InferResult]:
        """Pack the requests into their lanes, run the program once, and answer each request."""
        results: list[InferResult | None] = [None] * len(assignments)
        try:
            engine = self.engine_for(key_id)
        except HTTPError as exc:
            return [InferResult(error=exc) for _ in assignments]
        except SandboxUnavailableError as exc:
            err = validator_unavailable(str(exc))
            return [InferResult(error=err) for _ in assignments]
        except EnvelopeError as exc:
            err = HTTPError(500, "key_store_error", f"the stored bundle or weights for {key_id} are unusable: {exc}")
            return [InferResult(error=err) for _ in assignments]
        ready = []
        for i, (item, lane) in enumerate(assignments):
            try:  # the sandbox validated these blobs (Runtime.prepare_infer)
                cts = [engine.deserialize(blob) for blob in item.envelope.ciphertexts]
            except EnvelopeError as exc:
                results[i] = InferResult(error=from_envelope_error(exc))
                continue
            except Exception as exc:  # an OpenFHE failure (MemoryError, ...) fails this request alone
                logger.exception("deserializing a validated ciphertext failed")
                err = HTTPError(500, "engine_error", f"the ciphertext could not be loaded: {exc}")
                results[i] = InferResult(error=err)
                continue
            ready.append((i, item, lane, cts))
        if not ready:
            return results  # type: ignore[return-value]
        run_id = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        try:
            if len(ready) == 1 and ready[0][2] == 0:
                merged = ready[0][3]
            else:
                merged = engine.pack_lanes([(lane, cts) for _, _, lane, cts in ready])
            listeners = [item.progress for _, item, _, _ in ready if item.progress is not None]
            outs = engine.run_ciphertexts(merged, _fan_out(listeners) if listeners else None)
            blobs = [openfhe.Serialize(ct, openfhe.BINARY) for ct in outs]
        except Exception as exc:  # an OpenFHE failure must not take the worker down
            logger.exception("engine run %s failed", run_id)
            err = HTTPError(500, "engine_error", f"the encrypted program failed: {exc}")
            for i, *_ in ready:
                results[i] = InferResult(error=err)
            return results  # type: ignore[return-value]
        engine_ms = (time.perf_counter() - t0) * 1000.0
        self.runs += 1
        model = self.compiled
        lanes_used = sum(item.lanes for _, item, _, _ in ready)
        for i, item, lane, _ in ready:
            env = item.envelope
            out = EncryptedTensor(
                model_fingerprint=model.fingerprint,
                params_fingerprint=self.params.fingerprint,
                key_id=key_id,
                shape=((env.lanes_used, *model.output_shape) if env.batched else tuple(model.output_shape)),
                lanes_used=env.lanes_used,
                level=model.depth,
                ciphertexts=blobs,
                batched=env.batched,
                lane=lane,
                extra={"engine_run": run_id, "run_requests": len(ready), "run_lanes": lanes_used},
            )
            results[i] = InferResult(body=out.to_bytes(), lane=lane, run_id=run_id, requests_in_run=len(ready),
                                     lanes_in_run=lanes_used, engine_ms=engine_ms)
        return results  # type: ignore[return-value]


def _fan_out(listeners: list[Callable[[int, int], None]]) -> Callable[[int, int], None]:
    """One progress callback for a run that serves several tasks."""
    if len(listeners) == 1:
        return listeners[0]

    def progress(done: int, total: int) -> None:
        for listener in listeners:
            listener(done, total)

    return progress


@dataclass
class _Pending:
    item: InferItem
    future: asyncio.Future
    enqueued: float


@dataclass
class _Group:
    key: tuple[str, str, str]
    pending: deque = field(default_factory=deque)
    last_arrival: float = 0.0

    @property
    def lanes_pending(self) -> int:
        return sum(p.item.lanes for p in self.pending if not p.future.done())


class LanePacker:
    """Groups requests by (model, tenant, key_id) and schedules one engine run per group of <= 8 lanes."""

    def __init__(self, runner: EngineRunner, wait_s: float = 0.02, max_wait_s: float = 0.2,
                 metrics: Metrics | None = None) -> None:
        self.runner = runner
        self.lanes = runner.params.lanes if runner.can_pack else 1
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        self.metrics = metrics or runner.metrics
        self._groups: dict[tuple[str, str, str], _Group] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._busy = False
        self._closed = False

    @property
    def pending(self) -> int:
        return sum(len(g.pending) for g in self._groups.values())

    def submit(self, items: Sequence[InferItem]) -> list[asyncio.Future]:
        """Queue requests (call from the event loop); each future resolves to an InferResult."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._scheduler(), name="h33-lane-packer")
        now = time.monotonic()
        futures = []
        for item in items:
            fut = loop.create_future()
            futures.append(fut)
            if item.lanes > self.runner.params.lanes:
                fut.set_result(InferResult(error=HTTPError(422, "invalid_envelope", "too many lanes")))
                continue
            group = self._groups.get(item.group)
            if group is None:
                group = self._groups[item.group] = _Group(item.group)
            group.pending.append(_Pending(item, fut, now))
            group.last_arrival = now
        assert self._wake is not None
        self._wake.set()
        return futures

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for group in self._groups.values():
            for p in group.pending:
                if not p.future.done():
                    p.future.set_result(InferResult(error=HTTPError(503, "shutting_down", "the server is stopping")))
        self._groups.clear()

    # ----------------------------------------------------------------- scheduling
    async def _scheduler(self) -> None:
        assert self._wake is not None
        while not self._closed:
            self._wake.clear()
            timeout = self._schedule(time.monotonic())
            try:
                if timeout is None:
                    await self._wake.wait()
                else:
                    await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _schedule(self, now: float) -> float | None:
        """Start a run if the engine is free and a group is ready; else the seconds until one is."""
        if self._busy:
            return None
        best: _Group | None = None
        next_ready: float | None = None
        for key in list(self._groups):
            group = self._groups[key]
            while group.pending and group.pending[0].future.done():  # cancelled by a disconnect
                group.pending.popleft()
            if not group.pending:
                del self._groups[key]
                continue
            oldest = group.pending[0].enqueued
            ready_at = min(group.last_arrival + self.wait_s, oldest + self.max_wait_s)
            if group.lanes_pending >= self.lanes or now >= ready_at:
                if best is None or oldest < best.pending[0].enqueued:
                    best = group
            else:
                next_ready = ready_at if next_ready is None else min(next_ready, ready_at)
        if best is None:
            return None if next_ready is None else max(0.0, next_ready - now)
        assignments = self._take(best)
        if not assignments:
            return 0.0
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(best.key, assignments))
        return None

    def _take(self, group: _Group) -> list[tuple[_Pending, int]]:
        """First fit, in arrival order, of contiguous lane ranges into one ciphertext."""
        taken: list[tuple[_Pending, int]] = []
        skipped: deque = deque()
        used = 0
        while group.pending and used < self.lanes:
            p = group.pending.popleft()
            if p.future.done():
                continue
            k = p.item.lanes
            if self.lanes == 1 or k >= self.runner.params.lanes:
                if used == 0:  # a full request, or packing disabled: runs alone
                    taken.append((p, 0))
                    used = self.lanes
                else:
                    skipped.append(p)
                break
            if used + k <= self.lanes:
                taken.append((p, used))
                used += k
            else:
                skipped.append(p)
        group.pending.extendleft(reversed(skipped))
        return taken

    async def _run(self, key: tuple[str, str, str], assignments: list[tuple[_Pending, int]]) -> None:
        _, _, key_id = key
        start = time.monotonic()
        try:
            results = await self.runner.call(self.runner.run_group, key_id,
                                             [(p.item, lane) for p, lane in assignments])
        except Exception as exc:  # pragma: no cover - run_group catches engine failures itself
            logger.exception("lane packer run failed")
            results = [InferResult(error=HTTPError(500, "engine_error", str(exc))) for _ in assignments]
        finally:
            self._busy = False
            if self._wake is not None:
                self._wake.set()
        done = [r for r in results if r.error is None]
        if done:
            self.metrics.observe_run(done[0].requests_in_run, done[0].lanes_in_run, self.runner.params.lanes,
                                     done[0].engine_ms / 1000.0)
        for (p, _), res in zip(assignments, results):
            res.queue_ms = (start - p.enqueued) * 1000.0
            self.metrics.queue_seconds.labels(self.metrics.model).observe(start - p.enqueued)
            if not p.future.done():
                p.future.set_result(res)
