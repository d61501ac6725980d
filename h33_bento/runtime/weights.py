"""Encrypted-weight mode: a model's diagonals and biases as ciphertexts under one client's key.

The model owner keeps the full ``CompiledModel``; the server runs its weightless artifact
(``CompiledModel.without_weights``) with the ``EncryptedWeights`` that ``provision_weights`` made
for that client's public key.  Every diagonal is encoded exactly as plaintext mode encodes it
(``encode``, ``diagonal``: lane-expanded, rolled by its giant step, at the level of the step) and
then encrypted, so the engine's ciphertext x ciphertext products sit at the same level and scale
as its ciphertext x plaintext products.  Each ciphertext is written in the canonical encoding a
server's sandbox checks uploads against (``ckks.canonical.CiphertextChecker``; the public key is
usually deserialized, which changes the encoding but not the ciphertext), and a server takes
weights only through ``load_weights``, from a file it reads as a stream (``WeightsFile``).
Biases are encrypted one level down, where they are added after the rescale, for every output
block (a zero bias is not told apart from another one).

The frame (``ckks.serialization``, magic ``H33W``) names the weightless model's fingerprint, the
CKKS parameters and the key id, so weights for another model or key are refused before any blob
reaches OpenFHE; its digest catches truncated or edited bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import openfhe

from ..ckks.keys import EvaluationKeys, KeyChain, key_id_for
from ..ckks.params import CKKSParams
from ..ckks.canonical import CiphertextChecker
from ..ckks.sandbox import Sandbox
from ..ckks.serialization import WEIGHTS_MAGIC, FrameFile, FrameWriter, pack_frame, unpack_frame
from ..errors import KeyMismatchError, ModelMismatchError, ParamsMismatchError, TamperedDataError
from ..program.diagonals import DiagonalPlan
from ..program.model import CompiledModel, Step
from ..program.ops import Op


def encode(cc: openfhe.CryptoContext, params: CKKSParams, values: np.ndarray, level: int,
           scale_degree: int = 1) -> openfhe.Plaintext:
    """One lane vector repeated across the lanes (slot = position * lanes + lane), encoded at ``level``."""
    return cc.MakeCKKSPackedPlaintext(np.repeat(values, params.lanes), scale_degree, level)


def diagonal(plan: DiagonalPlan, index: int, giant: int) -> np.ndarray:
    """Diagonal ``index`` pre-rotated by its giant step, as the BSGS sum multiplies it."""
    return np.roll(plan.diags[index], giant)


@dataclass
class StepWeights:
    """One linear step's ciphertexts: its diagonals (in term order) at ``level``, one bias per output
    block at ``level + 1``."""

    level: int
    diagonals: list[bytes]
    biases: list[bytes]


@dataclass
class EncryptedWeights:
    """The weights of one weightless model encrypted under one client key."""

    model_fingerprint: str  # the weightless artifact's
    params_fingerprint: str
    key_id: str
    steps: dict[str, StepWeights]

    @property
    def size_bytes(self) -> int:
        return sum(len(b) for w in self.steps.values() for b in (*w.diagonals, *w.biases))

    def _header(self) -> dict:
        return {
            "model_fingerprint": self.model_fingerprint,
            "params_fingerprint": self.params_fingerprint,
            "key_id": self.key_id,
            "steps": [{"name": name, "level": w.level, "diagonals": len(w.diagonals), "biases": len(w.biases)}
                      for name, w in self.steps.items()],
        }

    def to_bytes(self) -> bytes:
        return pack_frame(WEIGHTS_MAGIC, self._header(), [blob for _, _, blob in self.ciphertexts()])

    def write(self, path: str | os.PathLike) -> Path:
        """The frame of :meth:`to_bytes` written to ``path`` blob by blob (a model owner's large
        weights are never held twice)."""
        with FrameWriter(path, WEIGHTS_MAGIC) as writer:
            for _, _, blob in self.ciphertexts():
                writer.add(blob)
            return writer.commit(self._header())

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedWeights":
        header, blobs = unpack_frame(data, WEIGHTS_MAGIC, "encrypted weights")
        if sum(s["diagonals"] + s["biases"] for s in header["steps"]) != len(blobs):
            raise TamperedDataError("encrypted weights list other ciphertext counts than they hold")
        steps, at = {}, 0
        for s in header["steps"]:
            diagonals, biases = blobs[at:at + s["diagonals"]], blobs[at + s["diagonals"]:at + s["diagonals"] + s["biases"]]
            at += s["diagonals"] + s["biases"]
            steps[s["name"]] = StepWeights(s["level"], diagonals, biases)
        return cls(header["model_fingerprint"], header["params_fingerprint"], header["key_id"], steps)

    def check(self, model: CompiledModel, key_id: str) -> None:
        """Raise the specific error unless these are the weights of weightless ``model`` under ``key_id``."""
        _check(self.model_fingerprint, self.params_fingerprint, self.key_id,
               {name: (w.level, len(w.diagonals), len(w.biases)) for name, w in self.steps.items()}, model, key_id)

    def ciphertexts(self) -> Iterator[tuple[str, int, bytes]]:
        """(step name, level, blob) of every ciphertext in frame order: each step's diagonals at its
        level, then its biases one level down."""
        for name, w in self.steps.items():
            for blob in w.diagonals:
                yield name, w.level, blob
            for blob in w.biases:
                yield name, w.level + 1, blob


class WeightsFile:
    """Encrypted weights in a file (an upload, a stored copy), never read whole: ``FrameFile``
    checks the frame's length, header and digest as a stream when it is opened, and
    :meth:`ciphertexts` yields one blob at a time (checking the digest again on the way), so a
    server holds at most one batch of a model's weights as bytes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.frame = FrameFile(path, WEIGHTS_MAGIC, "encrypted weights")
        header = self.frame.header
        if sum(s["diagonals"] + s["biases"] for s in header["steps"]) != len(self.frame.lengths):
            raise TamperedDataError("encrypted weights list other ciphertext counts than they hold")
        self.model_fingerprint: str = header["model_fingerprint"]
        self.params_fingerprint: str = header["params_fingerprint"]
        self.key_id: str = header["key_id"]
        self.layout = {s["name"]: (s["level"], s["diagonals"], s["biases"]) for s in header["steps"]}
        if len(self.layout) != len(header["steps"]):
            raise TamperedDataError("encrypted weights name a step twice")
        self.digest = self.frame.digest

    @property
    def count(self) -> int:
        """How many ciphertexts the file holds."""
        return len(self.frame.lengths)

    def check(self, model: CompiledModel, key_id: str) -> None:
        """As :meth:`EncryptedWeights.check`, from the header alone."""
        _check(self.model_fingerprint, self.params_fingerprint, self.key_id, self.layout, model, key_id)

    def ciphertexts(self) -> Iterator[tuple[str, int, bytes]]:
        """As :meth:`EncryptedWeights.ciphertexts`, read from the file one blob at a time."""
        blobs = self.frame.blobs()
        for name, (level, diagonals, biases) in self.layout.items():
            for i in range(diagonals + biases):
                yield name, level + (i >= diagonals), next(blobs)
        for _ in blobs:  # none are left: this ends the iterator, which checks the digest again
            pass


def _check(model_fingerprint: str, params_fingerprint: str, weights_key_id: str,
           layout: dict[str, tuple[int, int, int]], model: CompiledModel, key_id: str) -> None:
    """Raise the specific error unless weights with this header belong to weightless ``model`` under
    ``key_id``; ``layout``: step name -> (level, diagonals, biases)."""
    if params_fingerprint != model.params.fingerprint:
        raise ParamsMismatchError(f"encrypted weights were made for CKKS params {params_fingerprint}, "
                                  f"this model uses {model.params.fingerprint}")
    if model_fingerprint != model.fingerprint:
        raise ModelMismatchError(f"encrypted weights belong to model {model_fingerprint}, "
                                 f"this is model {model.fingerprint}")
    if weights_key_id != key_id:
        raise KeyMismatchError(f"encrypted weights are encrypted under key {weights_key_id}, not {key_id}")
    expected = {s.name: (s.level, len(s.linear.terms), s.linear.out_blocks)
                for s in model.steps if s.op is Op.ENCRYPTED_LINEAR}
    if layout != expected:
        raise TamperedDataError("encrypted weights do not hold the steps, levels and ciphertext counts "
                                "of the model they name")


def _encrypt_step(checker: CiphertextChecker, params: CKKSParams, public: openfhe.PublicKey,
                  step: Step) -> StepWeights:
    plan = step.linear
    _, giants = plan.schedule()
    cc = checker.cc

    def encrypt(values: np.ndarray, level: int) -> bytes:  # canonical: what the server's sandbox accepts
        return checker.canonical(cc.Encrypt(public, encode(cc, params, values, level)), level)

    return StepWeights(
        level=step.level,
        diagonals=[encrypt(diagonal(plan, t, int(g) % plan.n), step.level) for t, g in enumerate(giants.tolist())],
        biases=[encrypt(plan.bias[ob], step.level + 1) for ob in range(plan.out_blocks)],
    )


def provision_weights(compiled: CompiledModel, keys: EvaluationKeys | KeyChain) -> EncryptedWeights:
    """The model owner's step: encrypt the full ``compiled`` model's weights under a client's public
    key, for the server running ``compiled.without_weights()``.

    ``keys``: the client's bundle (only its public key is read) or a ``KeyChain`` holding at least
    the public key (``KeyChain.load(directory, only="public")``: what a client hands its model owner).
    """
    if compiled.weight_mode != "plaintext" or not compiled.runnable:
        raise ValueError("provisioning needs the model owner's full, runnable artifact (it holds the weights)")
    checker = CiphertextChecker(compiled.params)  # builds the context, which deserializing the key needs
    if isinstance(keys, KeyChain):
        params_fingerprint, public = keys.params.fingerprint, keys.public_key
    else:
        params_fingerprint = keys.params_fingerprint
        public = openfhe.DeserializePublicKeyString(keys.public_key, openfhe.BINARY)
        if public is None or public.GetKeyTag() != keys.key_tag:
            raise TamperedDataError("the public key does not carry the key tag its bundle names")
    if params_fingerprint != compiled.params.fingerprint:
        raise ParamsMismatchError(f"the key was made for CKKS params {params_fingerprint}, "
                                  f"the model uses {compiled.params.fingerprint}")
    steps = {s.name: _encrypt_step(checker, compiled.params, public, s) for s in compiled.steps if s.op is Op.LINEAR}
    return EncryptedWeights(compiled.without_weights().fingerprint, compiled.params.fingerprint,
                            key_id_for(public.GetKeyTag()), steps)


def predicted_weights_bytes(model: CompiledModel) -> int:
    """The size of a model's encrypted weights, from its plan alone: a ciphertext is two
    polynomials over the towers left at its level (``CKKSParams.plaintext_bytes`` twice), one per
    diagonal at its step's level and one per output block's bias a level down.  A server holds
    about this much per tenant once its engine is built, the upload is this size, and the model
    owner's ``provision_weights`` holds it too."""
    p = model.params
    return sum(2 * (len(s.linear.terms) * p.plaintext_bytes(s.level)
                    + s.linear.out_blocks * p.plaintext_bytes(s.level + 1))
               for s in model.steps if s.op in (Op.LINEAR, Op.ENCRYPTED_LINEAR))


def load_weights(path: str | os.PathLike, model: CompiledModel, key_id: str, key_tag: str,
                 sandbox: Sandbox) -> WeightsFile:
    """An untrusted weights file (an upload, a stored copy) -> the ``WeightsFile`` of weightless
    ``model`` under ``key_id``, safe for ``Engine`` in a serving process: the frame and its header
    are checked here, every ciphertext in ``sandbox``'s children at its level, streamed from the
    file a batch at a time (unless the sandbox passed this very frame before)."""
    weights = WeightsFile(path)
    weights.check(model, key_id)
    sandbox.canonical_weights(weights.digest, ((level, blob) for _, level, blob in weights.ciphertexts()), key_tag)
    return weights
