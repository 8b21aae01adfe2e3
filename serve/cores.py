"""CoreShare: the CPU cores split between the workers that are running a batch right now."""
from __future__ import annotations

import multiprocessing
from contextlib import contextmanager

import torch


class CoreShare:
    """A counter of busy workers in shared memory, inherited by every gunicorn worker forked after it.

    A worker about to run a batch uses cores // busy torch threads: a lone request gets every core
    (lowest latency), and under load each worker runs single-threaded (highest throughput, no
    oversubscription, no OpenMP spin-waiting against the threads that decode images).
    """

    def __init__(self, cores: int):
        self.cores = max(1, cores)
        self._busy = multiprocessing.get_context("fork").Value("i", 0)
        self._threads = 0  # what this process's inference thread is set to

    @contextmanager
    def share(self):
        with self._busy.get_lock():
            self._busy.value += 1
            busy = self._busy.value
        try:
            threads = max(1, self.cores // busy)
            if threads != self._threads:
                torch.set_num_threads(threads)
                self._threads = threads
            yield threads
        finally:
            with self._busy.get_lock():
                self._busy.value -= 1

    @property
    def busy(self) -> int:
        return self._busy.value
