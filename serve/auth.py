"""API keys: the scope each route needs, the keys that hold scopes, and the check before every request.

Off unless configured. The keys are a YAML (or JSON) mapping of key name -> entry:

    web-page:
      key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  # printf %s "$KEY" | sha256sum
      scopes: [inference]
    ops:
      key: "…"                                 # the key itself, 16+ printable ASCII characters
      scopes: [inference, management, metrics]

read from the file `api_keys_file` (SERVE_API_KEYS_FILE), re-read when it changes (a stat per
request; a file that no longer parses keeps the keys read before and logs why), or from the text
SERVE_API_KEYS, fixed until restart. Only sha256 digests are kept in memory and they are compared in
constant time. A request sends its key as `Authorization: Bearer <key>` or `X-API-Key: <key>`;
without a known key it gets 401, with a key that lacks the route's scope 403, each with a
WWW-Authenticate challenge, in the error shape of the route's API (serve/errors.py, serve/v2.py).
Neither keys nor digests reach a log line or an error message; the access log names the key.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml
from flask import Flask, Request, g, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.config import ServerSettings
from serve.errors import ConfigError, ForbiddenError, UnauthorizedError

log = logging.getLogger(__name__)

SCOPES = ("inference", "management", "metrics")
REALM = "torch-serve"
OPEN = None  # a route anyone may call
ANY_KEY = "any key"  # no route matched (404, 405): any valid key may learn that
# Which scope each route needs: an endpoint's own entry, else its blueprint's. A route in neither
# needs DEFAULT_SCOPE, the strictest, so a route added without a decision here is closed, not open.
ROUTE_SCOPES: Mapping[str, str | None] = MappingProxyType({
    # probes and the page shell: the page's own API calls are checked on their routes
    "serve.ping": OPEN,
    "serve.ready": OPEN,
    "v2.server_live": OPEN,
    "v2.server_ready": OPEN,
    "page": OPEN,
    "serve.metrics": "metrics",
    "serve.predict": "inference",
    "serve.list_models": "inference",
    "serve.describe_model": "inference",
    "serve.openapi": "inference",
    "v2": "inference",  # infer, server and model metadata, model readiness, unknown /v2 paths
    "v1": "inference",  # KServe V1: model list and readiness, predict, explain
    "management": "management",  # reload, and whatever the management blueprint serves later
    # gRPC (serve/grpc_door.py): "grpc.<method>" of inference.GRPCInferenceService; the gRPC health
    # service (grpc.health.v1) is not checked at all, as the HTTP probes aren't.
    "grpc.ServerLive": OPEN,
    "grpc.ServerReady": OPEN,
    "grpc": "inference",  # model metadata and readiness, inference, streaming, the repository index
})
DEFAULT_SCOPE = "management"
NO_KEY_MESSAGE = "this route needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def required_scope(endpoint: str | None) -> str | None:
    """The scope a route needs: OPEN (None), ANY_KEY when no route matched, or a name from SCOPES."""
    if endpoint is None:
        return ANY_KEY
    if endpoint in ROUTE_SCOPES:
        return ROUTE_SCOPES[endpoint]
    blueprint = endpoint.rpartition(".")[0]
    return ROUTE_SCOPES.get(blueprint, DEFAULT_SCOPE) if blueprint else DEFAULT_SCOPE


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes = field(repr=False)  # sha256 of the key


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str | None = Field(None, min_length=16, pattern=r"^[\x21-\x7e]+$")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: tuple[Literal["inference", "management", "metrics"], ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_key(self) -> _Entry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        return self


KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


def parse_keys(text: str, source: str) -> tuple[ApiKey, ...]:
    """Read a keys document (YAML or JSON). Messages name the source, the key name and the field,
    never a key's value.

    Raises:
        ConfigError: not YAML, not a mapping of names to entries, an invalid entry, no key at all,
            or one key under two names.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML or JSON{where}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source} must map key names to {{key or key_sha256, scopes}}; it holds no keys")
    keys = []
    for name, raw in data.items():
        if not isinstance(name, str) or not re.fullmatch(KEY_NAME, name):
            raise ConfigError(f"{source}: key names are 1-64 letters, digits and _ . @ - (got {str(name)[:64]!r})")
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"field '{'.'.join(str(p) for p in e['loc']) or '-'}': {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{source}: key '{name}': {problems}") from None
        digest = (bytes.fromhex(entry.key_sha256) if entry.key_sha256
                  else hashlib.sha256(entry.key.encode("ascii")).digest())
        keys.append(ApiKey(name, frozenset(entry.scopes), digest))
    by_digest: dict[bytes, str] = {}
    for key in keys:
        if key.digest in by_digest:
            raise ConfigError(f"{source}: keys '{by_digest[key.digest]}' and '{key.name}' are the same key")
        by_digest[key.digest] = key.name
    return tuple(keys)


Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """What changes when the file is rewritten or replaced (a Kubernetes Secret swaps a symlink);
    None when it can't be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    """Raises: ConfigError: the file can't be read or doesn't hold valid keys."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read API keys file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"API keys file {path} is not UTF-8 text") from None
    return parse_keys(text, f"API keys file {path}")


class ApiKeys:
    """The keys in force: fixed, or from a file read again whenever its signature changes."""

    def __init__(self, keys: tuple[ApiKey, ...], path: Path | None = None):
        self._keys = keys
        self._path = path
        self._signature = file_signature(path) if path is not None else None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ApiKeys | None:
        """The configured keys, or None when keys are off.

        Raises:
            ConfigError: the file or the text doesn't hold valid keys (the server must not start).
        """
        if server.api_keys is not None:
            return cls(parse_keys(server.api_keys.get_secret_value(), "SERVE_API_KEYS"))
        if server.api_keys_file is not None:
            path = Path(server.api_keys_file)
            signature = file_signature(path)
            keys = read_keys_file(path)
            store = cls(keys, path)
            store._signature = signature  # as read: a change since is picked up by the first request
            return store
        return None

    @property
    def names(self) -> list[str]:
        return [key.name for key in self._keys]

    def current(self) -> tuple[ApiKey, ...]:
        if self._path is not None and file_signature(self._path) != self._signature:
            self._reload()
        return self._keys

    def _reload(self) -> None:
        with self._lock:
            signature = file_signature(self._path)
            if signature == self._signature:
                return  # another thread got here first
            try:
                keys, error = read_keys_file(self._path), None
            except ConfigError as exc:
                keys, error = None, exc
            if file_signature(self._path) != signature:
                return  # rewritten while read: the next request reads it again
            self._signature = signature
            if error is not None:
                log.error("%s; keeping the %d keys read before (%s)", error.message, len(self._keys),
                          ", ".join(self.names))
                return
            self._keys = keys
            log.info("API keys reloaded from %s: %s", self._path, ", ".join(self.names))

    def identify(self, presented: str | None) -> ApiKey:
        """The key a request presented.

        Raises:
            UnauthorizedError: no key, or not one of the current keys.
        """
        if not presented:
            raise UnauthorizedError(NO_KEY_MESSAGE, challenge())
        digest = hashlib.sha256(presented.encode("latin-1", "replace")).digest()
        found = None
        for key in self.current():  # every digest compared: the time doesn't tell which one matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise UnauthorizedError("the API key is not valid", challenge(error="invalid_token"))
        return found


def challenge(error: str | None = None, scope: str | None = None) -> str:
    """A WWW-Authenticate value (RFC 6750)."""
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


def key_from(authorization: str | None, api_key: str | None) -> str | None:
    """The key in `Authorization: Bearer <key>`, else in `X-API-Key: <key>` (HTTP headers or gRPC metadata)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return (api_key or "").strip() or None


def presented_key(req: Request) -> str | None:
    """`Authorization: Bearer <key>`, else `X-API-Key: <key>`."""
    return key_from(req.headers.get("Authorization"), req.headers.get("X-API-Key"))


def check_key(keys: ApiKeys, endpoint: str | None, presented: str | None) -> ApiKey | None:
    """Check a presented key against the scope an endpoint needs (a route's, or "grpc.<method>"); the
    key, None for an open endpoint. Protocol-free: each door maps the errors to its own shape.

    Raises:
        UnauthorizedError: the endpoint needs a key and none valid was sent.
        ForbiddenError: the key lacks the endpoint's scope.
    """
    scope = required_scope(endpoint)
    if scope is OPEN:
        return None
    key = keys.identify(presented)
    if scope != ANY_KEY and scope not in key.scopes:
        raise ForbiddenError(f"the API key '{key.name}' lacks the '{scope}' scope this route needs",
                             challenge(error="insufficient_scope", scope=scope))
    return key


def authorize(keys: ApiKeys, req: Request) -> ApiKey | None:
    """Check a request against the scope its route needs; the key it used, None on an open route.

    Raises:
        UnauthorizedError: the route needs a key and none valid was sent.
        ForbiddenError: the key lacks the route's scope.
    """
    if required_scope(req.endpoint) is OPEN:
        return None  # the key isn't even looked at (a stale header on a probe is fine)
    return check_key(keys, req.endpoint, presented_key(req))


def register_auth(app: Flask, keys: ApiKeys | None) -> None:
    """Check every request's key before its view runs (after the request id is given, so a refused
    request is logged and counted like any other). Nothing is registered when keys are off."""
    if keys is None:
        return
    app.extensions["serve.api_keys"] = keys

    @app.before_request
    def _authorize() -> None:
        key = authorize(keys, request)
        g.api_key_name = key.name if key is not None else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def exposure_warning(server: ServerSettings, hosts: Iterable[str]) -> str | None:
    """What anyone who can reach a non-loopback address may do when keys are off; None otherwise."""
    exposed = sorted({h for h in hosts if not is_loopback(h)})
    if not exposed or server.api_keys_file is not None or server.api_keys is not None:
        return None
    what = ("run predictions (/predictions, /v2/models/<name>/infer, /v1/models/<name>:predict, gRPC), read model metadata (/models, /v2, "
            "/openapi.json) and /metrics")
    if server.enable_management:
        what += (", and load, switch, unload and reload models (POST /models/<name>/versions, /reload, ...: "
                 "enable_management is on)")
    return (f"listening on {', '.join(h or '*' for h in exposed)} without API keys: anyone who can reach it can "
            f"{what}. Set SERVE_API_KEYS_FILE (README, Security) to require keys.")
