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
from serve.tracing import NO_TRACE, RequestTrace, Tracing

log = logging.getLogger("serve.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
PREDICTION_ENDPOINTS = {"serve.predict", "v2.infer", "v1.predict"}
# Probes, /metrics and the web page are never traced: they are polled, and say nothing of where time goes.
UNTRACED_ENDPOINTS = {"serve.ping", "serve.ready", "serve.metrics", "v2.server_live", "v2.server_ready"}
TRACE_KEY = "serve.trace"  # the request's RequestTrace, in its WSGI environ


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


def request_trace() -> RequestTrace:
    """The current request's trace (a door puts it on its Call); NO_TRACE when not traced."""
    return request.environ.get(TRACE_KEY, NO_TRACE)


def _start_trace(tracing: Tracing, request_id: str) -> None:
    endpoint = request.endpoint or ""
    if endpoint in UNTRACED_ENDPOINTS or endpoint.startswith("page."):
        return
    rule = request.url_rule.rule if request.url_rule is not None else None
    attributes = {"http.request.method": request.method, "url.path": request.path, "url.scheme": request.scheme,
                  "client.address": request.remote_addr or "", "serve.request_id": request_id,
                  "serve.protocol": "rest"}
    if rule is not None:
        attributes["http.route"] = rule
    if request.user_agent.string:
        attributes["user_agent.original"] = request.user_agent.string[:256]
    name = f"{request.method} {rule}" if rule is not None else request.method
    request.environ[TRACE_KEY] = tracing.request(name, request.headers, attributes)


def register_request_hooks(app: Flask, metrics: Metrics, default_model: str, models: frozenset[str],
                           tracing: Tracing | None = None) -> None:
    """Give every request an id (X-Request-ID, accepted or generated, echoed), a log line and metrics;
    with tracing on, a SERVER span (serve/tracing.py) whose ids the log line carries.

    A model name the server doesn't serve is counted as "(unknown)": names come from the URL, and a
    label per name a client makes up would grow the metrics without bound.
    """

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        if tracing is not None and tracing.enabled:
            _start_trace(tracing, g.request_id)

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
        trace = request_trace()
        if trace.recording:
            attributes = {"http.response.status_code": response.status_code}
            if notes.get("batch_size") is not None:
                attributes["serve.batch_size"] = notes["batch_size"]
            if notes.get("error_code"):
                attributes["serve.error_code"] = notes["error_code"]
            trace.finish(attributes, error=f"HTTP {response.status_code}" if response.status_code >= 500 else None)
        log.info(access_line(request_id, request.method, request.path, model, response.status_code, elapsed,
                             notes.get("batch_size"), request.content_length, request.remote_addr,
                             g.get("api_key_name"), "rest", trace))
        return response

    @app.teardown_request
    def _end_trace(exc: BaseException | None) -> None:
        trace = request.environ.get(TRACE_KEY)
        if trace is not None:  # ended in _finish; here only when no response was made
            trace.finish(error=type(exc).__name__ if exc is not None else None)



def access_line(request_id: str, method: str, path: str, model: str | None, status: int, elapsed_s: float,
                batch_size: int | None, bytes_in: int | None, remote: str | None, key: str | None,
                protocol: str, trace: RequestTrace = NO_TRACE) -> str:
    """One request's access-log line, whatever its door: JSON, one object a line. `status` is the HTTP
    status (gRPC: the one its status code maps from, serve/grpc_door.py); `key` the API key's name
    (serve/auth.py), never the key; `trace_id` and `span_id` only when the request's span records."""
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "request_id": request_id,
        "method": method,
        "path": path,
        "model": model,
        "status": status,
        "latency_ms": round(elapsed_s * 1000, 2),
        "batch_size": batch_size,
        "bytes_in": bytes_in,
        "remote": remote,
        "key": key,
        "protocol": protocol,
    }
    ids = trace.ids()
    if ids is not None:
        line["trace_id"], line["span_id"] = ids
    return json.dumps(line)
