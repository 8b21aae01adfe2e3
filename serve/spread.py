"""Connections spread evenly over gunicorn's workers: each takes a new connection only while it holds no
more than the workers' average, else leaves it to the others (its gthread worker class, and the counts
the workers share)."""
from __future__ import annotations

import multiprocessing
import time

from gunicorn.workers.gthread import ThreadWorker

# A worker that is not to take a pending connection leaves its listener unwatched this long, for the
# others to take it; one still waiting after GIVE_WAY_S is taken anyway (a peer that is slow to wake
# must not hold a client back).
RECHECK_S = 0.001
GIVE_WAY_S = 0.02


class ConnectionCounts:
    """Open connections per worker slot, and which slots are live, in memory shared by the master and
    the workers it forks. Each worker writes its own slot only; any worker reads them all."""

    def __init__(self, slots: int):
        context = multiprocessing.get_context("fork")
        self.slots = slots
        self._counts = context.RawArray("i", slots)
        self._live = context.RawArray("b", slots)

    def free_slot(self, taken: set[int]) -> int:
        """The lowest slot not in `taken` (the master's live workers'), for a worker about to fork."""
        return min(set(range(self.slots)) - taken, default=len(taken) % self.slots)

    def join(self, slot: int) -> None:
        self._counts[slot] = 0
        self._live[slot] = 1

    def leave(self, slot: int) -> None:
        """A worker has exited (the master's child_exit): its connections are gone, it takes no more."""
        self._live[slot] = 0
        self._counts[slot] = 0

    def set(self, slot: int, count: int) -> None:
        self._counts[slot] = count

    def my_turn(self, slot: int, count: int) -> bool:
        """Whether a worker holding `count` connections may take another: it holds no more than the live
        workers' average (one alone always may)."""
        live = sum(self._live) or 1
        total = sum(self._counts[i] for i in range(self.slots) if self._live[i])
        return count * live <= max(total, count)


class SpreadThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that takes new connections in turn with the others.

    Why: a keep-alive connection stays with the worker that accepted it, and the plain gthread worker
    accepts whatever it wakes up to first: 4 clients were seen held 4 to 0 and 16 held 10 to 6, so one
    worker's requests queued behind each other while the other's cores idled, which made the p99 of
    closed-loop clients (bench/tail.py). gunicorn_conf makes a subclass with the server's `counts`, and
    gives each worker its `slot` before the fork.
    """

    counts: ConnectionCounts
    slot: int = 0

    def init_process(self) -> None:
        self._gave_way = self._pending = False
        self._waiting_since: float | None = None  # since when a connection this worker gave way to is waiting
        super().init_process()  # loads the app, runs post_worker_init, then run()

    def run(self) -> None:
        # Live only once booted: a worker still warming up (a respawn) isn't counted with 0 connections,
        # which would make every peer give way to it.
        self.counts.join(self.slot)
        super().run()

    def accept(self, listener) -> None:
        self._pending = True
        if not self.counts.my_turn(self.slot, self.nr_conns):
            now = time.monotonic()
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < GIVE_WAY_S:
                self._gave_way = True
                return
        self._waiting_since = None
        super().accept(listener)
        self.counts.set(self.slot, self.nr_conns)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        self.counts.set(self.slot, self.nr_conns)
        if self._gave_way:
            # gthread's loop has watched the listener again by now: unwatch it for a moment (the loop
            # watches it again after), else the pending connection wakes this worker at once, again.
            self._gave_way = False
            self.set_accept_enabled(False)
            timeout = min(timeout, RECHECK_S)
        watching, self._pending = self._accepting, False
        super().wait_for_and_dispatch_events(timeout)
        if watching and not self._pending:  # the listener was watched and nothing was waiting on it
            self._waiting_since = None
        self.counts.set(self.slot, self.nr_conns)


def spread_worker(counts: ConnectionCounts) -> type[SpreadThreadWorker]:
    """The worker class for gunicorn's worker_class setting, sharing `counts`."""
    return type("SpreadThreadWorker", (SpreadThreadWorker,), {"counts": counts})
