"""OneWriteResponse: gunicorn's response with the head and the body in one send()."""
from __future__ import annotations

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from serve.wire import OneWriteResponse


class RecordingSocket:
    def __init__(self):
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def respond(response_class, method: str, status: str, headers: list[tuple[str, str]], body: list[bytes],
            version: str = "1.1") -> list[bytes]:
    cfg = Config()
    request = f"{method} /predictions HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    req = next(iter(RequestParser(cfg, iter([request]), ("127.0.0.1", 1))))
    sock = RecordingSocket()
    resp, _ = wsgi.create(req, sock, ("127.0.0.1", 1), ("127.0.0.1", 2), cfg, response_class=response_class)
    resp.start_response(status, headers)
    for piece in body:
        resp.write(piece)
    resp.close()
    return sock.sends


JSON = [("Content-Type", "application/json"), ("Content-Length", "11")]


def without_date(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date:"))


def test_head_and_body_leave_in_one_send_and_match_gunicorns_bytes():
    ours = respond(OneWriteResponse, "POST", "200 OK", JSON, [b'{"ok":true}'])
    theirs = respond(wsgi.Response, "POST", "200 OK", JSON, [b'{"ok":true}'])
    assert len(ours) == 1 and len(theirs) == 2
    assert without_date(ours[0]) == without_date(b"".join(theirs))
    assert ours[0].startswith(b"HTTP/1.1 200 OK\r\n") and ours[0].endswith(b'\r\n\r\n{"ok":true}')


@pytest.mark.parametrize("method, status, headers, body", [
    ("HEAD", "200 OK", JSON, [b'{"ok":true}']),  # no body bytes may follow the head
    ("GET", "204 No Content", [], []),
    ("GET", "200 OK", [("Content-Length", "0")], [b""]),
])
def test_a_response_without_body_bytes_still_sends_its_head(method, status, headers, body):
    sends = respond(OneWriteResponse, method, status, headers, body)
    assert b"".join(sends).startswith(f"HTTP/1.1 {status}\r\n".encode()) and b"".join(sends).endswith(b"\r\n\r\n")


def test_a_chunked_body_is_framed_as_gunicorn_frames_it():
    pieces = [b"first", b"second"]
    ours = respond(OneWriteResponse, "GET", "200 OK", [("Content-Type", "text/plain")], pieces)
    theirs = respond(wsgi.Response, "GET", "200 OK", [("Content-Type", "text/plain")], pieces)
    assert b"Transfer-Encoding: chunked" in ours[0]
    assert b"".join(ours).split(b"\r\n\r\n", 1)[1] == b"".join(theirs).split(b"\r\n\r\n", 1)[1]
    assert b"".join(ours).endswith(b"0\r\n\r\n")
