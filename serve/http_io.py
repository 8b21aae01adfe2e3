"""What the REST doors share of HTTP: reading image bodies, the client's deadline and identity, the version
header, compact JSON answers and the {"error": message} shape KServe's V1 and V2 protocols answer errors in."""
from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from typing import Any

from flask import Blueprint, Request, Response, current_app
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serve.admission import TIMEOUT_HEADER, header_timeout_s
from serve.errors import (
    InvalidRequestError,
    ServeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
    finish_http_error,
    finish_serve_error,
)
from serve.response_notes import note

log = logging.getLogger(__name__)

# Bodies taken as raw image bytes; curl --data-binary sends form-urlencoded unless told otherwise.
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")
# On every prediction answer: "<version> <first 12 hex digits of the checkpoint's sha256>", and " int8"
# where precision int8 answered (docs/precision.md).
VERSION_HEADER = "X-Model-Version"


def compact_json(payload: Any, status: int = 200) -> Response:
    """A JSON answer without spaces (the V1 and V2 protocols' answers)."""
    return Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype="application/json")


def answer_errors_as_messages(blueprint: Blueprint) -> None:
    """Everything raised under the blueprint answers {"error": "message"} (KServe V1 and V2), with the
    headers, error code and log line every ServeError or HTTPException answer gets (serve/errors.py)."""

    @blueprint.errorhandler(ServeError)
    def _serve_error(exc: ServeError) -> Response:
        return finish_serve_error(exc, compact_json({"error": exc.message}, exc.status))

    @blueprint.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return finish_http_error(exc, compact_json({"error": exc.description or exc.name}, exc.code or 500))

    @blueprint.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return note(compact_json({"error": "internal server error"}, 500), error_code="internal_error")


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
