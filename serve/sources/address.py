"""A remote checkpoint source parsed: s3://bucket/key, hf://org/repo[@revision][/path], https://host/path."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from serve.errors import ConfigError

SCHEMES = ("s3", "hf", "https")
FORMS = "s3://bucket/key, hf://org/repo[@revision][/path] or https://host/path (with sha256)"
LOCAL_SCHEMES = ("package",)  # resolved by serve/config.py, never fetched
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def is_remote(value: object) -> bool:
    """Whether a checkpoint string names a remote source (any scheme://, package:// excepted)."""
    if not isinstance(value, str):
        return False
    match = _SCHEME.match(value)
    return match is not None and match.group(1).lower() not in LOCAL_SCHEMES


@dataclass(frozen=True)
class Address:
    """Where a remote checkpoint is: scheme, authority (bucket, org/repo, host[:port]), path within it."""

    scheme: str
    authority: str
    path: str  # no leading '/'; "" for a whole hf repo
    revision: str | None = None  # hf only
    query: str = ""  # https only (a presigned URL); not part of what allowed_sources matches

    def __str__(self) -> str:
        """The source as shown in logs and errors: a query (a presigned URL's signature) is left out."""
        return self.url.split("?", 1)[0] + ("?..." if self.query else "")

    @property
    def url(self) -> str:
        """The source in full (https: the URL fetched, query included)."""
        revision = f"@{self.revision}" if self.revision else ""
        path = f"/{self.path}" if self.path else ""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.authority}{revision}{path}{query}"

    @property
    def is_folder(self) -> bool:
        """An hf:// source without a path: the repo's model folder."""
        return self.scheme == "hf" and not self.path

    @property
    def name(self) -> str:
        """A safe file (or folder) name for the cache: the last path segment, suffix kept (formats key on it)."""
        last = self.path.rsplit("/", 1)[-1] if self.path else self.authority.rsplit("/", 1)[-1]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", last).lstrip(".")
        return safe or "checkpoint"


def parse_source(text: str) -> Address:
    """Parse a remote checkpoint string.

    Raises:
        ConfigError: an unknown scheme, or a malformed source (saying the expected form).
    """
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme not in SCHEMES:
        raise ConfigError(f"'{text[:200]}': scheme '{scheme}' is not a checkpoint source; expected {FORMS}")
    rest = text[match.end():]
    if scheme == "s3":
        return _parse_s3(text, rest)
    if scheme == "hf":
        return _parse_hf(text, rest)
    return _parse_https(text)


def _parse_s3(text: str, rest: str) -> Address:
    bucket, _, key = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or not key or key.endswith("/"):
        raise ConfigError(f"'{text[:200]}' is not s3://bucket/key (a bucket name, then the object's key)")
    return Address("s3", bucket, key)


def _parse_hf(text: str, rest: str) -> Address:
    parts = rest.split("/")
    if len(parts) < 2:
        raise ConfigError(f"'{text[:200]}' is not hf://org/repo[@revision][/path]")
    org, repo, inner = parts[0], parts[1], parts[2:]
    repo, _, revision = repo.partition("@")
    bad = (not _HF_NAME.fullmatch(org) or not _HF_NAME.fullmatch(repo)
           or (revision != "" and not _HF_REVISION.fullmatch(revision)) or ("@" in rest and not revision)
           or any(not segment or segment in (".", "..") for segment in inner))
    if bad:
        raise ConfigError(f"'{text[:200]}' is not hf://org/repo[@revision][/path] (revision: a commit, branch "
                          "or tag without '/'; path segments not empty, '.' or '..')")
    return Address("hf", f"{org}/{repo}", "/".join(inner), revision or None)


def _parse_https(text: str) -> Address:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"'{text[:200]}' is not an https URL: {exc}") from None
    host = (parts.hostname or "").lower()
    problem = (
        "credentials in the URL are not accepted" if parts.username is not None or parts.password is not None
        else "a fragment (#...) names no file" if parts.fragment
        else "no host" if not host
        else f"host '{host}' is not a DNS name or an IPv4 address" if not _HOST.fullmatch(host)
        else "no file path" if parts.path.strip("/") == ""
        else "'.' and '..' path segments are not accepted" if any(s in (".", "..") for s in parts.path.split("/"))
        else None
    )
    if problem:
        raise ConfigError(f"'{text[:200]}': {problem}; expected https://host[:port]/path")
    authority = host if port is None else f"{host}:{port}"
    return Address("https", authority, parts.path.lstrip("/"), query=parts.query)
