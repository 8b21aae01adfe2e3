"""s3:// sources through boto3: AWS S3 or any S3-compatible store (s3_endpoint_url: MinIO, Ceph, R2).

Credentials: server.s3_access_key_id / s3_secret_access_key, else boto3's own chain (AWS_ACCESS_KEY_ID
and the other standard variables, ~/.aws, an instance or pod role). An object is found again in the
cache by its ETag (a HEAD per start) or, pinned by sha256, without asking S3 at all; a resumed
download asks for the same ETag (If-Match), so a replaced object is never spliced onto an old one.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve.errors import CheckpointError
from serve.extras import require
from serve.sources.address import Address
from serve.sources.cache import SourceCache, key_of, pinned, verified
from serve.sources.transfer import Opened, Transient, download, retried

CHUNK = 1 << 20
CACHED_AS = "the object as cached for its current ETag"
CREDENTIALS = ("the credentials come from server.s3_access_key_id / s3_secret_access_key (SERVE_S3_ACCESS_KEY_ID, "
               "SERVE_S3_SECRET_ACCESS_KEY), else the standard AWS variables, ~/.aws or the pod's role")


def client(settings) -> Any:
    """A boto3 S3 client for the settings' endpoint, region and credentials.

    Raises: ConfigError: boto3 is not installed (the 's3' extra).
    """
    require("boto3", "s3:// sources")
    import boto3
    from botocore.config import Config

    keys = {}
    if settings.s3_access_key_id:
        keys = {"aws_access_key_id": settings.s3_access_key_id, "aws_secret_access_key": settings.s3_secret_access_key}
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=30,
                    s3={"addressing_style": "path"} if settings.s3_endpoint_url else None)
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
        verify=str(settings.ca_file) if settings.ca_file else None, config=config, **keys)


def fetch(address: Address, sha256: str | None, cache: SourceCache, settings) -> Path:
    """The cached copy of the object, downloaded if the cache has no copy of its current ETag.

    Raises: CheckpointError: refused (credentials, permissions, no such object), offline and not
        cached, the download failed, or the object's sha256 is not the one pinned.
    """
    what = f"'{address}'"
    source = str(address)
    if sha256 is not None and (hit := cache.file(sha256, address.name)) is not None:
        return hit  # the pinned bytes are here: nothing to ask S3
    ref = cache.ref(source)
    if settings.offline:
        return cache.offline(ref, sha256, what, CACHED_AS)
    s3 = client(settings)
    head = retried(lambda: _call(lambda: s3.head_object(Bucket=address.authority, Key=address.path), what), what)
    etag, size = head.get("ETag", ""), int(head.get("ContentLength", 0))
    if (entry := cache.current(ref, etag)) is not None:
        return pinned(entry, ref["sha256"], sha256, what, CACHED_AS)
    cache.check_size(size, what)
    key = key_of(f"{source}\0{etag}")
    with cache.lock(key):
        ref = cache.ref(source)
        if (entry := cache.current(ref, etag)) is not None:
            return pinned(entry, ref["sha256"], sha256, what, CACHED_AS)
        part = cache.partial(key)
        download(lambda offset: _open_at(s3, address, offset, etag, size, what), part, what, cache.max_bytes)
        digest = verified(part, sha256, what)
        entry = cache.commit_file(part, digest, address.name)
        cache.write_ref(source, entry, etag, digest)
        return entry


def _open_at(s3: Any, address: Address, offset: int, etag: str, size: int, what: str) -> Opened:
    if offset >= size:
        return Opened(offset, size, iter(()))
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    answer = _call(lambda: s3.get_object(Bucket=address.authority, Key=address.path, IfMatch=etag, **extra), what)
    body = answer["Body"]
    return Opened(offset, size, _chunks(body), body.close)


def _chunks(body: Any) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError

    try:
        yield from body.iter_chunks(CHUNK)
    except BotoCoreError as exc:  # the stream was cut or timed out
        raise Transient(str(exc)) from None


def _call(call: Any, what: str) -> Any:
    """call() with botocore's errors as this package's: refusals permanent, throttling and 5xx transient."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return call()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error.get("Code", str(status))
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            raise Transient(f"S3 answered {code} (HTTP {status})") from None
        if status in (401, 403) or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise CheckpointError(f"{what}: S3 refused access ({code}, HTTP {status}): wrong credentials, or "
                                  f"they may not read this object; {CREDENTIALS}") from None
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            raise CheckpointError(f"{what}: no such object (S3 answered {code}, HTTP 404)") from None
        if status == 412 or code == "PreconditionFailed":
            raise CheckpointError(f"{what}: the object changed while it was downloaded; start again") from None
        raise CheckpointError(f"{what}: S3 answered {code} (HTTP {status}): {error.get('Message', '')}") from None
    except NoCredentialsError:
        raise CheckpointError(f"{what}: no S3 credentials found; {CREDENTIALS}") from None
    except BotoCoreError as exc:  # endpoint unreachable after botocore's own retries, timeouts
        raise Transient(str(exc)) from None
