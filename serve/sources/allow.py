"""allowed_sources: the remote sources that may be fetched. Empty (the default) means none.

Each entry is a source prefix or a glob pattern in the source's own form:

    s3://models/                 everything in bucket 'models' ('s3://models' too; never 'models-x')
    s3://models/resnet/*.pth     '*' stays within one path segment, '**' crosses segments
    hf://my-org/*                any repo of my-org; hf://my-org/net@4f3c2a only that revision
    https://*.example.com/weights/

The scheme, then the authority (bucket, org/repo, host[:port]) and the path are matched each on its
own, so a pattern can't be stretched across them (https://*.example.com never matches
https://evil.com/?.example.com); a URL's query is not matched. A source is checked before any
connection is made.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from serve.errors import ConfigError
from serve.sources.address import Address

def check_allowed(address: Address, allowed: Sequence[str]) -> None:
    """Raises: ConfigError: no allowed_sources entry matches the source (naming the list)."""
    if any(_matches(address, _split(entry)) for entry in allowed):
        return
    listed = "empty: remote sources are off" if not allowed else f"allowed: {list(allowed)}"
    raise ConfigError(f"'{address}' is not in allowed_sources ({listed})")


def check_pattern(entry: str) -> str:
    """Raises: ValueError: the entry is not a source prefix or pattern of a known scheme."""
    if _split(entry) is None:
        raise ValueError(f"allowed_sources entry '{entry}' is not 's3://bucket[/prefix]', "
                         "'hf://org[/repo[@revision]][/path]' or 'https://host[:port][/prefix]' "
                         "(globs: * within a segment, ** across)")
    return entry


def _split(entry: str) -> tuple[str, str, str | None, str] | None:
    """(scheme, authority, revision, path) of an allowed_sources entry; None if it is malformed."""
    match = re.fullmatch(r"(s3|hf|https)://([^?#\s]+)", entry)
    if match is None:
        return None
    scheme, rest = match.groups()
    revision = None
    if scheme == "hf":
        org, _, rest = rest.partition("/")
        repo, _, path = rest.partition("/")
        repo, at, revision = repo.partition("@")
        if not org or "@" in org or (at and not repo) or (at and not revision):
            return None
        authority, revision = f"{org}/{repo or '*'}", revision or None
    else:
        authority, _, path = rest.partition("/")
        if not authority or "@" in authority:
            return None
        authority = authority.lower() if scheme == "https" else authority
    return scheme, authority, revision, path.strip("/") if not path.endswith("/") else path


def _matches(address: Address, entry: tuple[str, str, str | None, str] | None) -> bool:
    if entry is None or entry[0] != address.scheme:
        return False
    _, authority, revision, path = entry
    if not _glob(authority).fullmatch(address.authority):
        return False
    if revision is not None and revision != address.revision:
        return False
    if not path:
        return True
    if "*" in path or "?" in path:
        return _glob(path).fullmatch(address.path) is not None
    prefix = path.rstrip("/")
    return address.path == prefix or address.path.startswith(prefix + "/")


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """'**' matches anything, '*' anything but '/', '?' one character but '/'; the rest literally."""
    out = []
    for token in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
    return re.compile("".join(out))
