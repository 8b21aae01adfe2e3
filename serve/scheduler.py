"""Scheduler: when and how work runs on the process's inference thread (batching, admission, cores)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from serve.admission import Deadline, Resends, ServiceTime, retry_after_s
from serve.batching import Batcher, Lane, make_lane
from serve.config import ServerSettings
from serve.cores import CoreShare, HostLoad, available_cores
from serve.errors import BatchTimeoutError, OverloadedError
from serve.memory import PixelBudget
from serve.metrics import Metrics
from serve.tracing import NO_TRACE, RequestTrace, batch_span, split_batch

log = logging.getLogger(__name__)


def lower_priority(nice: int) -> None:
    """Lower the calling thread's priority by `nice` (from the process's own, at most 19), and so that of
    every thread it starts later (ONNX Runtime's intra-op pool, made with its session on the inference
    thread, or on the loader thread for a lazy model).

    Why: on busy cores the request threads then run before the forwards. A refusal's few
    milliseconds of work, or the decode that lets an admitted image join the next batch, no longer
    wait for a time slice behind a forward that takes tens (docs/performance.md, "Shed latency").
    Linux sets a nice value per thread; elsewhere it would be the whole process's, so it is left.
    """
    if sys.platform == "linux":
        try:
            base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's: the process's own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, base + nice))
        except OSError as exc:  # a seccomp profile that forbids it: serve at the same priority
            log.warning("inference thread priority not lowered (nice %d): %s", nice, exc)


@dataclass(frozen=True)
class Work:
    """What one lane runs: a model's batch function, and the rules for running it."""

    model: str
    forward: Callable[[list[Any]], list[Any]]  # a batch of inputs -> one output per input
    cpu: bool  # CPU batches take their share of the cores; a GPU's don't
    single_threaded: Callable[[int], bool]  # whether torch runs a batch of this size on one thread


@dataclass(frozen=True)
class Lanes:
    """A model version's two lanes: encoded images made uint8 tensors, and preprocessed float tensors
    (V2's FP32 input). Both batch up to max_batch_size, one image a queue entry."""

    images: Lane
    tensors: Lane


class Scheduler:
    """One inference thread (the Batcher) for every model of the process, and what decides whether and
    how a request's images run on it: admission by predicted wait, the hold for clients that resend
    refusals at once, the cores a CPU batch takes, the decode pixel budget, batch metrics."""

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None, cores: CoreShare | None = None):
        self.settings = settings
        self.metrics = metrics
        self.batcher = Batcher("inference")
        self.cores = cores  # None: a fixed torch_threads, so nothing to share
        self.pixels = PixelBudget(settings.max_image_pixels)  # one decode budget for every model
        self.service_time = ServiceTime()
        self.resends = Resends(settings.shed_hold_ms / 1000)
        self._last_end, self._backlog = 0.0, False  # the inference thread's last batch: when, and was work waiting
        self._loader: ThreadPoolExecutor | None = None
        self._loader_pid = 0

    @classmethod
    def for_settings(cls, settings: ServerSettings, metrics: Metrics | None = None) -> Scheduler:
        """With no fixed torch_threads, CPU batches share the cores the host's load leaves them; with
        one, the inference thread runs that many (torch's thread count is per thread: set it there)."""
        cores = None if settings.torch_threads else CoreShare(available_cores(), HostLoad())
        scheduler = cls(settings, metrics, cores)
        if settings.torch_threads:
            scheduler.call(torch.set_num_threads, settings.torch_threads)
        return scheduler

    # --- the inference thread -----------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the inference thread between batches (loading, warm-up); its result.
        The thread's time then is no batch's cost."""
        return self.batcher.call(self._between_batches, fn, args).result()

    def load_soon(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on this process's loader thread, beside the inference thread: a lazy model's
        load doesn't hold up the batches of those loaded. torch runs single-threaded there (thread
        counts are per thread), so no second OpenMP thread team is ever made (serve/batching.py)."""
        if self._loader_pid != os.getpid():  # made in the process that loads: threads don't survive fork
            self._loader = ThreadPoolExecutor(1, "loader", initializer=self._loader_thread)
            self._loader_pid = os.getpid()
        return self._loader.submit(fn, *args)

    def _loader_thread(self) -> None:
        """The loader thread's set-up: torch on one thread, and the inference thread's priority (the ONNX
        Runtime sessions a lazy model's warm-up makes here start their threads at it)."""
        torch.set_num_threads(1)
        if self.settings.inference_nice:
            lower_priority(self.settings.inference_nice)

    def _between_batches(self, fn: Callable[..., Any], args: tuple) -> Any:
        self._backlog = False
        return fn(*args)

    def lanes(self, work: Work, float_forward: Callable[[list[Any]], list[Any]], max_batch_size: int,
              max_delay_ms: float) -> Lanes:
        """The lanes of one model version: `work` for uint8 images, `float_forward` for float tensors."""
        tensors = Work(work.model, float_forward, work.cpu, work.single_threaded)
        return Lanes(make_lane(partial(self._run_lane, work), max_batch_size, max_delay_ms),
                     make_lane(partial(self._run_lane, tensors, lane="tensors"), max_batch_size, max_delay_ms))

    def _run_lane(self, work: Work, inputs: list[Any], lane: str = "images") -> list[tuple[Any, int]]:
        """A gathered batch, on the inference thread; each output carries the batch's size back. Inputs
        of traced requests come with their tickets (serve/tracing.py): the batch's forward span."""
        inputs, tickets = split_batch(inputs)
        started = time.perf_counter()
        with batch_span(tickets, len(inputs), lane):
            if self.cores is not None and work.cpu:
                with self.cores.share(single=work.single_threaded(len(inputs))):
                    outputs = work.forward(inputs)
            else:
                outputs = work.forward(inputs)
        ended = time.perf_counter()
        waiting = self.batcher.pending - len(inputs)  # this batch's futures are not resolved yet
        # Its cost on the thread's timeline: from the previous batch's end when work was waiting then
        # (gathering, answering, the CPU taken by request threads count too), else from its start.
        self.service_time.observe(work.model, len(inputs), ended - (self._last_end if self._backlog else started))
        self._last_end, self._backlog = ended, waiting > 0
        if self.metrics is not None:
            self.metrics.observe_batch(work.model, len(inputs), ended - started, waiting)
        return [(output, len(inputs)) for output in outputs]

    # --- a request's images -------------------------------------------------------------------------

    def deadline(self, client_s: float | None = None, source: str = "the request's deadline") -> Deadline:
        """A request's deadline from now: request_timeout_s, or the client's own if sooner."""
        timeout = self.settings.request_timeout_s
        return Deadline.after(timeout, f"{timeout:g}s (request_timeout_s)").tighter(client_s, source)

    def admit(self, model: str, count: int, deadline: Deadline, client: Hashable | None = None,
              trace: RequestTrace = NO_TRACE) -> None:
        """Refuse work that can't start in time: checked before a request's body is read, and again
        when its images are queued. A refusal for the server's own limits, to a client that comes back
        before the Retry-After it was given, is held first (Resends): it sleeps this thread only.

        Raises:
            OverloadedError: the predicted wait is over max_queue_wait_ms (or the client's deadline),
                or max_queue images are already waiting.
        """
        try:
            self._admit(model, count, deadline, trace)
        except OverloadedError as exc:
            if exc.holdable and client is not None:
                hold_s = self.resends.hold_s(client, exc.retry_after_s)
                if hold_s:
                    time.sleep(hold_s)
            raise

    def _admit(self, model: str, count: int, deadline: Deadline, trace: RequestTrace) -> None:
        wait = self.service_time.predicted_wait_s()
        trace.admitted(wait)
        pending, limit = self.batcher.pending, self.settings.max_queue
        if pending + count > limit:
            self._shed(model, "queue_full", trace)
            raise OverloadedError(f"server busy: {pending} images waiting (limit {limit}); retry shortly",
                                  retry_after_s(wait), holdable=True)
        budget = self.settings.max_queue_wait_ms / 1000
        why = f"max_queue_wait_ms ({self.settings.max_queue_wait_ms:g})"
        client = deadline.remaining() < budget
        if client:
            budget, why = deadline.remaining(), deadline.source
        if wait > budget:
            self._shed(model, "predicted_wait", trace)
            raise OverloadedError(f"server busy: model '{model}' would wait about {wait * 1000:.0f} ms, over "
                                  f"{why}; retry later", retry_after_s(wait), holdable=not client)

    def run(self, model: str, lane: Lane, inputs: list[Any], deadline: Deadline,
            client: Hashable | None = None, trace: RequestTrace = NO_TRACE) -> tuple[list[Any], int]:
        """Admit the inputs, queue them on the lane and wait for their outputs (one each, in order) and
        the largest batch they ran in. A traced request's inputs carry its queue span's ticket.

        Raises:
            OverloadedError: see admit.
            BatchTimeoutError: no answer before the deadline; the inputs still queued are cancelled.
        """
        self.admit(model, len(inputs), deadline, client, trace)
        ticket = trace.queue()
        futures = self.batcher.submit_many(lane, inputs if ticket is None else ticket.wrap(inputs))
        self.service_time.track(model, futures)
        try:
            results = self._wait(futures, model, deadline, trace)
        finally:
            if ticket is not None:
                ticket.end()
        return [output for output, _ in results], max(size for _, size in results)

    def _wait(self, futures: list[Future], model: str, deadline: Deadline, trace: RequestTrace = NO_TRACE) -> list:
        try:
            return [future.result(timeout=max(0.0, deadline.remaining())) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()  # the batcher skips them
            self._shed(model, "deadline", trace)
            raise BatchTimeoutError(f"model '{model}' did not answer within {deadline.source}; try again") from None

    def _shed(self, model: str, reason: str, trace: RequestTrace = NO_TRACE) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(model, reason).inc()
        trace.shed(reason)

    # --- the process ----------------------------------------------------------------------------

    def seed(self, model: str, seconds: float) -> None:
        """A model's first per-image cost for admission, replaced as its batches are measured."""
        self.service_time.seed(model, seconds)

    def start(self, server_pid: int | None = None) -> None:
        """In a serving process (a gunicorn worker, whose inference thread was started anew after the
        fork), before its runtimes start: the inference thread's priority (inference_nice), its fixed
        thread count, or follow the host's load, less the server's own."""
        if self.settings.inference_nice:
            self.call(lower_priority, self.settings.inference_nice)
        if self.settings.torch_threads:
            self.call(torch.set_num_threads, self.settings.torch_threads)
        if self.cores is not None:
            self.cores.start(root=server_pid)

    @property
    def closed(self) -> bool:
        return self.batcher.stopped

    def close(self) -> None:
        if self._loader is not None and self._loader_pid == os.getpid():
            self._loader.shutdown(wait=False, cancel_futures=True)
        self.batcher.stop()
        if self.cores is not None:
            self.cores.stop()
