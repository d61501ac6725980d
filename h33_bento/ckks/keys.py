"""Client key chain and the server-side evaluation-key bundle.

The split is the security boundary: ``KeyChain`` holds the secret key and lives only in the
client process; ``EvaluationKeys`` carries the public, relinearization and rotation keys and is
all a server ever receives.  Nothing in this module writes the secret key anywhere except the
client's own ``KeyChain.save`` directory.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import openfhe

from ..errors import EnvelopeError, KeyMismatchError, ParamsMismatchError, TamperedDataError
from .canonical import CiphertextChecker
from .context import get_context, release_rotation_keys
from .params import CKKSParams, SecurityLevel, check_security
from .serialization import KEYS_MAGIC, FrameFile, FrameWriter, pack_frame, unpack_frame

SECRET_KEY_FILE = "secret.key"
PUBLIC_KEY_FILE = "public.key"
EVAL_KEYS_FILE = "evaluation_keys.h33k"
PARAMS_FILE = "params.json"
#: rotation keys generated, written and installed at once (a few keys at N=2^16): bounds key memory
ROTATION_CHUNK_BYTES = 256 << 20


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


@dataclass(frozen=True, eq=False)
class EvaluationKeys:
    """Public key + relinearization key + exactly the rotation keys the program uses.

    The rotation (and bootstrapping) keys are several OpenFHE serializations (chunks) for the same
    key tag, each installed into OpenFHE's key map on top of the others, so no step ever holds
    them all at once.  A bundle read with :meth:`from_file` keeps its chunks in the file
    (``rotation_keys`` is then empty) and reads them one at a time when it is installed.
    """

    params_fingerprint: str
    key_id: str
    key_tag: str
    rotation_indices: tuple[int, ...]
    public_key: bytes
    mult_key: bytes
    rotation_keys: tuple[bytes, ...]
    source: FrameFile | None = field(default=None, compare=False, repr=False)

    def __eq__(self, other: object) -> bool:
        """The same bundle, wherever its rotation keys are (memory or file)."""
        if not isinstance(other, EvaluationKeys):
            return NotImplemented
        return ((self.header(), self.public_key, self.mult_key) == (other.header(), other.public_key, other.mult_key)
                and tuple(self.rotation_chunks()) == tuple(other.rotation_chunks()))

    __hash__ = None  # type: ignore[assignment]  # holds bytes it compares by value, like a list

    def header(self) -> dict[str, Any]:
        """What the bundle's frame header says of it (its blob lengths aside)."""
        return {"params_fingerprint": self.params_fingerprint, "key_id": self.key_id, "key_tag": self.key_tag,
                "rotation_indices": list(self.rotation_indices)}

    def to_bytes(self) -> bytes:
        """The whole bundle as one frame in memory (for small bundles and the HTTP upload)."""
        return pack_frame(KEYS_MAGIC, self.header(), [self.public_key, self.mult_key, *self.rotation_chunks()])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to ``path`` without holding it in memory (a file-backed one is copied)."""
        path = Path(path)
        if self.source is not None:
            if not self.source.stored_at(path):
                with self.source.open() as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            return path
        with FrameWriter(path, KEYS_MAGIC) as out:
            for blob in (self.public_key, self.mult_key, *self.rotation_keys):
                out.add(blob)
            return out.commit(self.header())

    @classmethod
    def _from_parts(cls, header: dict[str, Any], blobs: list[bytes], rotation: tuple[bytes, ...],
                    source: FrameFile | None, params: CKKSParams | None) -> "EvaluationKeys":
        if len(blobs) < 2:
            raise TamperedDataError(f"evaluation-key bundle has {len(blobs)} parts, expected at least 2")
        try:
            keys = cls(
                params_fingerprint=str(header["params_fingerprint"]),
                key_id=str(header["key_id"]),
                key_tag=str(header["key_tag"]),
                rotation_indices=tuple(int(r) for r in header["rotation_indices"]),
                public_key=blobs[0],
                mult_key=blobs[1],
                rotation_keys=rotation,
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TamperedDataError(f"evaluation-key bundle header is not valid: {exc}") from exc
        if key_id_for(keys.key_tag) != keys.key_id:
            raise TamperedDataError("evaluation-key bundle's key_id does not match its key tag")
        if params is not None:
            keys.check_params(params)
        return keys

    @classmethod
    def from_bytes(cls, data: bytes, params: CKKSParams | None = None) -> "EvaluationKeys":
        """Parse and validate a bundle; with ``params``, also check it was made for them."""
        header, blobs = unpack_frame(data, KEYS_MAGIC, "evaluation-key bundle")
        return cls._from_parts(header, blobs, tuple(b for b in blobs[2:] if b), None, params)

    @classmethod
    def from_file(cls, path: str | os.PathLike, params: CKKSParams | None = None) -> "EvaluationKeys":
        """A bundle file, validated as a stream (digest included); only its public and relinearization
        keys are read into memory, the rotation keys stay in the file until :meth:`install`."""
        frame = FrameFile(path, KEYS_MAGIC, "evaluation-key bundle")
        blobs = frame.blobs()
        head = [next(blobs, b"") for _ in range(2)] if len(frame.lengths) >= 2 else []
        blobs.close()
        return cls._from_parts(frame.header, head, (), frame, params)

    def rotation_chunks(self) -> Iterator[bytes]:
        """The rotation-key chunks, one in memory at a time for a file-backed bundle."""
        if self.source is None:
            yield from self.rotation_keys
            return
        for i, blob in enumerate(self.source.blobs()):
            if i >= 2 and blob:
                yield blob

    def rotation_files(self) -> Iterator[Path]:
        """The rotation-key chunks as files, one at a time, each removed when the next is asked for:
        OpenFHE deserializes a file holding only the keys it builds (a string costs the chunk's
        size twice more: the Python bytes and the binding's copy; gigabytes for bootstrapping keys)."""
        if self.source is not None:
            yield from (path for path in self.source.blob_files(first=2) if path.stat().st_size)
            return
        with tempfile.TemporaryDirectory(prefix="h33-keys-") as tmp:
            path = Path(tmp) / "chunk"
            for chunk in self.rotation_keys:
                path.write_bytes(chunk)
                yield path
                path.unlink()

    @property
    def rotation_bytes(self) -> int:
        if self.source is not None:
            return sum(self.source.lengths[2:])
        return sum(len(b) for b in self.rotation_keys)

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
        return len(self.public_key) + len(self.mult_key) + self.rotation_bytes

    def install(self, params: CKKSParams) -> openfhe.CryptoContext:
        """Load the relinearization and rotation keys into OpenFHE's key maps for this context,
        one rotation-key chunk at a time (OpenFHE merges each into the key tag's map)."""
        self.check_params(params)
        cc = get_context(params)
        # OpenFHE keeps evaluation keys in process-wide maps keyed by the key tag and refuses to
        # overwrite a relinearization key, so a bundle whose tag is already loaded (same client,
        # re-upload) is skipped.
        try:
            public = openfhe.DeserializePublicKeyString(self.public_key, openfhe.BINARY)
            if public is None or public.GetKeyTag() != self.key_tag:
                raise TamperedDataError("evaluation-key bundle's public key does not carry its key tag")
            if self.key_tag not in cc.GetAllEvalMultKeys():
                openfhe.DeserializeEvalMultKeyString(self.mult_key, openfhe.BINARY)
            if self.rotation_bytes and self.key_tag not in cc.GetAllEvalAutomorphismKeys():
                for path in self.rotation_files():
                    if not openfhe.CryptoContext.DeserializeEvalAutomorphismKey(str(path), openfhe.BINARY):
                        raise TamperedDataError("evaluation-key bundle's rotation keys could not be deserialized")
        except (RuntimeError, ValueError, MemoryError) as exc:  # OpenFHE's errors on malformed bytes
            raise TamperedDataError(f"evaluation keys could not be deserialized: {exc}") from exc
        if self.key_tag not in cc.GetAllEvalMultKeys():
            raise TamperedDataError("evaluation keys do not carry the key tag their header names")
        return cc


def _write_bundle(params: CKKSParams, keypair: openfhe.KeyPair, path: Path) -> None:
    """Generate the evaluation keys of ``keypair`` into a bundle file at ``path``, chunk by chunk.

    Each chunk (one slot count's bootstrapping keys, or ``ROTATION_CHUNK_BYTES`` of rotation keys)
    is generated into OpenFHE's map, serialized to a file, appended to the frame and dropped, so the
    process holds one chunk at a time.  OpenFHE can only drop every key pair's rotation keys at
    once; if this process holds another key pair's, they are kept, the chunks accumulate in the
    map (1x the bundle) and are serialized once at the end.
    """
    cc, tag, BIN = get_context(params), keypair.publicKey.GetKeyTag(), openfhe.BINARY
    alone = set(cc.GetAllEvalAutomorphismKeys()) <= {tag}
    with FrameWriter(path, KEYS_MAGIC) as out, tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        chunk_file = os.path.join(tmp, "chunk")
        out.add(openfhe.Serialize(keypair.publicKey, BIN))
        out.add(openfhe.SerializeEvalMultKeyString(BIN, tag))

        def flush() -> None:  # the keys in the map become one chunk
            if not cc.GetExistingEvalAutomorphismKeyIndices(tag):
                return
            if not openfhe.CryptoContext.SerializeEvalAutomorphismKey(chunk_file, BIN, tag):
                raise RuntimeError(f"OpenFHE could not serialize rotation keys to {chunk_file}")
            out.add_file(chunk_file)
            os.unlink(chunk_file)
            if alone:
                release_rotation_keys()

        covered: set[int] = set()
        for slots in params.bootstrapping.slots if params.bootstrapping is not None else ():
            cc.EvalBootstrapKeyGen(keypair.secretKey, slots)  # one slot count's keys: OpenFHE makes them at once
            covered |= set(cc.GetExistingEvalAutomorphismKeyIndices(tag))
            if alone:
                flush()
        todo = [r for r in params.rotation_indices if cc.FindAutomorphismIndex(r) not in covered]
        per_chunk = max(1, ROTATION_CHUNK_BYTES // params.estimated_key_bytes()["rotation"])
        for i in range(0, len(todo), per_chunk):
            cc.EvalRotateKeyGen(keypair.secretKey, todo[i:i + per_chunk])
            if alone:
                flush()
        if not alone:
            flush()
        out.commit({"params_fingerprint": params.fingerprint, "key_id": key_id_for(tag), "key_tag": tag,
                    "rotation_indices": list(params.rotation_indices)})


class KeyChain:
    """The client's keys.  Holds the secret key; never hand this object to a server.

    ``KeyChain.load(directory, only="public")`` holds the public key alone (enough to encrypt)
    and ``only="secret"`` the secret key alone (enough to decrypt).  The evaluation-key bundle
    always lives in a file (the key directory's, or a temporary one for a chain generated without
    a directory) and is read only when ``evaluation_keys()`` is first called: for a deep model it
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
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._eval_keys: EvaluationKeys | None = None
        self._canonical: CiphertextChecker | None = None

    @classmethod
    def generate(cls, params: CKKSParams, min_security_level: SecurityLevel = "HEStd_128_classic",
                 directory: str | os.PathLike | None = None) -> "KeyChain":
        """New key pair plus the relinearization, rotation and bootstrapping keys ``params`` asks for.

        With ``directory`` the chain is saved there as :meth:`save` does, the evaluation-key bundle
        written straight into it; without, the bundle goes to a temporary file removed with the chain.
        Either way it is generated and written a chunk at a time (see ``_write_bundle``).

        Parameters below ``min_security_level`` are refused (``InsecureParametersError``); keys are
        made to be used, and under weak parameters anything encrypted with them is exposed.
        """
        check_security(params, min_security_level)
        cc = get_context(params)
        keypair = cc.KeyGen()
        cc.EvalMultKeyGen(keypair.secretKey)
        chain = cls(params, keypair.publicKey, keypair.secretKey)
        if directory is not None:
            d = chain._save_keys(directory)
            bundle = d / EVAL_KEYS_FILE
        else:
            chain._tmpdir = tempfile.TemporaryDirectory(prefix="h33-keys-")  # removed once nothing holds it
            bundle = Path(chain._tmpdir.name) / EVAL_KEYS_FILE
        _write_bundle(params, keypair, bundle)
        chain._eval_keys_file = bundle
        return chain

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
        """The bundle to upload to a server: no secret key in it.  File-backed: installing it
        (``Engine``) reads its rotation keys a chunk at a time; ``to_bytes()`` reads them all."""
        if self._eval_keys is None:
            if self._eval_keys_file is None:
                raise EnvelopeError("this key chain has no evaluation-key bundle (KeyChain.generate makes one)")
            try:
                bundle = EvaluationKeys.from_file(self._eval_keys_file, self.params)
            except FileNotFoundError as exc:
                raise EnvelopeError(f"key directory {self._eval_keys_file.parent} is incomplete: "
                                    f"{exc.filename} is missing") from exc
            if bundle.key_id != self.key_id:
                raise KeyMismatchError(f"{self._eval_keys_file} holds the evaluation keys of another key pair")
            bundle.source.owner = self._tmpdir  # a temporary bundle file lives as long as either needs it
            self._eval_keys = bundle
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

    def _save_keys(self, directory: str | os.PathLike) -> Path:
        """Parameters, secret key (file mode 0600) and public key, each in its own file."""
        d = Path(directory)
        secret = openfhe.Serialize(self._key("secret"), openfhe.BINARY)
        d.mkdir(parents=True, exist_ok=True)
        (d / PARAMS_FILE).write_text(self.params.model_dump_json(indent=2))
        fd = os.open(d / SECRET_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        (d / PUBLIC_KEY_FILE).write_bytes(openfhe.Serialize(self._key("public"), openfhe.BINARY))
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        """Persist the keys for this client only (secret key file mode 0600), each key in its own
        file so that encrypting and decrypting read only the key they use; the evaluation-key
        bundle is copied from its file, never read whole."""
        bundle = self.evaluation_keys()
        d = self._save_keys(directory)
        bundle.save(d / EVAL_KEYS_FILE)
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
