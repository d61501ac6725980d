"""The server-side engine: runs a CompiledModel on ciphertexts with evaluation keys only.

It never sees a secret key.  Plaintext diagonals are lane-expanded, encoded at the level where
they are consumed and cached up to a memory budget; the first run encodes, later runs reuse.
In encrypted-weight mode (a weightless model and its ``EncryptedWeights``) it never sees a
weight either: the diagonals and biases are ciphertexts under the client's key.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, ClassVar, Sequence

import numpy as np
import openfhe

from ..ckks.context import bootstrap_context
from ..ckks.keys import EvaluationKeys, load_ciphertext
from ..ckks.sandbox import Sandbox
from ..ckks.serialization import EncryptedTensor
from ..errors import EnvelopeError, TamperedDataError, WeightsNotProvisionedError
from ..program.cost_model import DEFAULT_CACHE_BYTES
from ..program.model import CompiledModel, Step
from ..program.ops import Op
from ..program.polynomials import to_openfhe_coeffs
from .weights import EncryptedWeights, WeightsFile, diagonal, encode


class PlaintextCache:
    """Encoded plaintexts of one model keyed by (step, term, level, scale degree), bounded in bytes.

    Every run replays the same sequence of diagonals, so once the budget is full new ones are
    encoded on the fly and not kept: an LRU would evict each entry just before its next use
    and hit nothing at all whenever a program's plaintexts exceed the budget, while a cache
    that keeps what it holds serves that share of every run.  Plaintexts do not depend on the
    evaluation keys, so the engines of one model (one per client key) can share one cache.
    """

    def __init__(self, compiled: CompiledModel, budget_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.model_fingerprint = compiled.fingerprint
        self.budget = budget_bytes
        self.params = compiled.params
        self.used = 0
        self._items: dict[tuple, openfhe.Plaintext] = {}
        self._lock = threading.Lock()  # engines sharing the cache may run on different threads
        self.hits = self.misses = 0

    def get(self, key: tuple, level: int, make) -> openfhe.Plaintext:
        pt = self._items.get(key)
        if pt is not None:
            self.hits += 1
            return pt
        self.misses += 1
        pt = make()
        size = self.params.plaintext_bytes(level)
        with self._lock:
            if key not in self._items and self.used + size <= self.budget:
                self._items[key] = pt
                self.used += size
        return pt


class Engine:
    """Runs one compiled model for the holder of one evaluation-key bundle."""

    def __init__(self, compiled: CompiledModel, evaluation_keys: EvaluationKeys | bytes,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, *, cache: PlaintextCache | None = None,
                 keep_serialized_keys: bool = True, sandbox: Sandbox | None = None,
                 weights: EncryptedWeights | WeightsFile | bytes | None = None) -> None:
        """Install ``evaluation_keys`` into OpenFHE and prepare to run ``compiled``.

        ``cache``: a :class:`PlaintextCache` of this model to share with other engines; without
        one the engine encodes into its own cache of ``cache_bytes``.  ``keep_serialized_keys=False``
        drops the serialized relinearization and rotation keys once OpenFHE holds them (about the
        bundle's size, hundreds of MB); ``self.keys`` then keeps the public key and key tag, which
        is all the engine reads later, and can build another engine while the keys stay installed.

        ``sandbox``: for a process that serves other requests.  :meth:`run` then has every
        envelope's ciphertexts validated in the sandbox's child processes before OpenFHE
        deserializes them here, so a malicious ciphertext cannot crash this process.  The keys
        must be validated already (``KeyStore.load(..., sandbox=...)``, ``Sandbox.load_bundle``).
        Without one (a client's own local engine), ciphertexts are deserialized directly.

        ``weights``: what a weightless model (``CompiledModel.without_weights``) runs with, provisioned
        for this key (``runtime.weights.provision_weights``).  Their ciphertexts are deserialized here,
        one at a time (a ``WeightsFile`` is read from its file as they are); in a server, they must
        be validated already, like the keys (``runtime.weights.load_weights``).
        """
        if not compiled.runnable:
            raise ValueError("this compiled model is an estimate only (its depth needs bootstrapping); it cannot run")
        if cache is not None and cache.model_fingerprint != compiled.fingerprint:
            raise ValueError(f"the plaintext cache belongs to model {cache.model_fingerprint}, "
                             f"not {compiled.fingerprint}")
        if sandbox is not None and sandbox.params.fingerprint != compiled.params.fingerprint:
            raise ValueError("the sandbox validates for other CKKS parameters than this model's")
        if isinstance(evaluation_keys, (bytes, bytearray, memoryview)):
            evaluation_keys = EvaluationKeys.from_bytes(bytes(evaluation_keys), compiled.params)
        self.model = compiled
        self.params = compiled.params
        self.keys = evaluation_keys
        self.key_id = evaluation_keys.key_id
        self.sandbox = sandbox
        self.cc = evaluation_keys.install(compiled.params)
        if compiled.params.bootstrapping is not None:
            bootstrap_context(compiled.params, precompute=True)
        if not keep_serialized_keys:
            self.keys = dataclasses.replace(evaluation_keys, mult_key=b"", rotation_keys=(), source=None)
        self._m = self.cc.GetCyclotomicOrder()
        self._manual = self.params.scaling_technique == "FIXEDMANUAL"
        self._zero: openfhe.Ciphertext | None = None
        self._lock = threading.Lock()
        self.cache = cache if cache is not None else PlaintextCache(compiled, cache_bytes)
        self.last_timings: dict[str, float] = {}
        self._weights = self._load_weights(weights)

    def _load_weights(self, weights: EncryptedWeights | WeightsFile | bytes | None) -> dict[str, tuple[list, list]]:
        """Step name -> (diagonal, bias) ciphertexts; refuses weights of another model or key."""
        if self.model.weight_mode == "plaintext":
            if weights is not None:
                raise ValueError("this model holds its weights in the clear; encrypted weights run with its "
                                 "weightless artifact (CompiledModel.without_weights)")
            return {}
        if weights is None:
            raise WeightsNotProvisionedError(f"model {self.model.fingerprint} runs with encrypted weights, and none "
                                             f"were provisioned for key {self.key_id}")
        if isinstance(weights, (bytes, bytearray, memoryview)):
            weights = EncryptedWeights.from_bytes(bytes(weights))
        weights.check(self.model, self.key_id)
        levels = {s.name: s.level for s in self.model.steps}
        loaded: dict[str, tuple[list, list]] = {name: ([], []) for name in levels}
        for name, level, blob in weights.ciphertexts():  # a bias sits one level below its step's diagonals
            loaded[name][level != levels[name]].append(self._ciphertext(blob, level))
        return {name: cts for name, cts in loaded.items() if cts != ([], [])}

    # ----------------------------------------------------------------- envelopes
    def run(self, envelope: EncryptedTensor | bytes) -> EncryptedTensor:
        """Validate an input envelope, run the program, and return the output envelope."""
        enc = EncryptedTensor.from_bytes(envelope) if isinstance(envelope, (bytes, bytearray)) else envelope
        enc.check(self.model.fingerprint, self.params.fingerprint, {self.key_id})
        if tuple(enc.shape) not in (tuple(self.model.input_shape),
                                    (enc.lanes_used, *self.model.input_shape)):
            raise EnvelopeError(f"envelope holds shape {tuple(enc.shape)}, the model takes {self.model.input_shape}")
        if len(enc.ciphertexts) != self.model.input_blocks:
            raise EnvelopeError(f"envelope holds {len(enc.ciphertexts)} ciphertexts, the model takes "
                                f"{self.model.input_blocks}")
        blobs = enc.ciphertexts
        if self.sandbox is not None:
            blobs = self.sandbox.canonical_ciphertexts(blobs, self.keys.key_tag)
        out = self.run_ciphertexts([self.deserialize(blob) for blob in blobs])
        return EncryptedTensor(
            model_fingerprint=self.model.fingerprint,
            params_fingerprint=self.params.fingerprint,
            key_id=self.key_id,
            shape=((enc.lanes_used, *self.model.output_shape) if enc.batched else self.model.output_shape),
            lanes_used=enc.lanes_used,
            level=self.model.depth,
            ciphertexts=[openfhe.Serialize(ct, openfhe.BINARY) for ct in out],
            batched=enc.batched,
            lane=enc.lane,
        )

    def deserialize(self, blob: bytes) -> openfhe.Ciphertext:
        """A ciphertext blob -> Ciphertext, checked against this key and ring.

        OpenFHE deserializes the blob in this process: in a server, pass only blobs a
        :class:`Sandbox` has validated (``canonical_ciphertexts``), since a malformed one can crash it.
        """
        return self._ciphertext(blob, 0)

    def _ciphertext(self, blob: bytes, level: int) -> openfhe.Ciphertext:
        """``deserialize`` for a ciphertext expected at ``level`` (an input at 0, a weight at its step's)."""
        ct = load_ciphertext(blob, self.keys.key_tag)
        if (ct.GetCryptoContext().GetRingDimension() != self.params.ring_dim or ct.GetLevel() != level
                or ct.GetNoiseScaleDeg() != 1):
            raise TamperedDataError(f"ciphertext does not match the model's ring dimension, level {level} "
                                    f"and scale degree 1")
        # Arithmetic on a freshly deserialized ciphertext runs ~6x slower in OpenFHE 1.6 (its ring
        # elements do not share the context's precomputed parameters); results take the first
        # operand's, so adding the input to a context-made encryption of zero fixes every later op.
        if self._zero is None:
            public = openfhe.DeserializePublicKeyString(self.keys.public_key, openfhe.BINARY)
            self._zero = self.cc.Encrypt(public, self.cc.MakeCKKSPackedPlaintext(np.zeros(self.params.slots)))
        zero = self._zero if level == 0 else self.cc.LevelReduce(self._zero, None, level)
        return self.cc.EvalAdd(zero, ct)

    # ----------------------------------------------------------------- program
    def run_ciphertexts(self, inputs: Sequence[openfhe.Ciphertext],
                        progress: Callable[[int, int], None] | None = None) -> list[openfhe.Ciphertext]:
        """Execute every step; returns the output blocks.

        ``progress(done, total)`` is called with 0 before the first step and after each step (on
        this thread, so it must be quick): how a long run reports how far it got.
        """
        with self._lock:
            values: dict[str, list[openfhe.Ciphertext]] = {self.model.input_name: list(inputs)}
            timings: dict[str, float] = {}
            total = len(self.model.steps)
            if progress is not None:
                progress(0, total)
            for done, step in enumerate(self.model.steps, 1):
                t0 = time.perf_counter()
                values[step.name] = self.EVALUATORS[step.op](self, step, [values[i] for i in step.inputs])
                timings[step.name] = (time.perf_counter() - t0) * 1000.0
                if progress is not None:
                    progress(done, total)
            self.last_timings = timings
            return values[self.model.output]

    def _poly(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        coeffs = to_openfhe_coeffs(step.attrs["coeffs"])
        return [self.cc.EvalChebyshevSeries(ct, coeffs, step.attrs["lower"], step.attrs["upper"]) for ct in args[0]]

    def _square(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        return [self._rescale(self.cc.EvalSquare(ct)) for ct in args[0]]

    def _sum(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        return [self.cc.EvalAdd(*self._same_level(a, b)) for a, b in zip(*args)]

    def _product(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        return [self._rescale(self.cc.EvalMult(*self._same_level(a, b))) for a, b in zip(*args)]

    def _bootstrap(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        """Refresh every block.  A sparse bootstrap reads the ciphertext as ``slots`` periodic slots
        (OpenFHE averages the periods; the compiler scaled a zero-padded input to match)."""
        slots, full = int(step.attrs["slots"]), self.params.slots
        out = []
        for ct in args[0]:
            if slots != full:
                ct = ct.Clone()
                ct.SetSlots(slots)
            refreshed = self.cc.EvalBootstrap(ct)
            if slots != full:
                refreshed.SetSlots(full)
            out.append(refreshed)
        return out

    def _rescale(self, ct: openfhe.Ciphertext) -> openfhe.Ciphertext:
        """Rescale a ciphertext pending one (scale degree 2), exactly once.

        Left pending, as FLEXIBLEAUTO would, every later product with a rotated copy would
        rescale its own copy again.  FLEXIBLEAUTO ignores ``Rescale``; compressing to one tower
        fewer is the same operation there.
        """
        if ct.GetNoiseScaleDeg() < 2:
            return ct
        if self._manual:
            self.cc.RescaleInPlace(ct)
            return ct
        return self.cc.Compress(ct, self.params.multiplicative_depth - ct.GetLevel())

    def _same_level(self, a: openfhe.Ciphertext, b: openfhe.Ciphertext) -> tuple[openfhe.Ciphertext, openfhe.Ciphertext]:
        """Operands of a residual add or product must sit at one level under manual scaling."""
        if self._manual and a.GetLevel() != b.GetLevel():
            if a.GetLevel() < b.GetLevel():
                a = self.cc.LevelReduce(a, None, b.GetLevel() - a.GetLevel())
            else:
                b = self.cc.LevelReduce(b, None, a.GetLevel() - b.GetLevel())
        return a, b

    def _diagonal(self, step: Step, index: int, giant: int, level: int) -> openfhe.Plaintext:
        return self.cache.get((step.name, index, level, 1), level,
                              lambda: encode(self.cc, self.params, diagonal(step.linear, index, giant), level))

    def _linear(self, step: Step, args: list[list[openfhe.Ciphertext]]) -> list[openfhe.Ciphertext]:
        """The BSGS transform of ``step.linear``: hoisted baby steps shared by every output block,
        products with the diagonals, giant steps and folds summed in the extended basis.

        With encrypted weights (``encrypted_linear``) the products are ciphertext x ciphertext, left
        unrelinearized and summed as three-element ciphertexts; each partial sum is relinearized
        once before it is rotated (one per output block and giant step, not one per product), and the
        block is rescaled once, as in plaintext mode: the same levels, the bias a ciphertext add.
        """
        xs = [self._rescale(x) for x in args[0]]
        encrypted = step.op is Op.ENCRYPTED_LINEAR
        diagonals, biases = self._weights.get(step.name, ([], []))
        cc, plan, lanes, n = self.cc, step.linear, self.params.lanes, self.params.lane_length
        babies, giants = plan.schedule()
        babies_needed: dict[int, set[int]] = {}
        for ib, b in zip(plan.terms[:, 1].tolist(), babies.tolist()):
            babies_needed.setdefault(ib, set()).add(b)
        rotated: dict[tuple[int, int], openfhe.Ciphertext] = {}
        for ib, needed in babies_needed.items():
            x = xs[ib]
            nonzero = sorted(needed - {0})
            if nonzero:
                digits = cc.EvalFastRotationPrecompute(x)
                for b in nonzero:
                    rotated[ib, b] = cc.EvalFastRotation(x, b * lanes, self._m, digits)
            rotated[ib, 0] = x
        level = xs[0].GetLevel()
        outs = []
        for ob in range(plan.out_blocks):
            acc: dict[int, openfhe.Ciphertext] = {}
            for t in np.flatnonzero(plan.terms[:, 0] == ob).tolist():
                ib, b, g = int(plan.terms[t, 1]), int(babies[t]), int(giants[t]) % n
                if encrypted:
                    prod = cc.EvalMultNoRelin(rotated[ib, b], diagonals[t])
                else:
                    prod = cc.EvalMult(rotated[ib, b], self._diagonal(step, t, g, level))
                if g in acc:
                    cc.EvalAddInPlace(acc[g], prod)
                else:
                    acc[g] = prod
            if encrypted:
                for part in acc.values():
                    cc.RelinearizeInPlace(part)
            out = acc.pop(0, None)
            out = self._add(out, self._rotate_sum([(part, g) for g, part in acc.items()]))
            for chunk in plan.fold_chunks():
                out = self._add(out, self._rotate_sum([(out, r) for r in chunk]))
            out = self._rescale(out)
            if encrypted:
                out = cc.EvalAdd(out, biases[ob])
            elif np.any(plan.bias[ob]):
                lvl, deg = out.GetLevel(), out.GetNoiseScaleDeg()
                bias = self.cache.get((step.name, "bias", ob, lvl, deg), lvl,
                                      lambda: encode(cc, self.params, plan.bias[ob], lvl, deg))
                out = cc.EvalAdd(out, bias)
            outs.append(out)
        return outs

    def _add(self, a: openfhe.Ciphertext | None, b: openfhe.Ciphertext | None) -> openfhe.Ciphertext | None:
        if a is None or b is None:
            return b if a is None else a
        return self.cc.EvalAdd(a, b)

    def _rotate_sum(self, terms: list[tuple[openfhe.Ciphertext, int]]) -> openfhe.Ciphertext | None:
        """sum of rot(ct, r) over ``terms`` (per-lane amounts), with a single ModDown for two or more.

        Each rotation is computed with ``EvalFastRotationExt`` (digits of its own ciphertext, or
        shared when every term rotates the same one) and left in the extended basis P*Q; the sum
        is brought back to Q by one ``KeySwitchDown``.
        """
        cc, lanes = self.cc, self.params.lanes
        if not terms:
            return None
        if len(terms) == 1:
            ct, r = terms[0]
            return cc.EvalRotate(ct, r * lanes)
        total = None
        digits = None
        for i, (ct, r) in enumerate(terms):
            if digits is None or ct is not terms[i - 1][0]:
                digits = cc.EvalFastRotationPrecompute(ct)
            rotated = cc.EvalFastRotationExt(ct, r * lanes, digits, True)
            if total is None:
                total = rotated
            else:
                cc.EvalAddInPlace(total, rotated)
        return cc.KeySwitchDown(total)

    #: The CKKS evaluation of each op kind a program holds: the engine's entry in the op registry
    #: (``program.ops``); ``tests/test_architecture.py`` checks that it covers every program op.
    EVALUATORS: ClassVar[dict[Op, Callable[..., list[openfhe.Ciphertext]]]] = {
        Op.LINEAR: _linear, Op.ENCRYPTED_LINEAR: _linear, Op.POLY: _poly, Op.SQUARE: _square, Op.ADD: _sum, Op.MUL: _product,
        Op.BOOTSTRAP: _bootstrap,
    }

    # ----------------------------------------------------------------- lane packing
    def pack_lanes(self, requests: Sequence[tuple[int, list[openfhe.Ciphertext]]]) -> list[openfhe.Ciphertext]:
        """Merge single-input ciphertexts (each in lane 0) into one, request i moved to its lane.

        The lanes are merged half by half (``_shifted_sum``): requests in the upper half are summed
        first, then moved by half the lanes at once.  Every move is by a power of two, so the bundle
        carries log2(lanes) lane-shift keys instead of lanes - 1, and k requests in lanes 0..k-1 take
        k - 1 rotations, as many as moving each one by its own key would.
        """
        by_lane: dict[int, list[openfhe.Ciphertext]] = {}
        for lane, blocks in requests:
            if not 0 <= lane < self.params.lanes:
                raise ValueError(f"lane {lane} outside 0..{self.params.lanes - 1}")
            by_lane[lane] = [self.cc.EvalAdd(a, b) for a, b in zip(by_lane[lane], blocks)] if lane in by_lane \
                else blocks
        if not by_lane:
            raise ValueError("no requests to pack")
        return self._shifted_sum(by_lane, self.params.lanes)

    def _shifted_sum(self, by_lane: dict[int, list[openfhe.Ciphertext]], width: int) -> list[openfhe.Ciphertext]:
        """The sum of every ``by_lane[l]`` moved right by l lanes (all l < ``width``, a power of two)."""
        if width == 1:
            return by_lane[0]
        half = width // 2
        low = {lane: blocks for lane, blocks in by_lane.items() if lane < half}
        high = {lane - half: blocks for lane, blocks in by_lane.items() if lane >= half}
        out = self._shifted_sum(low, half) if low else None
        if high:
            moved = [self.cc.EvalRotate(ct, self.params.slots - half) for ct in self._shifted_sum(high, half)]
            out = moved if out is None else [self.cc.EvalAdd(a, b) for a, b in zip(out, moved)]
        return out
