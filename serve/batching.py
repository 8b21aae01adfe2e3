"""Batcher: one thread per process that runs every model's batches (and loads), fed by a queue of Futures."""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

_STOP = object()
_CALL = "__call__"


@dataclass(frozen=True, eq=False)
class Lane:
    """One model's batch function and its batching limits."""

    fn: Callable[[list[Any]], Sequence[Any]]
    max_batch_size: int = 4
    max_delay_s: float = 0.0


def make_lane(fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 4, max_delay_ms: float = 0.0) -> Lane:
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    return Lane(fn, max_batch_size, max_delay_ms / 1000.0)


class Batcher:
    """Gathers submitted items into per-lane batches and runs them, one at a time, on a single thread.

    A batch starts as soon as one item is queued and waits at most its lane's delay for more (0 takes
    only what is already queued), up to max_batch_size. Every piece of torch work in the process runs
    on this thread (but lazy models' loads, on a loader thread where torch has one thread and so no
    team of its own): GNU OpenMP keeps one thread team per calling thread, and once several teams exist
    it stops spin-waiting, which makes every forward slower (docs/performance.md). The thread is restarted in a
    forked child (threads don't survive fork), so a Batcher made before gunicorn forks serves in
    every worker.
    """

    def __init__(self, name: str = "batcher"):
        self.name = name
        self.lanes: dict[str, Lane] = {}
        self._stopped = False
        self._start()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (b := ref()) is not None and b._restart_after_fork())

    @property
    def pending(self) -> int:
        """Items submitted and not yet answered (queued, held or in the running batch)."""
        with self._pending_lock:
            return self._pending

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _done(self, _future: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _start(self) -> None:
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: dict[Lane, collections.deque] = collections.defaultdict(collections.deque)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _restart_after_fork(self) -> None:
        if not self._stopped:
            self._start()

    def add_lane(self, key: str, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 4,
                 max_delay_ms: float = 0.0) -> None:
        self.lanes[key] = make_lane(fn, max_batch_size, max_delay_ms)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on the batcher's thread, between batches."""
        return self._put(_CALL, [(fn, args)])[0]

    def submit(self, key: str, item: Any) -> Future:
        return self.submit_many(key, [item])[0]

    def submit_many(self, key: str | Lane, items: Sequence[Any]) -> list[Future]:
        """Queue items for a lane (its key, or the Lane itself), in order; each Future gets its own
        result, or its batch's exception. Queued items keep their Lane: they run on it even if the
        key is given to another lane meanwhile (a model version replaced while requests wait)."""
        if isinstance(key, Lane):
            return self._put(key, items)
        if key not in self.lanes:
            raise KeyError(f"{self.name} has no lane '{key}'")
        return self._put(self.lanes[key], items)

    def _put(self, key: Lane | str, items: Sequence[Any]) -> list[Future]:
        if self._stopped:
            raise RuntimeError(f"{self.name} is stopped")
        futures = []
        with self._pending_lock:
            self._pending += len(items)
        for item in items:
            future: Future = Future()
            future.add_done_callback(self._done)
            self._queue.put((key, item, future))
            futures.append(future)
        return futures

    def stop(self, timeout: float | None = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while True:
            first = self._next_held()
            if first is None:
                if stopping:
                    return
                first = self._queue.get()
                if first is _STOP:
                    stopping = True
                    continue
            lane, item, future = first
            if lane is _CALL:
                self._execute(lambda calls: [fn(*args) for fn, args in calls], [(item, future)])
                continue
            batch, saw_stop = self._gather(lane, [(item, future)])
            stopping = stopping or saw_stop
            self._execute(lane.fn, batch)

    def _next_held(self):
        for lane, held in list(self._held.items()):
            if held:
                return (lane, *held.popleft())
            del self._held[lane]  # a replaced lane's entry goes once empty
        return None

    def _gather(self, lane: Lane, batch: list) -> tuple[list, bool]:
        held = self._held[lane]
        while held and len(batch) < lane.max_batch_size:
            batch.append(held.popleft())
        deadline = time.monotonic() + lane.max_delay_s
        while len(batch) < lane.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            other, item, future = entry
            if other is lane:
                batch.append((item, future))
            else:  # another lane's (or a call): it waits its turn, in order
                self._held[other].append((item, future))
        return batch, False

    def _execute(self, fn: Callable[[list[Any]], Sequence[Any]], batch: list) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(live)}")
        except BaseException as exc:  # every waiter must hear about the failure, whatever it is
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), result in zip(live, results):
            future.set_result(result)
