"""Server configuration: model sources, tenants and their API-key hashes, key store, limits, lane packing.

Everything is read once at start-up from an optional YAML/JSON file (``H33_CONFIG``) and then from
environment variables, which win.  API keys are never stored: the configuration holds the SHA-256
of each key, and a presented key is hashed and compared with ``hmac.compare_digest``.

Environment variables::

    H33_CONFIG              YAML/JSON file with any of the fields of ServeConfig
    H33_MODEL_URI           MLflow model URI (models:/name@alias, runs:/..., a local path)
    H33_BENTO_MODEL         BentoML model tag or alias (default "h33-model"), used when no MLflow URI
    H33_MODELS              several models, by name, instead of the two above: a JSON object
                            {"mnist": "models:/mnist@prod", "lenet": "bento:lenet:latest"} or
                            "mnist=models:/mnist@prod,lenet=bento:lenet" ("bento:" names a BentoML
                            store tag, anything else is an MLflow URI); served under /models/{name}/
    H33_DEFAULT_MODEL       the model the un-prefixed routes (/infer, /keys, /model, /tasks) address
                            (default: the first of H33_MODELS)
    H33_KEY_STORE           directory for evaluation-key bundles (default ./h33-keystore); with
                            H33_KEY_STORE_URL, this replica's cache of them
    H33_KEY_STORE_URL       s3://bucket[/prefix]: one key store for every replica (endpoint and
                            credentials from boto3's AWS_* variables)
    H33_KEY_REVALIDATE_S    with H33_KEY_STORE_URL, seconds a cached key is trusted before the
                            object store is asked again (default 5; a deletion elsewhere shows then)
    H33_API_KEYS_FILE       YAML/JSON file {tenants: {name: [sha256, ...]}} (or {name: [sha256, ...]})
    H33_API_KEYS            inline "tenant:sha256,tenant:sha256"
    H33_MAX_INFER_BYTES     /infer body limit (default 64 MiB)
    H33_MAX_KEY_BYTES       /keys body limit (default 1 GiB)
    H33_MAX_WEIGHTS_BYTES   /keys/{key_id}/weights body limit (default 4 GiB; encrypted-weight mode)
    H33_LANE_WAIT_MS        lane-fill idle window (default 20 ms)
    H33_LANE_MAX_WAIT_MS    lane-fill maximum wait (default 200 ms)
    H33_MAX_ENGINES         engines (key bundles) kept installed per worker (default 8)
    H33_MAX_KEYS_PER_TENANT key bundles a tenant may register (default 8)
    H33_ENGINE_CACHE_BYTES  plaintext-diagonal cache shared by the engines (default 2 GiB)
    H33_BODY_TIMEOUT_S      time a request body may take to arrive, on top of its size at the minimum
                            rate (default 30 s)
    H33_BODY_MIN_RATE       minimum upload rate a large body is allowed for, bytes/s (default 1 MiB/s)
    H33_MAX_CONCURRENCY     authenticated requests in flight per worker (default 128)
    H33_MAX_TENANT_CONCURRENCY  authenticated requests in flight per tenant and worker (default 32)
    H33_METRICS_PUBLIC      "true" (default): /metrics needs no credentials; "false": a scrape token
    H33_METRICS_TOKEN_SHA256    sha256 of the scrape token(s) /metrics accepts when not public (comma-separated)
    H33_MAX_INSTALLED_KEYS  distinct keys installed per worker before its OpenFHE key state is flushed (default 16)
    H33_SANDBOX_PROCESSES   processes validating untrusted ciphertexts (default 2)
    H33_SANDBOX_TIMEOUT_S   time limit for validating one request's ciphertexts (default 30 s)
    H33_TASK_TTL_S          how long a finished task's result is kept (default 3600 s)
    H33_MAX_TASKS           tasks kept per worker, finished ones included (default 64)
    H33_MAX_TENANT_TASKS    unfinished tasks per tenant and worker (default 8)
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..keystore import MODEL_NAME_RE, TENANT_RE

API_KEY_PREFIX = "h33_pk_"
MiB = 1 << 20
GiB = 1 << 30
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: The name of the one model a service configured with H33_MODEL_URI / H33_BENTO_MODEL serves.
SINGLE_MODEL_NAME = "default"
BENTO_PREFIX = "bento:"


def new_api_key() -> str:
    """A fresh random API key, ``h33_pk_`` + 43 URL-safe characters (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """The SHA-256 (hex) the server configuration stores for ``api_key``."""
    return hashlib.sha256(api_key.strip().encode("utf-8")).hexdigest()


class TenantConfig(BaseModel):
    """One tenant: the hashes of its API keys (several, so keys can be rotated without downtime)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    api_key_sha256: tuple[str, ...] = Field(min_length=1)

    @field_validator("api_key_sha256")
    @classmethod
    def _hex(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for h in value:
            h = h.strip().lower().removeprefix("sha256:")
            if not _SHA256_RE.match(h):
                raise ValueError("api_key_sha256 entries must be 64 hex characters (sha256 of the API key); "
                                 "store hashes, never the keys themselves")
            out.append(h)
        return tuple(out)


class ModelSource(BaseModel):
    """Where one served model comes from: an MLflow model URI or a BentoML store tag (exactly one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_uri: Optional[str] = Field(default=None, min_length=1)
    bento_model: Optional[str] = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """A string: ``bento:TAG`` for the BentoML store, else an MLflow model URI."""
        if isinstance(value, str):
            tag = value.strip().removeprefix(BENTO_PREFIX)
            return {"bento_model": tag} if value.strip().startswith(BENTO_PREFIX) else {"model_uri": value.strip()}
        return value

    @model_validator(mode="after")
    def _one(self) -> "ModelSource":
        if (self.model_uri is None) == (self.bento_model is None):
            raise ValueError("a model source is either model_uri (MLflow) or bento_model (BentoML store), not both "
                             "or neither")
        return self


def parse_models(text: str) -> dict[str, Any]:
    """``H33_MODELS``: a JSON object ``{name: source}`` or ``name=source,name=source``; a name given twice
    is an error (JSON would silently keep the last)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            models = json.loads(text, object_pairs_hook=lambda items: _unique(items, "H33_MODELS"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"H33_MODELS is not valid JSON: {exc}") from None
        if not models:
            raise ValueError("H33_MODELS names no model")
        return models
    items = []
    for entry in text.split(","):
        if entry.strip():
            name, sep, source = entry.strip().partition("=")
            if not sep or not source.strip():
                raise ValueError(f"H33_MODELS entries look like name=models:/mnist@prod or name=bento:tag, "
                                 f"got {entry.strip()!r}")
            items.append((name.strip(), source.strip()))
    return _unique(items, "H33_MODELS")


def _unique(items: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in items:
        if name in out:
            raise ValueError(f"{where} names {name!r} twice")
        out[name] = value
    return out


class ServeConfig(BaseModel):
    """All server settings; see the module docstring for the environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: Optional[str] = Field(default=None, description="MLflow model URI; wins over bento_model")
    bento_model: str = Field(default="h33-model", description="BentoML model tag or bentofile alias")
    models: dict[str, ModelSource] = Field(default_factory=dict, description="several models by name; "
                                           "replaces model_uri / bento_model")
    default_model: Optional[str] = Field(default=None, description="the model of the un-prefixed routes "
                                         "(default: the first of models)")
    key_store: Path = Path("h33-keystore")
    key_store_url: Optional[str] = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                                         description="shared key store on object storage; key_store is then a cache")
    key_revalidate_s: float = Field(default=5.0, ge=0)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    max_infer_bytes: int = Field(default=64 * MiB, ge=1024)
    max_key_bundle_bytes: int = Field(default=1 * GiB, ge=1024)
    max_weights_bytes: int = Field(default=4 * GiB, ge=1024, description="encrypted-weights upload limit")
    lane_wait_ms: float = Field(default=20.0, ge=0, description="run a partly filled group after this idle gap")
    lane_max_wait_ms: float = Field(default=200.0, ge=0, description="never hold a request longer than this")
    max_engines: int = Field(default=8, ge=1)
    max_keys_per_tenant: int = Field(default=8, ge=1)
    engine_cache_bytes: int = Field(default=2 * GiB, ge=0)
    body_timeout_s: float = Field(default=30.0, gt=0, description="time a body may take, plus size / body_min_rate")
    body_min_rate: int = Field(default=1 * MiB, ge=1, description="bytes/s a large body is given time for")
    max_concurrency: int = Field(default=128, ge=1, description="authenticated requests in flight per worker")
    max_tenant_concurrency: int = Field(default=32, ge=1, description="the same, per tenant")
    metrics_public: bool = True
    metrics_token_sha256: tuple[str, ...] = ()
    max_installed_keys: int = Field(default=16, ge=1, description="distinct keys installed per worker before its "
                                    "OpenFHE key state is flushed and reloaded lazily (bounds worker memory)")
    sandbox_processes: int = Field(default=2, ge=1, description="child processes validating untrusted ciphertexts")
    sandbox_timeout_s: float = Field(default=30.0, gt=0, description="limit for validating one request's ciphertexts")
    task_ttl_s: float = Field(default=3600.0, gt=0, description="how long a finished task's result is kept")
    max_tasks: int = Field(default=64, ge=1, description="tasks kept per worker (queued, running and finished)")
    max_tenant_tasks: int = Field(default=8, ge=1, description="unfinished tasks per tenant and worker")

    @field_validator("metrics_token_sha256", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        """Comma-separated in the environment; checked and normalized like the tenants' key hashes."""
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(TenantConfig(api_key_sha256=tuple(value)).api_key_sha256) if value else ()

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            # shorthand: {tenant: [sha256, ...]} or {tenant: "sha256"}
            value = {k: ({"api_key_sha256": [v]} if isinstance(v, str)
                         else {"api_key_sha256": list(v)} if isinstance(v, (list, tuple)) else v)
                     for k, v in value.items()}
            for name in value:
                if not TENANT_RE.match(str(name)):
                    raise ValueError(f"tenant name {name!r} must match {TENANT_RE.pattern}")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSource]) -> dict[str, ModelSource]:
        for name in value:
            if not MODEL_NAME_RE.match(name):
                raise ValueError(f"model name {name!r} must match {MODEL_NAME_RE.pattern} (it is a URL path "
                                 "segment and a key-store directory)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.models and (self.model_uri or "bento_model" in self.model_fields_set):
            raise ValueError("models (H33_MODELS) replaces model_uri / bento_model (H33_MODEL_URI, "
                             "H33_BENTO_MODEL): configure one or the other")
        if self.default_model is not None and self.default_model not in self.served_models():
            raise ValueError(f"default_model {self.default_model!r} is not a served model "
                             f"(served: {', '.join(self.served_models())})")
        if self.lane_max_wait_ms < self.lane_wait_ms:
            raise ValueError("lane_max_wait_ms must be at least lane_wait_ms")
        if self.max_tenant_tasks > self.max_tasks:
            raise ValueError("max_tenant_tasks must be at most max_tasks")
        if self.max_installed_keys < self.max_engines:
            raise ValueError("max_installed_keys must be at least max_engines (every cached engine's keys are installed)")
        return self

    # ------------------------------------------------------------------ models
    def served_models(self) -> dict[str, ModelSource]:
        """Every served model by name, in configuration order (one, ``SINGLE_MODEL_NAME``, without ``models``)."""
        if self.models:
            return dict(self.models)
        source = ModelSource(model_uri=self.model_uri) if self.model_uri else ModelSource(bento_model=self.bento_model)
        return {SINGLE_MODEL_NAME: source}

    @property
    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.served_models()))

    def key_store_for(self, name: str) -> tuple[Path, Optional[str]]:
        """Model ``name``'s key store: (local directory, S3 URL or None).

        A one-model service keeps its keys at the store's root, as before several models could be
        served; with ``models`` each has ``models/<name>/`` under the directory and the S3 prefix, so
        a key uploaded for one model is unknown to the others.
        """
        if not self.models:
            return self.key_store, self.key_store_url
        url = f"{self.key_store_url.rstrip('/')}/models/{name}" if self.key_store_url else None
        return self.key_store / "models" / name, url

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if env.get("H33_CONFIG"):
            data.update(_read_mapping(Path(env["H33_CONFIG"])))
        simple = {
            "H33_MODEL_URI": "model_uri",
            "H33_BENTO_MODEL": "bento_model",
            "H33_DEFAULT_MODEL": "default_model",
            "H33_KEY_STORE": "key_store",
            "H33_KEY_STORE_URL": "key_store_url",
            "H33_KEY_REVALIDATE_S": "key_revalidate_s",
            "H33_MAX_INFER_BYTES": "max_infer_bytes",
            "H33_MAX_KEY_BYTES": "max_key_bundle_bytes",
            "H33_MAX_WEIGHTS_BYTES": "max_weights_bytes",
            "H33_LANE_WAIT_MS": "lane_wait_ms",
            "H33_LANE_MAX_WAIT_MS": "lane_max_wait_ms",
            "H33_MAX_ENGINES": "max_engines",
            "H33_MAX_KEYS_PER_TENANT": "max_keys_per_tenant",
            "H33_ENGINE_CACHE_BYTES": "engine_cache_bytes",
            "H33_BODY_TIMEOUT_S": "body_timeout_s",
            "H33_BODY_MIN_RATE": "body_min_rate",
            "H33_MAX_CONCURRENCY": "max_concurrency",
            "H33_MAX_TENANT_CONCURRENCY": "max_tenant_concurrency",
            "H33_METRICS_PUBLIC": "metrics_public",
            "H33_METRICS_TOKEN_SHA256": "metrics_token_sha256",
            "H33_MAX_INSTALLED_KEYS": "max_installed_keys",
            "H33_SANDBOX_PROCESSES": "sandbox_processes",
            "H33_SANDBOX_TIMEOUT_S": "sandbox_timeout_s",
            "H33_TASK_TTL_S": "task_ttl_s",
            "H33_MAX_TASKS": "max_tasks",
            "H33_MAX_TENANT_TASKS": "max_tenant_tasks",
        }
        for var, field in simple.items():
            if env.get(var):
                data[field] = env[var]
        if env.get("H33_MODELS"):
            data["models"] = parse_models(env["H33_MODELS"])
        tenants: dict[str, list[str]] = {}

        def add(name: str, hashes: Any) -> None:
            if isinstance(hashes, Mapping):
                hashes = hashes.get("api_key_sha256", [])
            tenants.setdefault(str(name), []).extend([hashes] if isinstance(hashes, str) else list(hashes))

        for name, spec in dict(data.pop("tenants", {}) or {}).items():
            add(name, spec)
        if env.get("H33_API_KEYS_FILE"):
            spec = _read_mapping(Path(env["H33_API_KEYS_FILE"]))
            for name, hashes in dict(spec.get("tenants", spec)).items():
                add(name, hashes)
        if env.get("H33_API_KEYS"):
            for entry in env["H33_API_KEYS"].split(","):
                if entry.strip():
                    name, sep, digest = entry.strip().partition(":")
                    if not sep:
                        raise ValueError("H33_API_KEYS entries look like tenant:sha256hex")
                    add(name, digest)
        data["tenants"] = tenants
        return cls.model_validate(data)

    def public_limits(self) -> dict[str, float]:
        return {"max_infer_bytes": self.max_infer_bytes, "max_key_bundle_bytes": self.max_key_bundle_bytes,
                "max_weights_bytes": self.max_weights_bytes,
                "body_timeout_s": self.body_timeout_s, "body_min_rate": self.body_min_rate,
                "max_tenant_concurrency": self.max_tenant_concurrency, "task_ttl_s": self.task_ttl_s,
                "max_tenant_tasks": self.max_tenant_tasks}

    def body_seconds(self, size: int) -> float:
        """How long a body of ``size`` bytes may take to arrive."""
        return self.body_timeout_s + size / self.body_min_rate


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    return data


class Authenticator:
    """Maps ``Authorization: Bearer h33_pk_...`` to a tenant name, or None."""

    def __init__(self, tenants: Mapping[str, TenantConfig]) -> None:
        self._entries = [(bytes.fromhex(h), name) for name, cfg in tenants.items() for h in cfg.api_key_sha256]

    @property
    def tenants(self) -> set[str]:
        return {name for _, name in self._entries}

    def authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(API_KEY_PREFIX) or len(token) > 256:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for expected, name in self._entries:  # no early exit: the time does not depend on which entry matches
            if hmac.compare_digest(expected, digest):
                found = name
        return found


def main(argv: list[str] | None = None) -> None:
    """``python -m h33_bento.runners.config new-key TENANT``: print a new API key and its config line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m h33_bento.runners.config")
    sub = parser.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new-key", help="generate an API key for a tenant")
    new.add_argument("tenant")
    hsh = sub.add_parser("hash", help="print the sha256 to store for an existing API key")
    hsh.add_argument("api_key")
    args = parser.parse_args(argv)
    if args.cmd == "new-key":
        if not TENANT_RE.match(args.tenant):
            parser.error(f"tenant must match {TENANT_RE.pattern}")
        key = new_api_key()
        print(f"API key (give it to the tenant; it is not stored anywhere): {key}")
        print("add to the server's api-keys file:")
        print(f"tenants:\n  {args.tenant}:\n    - {hash_api_key(key)}")
    else:
        print(hash_api_key(args.api_key))


if __name__ == "__main__":
    main()
