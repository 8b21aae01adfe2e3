"""What an answer carries for its request's access-log line and metrics, beside its body and headers."""
from __future__ import annotations

from flask import Response


def note(response: Response, **values: object) -> Response:
    """Note values on the response: batch_size (a prediction's Answer.batch_size), error_code (the
    answer's error code, whatever its body's shape: V2's error bodies carry only a message)."""
    if not hasattr(response, "notes"):
        response.notes = {}
    response.notes.update(values)
    return response


def noted(response: Response) -> dict:
    """The values noted on the response."""
    return getattr(response, "notes", {})
