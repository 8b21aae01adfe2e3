"""HTTP(S) requests for the source fetchers: TLS verified (system CAs or source_ca_file), redirects
followed (never from https to http; an Authorization header never sent to another host), a Range asked
for when resuming."""
from __future__ import annotations

import http.client
import json
import re
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from serve.errors import CheckpointError
from serve.sources.transfer import Opened, Transient

TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
CHUNK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The client's TLS context: the system's CAs, or only those in ca_file."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def request(method: str, url: str, what: str, context: ssl.SSLContext, headers: Mapping[str, str] | None = None,
            follow: bool = True, timeout: float = TIMEOUT_S) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send one request (following redirects); the connection and its response, whatever the status.

    Raises:
        CheckpointError: a certificate not trusted, a redirect to plain http or too many redirects.
        OSError, http.client.HTTPException: the connection failed (worth retrying).
    """
    headers = dict(headers or {})
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, headers=headers)
            response = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise CheckpointError(f"{what}: the TLS certificate of {parts.hostname} is not trusted "
                                  f"({exc.verify_message}); source_ca_file names the CA bundle to trust") from None
        except BaseException:
            conn.close()
            raise
        if not follow or response.status not in REDIRECTS or not response.getheader("Location"):
            return conn, response
        location = urljoin(url, response.getheader("Location"))
        response.read()
        conn.close()
        moved = urlsplit(location)
        if parts.scheme == "https" and moved.scheme != "https":
            raise CheckpointError(f"{what}: redirected from https to {location[:200]}; only https is followed")
        if moved.scheme not in ("http", "https"):
            raise CheckpointError(f"{what}: redirected to {location[:200]}")
        if (moved.hostname, moved.port) != (parts.hostname, parts.port):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = location
    raise CheckpointError(f"{what}: more than {MAX_REDIRECTS} redirects")


def refusal(what: str, response: http.client.HTTPResponse) -> BaseException:
    """The error for a status that isn't a success: 5xx, 408 and 429 are worth retrying, the rest not."""
    text = f"{what}: the server answered HTTP {response.status} {response.reason}"
    if response.status >= 500 or response.status in (408, 429):
        return Transient(text)
    hint = {401: " (no or wrong credentials)", 403: " (access refused: credentials or permissions)",
            404: " (no such file)"}.get(response.status, "")
    return CheckpointError(text + hint)


def open_at(url: str, offset: int, what: str, context: ssl.SSLContext,
            headers: Mapping[str, str] | None = None) -> Opened:
    """GET url from byte `offset` on (a Range request when offset > 0).

    Raises: CheckpointError (permanent), Transient, OSError.
    """
    sent = dict(headers or {})
    if offset:
        sent["Range"] = f"bytes={offset}-"
    conn, response = request("GET", url, what, context, sent)
    try:
        if response.status == 416 and offset:
            total = _content_range(response.getheader("Content-Range", ""))[1]
            response.read()
            if total == offset:  # the partial file is already whole
                conn.close()
                return Opened(offset, total, iter(()))
            raise Transient("the server can't resume this download", restart=True)
        if response.status == 206:
            start, total = _content_range(response.getheader("Content-Range", ""))
        elif response.status == 200:
            length = response.getheader("Content-Length")
            start, total = 0, int(length) if length and length.isdigit() else None
        else:
            raise refusal(what, response)
    except BaseException:
        conn.close()
        raise
    return Opened(start, total, _chunks(response), conn.close)


def get_json(url: str, what: str, context: ssl.SSLContext, headers: Mapping[str, str] | None = None,
             limit: int = 16 * 2**20) -> tuple[object, http.client.HTTPResponse]:
    """GET a JSON document (a few MB at most); the document and the response (for its headers).

    Raises: CheckpointError (permanent or not JSON), Transient, OSError.
    """
    conn, response = request("GET", url, what, context, headers)
    try:
        if response.status != 200:
            raise refusal(what, response)
        body = response.read(limit + 1)
    finally:
        conn.close()
    if len(body) > limit:
        raise CheckpointError(f"{what}: the answer is larger than {limit} bytes")
    try:
        return json.loads(body), response
    except ValueError as exc:
        raise CheckpointError(f"{what}: the answer is not JSON: {exc}") from None


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total size) of 'bytes 100-199/200' (or 'bytes */200')."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if match is None:
        raise Transient(f"unreadable Content-Range '{value[:80]}'", restart=True)
    return int(match.group(1) or 0), None if match.group(2) == "*" else int(match.group(2))


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read(CHUNK):
        yield chunk
