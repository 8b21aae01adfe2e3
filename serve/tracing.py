"""Tracing: OpenTelemetry spans of where a request's time goes (docs/operations.md#tracing); no-ops when off.

The doors start a request's SERVER span (`Tracing.request`, the W3C traceparent / tracestate continued)
and end it (`RequestTrace.finish`); the service and the scheduler time its stages through the
protocol-free `RequestTrace` the door puts on the Call:

    POST /predictions/<name>     SERVER: the door's, from the request to its answer
      read                       the body read and parsed (the door's read callback)
      decode                     decode + the task's prepare, every image of the request
      queue                      queued until its first batch starts: the admission's predicted wait,
                                 any shed reason, a link to the forward span
      forward                    one span per batch (on the inference thread): model, version, runtime,
                                 batch size; a child of the first request it served, linked to each
      postprocess                the task's outputs made results (task.finish, V2 tensors)
      encode                     from the results to the answer's bytes

With tracing off (the default) every door gets NO_TRACE, whose methods do nothing, and no OpenTelemetry
module is imported. With it on, the tracer provider and its batch span processor (a thread: not
fork-safe) are made in each serving process after gunicorn's fork (post_worker_init, or a process's first
request outside gunicorn) and flushed when the worker exits.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from serve.config import ServerSettings
from serve.extras import require

log = logging.getLogger(__name__)
SHUTDOWN_S = 5.0  # the longest a stopping process waits for its last spans to be exported


class _NoStage:
    """A stage that times nothing (tracing off)."""

    __slots__ = ()

    def __enter__(self) -> _NoStage:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def set(self, **attributes: Any) -> None:
        pass


_NO_STAGE = _NoStage()


class RequestTrace:
    """One request's spans, as the service and scheduler see them. This base records nothing: it is
    what a door passes when tracing is off, or when the request is not sampled."""

    recording = False

    def serving(self, model: str, version: str, runtime: str) -> None:
        """The model version that answers (once looked up)."""

    def stage(self, name: str, **attributes: Any) -> _NoStage:
        """A context manager timing one stage of the request as a child span."""
        return _NO_STAGE

    def admitted(self, predicted_wait_s: float) -> None:
        """What admission predicted the wait would be."""

    def shed(self, reason: str) -> None:
        """The request was refused: queue_full, predicted_wait or deadline."""

    def queue(self) -> QueueTicket | None:
        """The queue-wait span of the images about to be queued; None: nothing to carry."""
        return None

    def ids(self) -> tuple[str, str] | None:
        """The SERVER span's trace id and span id in hex, for the access log; None when not recording."""
        return None

    def finish(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """End the request's span (the door's, once its answer is made): `error` marks it failed."""


NO_TRACE = RequestTrace()


class Traced:
    """One queued input with the ticket of the request it belongs to (tracing on only)."""

    __slots__ = ("item", "ticket")

    def __init__(self, item: Any, ticket: QueueTicket):
        self.item, self.ticket = item, ticket


class QueueTicket:
    """A request's queue-wait span, carried with its queued inputs to the inference thread: the batch
    that runs them notes when it started and its span; the request thread ends the span then."""

    __slots__ = ("trace", "span", "batch_started_ns", "batch_span", "batch_size", "shed_reason")

    def __init__(self, trace: _RecordingTrace, span: Any):
        self.trace, self.span = trace, span
        self.batch_started_ns: int | None = None
        self.batch_span: Any = None
        self.batch_size = 0
        self.shed_reason: str | None = None

    def wrap(self, inputs: Sequence[Any]) -> list[Traced]:
        return [Traced(item, self) for item in inputs]

    def ran(self, started_ns: int, batch_span: Any, size: int) -> None:
        """On the inference thread: a batch holding this request's inputs starts."""
        if self.batch_started_ns is None:
            self.batch_started_ns, self.batch_span = started_ns, batch_span
        self.batch_size = max(self.batch_size, size)

    def end(self) -> None:
        """On the request thread, its outputs in (or its deadline passed): end at its first batch's start."""
        span = self.span
        if self.batch_span is not None:
            span.add_link(self.batch_span.get_span_context(), {"serve.link": "forward"})
            span.set_attribute("serve.batch_size", self.batch_size)
        if self.shed_reason is not None:
            span.set_attribute("serve.shed_reason", self.shed_reason)
            span.set_status(self.trace.tracing.otel.ERROR, self.shed_reason)
        span.end(end_time=self.batch_started_ns)


def split_batch(inputs: list[Any]) -> tuple[list[Any], dict[QueueTicket, int]]:
    """A gathered batch's inputs without their tickets, and each traced request's ticket with how many
    of its inputs the batch holds."""
    tickets: dict[QueueTicket, int] = {}
    plain = inputs
    for index, entry in enumerate(inputs):
        if type(entry) is Traced:
            if plain is inputs:
                plain = list(inputs)
            plain[index] = entry.item
            tickets[entry.ticket] = tickets.get(entry.ticket, 0) + 1
    return plain, tickets


class _BatchSpan:
    """The forward span of one batch: a child of the first traced request's SERVER span, linked to
    every traced request it serves."""

    __slots__ = ("span", "otel")

    def __init__(self, tickets: dict[QueueTicket, int], size: int, lane: str):
        first = next(iter(tickets)).trace
        self.otel = first.tracing.otel
        started = time.time_ns()
        links = [self.otel.Link(t.trace.span.get_span_context(), {"serve.images": n}) for t, n in tickets.items()]
        self.span = first.tracing.tracer.start_span(
            "forward", context=first.context, links=links, start_time=started, attributes={
                "serve.model": first.model, "serve.version": first.version, "serve.runtime": first.runtime,
                "serve.batch_size": size, "serve.lane": lane, "serve.requests": len(tickets)})
        for ticket in tickets:
            ticket.ran(started, self.span, size)

    def __enter__(self) -> _BatchSpan:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None:
            self.span.set_status(self.otel.ERROR, f"{type(exc).__name__}: {exc}"[:200])
            self.span.set_attribute("error.type", type(exc).__name__)
        self.span.end()
        return False


def batch_span(tickets: dict[QueueTicket, int], size: int, lane: str) -> _BatchSpan | _NoStage:
    """A context manager around one batch's forward: its span when a traced request is in it."""
    return _BatchSpan(tickets, size, lane) if tickets else _NO_STAGE


class _StageSpan:
    __slots__ = ("trace", "name", "attributes", "span")

    def __init__(self, trace: _RecordingTrace, name: str, attributes: dict[str, Any]):
        self.trace, self.name, self.attributes = trace, name, attributes

    def __enter__(self) -> _StageSpan:
        self.span = self.trace.tracing.tracer.start_span(self.name, context=self.trace.context,
                                                         attributes=self.attributes)
        return self

    def set(self, **attributes: Any) -> None:
        self.span.set_attributes(attributes)

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None:
            self.span.set_status(self.trace.tracing.otel.ERROR, getattr(exc, "message", str(exc))[:200])
            self.span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
        ended = time.time_ns()
        self.span.end(end_time=ended)
        self.trace.last_stage = (self.name, ended)
        return False


class _RecordingTrace(RequestTrace):
    """A sampled request: its SERVER span and the stages under it."""

    recording = True

    def __init__(self, tracing: Tracing, span: Any):
        self.tracing, self.span = tracing, span
        self.context = tracing.otel.set_span_in_context(span)
        self.model = self.version = self.runtime = ""
        self.predicted_wait_s: float | None = None
        self.ticket: QueueTicket | None = None
        self.last_stage: tuple[str, int] | None = None
        self.ended = False

    def serving(self, model: str, version: str, runtime: str) -> None:
        self.model, self.version, self.runtime = model, version, runtime
        self.span.set_attributes({"serve.model": model, "serve.version": version})

    def stage(self, name: str, **attributes: Any) -> _StageSpan:
        return _StageSpan(self, name, attributes)

    def admitted(self, predicted_wait_s: float) -> None:
        self.predicted_wait_s = predicted_wait_s

    def _wait_attributes(self) -> dict[str, Any]:
        if self.predicted_wait_s is None:
            return {}
        return {"serve.predicted_wait_ms": round(self.predicted_wait_s * 1000, 3)}

    def shed(self, reason: str) -> None:
        self.span.set_attribute("serve.shed_reason", reason)
        if self.ticket is not None:  # queued: its span ends with the reason
            self.ticket.shed_reason = reason
            return
        # Refused by admission before queueing: a queue span of the admission alone, with the reason.
        span = self.tracing.tracer.start_span("queue", context=self.context, attributes={
            **self._wait_attributes(), "serve.shed_reason": reason})
        span.set_status(self.tracing.otel.ERROR, reason)
        span.end()

    def queue(self) -> QueueTicket:
        span = self.tracing.tracer.start_span("queue", context=self.context, attributes=self._wait_attributes())
        self.ticket = QueueTicket(self, span)
        return self.ticket

    def ids(self) -> tuple[str, str]:
        context = self.span.get_span_context()
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def finish(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        now = time.time_ns()
        if self.last_stage is not None and self.last_stage[0] == "postprocess":
            # The answer's encoding happens in the door, after the results: from them to now.
            span = self.tracing.tracer.start_span("encode", context=self.context, start_time=self.last_stage[1])
            span.end(end_time=now)
        if attributes:
            self.span.set_attributes(dict(attributes))
        if error is not None:
            self.span.set_status(self.tracing.otel.ERROR, error[:200])
        self.span.end(end_time=now)


class _Otel:
    """The OpenTelemetry names tracing uses, imported once tracing starts (never when it is off)."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.set_span_in_context = trace.set_span_in_context
        self.Link = Link
        self.SERVER = SpanKind.SERVER
        self.ERROR = StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()


def make_sampler(name: str, ratio: float) -> Any:
    """OTEL_TRACES_SAMPLER's sampler by its name (serve/config.py checked it), `ratio` its argument."""
    from opentelemetry.sdk.trace import sampling

    roots = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
             "traceidratio": sampling.TraceIdRatioBased(ratio)}
    if name.startswith("parentbased_"):
        return sampling.ParentBased(roots[name.removeprefix("parentbased_")])
    return roots[name]


class Tracing:
    """A process's tracer: off (the default) makes every request NO_TRACE; on, the provider is made in
    the process that serves (start) and flushed when it stops (shutdown)."""

    def __init__(self, settings: ServerSettings | None = None):
        """Raises: ConfigError: tracing is on and the `tracing` extra is not installed."""
        self.exporter_name = settings.tracing if settings is not None else "off"
        self.enabled = self.exporter_name != "off"
        self.settings = settings
        if self.enabled:
            require("opentelemetry.sdk", "tracing (OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT)")
            if self.exporter_name == "otlp":
                require("opentelemetry.exporter.otlp.proto.http", "tracing over OTLP/HTTP")
        self.otel: Any = None
        self.tracer: Any = None
        self._provider: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def start(self, exporter: Any = None) -> None:
        """Make this process's tracer provider and exporter, once per process (after gunicorn's fork:
        the batch span processor's thread would not survive one). `exporter`: a test's own (an
        in-memory exporter), its spans exported as each ends."""
        if not self.enabled and exporter is None:
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

            settings = self.settings or ServerSettings()
            provider = TracerProvider(
                sampler=make_sampler(settings.tracing_sampler, settings.tracing_sampler_arg),
                resource=Resource.create({"service.name": settings.tracing_service_name,
                                          "process.pid": os.getpid()}),
                shutdown_on_exit=False)  # shutdown() flushes: on worker_exit, or the service's close
            if exporter is not None:
                provider.add_span_processor(SimpleSpanProcessor(exporter))
            else:
                provider.add_span_processor(BatchSpanProcessor(self._exporter()))
            self.otel = _Otel()
            self.tracer = provider.get_tracer("serve.tracing")
            self._provider = provider
            self.enabled = True
            self._pid = os.getpid()

    def _exporter(self) -> Any:
        if self.exporter_name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout: the OTEL_EXPORTER_OTLP_* variables

    def request(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> RequestTrace:
        """Start a request's SERVER span, continuing the trace of its traceparent / tracestate."""
        if not self.enabled:
            return NO_TRACE
        if self._pid != os.getpid():
            self.start()  # outside gunicorn (or a worker's first request before post_worker_init)
        parent = self.otel.propagator.extract(carrier)
        span = self.tracer.start_span(name, context=parent, kind=self.otel.SERVER, attributes=attributes)
        if not span.is_recording():
            return NO_TRACE  # not sampled: a non-recording span needs no end
        return _RecordingTrace(self, span)

    def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Export what is left and stop the exporter (a worker's graceful stop), waiting timeout_s at
        most: a collector that doesn't answer would hold the exit through the exporter's retries (21 s
        measured against a closed port), past gunicorn's graceful_timeout_s."""
        with self._lock:
            provider = self._provider if self._pid == os.getpid() else None
            self._provider, self._pid = None, 0
            self.enabled = False
        if provider is None:
            return
        flushing = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        flushing.start()
        flushing.join(timeout_s)
        if flushing.is_alive():
            log.warning("tracing: spans not exported within %g s of stopping (is the collector up?); dropped", timeout_s)
