"""The wire: gunicorn's HTTP/1 response with its head and first body bytes in one send(), and an
error answer's unread request body drained after it is sent.

gunicorn sends the status line and headers, then the body, in two send() calls. A worker killed
between the two (SIGKILL, the OOM killer, a node going away) leaves an answer with a head and no
body; a proxy that has already passed the head on (nginx does, at once) can't retry it elsewhere,
so the client gets a broken response. In one send(), an answer that fits one write (every JSON
answer of this server) reaches the proxy whole or not at all, and not at all is retried on another
replica (the drill in bench/drill.py). It also saves a system call per request.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi
from werkzeug.wrappers import Response

DRAIN_CHUNK = 1 << 16


class OneWriteResponse(wsgi.Response):
    _head = b""
    _hold = True

    def send_headers(self) -> None:
        """Build the head and hold it for the first body write (or close)."""
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        self._head = util.to_bytestring("%s\r\n" % "".join(lines), "latin-1")
        self.headers_sent = True
        if not self._hold:
            self._flush_head()

    def _flush_head(self) -> None:
        head, self._head = self._head, b""
        if head:
            self.sock.sendall(head)

    def _emit_body(self, data: bytes) -> None:
        if self._head and not self.chunked:
            head, self._head = self._head, b""
            self.sock.sendall(head + data)
            return
        self._flush_head()
        util.write(self.sock, data, self.chunked)

    def sendfile(self, respiter) -> bool:
        self._hold = False  # sendfile writes to the socket itself, right after the head
        try:
            return super().sendfile(respiter)
        finally:
            self._hold = True

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        self._flush_head()  # a response without body bytes: HEAD, 204, 304, an empty body
        if self.chunked:
            util.write_chunk(self.sock, b"")


def install() -> None:
    """Make gunicorn's HTTP/1 workers answer with OneWriteResponse (wsgi.create's default class)."""
    wsgi.Response = OneWriteResponse


def drain_after(response: Response, environ: Mapping[str, Any], limit: int | None) -> None:
    """Keep a keep-alive connection usable after an answer given before the body was read (a shed
    request, a missing key): the body is read and dropped once the answer is sent, up to `limit`
    bytes. A body that may be longer (over the limit, or chunked) also gets `Connection: close`, and
    gunicorn closes gracefully. Without this, gunicorn drains only 64 KiB and closes; the
    client, still sending, gets a reset that can discard the answer before it reads it. A body
    already read costs nothing here."""
    stream = environ.get("wsgi.input")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if stream is None or (length <= 0 and not chunked):
        return
    if chunked or (limit is not None and length > limit):
        response.headers["Connection"] = "close"
    # A declared length over the limit is not read at all: the connection closes anyway.
    budget = (limit or 0) if chunked else (0 if limit is not None and length > limit else length)

    def drain() -> None:
        left = budget
        try:
            while left > 0 and (chunk := stream.read(min(DRAIN_CHUNK, left))):
                left -= len(chunk)
        except (OSError, ValueError):
            pass  # the client went away: nothing left to keep usable

    response.call_on_close(drain)
