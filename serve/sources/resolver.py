"""A checkpoint string -> a local file or folder: a remote source checked (form, sha256 rule,
allowed_sources) before any connection, then fetched into the source cache (or found there)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve.errors import ConfigError
from serve.sources import hf, https, s3
from serve.sources.address import parse_source
from serve.sources.allow import check_allowed
from serve.sources.cache import SourceCache

log = logging.getLogger(__name__)

FETCHERS = {"https": https.fetch, "s3": s3.fetch, "hf": hf.fetch}


@dataclass(frozen=True)
class SourceSettings:
    """What fetching needs (serve/config.py's ServerSettings.sources builds it)."""

    cache_dir: Path
    allowed: tuple[str, ...] = ()
    max_bytes: int | None = None
    offline: bool = False
    ca_file: Path | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = field(default=None, repr=False)


class Resolver:
    """Remote sources to cached local paths, for one set of settings."""

    def __init__(self, settings: SourceSettings):
        self.settings = settings
        self.cache = SourceCache(settings.cache_dir, settings.max_bytes)

    def resolve(self, text: str, sha256: str | None = None) -> Path:
        """The local file (or model folder) holding the source's checkpoint.

        Raises:
            ConfigError: not a source's form, an https source without sha256, not in allowed_sources
                (nothing is connected to), boto3 missing for s3://.
            CheckpointError: offline and not cached, refused or failed download, a sha256 mismatch.
        """
        address = parse_source(text)
        if address.scheme == "https" and not sha256:
            raise ConfigError(f"'{address}': https sources must carry sha256 (the file's digest, e.g. from sha256sum)")
        check_allowed(address, self.settings.allowed)
        started = time.perf_counter()
        path = FETCHERS[address.scheme](address, sha256, self.cache, self.settings)
        log.info("checkpoint %s: %s (%.2fs)", address, path, time.perf_counter() - started)
        return path
