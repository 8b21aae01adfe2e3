"""Prometheus metrics: one Metrics per app, correct across gunicorn workers (prometheus_client multiprocess mode)."""
from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def multiprocess_dir() -> str | None:
    """Where worker processes write their values; gunicorn_conf sets it before prometheus_client loads."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's metrics. Values go to this app's own registry, or, under gunicorn, to the shared
    multiprocess directory that every scrape aggregates over all workers."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("serve_requests", "HTTP prediction requests", ["model", "status"], registry=r)
        self.request_seconds = Histogram("serve_request_duration_seconds", "Prediction request latency",
                                         ["model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("serve_batch_size", "Images per forward pass", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("serve_inference_duration_seconds", "Forward pass time per batch",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("serve_queue_depth", "Images waiting for the model, per worker",
                                 multiprocess_mode="livesum", registry=r)
        self.load_seconds = Gauge("serve_model_load_seconds", "Time to load a model's checkpoint", ["model"],
                                  multiprocess_mode="max", registry=r)
        self.errors = Counter("serve_errors", "Error responses by code", ["code"], registry=r)
        # Operations: what admission refused and why; each worker's control generation and failed switches.
        self.shed = Counter("serve_shed", "Requests refused or cancelled by admission (reason: predicted_wait, "
                            "queue_full, deadline)", ["model", "reason"], registry=r)
        self.control_generation = Gauge("serve_control_generation", "The management control file generation "
                                        "this worker has applied", multiprocess_mode="liveall", registry=r)
        self.lifecycle_failures = Counter("serve_lifecycle_failures", "Version changes this worker could not "
                                          "apply (it kept the previous versions)", ["model"], registry=r)
        # Many models: lazy models loaded on first use and evicted under model_memory_budget, per worker.
        self.models_loaded = Gauge("serve_models_loaded", "Models loaded in this worker (eager and lazy)",
                                   multiprocess_mode="liveall", registry=r)
        self.model_bytes = Gauge("serve_model_bytes", "Bytes a loaded lazy model holds in this worker (0 once "
                                 "evicted)", ["model"], multiprocess_mode="liveall", registry=r)
        self.lazy_loads = Counter("serve_lazy_loads", "Lazy model loads (first use, or after an eviction)",
                                  ["model"], registry=r)
        self.evictions = Counter("serve_evictions", "Lazy models evicted to stay within model_memory_budget",
                                 ["model"], registry=r)
        self.lazy_load_seconds = Histogram("serve_lazy_load_duration_seconds", "Time to load and warm a lazy model",
                                           ["model"], buckets=LOAD_BUCKETS, registry=r)

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        self.request_seconds.labels(model, str(status)).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float, pending: int) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_seconds.labels(model).observe(seconds)
        self.queue_depth.set(pending)

    def render(self) -> tuple[bytes, str]:
        """The exposition text: every worker's values when running under gunicorn, else this app's."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)
