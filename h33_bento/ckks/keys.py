"""Client key chain and the server-side evaluation-key bundle.

The split is the security boundary: ``KeyChain`` holds the secret key and lives only in the
client process; ``EvaluationKeys`` carries the public, relinearization and rotation keys and is
all a server ever receives.  Nothing in this module writes the secret key anywhere except the
client's own ``KeyChain.save`` directory.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openfhe

from ..errors import EnvelopeError, KeyMismatchError, ParamsMismatchError, TamperedDataError
from .context import get_context
from .params import CKKSParams, SecurityLevel, check_security
from .serialization import KEYS_MAGIC, pack_frame, unpack_frame

SECRET_KEY_FILE = "secret.key"
EVAL_KEYS_FILE = "evaluation_keys.h33k"
PARAMS_FILE = "params.json"


def load_ciphertext(blob: bytes, key_tag: str) -> openfhe.Ciphertext:
    """Deserialize an untrusted ciphertext blob and check it was made under ``key_tag``."""
    try:
        ct = openfhe.DeserializeCiphertextString(blob, openfhe.BINARY)
    except (RuntimeError, ValueError, MemoryError) as exc:  # OpenFHE's errors on malformed bytes
        raise TamperedDataError(f"ciphertext could not be deserialized: {exc}") from exc
    if ct is None:
        raise TamperedDataError("ciphertext could not be deserialized")
    if ct.GetKeyTag() != key_tag:
        raise KeyMismatchError("ciphertext was encrypted under another key")
    return ct


def key_id_for(key_tag: str) -> str:
    """A key's public identity, derived from OpenFHE's key tag (which every ciphertext carries).

    The serialized public key is not byte-stable across a save/load, so it cannot be the id.
    """
    return hashlib.sha256(f"h33-key:{key_tag}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class EvaluationKeys:
    """Public key + relinearization key + exactly the rotation keys the program uses."""

    params_fingerprint: str
    key_id: str
    key_tag: str
    rotation_indices: tuple[int, ...]
    public_key: bytes
    mult_key: bytes
    rotation_keys: bytes

    def to_bytes(self) -> bytes:
        header = {
            "params_fingerprint": self.params_fingerprint,
            "key_id": self.key_id,
            "key_tag": self.key_tag,
            "rotation_indices": list(self.rotation_indices),
        }
        return pack_frame(KEYS_MAGIC, header, [self.public_key, self.mult_key, self.rotation_keys])

    @classmethod
    def from_bytes(cls, data: bytes, params: CKKSParams | None = None) -> "EvaluationKeys":
        """Parse and validate a bundle; with ``params``, also check it was made for them."""
        header, blobs = unpack_frame(data, KEYS_MAGIC, "evaluation-key bundle")
        if len(blobs) != 3:
            raise TamperedDataError(f"evaluation-key bundle has {len(blobs)} parts, expected 3")
        try:
            keys = cls(
                params_fingerprint=str(header["params_fingerprint"]),
                key_id=str(header["key_id"]),
                key_tag=str(header["key_tag"]),
                rotation_indices=tuple(int(r) for r in header["rotation_indices"]),
                public_key=blobs[0],
                mult_key=blobs[1],
                rotation_keys=blobs[2],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TamperedDataError(f"evaluation-key bundle header is not valid: {exc}") from exc
        if key_id_for(keys.key_tag) != keys.key_id:
            raise TamperedDataError("evaluation-key bundle's key_id does not match its key tag")
        if params is not None:
            keys.check_params(params)
        return keys

    def check_params(self, params: CKKSParams) -> None:
        if self.params_fingerprint != params.fingerprint:
            raise ParamsMismatchError(
                f"evaluation keys were made for CKKS params {self.params_fingerprint}, "
                f"the model uses {params.fingerprint}"
            )
        missing = sorted(set(params.rotation_indices) - set(self.rotation_indices))
        if missing:
            raise ParamsMismatchError(f"evaluation keys lack rotation keys {missing[:8]}")

    @property
    def size_bytes(self) -> int:
        return len(self.public_key) + len(self.mult_key) + len(self.rotation_keys)

    def install(self, params: CKKSParams) -> openfhe.CryptoContext:
        """Load the relinearization and rotation keys into OpenFHE's key maps for this context."""
        self.check_params(params)
        cc = get_context(params)
        # OpenFHE keeps evaluation keys in process-wide maps keyed by the key tag and refuses to
        # overwrite them, so a bundle whose tag is already loaded (same client, re-upload) is skipped.
        try:
            public = openfhe.DeserializePublicKeyString(self.public_key, openfhe.BINARY)
            if public is None or public.GetKeyTag() != self.key_tag:
                raise TamperedDataError("evaluation-key bundle's public key does not carry its key tag")
            if self.key_tag not in cc.GetAllEvalMultKeys():
                openfhe.DeserializeEvalMultKeyString(self.mult_key, openfhe.BINARY)
            if self.rotation_keys and self.key_tag not in cc.GetAllEvalAutomorphismKeys():
                openfhe.DeserializeEvalAutomorphismKeyString(self.rotation_keys, openfhe.BINARY)
        except (RuntimeError, ValueError, MemoryError) as exc:  # OpenFHE's errors on malformed bytes
            raise TamperedDataError(f"evaluation keys could not be deserialized: {exc}") from exc
        if self.key_tag not in cc.GetAllEvalMultKeys():
            raise TamperedDataError("evaluation keys do not carry the key tag their header names")
        return cc


class KeyChain:
    """The client's keys.  Holds the secret key; never hand this object to a server."""

    def __init__(self, params: CKKSParams, public_key: openfhe.PublicKey, secret_key: openfhe.PrivateKey) -> None:
        self.params = params
        self._cc = get_context(params)
        self._public_key = public_key
        self._secret_key = secret_key
        self._public_bytes = openfhe.Serialize(public_key, openfhe.BINARY)
        self.key_id = key_id_for(public_key.GetKeyTag())
        self._eval_keys: EvaluationKeys | None = None

    @classmethod
    def generate(cls, params: CKKSParams, min_security_level: SecurityLevel = "HEStd_128_classic") -> "KeyChain":
        """New key pair plus the relinearization, rotation and bootstrapping keys ``params`` asks for.

        Parameters below ``min_security_level`` are refused (``InsecureParametersError``); keys are
        made to be used, and under weak parameters anything encrypted with them is exposed.
        """
        check_security(params, min_security_level)
        cc = get_context(params)
        keypair = cc.KeyGen()
        cc.EvalMultKeyGen(keypair.secretKey)
        if params.rotation_indices:
            cc.EvalRotateKeyGen(keypair.secretKey, list(params.rotation_indices))
        if params.bootstrapping is not None:  # the context is set up for it (get_context)
            for slots in params.bootstrapping.slots:
                cc.EvalBootstrapKeyGen(keypair.secretKey, slots)
        return cls(params, keypair.publicKey, keypair.secretKey)

    @property
    def key_tag(self) -> str:
        return self._public_key.GetKeyTag()

    def evaluation_keys(self) -> EvaluationKeys:
        """The bundle to upload to a server: no secret key in it."""
        if self._eval_keys is None:
            tag = self.key_tag
            self._eval_keys = EvaluationKeys(
                params_fingerprint=self.params.fingerprint,
                key_id=self.key_id,
                key_tag=tag,
                rotation_indices=tuple(self.params.rotation_indices),
                public_key=self._public_bytes,
                mult_key=openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag),
                rotation_keys=openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag)
                if self.params.rotation_indices or self.params.bootstrapping else b"",
            )
        return self._eval_keys

    def encrypt_slots(self, values: np.ndarray) -> bytes:
        """Encrypt one full slot vector and return OpenFHE's BINARY serialization.

        The client holds the secret key, so it encrypts with it: a fresh RLWE sample under the
        same key, indistinguishable to the server from a public-key encryption and about a
        quarter cheaper (no encryption of zero to compute).
        """
        pt = self._cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64))
        return openfhe.Serialize(self._cc.Encrypt(self._secret_key, pt), openfhe.BINARY)

    def decrypt_slots(self, blob: bytes) -> np.ndarray:
        """Decrypt one serialized ciphertext to its real slot values."""
        ct = load_ciphertext(blob, self.key_tag)
        pt = self._cc.Decrypt(ct, self._secret_key)
        pt.SetLength(self.params.slots)
        return np.asarray(pt.GetRealPackedValue(), dtype=np.float64)

    def save(self, directory: str | os.PathLike) -> Path:
        """Persist the keys for this client only (secret key file mode 0600)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / PARAMS_FILE).write_text(self.params.model_dump_json(indent=2))
        secret = d / SECRET_KEY_FILE
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(openfhe.Serialize(self._secret_key, openfhe.BINARY))
        (d / "public.key").write_bytes(self._public_bytes)
        (d / EVAL_KEYS_FILE).write_bytes(self.evaluation_keys().to_bytes())
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "KeyChain":
        d = Path(directory)
        try:
            params = CKKSParams.model_validate_json((d / PARAMS_FILE).read_text())
            secret = (d / SECRET_KEY_FILE).read_bytes()
            public = (d / "public.key").read_bytes()
            bundle = EvaluationKeys.from_bytes((d / EVAL_KEYS_FILE).read_bytes(), params)
        except FileNotFoundError as exc:
            raise EnvelopeError(f"key directory {d} is incomplete: {exc.filename} is missing") from exc
        get_context(params)  # deserializing keys needs the context to exist
        chain = cls(params, openfhe.DeserializePublicKeyString(public, openfhe.BINARY),
                    openfhe.DeserializePrivateKeyString(secret, openfhe.BINARY))
        chain._eval_keys = bundle
        return chain
