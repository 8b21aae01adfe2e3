"""The error hierarchy and the one place that turns errors into JSON responses."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from serve.response_notes import note
from serve.wire import drain_after

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of every error the server raises on purpose; carries an HTTP status and a stable code."""

    status = 500
    code = "internal_error"
    headers: Mapping[str, str] = MappingProxyType({})  # sent with the error answer, whatever its shape

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(ServeError):
    """The configuration is invalid; raised at startup, the server refuses to boot."""

    code = "config_error"


class CheckpointError(ServeError):
    """A checkpoint can't be read or doesn't fit its model; raised at startup."""

    code = "checkpoint_error"


class DeviceError(ServeError):
    """The configured device does not exist on this machine; raised at startup."""

    code = "device_error"


class ExportError(ServeError):
    """A model could not be exported to, verified in or opened by ONNX Runtime; the message is the
    reason, and the server runs the model eagerly instead (or refuses an .onnx checkpoint)."""

    code = "export_error"


class ModelTooLargeError(ServeError):
    """A lazy model that alone holds more than model_memory_budget: it can't be served within it."""

    status = 507
    code = "model_too_large"


class InvalidRequestError(ServeError):
    status = 400
    code = "invalid_request"


class InvalidImageError(ServeError):
    status = 400
    code = "invalid_image"


class ImageTooLargeError(ServeError):
    status = 413
    code = "image_too_large"


class TooManyImagesError(ServeError):
    status = 413
    code = "too_many_images"


class UnsupportedMediaTypeError(ServeError):
    status = 415
    code = "unsupported_media_type"


class ReloadFailedError(ServeError):
    status = 409
    code = "reload_failed"


class ModelNotFoundError(ServeError):
    status = 404
    code = "model_not_found"


class UnauthorizedError(ServeError):
    """No API key, or one the server doesn't know; the answer carries a WWW-Authenticate challenge."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, challenge: str):
        super().__init__(message)
        self.headers = {"WWW-Authenticate": challenge}


class ForbiddenError(UnauthorizedError):
    """A valid API key without the scope the route needs."""

    status = 403
    code = "forbidden"


class NotReadyError(ServeError):
    status = 503
    code = "not_ready"


class OverloadedError(ServeError):
    """The request would wait longer than the server's budget (or its own deadline), or the queue holds
    max_queue images: answered at once, with Retry-After (the predicted wait, whole seconds, at least 1)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, holdable: bool = False):
        """holdable: refused for the server's own limits (not the client's deadline), so a client that
        resends at once may be held (serve/admission.py, Resends)."""
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))
        self.holdable = holdable


class BatchTimeoutError(ServeError):
    """The request's deadline (request_timeout_s, or the client's own) passed before its answer."""

    status = 503
    code = "timeout"


class VersionConflictError(ServeError):
    """A lifecycle call that contradicts the served state: a version that exists already, unloading the default."""

    status = 409
    code = "version_conflict"


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return note(response, error_code=code)


def http_error_code(exc: HTTPException) -> str:
    return (exc.name or "http_error").lower().replace(" ", "_")


def finish_serve_error(exc: ServeError, response: Response) -> Response:
    """What every ServeError answer shares, whatever its body's shape: its code noted, a log line for
    real server faults, the error's own headers (WWW-Authenticate), Retry-After on 503s (overload,
    timeouts, not ready)."""
    note(response, error_code=exc.code)
    drain_after(response, request.environ, current_app.config.get("MAX_CONTENT_LENGTH"))
    response.headers.update(exc.headers)
    if exc.status >= 500 and exc.status != 503:
        log.error("%s: %s", exc.code, exc.message)
    if exc.status == 503:
        response.headers["Retry-After"] = str(getattr(exc, "retry_after_s", 1))  # OverloadedError's: its predicted wait
    return response


def finish_http_error(exc: HTTPException, response: Response) -> Response:
    """What every HTTPException answer shares: its code noted, Allow on a 405."""
    note(response, error_code=http_error_code(exc))
    drain_after(response, request.environ, current_app.config.get("MAX_CONTENT_LENGTH"))
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def register_error_handlers(app: Flask) -> None:
    """Map every exception a request can raise to one JSON shape."""

    @app.errorhandler(ServeError)
    def _serve_error(exc: ServeError):
        return finish_serve_error(exc, error_response(exc.status, exc.code, exc.message))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return finish_http_error(exc, error_response(exc.code or 500, http_error_code(exc), exc.description or exc.name))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
