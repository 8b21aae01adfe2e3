"""Per-request bookkeeping: the request id, one JSON access-log line and the request metrics."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from flask import Flask, Response, g, request

from serve.metrics import Metrics
from serve.response_notes import noted

log = logging.getLogger("serve.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
PREDICTION_ENDPOINTS = {"serve.predict", "v2.infer"}


class JsonFormatter(logging.Formatter):
    """Server logs as one JSON object a line (SERVE_LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


UNKNOWN_MODEL = "(unknown)"


def register_request_hooks(app: Flask, metrics: Metrics, default_model: str, models: frozenset[str]) -> None:
    """Give every request an id (X-Request-ID, accepted or generated, echoed), a log line and metrics.

    A model name the server doesn't serve is counted as "(unknown)": names come from the URL, and a
    label per name a client makes up would grow the metrics without bound.
    """

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex

    @app.after_request
    def _finish(response: Response) -> Response:
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        model = (request.view_args or {}).get("name")
        if request.endpoint in PREDICTION_ENDPOINTS:
            model = model or default_model
            metrics.observe_request(model if model in models else UNKNOWN_MODEL, response.status_code, elapsed)
        notes = noted(response)
        if response.status_code >= 400:
            metrics.errors.labels(notes.get("error_code") or f"http_{response.status_code}").inc()
        log.info(json.dumps({
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "model": model,
            "status": response.status_code,
            "latency_ms": round(elapsed * 1000, 2),
            "batch_size": notes.get("batch_size"),
            "bytes_in": request.content_length,
            "remote": request.remote_addr,
            "key": g.get("api_key_name"),  # the API key's name (serve/auth.py), never the key
        }))
        return response

