"""The data owner's side: keys, lane packing, encryption, decryption and predictions.

Up to ``lanes`` inputs share one ciphertext (slot = position * lanes + lane), so eight images
cost one encrypted pass.  Softmax is applied here, after decryption: the server only ever
computes logits on ciphertexts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .ckks.keys import KeyChain
from .ckks.serialization import EncryptedTensor
from .compiler.program import CompiledModel
from .errors import EnvelopeError
from .runtime.simulate import pack


@dataclass
class Prediction:
    """Decrypted output for one input: logits, client-side softmax and labels."""

    logits: np.ndarray
    labels: list[str]

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max()
        e = np.exp(z)
        return e / e.sum()

    @property
    def index(self) -> int:
        return int(np.argmax(self.logits))

    @property
    def label(self) -> str:
        return self.labels[self.index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.index])

    def top_k(self, k: int = 3) -> list[tuple[str, float]]:
        probs = self.probabilities
        order = np.argsort(-probs)[:k]
        return [(self.labels[i], float(probs[i])) for i in order]


class FHEInferenceClient:
    """Encrypt locally, infer on a server (or a local engine), decrypt locally.

    ``model`` is a CompiledModel or the directory it was saved to.  Without ``url`` inference runs
    in a local Engine that gets only the evaluation keys.  ``weight_mode`` is "plaintext": the
    server holds the weights in the clear and only the data is encrypted.
    """

    def __init__(self, model: CompiledModel | str | os.PathLike, url: str | None = None,
                 api_key: str | None = None, weight_mode: str = "plaintext",
                 keys: KeyChain | str | os.PathLike | None = None) -> None:
        if weight_mode != "plaintext":
            raise ValueError(f"weight_mode {weight_mode!r} is not supported; only 'plaintext' weights are")
        self.model = model if isinstance(model, CompiledModel) else CompiledModel.load(model)
        if url is not None:
            raise NotImplementedError("remote inference arrives with the BentoML service")
        self.url, self.api_key, self.weight_mode = url, api_key, weight_mode
        if isinstance(keys, (str, os.PathLike)):
            keys = KeyChain.load(keys)
        self.keys = keys if keys is not None else KeyChain.generate(self.model.params)
        if self.keys.params.fingerprint != self.model.params.fingerprint:
            raise EnvelopeError("the key chain was generated for other CKKS parameters than this model's")
        self._engine = None

    @property
    def lanes(self) -> int:
        return self.model.lanes

    def save_keys(self, directory: str | os.PathLike) -> Path:
        return self.keys.save(directory)

    def encrypt(self, x: np.ndarray) -> EncryptedTensor:
        """Encrypt one input (shape = input_shape) or up to ``lanes`` inputs (k, *input_shape)."""
        x = np.asarray(x, dtype=np.float64)
        shape = tuple(self.model.input_shape)
        batched = x.shape != shape
        if batched and x.shape[1:] != shape:
            raise ValueError(f"expected an input of shape {shape} or a batch (k, *{shape}), got {x.shape}")
        batch = x.reshape(-1, *shape)
        if not 1 <= len(batch) <= self.lanes:
            raise ValueError(f"one ciphertext holds 1 to {self.lanes} inputs, got {len(batch)}")
        vec = pack(self.model, batch)  # (k, blocks, n)
        slots = np.zeros((self.model.input_blocks, self.model.lane_length, self.lanes))
        slots[:, :, : len(batch)] = vec.transpose(1, 2, 0)
        blobs = [self.keys.encrypt_slots(block.reshape(-1)) for block in slots]
        return EncryptedTensor(
            model_fingerprint=self.model.fingerprint,
            params_fingerprint=self.model.params.fingerprint,
            key_id=self.keys.key_id,
            shape=((len(batch), *shape) if batched else shape),
            lanes_used=len(batch),
            level=0,
            ciphertexts=blobs,
            batched=batched,
        )

    def infer(self, enc: EncryptedTensor) -> EncryptedTensor:
        """Run the encrypted program (locally, with evaluation keys only)."""
        if self._engine is None:
            from .runtime.engine import Engine

            self._engine = Engine(self.model, self.keys.evaluation_keys())
        return self._engine.run(enc)

    def decrypt_logits(self, enc: EncryptedTensor | bytes) -> np.ndarray:
        """Logits for every input in the envelope, shape (lanes_used, num_outputs)."""
        if isinstance(enc, (bytes, bytearray)):
            enc = EncryptedTensor.from_bytes(enc)
        enc.check(self.model.fingerprint, self.model.params.fingerprint, {self.keys.key_id})
        n, lanes = self.model.lane_length, self.lanes
        vec = np.stack([self.keys.decrypt_slots(b).reshape(n, lanes) for b in enc.ciphertexts])  # (blocks, n, L)
        blocks, offsets = np.divmod(self.model.output_positions, n)
        values = vec[blocks, offsets, :].T  # (L, outputs)
        first = enc.lane
        return values[first:first + enc.lanes_used]

    def decrypt(self, enc: EncryptedTensor | bytes) -> Prediction | list[Prediction]:
        """A Prediction for a single input, or a list for a batch envelope."""
        if isinstance(enc, (bytes, bytearray)):
            enc = EncryptedTensor.from_bytes(enc)
        labels = self.model.class_labels()
        preds = [Prediction(row, labels) for row in self.decrypt_logits(enc)]
        return preds if enc.batched else preds[0]

    def predict(self, x: np.ndarray) -> Prediction | list[Prediction]:
        """encrypt -> infer -> decrypt in one call."""
        return self.decrypt(self.infer(self.encrypt(x)))

    def infer_batch(self, inputs: Sequence[np.ndarray] | np.ndarray) -> list[Prediction]:
        """Predictions for any number of inputs, ``lanes`` per encrypted pass."""
        batch = np.asarray(inputs, dtype=np.float64).reshape(-1, *self.model.input_shape)
        preds: list[Prediction] = []
        for start in range(0, len(batch), self.lanes):
            preds.extend(self.decrypt(self.infer(self.encrypt(batch[start:start + self.lanes]))))
        return preds
