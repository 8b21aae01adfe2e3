"""https:// sources: a file behind HTTPS, always pinned by its sha256 (the cache key), resumed with Range."""
from __future__ import annotations

from pathlib import Path

from serve.errors import CheckpointError
from serve.sources import web
from serve.sources.address import Address
from serve.sources.cache import SourceCache, verified
from serve.sources.transfer import download


def fetch(address: Address, sha256: str | None, cache: SourceCache, settings) -> Path:
    """The cached file whose bytes have `sha256`, downloaded from the URL if it isn't cached yet.

    Raises: CheckpointError: offline and not cached, the download failed, or its sha256 differs.
    """
    what = f"'{address}'"
    if sha256 is None:
        raise CheckpointError(f"{what}: https sources must carry sha256")
    sha256 = sha256.lower()
    hit = cache.file(sha256, address.name)
    if hit is not None:
        return hit
    if settings.offline:
        raise CheckpointError(f"{what}: offline, and its sha256 {sha256[:12]}... is not in the source cache {cache.root}")
    context = web.tls_context(settings.ca_file)
    with cache.lock(sha256):
        hit = cache.file(sha256, address.name)  # another process fetched it while this one waited
        if hit is not None:
            return hit
        part = cache.partial(sha256)
        download(lambda offset: web.open_at(address.url, offset, what, context), part, what, cache.max_bytes)
        verified(part, sha256, what)
        return cache.commit_file(part, sha256, address.name)
