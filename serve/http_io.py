"""What the REST doors share of HTTP: reading image bodies, the client's deadline and identity, the version header."""
from __future__ import annotations

from collections.abc import Hashable

from flask import Request, current_app
from werkzeug.exceptions import RequestEntityTooLarge

from serve.admission import TIMEOUT_HEADER, header_timeout_s
from serve.errors import InvalidRequestError, TooManyImagesError, UnsupportedMediaTypeError

# Bodies taken as raw image bytes; curl --data-binary sends form-urlencoded unless told otherwise.
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")
# On every prediction answer: "<version> <first 12 hex digits of the checkpoint's sha256>".
VERSION_HEADER = "X-Model-Version"


def client_timeout(req: Request) -> tuple[float | None, str]:
    """The client's deadline from X-Request-Timeout-Ms (seconds, None when absent) and how to name it.

    Raises: InvalidRequestError: not a positive number of milliseconds.
    """
    return header_timeout_s(req.headers), f"{req.headers.get(TIMEOUT_HEADER)} ms ({TIMEOUT_HEADER})"


def client_of(req: Request) -> Hashable:
    """The connection a request came on (peer address and port): admission holds refusals it resends at once."""
    return req.environ.get("REMOTE_ADDR"), req.environ.get("REMOTE_PORT")


def read_images(req: Request, limit: int) -> tuple[list[bytes], bool]:
    """Return the request's image payloads and whether it asked for a list answer (several files).

    Raises:
        InvalidRequestError: multipart without a file, or an empty body.
        TooManyImagesError: more files than `limit`.
        UnsupportedMediaTypeError: a body that can't be an image (JSON, text, ...).
    """
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        try:
            files = [f for key in req.files for f in req.files.getlist(key)]
        except RequestEntityTooLarge:
            if req.content_length is None or req.content_length > current_app.config["MAX_CONTENT_LENGTH"]:
                raise
            # Within the byte limit, so it was the part count (MAX_FORM_PARTS) that ran out. Read the
            # rest of the body, so the keep-alive connection is left at the next request's start.
            while req.input_stream.read(1 << 16):
                pass
            raise TooManyImagesError(f"more parts in the multipart body than {limit} images allow") from None
        if not files:
            raise InvalidRequestError("multipart request holds no file; send the image as a file field (-F image=@cat.jpg)")
        if len(files) > limit:
            raise TooManyImagesError(f"{len(files)} images in one request; the limit is {limit}")
        return [f.read() for f in files], len(files) > 1
    if mimetype.startswith("image/") or mimetype in RAW_TYPES:
        data = read_whole_body(req)
        if not data:
            raise InvalidRequestError("the request body is empty; send image bytes or multipart/form-data")
        return [data], False
    raise UnsupportedMediaTypeError(
        f"Content-Type '{mimetype}' is not supported; send image bytes (image/*, application/octet-stream) "
        "or multipart/form-data"
    )


def read_whole_body(req: Request) -> bytes:
    """The body, up to MAX_CONTENT_LENGTH.

    Raises:
        RequestEntityTooLarge: longer, also for a chunked body (no Content-Length), which werkzeug
            silently cuts at the limit.
    """
    data = req.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and req.content_length is None and len(data) >= limit and req.input_stream.read(1):
        raise RequestEntityTooLarge()
    return data
