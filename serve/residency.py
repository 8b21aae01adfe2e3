"""Residency: which lazy models a worker keeps loaded within model_memory_budget, least recently used out first."""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import torch

from serve.memory import trim

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """This process's anonymous resident memory (resident less file-backed pages: libraries a load pages
    in are shared, not the model's), from /proc/self/statm, once freed heap is handed back (so a load's
    temporary copies don't count in its size)."""
    trim()
    with open("/proc/self/statm") as statm:
        fields = statm.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(module: torch.nn.Module | None) -> int:
    """The bytes a module's parameters and buffers hold, each storage counted once."""
    if module is None:
        return 0
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class Residency:
    """Lazy models' loads, sizes, last uses and requests in flight, for one worker.

    A lazy model is loaded by the first request that needs it (requests that come meanwhile wait on
    the same load); after each load, the least recently used lazy models are evicted until those
    loaded fit `budget` bytes, skipping pinned ones and any with a request in flight. Eviction drops
    every reference the server holds and hands the freed heap back to the OS.
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.lock = threading.RLock()  # the table holds it around admit(), and a load may finish inside start_load()
        self.sizes: OrderedDict[str, int] = OrderedDict()  # loaded lazy models, least recently used first
        self.pinned: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.loading: dict[str, Future] = {}
        self.load_s: dict[str, float] = {}  # each model's last load time: the retry hint while it loads

    def enter(self, name: str) -> None:
        """A request starts using a model (call with `lock` held)."""
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        if name in self.sizes:
            self.sizes.move_to_end(name)

    def leave(self, name: str) -> None:
        with self.lock:
            self.in_flight[name] -= 1

    def start_load(self, name: str, submit: Callable[[], Future]) -> Future:
        """The model's load in progress, or a new one (`submit` queues it); call with `lock` held."""
        future = self.loading.get(name)
        if future is None:
            future = submit()
            self.loading[name] = future
            future.add_done_callback(lambda _f: self._loaded(name))
        return future

    def _loaded(self, name: str) -> None:
        with self.lock:
            self.loading.pop(name, None)

    def held(self) -> int:
        return sum(self.sizes.values())

    def admit(self, name: str, size: int, pin: bool) -> list[str]:
        """Count a model just loaded; the lazy models to evict so the rest fit the budget, least
        recently used first (never `name`, a pinned one, or one with a request in flight)."""
        with self.lock:
            self.sizes[name] = size
            self.sizes.move_to_end(name)
            if pin:
                self.pinned.add(name)
            if self.budget is None:
                return []
            total, evict = self.held(), []
            for other, other_size in self.sizes.items():
                if total <= self.budget:
                    break
                if other == name or other in self.pinned or self.in_flight.get(other, 0):
                    continue
                evict.append(other)
                total -= other_size
            for other in evict:
                del self.sizes[other]
            if total > self.budget:
                log.warning("lazy models hold %d bytes, over model_memory_budget (%d): the rest are pinned or "
                            "answering requests", total, self.budget)
            return evict

    def forget(self, name: str) -> None:
        with self.lock:
            self.sizes.pop(name, None)

    @staticmethod
    def release(dropped: Iterable[object]) -> None:
        """After the last references to evicted models are gone: collect them and trim the heap."""
        del dropped
        gc.collect()
        trim()
