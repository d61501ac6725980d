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
from typing import Literal

import numpy as np
import openfhe

from ..errors import EnvelopeError, KeyMismatchError, ParamsMismatchError, TamperedDataError
from .canonical import CiphertextChecker
from .context import get_context
from .params import CKKSParams, SecurityLevel, check_security
from .serialization import KEYS_MAGIC, pack_frame, unpack_frame

SECRET_KEY_FILE = "secret.key"
PUBLIC_KEY_FILE = "public.key"
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
    """The client's keys.  Holds the secret key; never hand this object to a server.

    ``KeyChain.load(directory, only="public")`` holds the public key alone (enough to encrypt)
    and ``only="secret"`` the secret key alone (enough to decrypt).  A loaded chain reads the
    evaluation-key bundle only when ``evaluation_keys()`` is first called: for a deep model it
    is gigabytes, and neither encrypting nor decrypting needs it.
    """

    def __init__(self, params: CKKSParams, public_key: openfhe.PublicKey | None,
                 secret_key: openfhe.PrivateKey | None, eval_keys_file: Path | None = None) -> None:
        if public_key is None and secret_key is None:
            raise ValueError("a key chain needs a public key, a secret key or both")
        self.params = params
        self._cc = get_context(params)
        self._public_key = public_key
        self._secret_key = secret_key
        self.key_id = key_id_for(self.key_tag)
        self._eval_keys_file = eval_keys_file
        self._eval_keys: EvaluationKeys | None = None
        self._canonical: CiphertextChecker | None = None

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
        """OpenFHE's tag of this key pair (the public and the secret key carry the same)."""
        return (self._public_key if self._public_key is not None else self._secret_key).GetKeyTag()

    @property
    def public_key(self) -> openfhe.PublicKey:
        """The public key: what a model owner encrypts this client's weights under (``provision_weights``)."""
        return self._key("public")

    def _key(self, which: str) -> openfhe.PublicKey | openfhe.PrivateKey:
        key = self._public_key if which == "public" else self._secret_key
        if key is None:
            raise EnvelopeError(f"this key chain was loaded without its {which} key "
                                f"(KeyChain.load(directory) loads both)")
        return key

    def evaluation_keys(self) -> EvaluationKeys:
        """The bundle to upload to a server: no secret key in it."""
        if self._eval_keys is None and self._eval_keys_file is not None:
            try:
                data = self._eval_keys_file.read_bytes()
            except FileNotFoundError as exc:
                raise EnvelopeError(f"key directory {self._eval_keys_file.parent} is incomplete: "
                                    f"{exc.filename} is missing") from exc
            bundle = EvaluationKeys.from_bytes(data, self.params)
            if bundle.key_id != self.key_id:
                raise KeyMismatchError(f"{self._eval_keys_file} holds the evaluation keys of another key pair")
            self._eval_keys = bundle
        if self._eval_keys is None:
            tag = self.key_tag
            self._eval_keys = EvaluationKeys(
                params_fingerprint=self.params.fingerprint,
                key_id=self.key_id,
                key_tag=tag,
                rotation_indices=tuple(self.params.rotation_indices),
                public_key=openfhe.Serialize(self._key("public"), openfhe.BINARY),
                mult_key=openfhe.SerializeEvalMultKeyString(openfhe.BINARY, tag),
                rotation_keys=openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, tag)
                if self.params.rotation_indices or self.params.bootstrapping else b"",
            )
        return self._eval_keys

    def encrypt_slots(self, values: np.ndarray) -> bytes:
        """Encrypt one full slot vector and return OpenFHE's BINARY serialization.

        A chain holding the secret key encrypts with it: a fresh RLWE sample under the same key,
        indistinguishable to the server from a public-key encryption and about a quarter cheaper
        (no encryption of zero to compute).  A public-only chain encrypts with the public key.
        """
        pt = self._cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64))
        if self._secret_key is not None:
            return openfhe.Serialize(self._cc.Encrypt(self._secret_key, pt), openfhe.BINARY)
        if self._canonical is None:  # a public-key encryption is written as the server's sandbox accepts it
            self._canonical = CiphertextChecker(self.params)
        return self._canonical.canonical(self._cc.Encrypt(self._public_key, pt))

    def decrypt_slots(self, blob: bytes) -> np.ndarray:
        """Decrypt one serialized ciphertext to its real slot values."""
        ct = load_ciphertext(blob, self.key_tag)
        pt = self._cc.Decrypt(ct, self._key("secret"))
        pt.SetLength(self.params.slots)
        return np.asarray(pt.GetRealPackedValue(), dtype=np.float64)

    def save(self, directory: str | os.PathLike) -> Path:
        """Persist the keys for this client only (secret key file mode 0600), each key in its own
        file so that encrypting and decrypting read only the key they use."""
        d = Path(directory)
        bundle = self.evaluation_keys().to_bytes()
        secret = openfhe.Serialize(self._key("secret"), openfhe.BINARY)
        d.mkdir(parents=True, exist_ok=True)
        (d / PARAMS_FILE).write_text(self.params.model_dump_json(indent=2))
        fd = os.open(d / SECRET_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        (d / PUBLIC_KEY_FILE).write_bytes(openfhe.Serialize(self._key("public"), openfhe.BINARY))
        (d / EVAL_KEYS_FILE).write_bytes(bundle)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, only: Literal["public", "secret"] | None = None) -> "KeyChain":
        """The chain saved in ``directory``; with ``only``, just that key (and the parameters)."""
        d = Path(directory)
        try:
            params = CKKSParams.model_validate_json((d / PARAMS_FILE).read_text())
            get_context(params)  # deserializing keys needs the context to exist
            public = secret = None
            if only != "secret":
                public = openfhe.DeserializePublicKeyString((d / PUBLIC_KEY_FILE).read_bytes(), openfhe.BINARY)
            if only != "public":
                secret = openfhe.DeserializePrivateKeyString((d / SECRET_KEY_FILE).read_bytes(), openfhe.BINARY)
        except FileNotFoundError as exc:
            raise EnvelopeError(f"key directory {d} is incomplete: {exc.filename} is missing") from exc
        if public is not None and secret is not None and public.GetKeyTag() != secret.GetKeyTag():
            raise KeyMismatchError(f"{d}: the public and the secret key belong to different key pairs")
        return cls(params, public, secret, eval_keys_file=d / EVAL_KEYS_FILE)
