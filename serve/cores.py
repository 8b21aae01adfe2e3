"""CoreShare: the CPU cores split between the workers that are running a batch right now."""
from __future__ import annotations

import math
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path

import torch

# A batch expected to take less than this on one thread (batch size x the batch-1 forward timed at
# warm-up) runs single-threaded: a second thread gains it little and costs a core of OpenMP
# spin-waiting after every batch. Measured on the tiny CNN (0.22 ms at 1 thread, 0.17 ms at 2) with
# 2 workers at c=16: 697 req/s and 2.8 ms CPU per request with the core share, 986 req/s and 1.9 ms
# with this rule. EfficientNet-Lite0 (about 25 ms) keeps every core for a lone request.
SMALL_FORWARD_MS = 2.0


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's
    CPU limit), which os.sched_getaffinity doesn't see: a 2-CPU pod on a 64-core node has 2."""
    cores = len(os.sched_getaffinity(0))
    for quota_file, period_file in ((f"{cgroup}/cpu.max", None),  # cgroup v2: "quota period"
                                    (f"{cgroup}/cpu/cpu.cfs_quota_us", f"{cgroup}/cpu/cpu.cfs_period_us")):
        try:
            text = Path(quota_file).read_text().split()
            quota, period = (text[0], text[1]) if period_file is None else (text[0], Path(period_file).read_text())
            if quota not in ("max", "-1"):
                return max(1, min(cores, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return cores


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
    def share(self, single: bool = False):
        """Count this batch as busy and set the thread count: its share of the cores, or 1 if `single`."""
        with self._busy.get_lock():
            self._busy.value += 1
            busy = self._busy.value
        try:
            threads = 1 if single else max(1, self.cores // busy)
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
