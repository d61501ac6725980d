"""The client roles: the data owner (``FHEInferenceClient``: keys, lane packing, encryption,
decryption, predictions) and, in encrypted-weight mode, the model owner (``ModelOwner``).

Up to ``lanes`` inputs share one ciphertext (slot = position * lanes + lane), so eight images
cost one encrypted pass.  Softmax is applied here, after decryption: the server only ever
computes logits on ciphertexts.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .ckks.keys import KeyChain
from .ckks.params import CKKSParams, SecurityLevel, check_security
from .ckks.serialization import EncryptedTensor
from .keystore import MODEL_NAME_RE
from .memory import check_memory
from .program.model import CompiledModel, WeightMode
from .program.packing import pack
from .program.report import peak_memory
from .errors import (
    EnvelopeError,
    H33Error,
    KeyMismatchError,
    ModelMismatchError,
    ParamsMismatchError,
    TamperedDataError,
    TruncatedDataError,
    UnknownModelError,
    UnsupportedVersionError,
    WeightsNotProvisionedError,
)

if TYPE_CHECKING:
    from .runtime.weights import EncryptedWeights, WeightsFile


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


class RemoteError(H33Error):
    """An error answer from the inference server: HTTP ``status``, stable ``code``, ``message``.

    Envelope faults are raised as subclasses that are also the matching local error class, so
    ``except TamperedDataError`` works the same for local and remote inference.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _remote_error_class(base: type[Exception]) -> type[RemoteError]:
    return type(f"Remote{base.__name__}", (RemoteError, base), {"__module__": __name__})


_RemoteEnvelopeError = _remote_error_class(EnvelopeError)
_REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    "tampered": _remote_error_class(TamperedDataError),
    "truncated": _remote_error_class(TruncatedDataError),
    "model_mismatch": _remote_error_class(ModelMismatchError),
    "params_mismatch": _remote_error_class(ParamsMismatchError),
    "key_mismatch": _remote_error_class(KeyMismatchError),
    "unsupported_version": _remote_error_class(UnsupportedVersionError),
    "invalid_envelope": _RemoteEnvelopeError,
    "invalid_bundle": _RemoteEnvelopeError,
    "weights_missing": _remote_error_class(WeightsNotProvisionedError),
    "unknown_model": _remote_error_class(UnknownModelError),
}


def model_base_url(url: str, name: str | None) -> str:
    """The base URL of a served model's routes: ``url/models/{name}``, or ``url`` itself (the default model)."""
    base = url.rstrip("/")
    if name is None:
        return base
    if not MODEL_NAME_RE.match(name):
        raise ValueError(f"{name!r} is neither a directory nor a served model's name (names match "
                         f"{MODEL_NAME_RE.pattern})")
    return f"{base}/models/{name}"


class FHEInferenceClient:
    """Encrypt locally, infer on a server (or a local engine), decrypt locally.

    ``model`` is a CompiledModel or the directory it was saved to, or with ``url`` the name of one of
    the server's models (a string that is not an existing directory: ``model="mnist"``; ``GET
    /models`` lists them); a name the server does not serve raises ``UnknownModelError`` (HTTP 404
    ``unknown_model``).  Without ``url`` inference runs
    in a local Engine that gets only the evaluation keys.  With ``weight_mode="plaintext"`` (the
    default) the server holds the weights in the clear and only the data is encrypted; with
    ``weight_mode="encrypted"`` it runs the weightless artifact (``CompiledModel.without_weights``,
    whose fingerprint the envelopes then carry) with weights the model owner encrypted under this
    client's key (``runtime.weights.provision_weights``).  Locally, a full model's weights are
    provisioned by this client itself (it holds them anyway); a weightless model's come from its
    owner through :meth:`install_weights`.  Against a server the model owner uploads them
    (:class:`ModelOwner`); until then ``infer`` raises ``WeightsNotProvisionedError`` (HTTP 409
    ``weights_missing``).

    With ``url`` (an h33 BentoML service) and ``api_key`` the client fetches ``GET /model``,
    generates keys for the served parameters if ``keys`` is not given, uploads the evaluation keys
    to ``POST /keys`` once (skipped when the server already holds them), and ``infer`` posts
    envelopes to ``POST /infer`` -- the server's default model's routes, or with a model name every
    call goes to ``/models/{name}/...``.  A local ``model`` is then optional: without it (or with a
    name) the client uses the public layout the server publishes (where inputs go, where logits are
    read); with it, the client checks that the server's default model is exactly that model.
    Secret keys never leave the client.

    ``min_security_level`` (default ``HEStd_128_classic``): parameters below it, the served ones
    or a local model's, are refused with ``InsecureParametersError`` before any key is made or
    anything is sent; a level the parameters only claim is checked with OpenFHE.  Opting out is
    explicit: ``min_security_level="HEStd_NotSet"``.

    Long runs go through the server's task routes: for a model whose predicted latency (``GET
    /model``) exceeds ``task_threshold_s`` (default 60 s), ``infer`` submits the envelope to
    ``POST /tasks``, polls ``GET /tasks/{id}`` (a tqdm bar of the program's steps, unless
    ``progress=False``) and fetches the result, so no single HTTP request has to outlast the run;
    it gives up after ``task_timeout_s`` (default: ``http_timeout`` or three times the prediction,
    whichever is longer) with ``TimeoutError``.  Shorter runs post to ``/infer`` and are lane-packed.

    Generating keys (no ``keys`` given) is refused with ``InsufficientMemoryError`` when the plan's
    predicted peak (``program.report.peak_memory``) exceeds the memory available to this process
    (its cgroup's limit, else ``MemAvailable``); ``ignore_memory_check=True`` generates anyway.
    """

    #: seconds to wait for one HTTP answer at least (an upload of a ~0.5 GB key bundle, or a queued
    #: run); a model predicted to run longer (a deep, bootstrapped one) gets three times its prediction
    http_timeout: float = 900.0

    def __init__(self, model: CompiledModel | str | os.PathLike | None = None, url: str | None = None,
                 api_key: str | None = None, keys: KeyChain | str | os.PathLike | None = None,
                 min_security_level: SecurityLevel = "HEStd_128_classic",
                 weight_mode: WeightMode = "plaintext", task_threshold_s: float = 60.0,
                 task_timeout_s: float | None = None, progress: bool = True,
                 ignore_memory_check: bool = False) -> None:
        if weight_mode not in ("plaintext", "encrypted"):
            raise ValueError(f"weight_mode must be 'plaintext' or 'encrypted', not {weight_mode!r}")
        self.url, self.api_key, self.weight_mode = url, api_key, weight_mode
        self.task_threshold_s, self.task_timeout_s, self.progress = task_threshold_s, task_timeout_s, progress
        #: whether ``infer`` runs as a server task (the served model's predicted latency > task_threshold_s)
        self.uses_tasks = False
        #: the last task's final status (task_id, state, done, total, timestamps), from GET /tasks/{id}
        self.last_task: dict[str, Any] = {}
        self._weights: EncryptedWeights | WeightsFile | bytes | None = None  # the local engine's (encrypted mode)
        self._owner_model: CompiledModel | None = None  # a full model given in encrypted mode: provisions locally
        self._http: Any = None
        self._uploaded_key_id: str | None = None
        self._upload_lock = threading.Lock()
        self.server_info: dict[str, Any] | None = None
        #: facts about the last remote run (engine_run, lane, run_requests, ...), from the X-H33-* headers
        self.last_run: dict[str, str] = {}
        #: the server's name of the model this client uses (None: the server's default model)
        self.model_name: str | None = None
        if url is not None:
            if isinstance(model, str) and not Path(model).is_dir():
                self.model_name, model = model, None
            self._connect(model_base_url(url, self.model_name), api_key)
            self.model = self._remote_model(model)
        elif model is None:
            raise ValueError("a model (CompiledModel or its directory) is required without a server url")
        else:
            self.model = self._local_model(model)
        check_security(self.model.params, min_security_level)  # before a key is made or a byte is sent
        if isinstance(keys, (str, os.PathLike)):
            keys = KeyChain.load(keys)
        if keys is None and not ignore_memory_check:
            check_memory("generating this model's keys", peak_memory(self.model)["keygen"],
                         "FHEInferenceClient(..., ignore_memory_check=True)")
        self.keys = keys if keys is not None else KeyChain.generate(self.model.params, min_security_level)
        if self.keys.params.fingerprint != self.model.params.fingerprint:
            raise EnvelopeError("the key chain was generated for other CKKS parameters than this model's")
        self._engine = None

    # ----------------------------------------------------------------- remote plumbing
    def _connect(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"User-Agent": "h33-bento-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(self.http_timeout, connect=30.0))
        self.server_info = self._json(self._http.get("/model"))
        predicted = ((self.server_info.get("model") or {}).get("summary") or {}).get("predicted_latency_ms")
        predicted_s = predicted / 1000.0 if isinstance(predicted, (int, float)) else 0.0
        if 3 * predicted_s > self.http_timeout:
            self._http.timeout = httpx.Timeout(3 * predicted_s, connect=30.0)
        self.uses_tasks = predicted_s > self.task_threshold_s
        if self.task_timeout_s is None:
            self.task_timeout_s = max(self.http_timeout, 3 * predicted_s)

    @staticmethod
    def _raise_for(resp: Any) -> None:
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
            code, message = str(err["code"]), str(err["message"])
        except Exception:  # not our JSON error shape (a proxy, an ingress limit, ...)
            code, message = "http_error", resp.text[:500]
        raise _REMOTE_ERRORS.get(code, RemoteError)(resp.status_code, code, message)

    def _json(self, resp: Any) -> dict[str, Any]:
        self._raise_for(resp)
        return resp.json()

    def _remote_model(self, model: CompiledModel | str | os.PathLike | None) -> CompiledModel:
        info = self.server_info or {}
        served_fp = info["model"]["fingerprint"]
        served_mode = info["model"].get("weight_mode", "plaintext")
        if served_mode != self.weight_mode:
            raise ValueError(f"the server at {self.url} serves its model with {served_mode} weights: "
                             f"use weight_mode={served_mode!r}")
        if model is not None:
            local = self._local_model(model)
            if local.fingerprint != served_fp:
                raise ModelMismatchError(f"the server at {self.url} serves model {served_fp}, "
                                         f"not this model ({local.fingerprint})")
            return local
        params = CKKSParams.model_validate({k: v for k, v in info["params"].items() if k != "fingerprint"})
        if params.fingerprint != info["params"]["fingerprint"]:
            raise ParamsMismatchError("the server's parameters do not match their fingerprint")
        m = info["model"]
        return CompiledModel(  # a layout-only view: enough to pack inputs and read outputs, no weights
            params=params,
            input_shape=tuple(m["input_shape"]),
            input_name=m.get("input_name", "input"),
            input_positions=np.asarray(info["layout"]["input_positions"], dtype=np.int64),
            output_shape=tuple(m["output_shape"]),
            output_positions=np.asarray(info["layout"]["output_positions"], dtype=np.int64),
            steps=[],
            labels=list(m["labels"]) if m.get("labels") else None,
            depth=int(m.get("depth", 0)),
            runnable=False,
            metadata={"layout_only": True, "server": self.url},
            _fingerprint=served_fp,
        )

    def _local_model(self, model: CompiledModel | str | os.PathLike) -> CompiledModel:
        """The model in this client's weight mode: its weightless artifact in encrypted mode."""
        local = model if isinstance(model, CompiledModel) else CompiledModel.load(model)
        if self.weight_mode == "plaintext":
            if local.weight_mode == "encrypted":
                raise ValueError("this model's weights are encrypted: use weight_mode='encrypted'")
            return local
        if local.weight_mode == "plaintext":
            self._owner_model = local
        return local.without_weights()

    def install_weights(self, weights: EncryptedWeights | WeightsFile | bytes) -> None:
        """Encrypted weights (``EncryptedWeights``, their bytes, or a ``WeightsFile`` read as the
        engine loads them) for the local engine, from the model owner's ``provision_weights`` for
        this client's key."""
        if self._http is not None or self.weight_mode != "encrypted":
            raise ValueError("install_weights is for a local engine in weight_mode='encrypted'")
        self._weights, self._engine = weights, None

    def upload_keys(self) -> str:
        """Register this client's evaluation keys with the server (once) and return the key_id."""
        if self._http is None:
            raise RuntimeError("upload_keys needs a server url")
        key_id = self.keys.key_id
        with self._upload_lock:
            if self._uploaded_key_id == key_id:
                return key_id
            resp = self._http.get(f"/keys/{key_id}")
            if resp.status_code != 200:
                if resp.status_code != 404:
                    self._raise_for(resp)
                headers = {"Content-Type": "application/octet-stream", "X-H33-Key-Id": key_id}  # the id: for routers
                bundle = self.keys.evaluation_keys()
                if bundle.source is None:
                    resp = self._http.post("/keys", content=bundle.to_bytes(), headers=headers)
                else:  # streamed from its file: a deep model's bundle is gigabytes
                    with bundle.source.open() as fh:
                        size = os.fstat(fh.fileno()).st_size
                        resp = self._http.post("/keys", content=iter(lambda: fh.read(8 << 20), b""),
                                               headers={**headers, "Content-Length": str(size)})
                got = self._json(resp)["key_id"]
                if got != key_id:
                    raise RemoteError(resp.status_code, "key_mismatch", f"server registered {got}, expected {key_id}")
            self._uploaded_key_id = key_id
            return key_id

    def _post_envelope(self, path: str, enc: EncryptedTensor) -> Any:
        """POST an envelope to /infer or /tasks; re-uploads the keys once if the server lost them."""
        self.upload_keys()
        body = enc.to_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-H33-Key-Id": enc.key_id}
        resp = self._http.post(path, content=body, headers=headers)
        if resp.status_code == 404 and enc.key_id == self.keys.key_id:  # the server lost our keys: re-upload once
            self._uploaded_key_id = None
            self.upload_keys()
            resp = self._http.post(path, content=body, headers=headers)
        self._raise_for(resp)
        return resp

    def _answer(self, resp: Any) -> EncryptedTensor:
        """The output envelope of an /infer or task-result answer; its run facts go to ``last_run``."""
        self._raise_for(resp)
        self.last_run = {k[len("x-h33-"):].replace("-", "_"): v for k, v in resp.headers.items()
                         if k.lower().startswith("x-h33-")}
        return EncryptedTensor.from_bytes(resp.content)

    def _infer_task(self, enc: EncryptedTensor) -> EncryptedTensor:
        """Submit to POST /tasks, poll its progress until it finishes, fetch the result."""
        from tqdm.auto import tqdm

        task = self._post_envelope("/tasks", enc).json()
        task_id = task["task_id"]
        headers = {"X-H33-Key-Id": enc.key_id}  # routers hash on it: the replica holding the task
        deadline = time.monotonic() + (self.task_timeout_s or self.http_timeout)
        wait = 0.1
        with tqdm(total=task["total"], desc=f"h33 task {task_id[:8]}", unit="step",
                  disable=None if self.progress else True) as bar:
            while task["state"] not in ("completed", "failed"):
                if time.monotonic() + wait > deadline:
                    raise TimeoutError(f"task {task_id} did not finish within {self.task_timeout_s:.0f} s "
                                       f"({task['done']} of {task['total']} steps done)")
                time.sleep(wait)
                wait = min(2 * wait, 1.0)
                task = self._json(self._http.get(f"/tasks/{task_id}", headers=headers))
                bar.total = task["total"]
                bar.update(task["done"] - bar.n)
        self.last_task = task
        return self._answer(self._http.get(f"/tasks/{task_id}/result", headers=headers))

    def _infer_remote(self, enc: EncryptedTensor) -> EncryptedTensor:
        if self.uses_tasks:
            return self._infer_task(enc)
        return self._answer(self._post_envelope("/infer", enc))

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "FHEInferenceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        """Run the encrypted program: on the server with ``url``, else locally with evaluation keys only."""
        if self._http is not None:
            return self._infer_remote(enc)
        if self._engine is None:
            from .runtime.engine import Engine
            from .runtime.weights import provision_weights

            keys = self.keys.evaluation_keys()
            if self._weights is None and self._owner_model is not None:
                self._weights = provision_weights(self._owner_model, keys)
            self._engine = Engine(self.model, keys, weights=self._weights)
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


class ModelOwner:
    """The model owner's side of encrypted-weight mode: it holds the full model, encrypts its
    weights under a client's public key and uploads them to the server for that client's key.

    The public key comes from the client (the directory ``h33 keygen`` wrote, read with
    ``only="public"``, or its ``KeyChain``), not from the server: the server is the party the
    weights are hidden from, and a public key it handed out could be its own.  ``api_key`` is an
    API key of the client's tenant (weights are stored only for a key of the uploading tenant), and
    the client uploads its evaluation keys first (``FHEInferenceClient.upload_keys``).  ``model_name``
    is the server's name of the model (the client's ``model="..."``); None: the server's default model.
    """

    def __init__(self, model: CompiledModel | str | os.PathLike, url: str | None = None,
                 api_key: str | None = None, model_name: str | None = None) -> None:
        self.model = model if isinstance(model, CompiledModel) else CompiledModel.load(model)
        if self.model.weight_mode != "plaintext":
            raise ValueError("a model owner holds the full model (with its weights), not a weightless artifact")
        self.weightless = self.model.without_weights()
        self.url, self.api_key, self.model_name = url, api_key, model_name

    def encrypt_weights(self, public: KeyChain | str | os.PathLike) -> EncryptedWeights:
        """The model's weights encrypted under the client's public key (a ``KeyChain`` or its directory)."""
        from .runtime.weights import provision_weights

        if not isinstance(public, KeyChain):
            public = KeyChain.load(public, only="public")
        return provision_weights(self.model, public)

    def provision(self, public: KeyChain | str | os.PathLike) -> dict[str, Any]:
        """Encrypt the weights for ``public`` and upload them to ``POST /keys/{key_id}/weights``;
        returns the server's answer (``key_id``, ``model_fingerprint``, ``size_bytes``, ``ciphertexts``)."""
        import httpx

        if self.url is None:
            raise RuntimeError("provision needs a server url (encrypt_weights makes the weights alone)")
        if not isinstance(public, KeyChain):
            public = KeyChain.load(public, only="public")
        headers = {"User-Agent": "h33-bento-model-owner", "Content-Type": "application/octet-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        with httpx.Client(base_url=model_base_url(self.url, self.model_name), headers=headers,
                          timeout=httpx.Timeout(FHEInferenceClient.http_timeout, connect=30.0)) as http:
            resp = http.get("/model")
            FHEInferenceClient._raise_for(resp)
            served = resp.json()["model"]["fingerprint"]
            if served != self.weightless.fingerprint:
                raise ModelMismatchError(f"the server at {self.url} serves model {served}, not this model's "
                                         f"weightless artifact ({self.weightless.fingerprint})")
            weights = self.encrypt_weights(public)
            body = weights.to_bytes()
            del weights
            resp = http.post(f"/keys/{public.key_id}/weights", content=body)
            FHEInferenceClient._raise_for(resp)
            return resp.json()
