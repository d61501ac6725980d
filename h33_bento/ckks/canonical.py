"""The canonical encoding of a ciphertext: the one a server's sandbox accepts byte for byte.

The sandbox (``sandbox.py``) refuses any ciphertext whose bytes are not exactly what OpenFHE writes
for a fresh ciphertext of the served parameters, so that no crafted field reaches the worker.  An
honest ciphertext can still be written differently (one made with a deserialized public key), so
the parties that encrypt that way write it through :meth:`CiphertextChecker.canonical` first.
"""
from __future__ import annotations

import numpy as np
import openfhe

from ..errors import KeyMismatchError, TamperedDataError
from .context import get_context
from .params import CKKSParams


class CiphertextChecker:
    """The served context and its trivial encryption of zero: what a sandbox child checks
    ciphertexts with, and what writes them in the encoding it accepts.

    A ciphertext made with a deserialized public key encodes its ring elements apart from the
    context's, so a public-key encryption (a client holding only the public key, a model owner
    provisioning weights) is written in the canonical encoding (:meth:`canonical`) that the
    children compare uploads with.
    """

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.cc = get_context(params)
        throwaway = self.cc.KeyGen()  # only to let the context make a ciphertext; never used otherwise
        x = self.cc.Encrypt(throwaway.publicKey, self.cc.MakeCKKSPackedPlaintext(np.zeros(params.slots)))
        self.zero = self.cc.EvalSub(x, x)  # both elements 0: adding it changes no coefficient
        self._zeros = {0: self.zero}  # level -> zero reduced to it

    def canonical(self, ct: openfhe.Ciphertext, level: int = 0) -> bytes:
        """``Serialize(EvalAdd(zero, ct))`` with ``zero`` at ``level`` under ``ct``'s key tag: every field
        the context's, the coefficients ``ct``'s."""
        if level not in self._zeros:
            self._zeros[level] = self.cc.LevelReduce(self.zero, None, level)
        zero = self._zeros[level].Clone()
        zero.SetKeyTag(ct.GetKeyTag())
        return openfhe.Serialize(self.cc.EvalAdd(zero, ct), openfhe.BINARY)

    def check(self, blob: bytes, key_tag: str, level: int = 0) -> None:
        p = self.params
        try:
            ct = openfhe.DeserializeCiphertextString(blob, openfhe.BINARY)  # the step that may crash
        except Exception as exc:
            raise TamperedDataError(f"ciphertext could not be deserialized: {exc}") from None
        if ct is None:
            raise TamperedDataError("ciphertext could not be deserialized")
        if ct.GetKeyTag() != key_tag:
            raise KeyMismatchError("ciphertext was encrypted under another key")
        if not 0 <= level <= p.multiplicative_depth:
            raise TamperedDataError(f"no ciphertext of this model sits at level {level}")
        if (ct.GetCryptoContext().GetRingDimension() != p.ring_dim or ct.GetLevel() != level
                or ct.GetNoiseScaleDeg() != 1 or ct.GetSlots() != p.slots):
            raise TamperedDataError("ciphertext does not have the ring dimension, level, scale degree and slot "
                                    "count of a fresh input for this model" if level == 0 else
                                    f"weight ciphertext does not have the ring dimension, level {level}, scale "
                                    "degree and slot count its step needs")
        try:
            canonical = self.canonical(ct, level)
        except Exception as exc:  # e.g. the ciphertext belongs to another context
            raise TamperedDataError(f"ciphertext does not belong to the model's parameters: {exc}") from None
        if canonical != blob:
            raise TamperedDataError("ciphertext is not the canonical encoding of a fresh encryption under the model's "
                                    "parameters (trailing bytes, or fields that differ from one)")
