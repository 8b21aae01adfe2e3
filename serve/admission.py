"""Admission: whether a request may wait for its model, judged by time, not by a count.

Each worker measures, per model, what an image costs its inference thread: an EWMA of batch time /
batch size (batching included, so it is the cost under the load it sees). A request is admitted
only if the work queued ahead of it (images waiting or running, per model, times their cost) fits
the budget: the server's max_queue_wait_ms, or the client's own deadline when that is tighter. A
request that is refused gets 503 `overloaded` at once, with Retry-After from the predicted wait; one
whose deadline passes while its images wait gets 503 `timeout`, and its images are cancelled.

A client sets its deadline with the header `X-Request-Timeout-Ms: <ms>` (any route), or, on the V2
protocol, the request parameter `timeout` in microseconds (tritonclient's infer(timeout=...)).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass

from serve.errors import InvalidRequestError

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
EWMA_WEIGHT = 0.2  # the newest batch's share: about the last 5-10 batches count


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered (time.monotonic()), and who set it, for the error message."""

    at: float
    source: str

    @classmethod
    def after(cls, seconds: float, source: str) -> Deadline:
        return cls(time.monotonic() + seconds, source)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def tighter(self, seconds: float | None, source: str) -> Deadline:
        """This deadline, or one `seconds` from now if that comes first."""
        if seconds is None:
            return self
        other = Deadline.after(seconds, source)
        return other if other.at < self.at else self


def header_timeout_s(headers: Mapping[str, str]) -> float | None:
    """The client's deadline from X-Request-Timeout-Ms, in seconds; None when absent.

    Raises: InvalidRequestError: not a positive number of milliseconds.
    """
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got '{raw[:40]}'")
    return value / 1000


def v2_timeout_s(params: Mapping[str, object]) -> float | None:
    """The V2 request parameter `timeout` (microseconds, as tritonclient sends it), in seconds.

    Raises: InvalidRequestError: not a positive integer.
    """
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError(f"request parameter 'timeout' must be a positive integer (microseconds), got {value!r:.40}")
    return value / 1e6


class ServiceTime:
    """Per model: images queued (submitted, not answered) and the measured seconds one image costs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}
        self._cost_s: dict[str, float] = {}

    def seed(self, model: str, seconds: float) -> None:
        """A first estimate (a warm-up forward), replaced as batches are measured."""
        with self._lock:
            self._cost_s.setdefault(model, seconds)

    def observe(self, model: str, batch_size: int, seconds: float) -> None:
        per_image = seconds / max(1, batch_size)
        with self._lock:
            old = self._cost_s.get(model)
            self._cost_s[model] = per_image if old is None else EWMA_WEIGHT * per_image + (1 - EWMA_WEIGHT) * old

    def cost_s(self, model: str) -> float:
        with self._lock:
            return self._cost_s.get(model, 0.0)

    def track(self, model: str, futures: list[Future]) -> None:
        """Count the futures as queued for `model` until each is answered or cancelled."""
        with self._lock:
            self._queued[model] = self._queued.get(model, 0) + len(futures)
        for future in futures:
            future.add_done_callback(lambda _f: self._answered(model))

    def _answered(self, model: str) -> None:
        with self._lock:
            self._queued[model] -= 1

    def predicted_wait_s(self) -> float:
        """How long an image queued now would wait: the work ahead of it on the inference thread."""
        with self._lock:
            return sum(count * self._cost_s.get(model, 0.0) for model, count in self._queued.items())


def retry_after_s(wait_s: float) -> int:
    """Retry-After for a predicted wait: whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))


class Resends:
    """Clients that resend a refused request before the Retry-After they were given: each such refusal
    on the same connection (peer address and port) is held hold_s times the refusals in a row, 1 s at
    most, before it is answered. A first refusal, or one after the client waited as asked, is answered
    at once. Why: clients that resend at once (wrk's do) would otherwise have the workers spend their
    CPU refusing (docs/performance.md has the figures).
    """

    MAX_PEERS = 4096

    def __init__(self, hold_s: float):
        self.hold_s_each = hold_s
        self._lock = threading.Lock()
        self._peers: OrderedDict = OrderedDict()  # peer -> (refusals in a row, when answered, Retry-After)

    def hold_s(self, peer, retry_after_s: float) -> float:
        """Note a refusal for `peer`; how long to hold its answer."""
        if not self.hold_s_each or peer == (None, None):
            return 0.0
        now = time.monotonic()
        with self._lock:
            count, answered, asked = self._peers.pop(peer, (0, 0.0, 0.0))
            count = count + 1 if now - answered < asked else 0
            hold = min(1.0, self.hold_s_each * count)
            self._peers[peer] = (count, now + hold, retry_after_s)  # Retry-After counts from the answer
            while len(self._peers) > self.MAX_PEERS:
                self._peers.popitem(last=False)
        return hold
