"""CoreShare: the CPU cores split between the workers that are running a batch right now, less the
cores other processes on the host are using (HostLoad)."""
from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# A batch expected to take less than this on one thread (batch size x the batch-1 forward timed at
# warm-up) runs single-threaded: a second thread gains it little and costs a core of OpenMP
# spin-waiting after every batch (docs/performance.md has the figures).
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


_current = threading.local()


def batch_share(default: int) -> int:
    """The threads this thread's running batch has a share of (the cores, less those other processes
    hold, divided among the server's busy workers), inside CoreShare.share, even when torch itself was
    set to one thread; `default` outside it. For a runtime whose thread pool is fixed per session
    (ONNX Runtime): it picks its session by this."""
    return getattr(_current, "share", None) or default


@contextmanager
def sharing_as(threads: int):
    """batch_share answers `threads` inside (a worker warming the session its busy batches will use)."""
    _current.share = threads
    try:
        yield
    finally:
        _current.share = None


# Batches of two workers that overlapped this recently mean steady load: a batch then takes its share
# as if the others were busy even in a gap between theirs, which is brief: one that took every core
# in it ran on beside the next one's thread, oversubscribed (docs/performance.md, "Tail"). Lone
# requests that alternate between workers (a client without keep-alive) never overlap: they keep
# every core.
RECENT_S = 0.1

# Other processes count as holding one more core once they use this much more of one (averaged over
# HostLoad's window), and one fewer once they use this much less: hysteresis, so a load near the
# line doesn't switch the thread count batch by batch.
TAKE_CORE, FREE_CORE = 0.65, 0.35


class HostLoad:
    """The CPU other processes take from this server's cores: every busy tick /proc/stat counts on the
    CPUs this process may run on (steal included: a hypervisor's other guests), less the ticks of the
    server's own processes (a root pid and its children: the gunicorn master and workers), sampled
    every `interval_s` by a daemon thread and averaged over the last `window` samples.

    Why: GNU OpenMP's threads meet at a barrier after every parallel op, so a 2-thread eager forward
    beside CPU-bound processes waits at each op for whichever thread is descheduled, and takes several
    times longer than on one thread (docs/performance.md). ONNX Runtime picks its session by the same
    share (serve/runtimes/onnx/).
    """

    def __init__(self, cpus: set[int] | None = None, root: int | None = None, interval_s: float = 0.25,
                 window: int = 4, stat: str = "/proc/stat", proc: str = "/proc"):
        self.cpus = set(os.sched_getaffinity(0) if cpus is None else cpus)
        self.root = root or os.getpid()
        self.interval_s = interval_s
        self._stat, self._proc = stat, proc
        self._tick = os.sysconf("SC_CLK_TCK")
        self._samples: collections.deque = collections.deque(maxlen=window + 1)
        self._stop = threading.Event()
        self._pid: int | None = None

    def start(self, root: int | None = None) -> "HostLoad":
        """Sample in a daemon thread of this process (once per process: a thread doesn't survive fork)."""
        if root is not None:
            self.root = root
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._samples.clear()
            self._stop = threading.Event()
            threading.Thread(target=self._run, args=(self._stop,), name="host-load", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            self._samples.append((time.monotonic(), self._busy_ticks(), self._own_ticks()))
        except (OSError, ValueError, IndexError):  # no /proc (not Linux), or a line we can't read
            pass

    @property
    def foreign(self) -> float:
        """Cores' worth of CPU other processes used over the window (0.0 until two samples exist)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, busy0, own0), (t1, busy1, own1) = self._samples[0], self._samples[-1]
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / self._tick / (t1 - t0))

    def _busy_ticks(self) -> int:
        total = 0
        with open(self._stat) as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *fields = line.split()
                if name != "cpu" and int(name[3:]) in self.cpus:
                    # user nice system idle iowait irq softirq steal (guest is inside user already)
                    values = [int(v) for v in fields[:8]]
                    total += sum(values) - values[3] - values[4]
        return total

    def _own_ticks(self) -> int:
        try:
            children = Path(f"{self._proc}/{self.root}/task/{self.root}/children").read_text().split()
        except OSError:
            children = []
        total = 0
        for pid in {str(self.root), str(os.getpid()), *children}:
            try:
                fields = Path(f"{self._proc}/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # a worker that just exited
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total


class CoreShare:
    """A counter of busy workers in shared memory, inherited by every gunicorn worker forked after it.

    A worker about to run a batch uses (cores - cores other processes hold) // busy torch threads: a
    lone request on a quiet host gets every core (lowest latency); under load each worker runs
    single-threaded (highest throughput, no oversubscription, no OpenMP spin-waiting against the
    threads that decode images); beside CPU-bound neighbours (HostLoad) the cores they hold are not
    counted, so a 2-core host with a busy neighbour runs batches on one thread.
    """

    def __init__(self, cores: int, host: HostLoad | None = None, recent_s: float = RECENT_S):
        self.cores = max(1, cores)
        self.host = host
        self.recent_s = recent_s
        context = multiprocessing.get_context("fork")
        self._busy = context.Value("i", 0)
        self._overlap = context.RawValue("d", -math.inf)  # when a batch last began beside another's (monotonic)
        self._threads = 0  # what this process's inference thread is set to
        self._taken = 0  # cores held by other processes at the last batch, for the log

    def start(self, root: int | None = None) -> None:
        """Start measuring the host's load in this process (a gunicorn worker: root is the master)."""
        if self.host is not None:
            self.host.start(root)

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()

    @property
    def taken(self) -> int:
        """Cores other processes hold now, whole cores with hysteresis (TAKE_CORE, FREE_CORE); one core
        is always left to this server."""
        if self.host is None:
            return 0
        self.host.start()  # lazily, in a process nobody started it in
        # With more CPUs to run on than cores to use (a CPU quota: a 2-CPU pod on a 64-core node), the
        # others' load counts only once it leaves fewer idle CPUs than this server's cores.
        spare = max(0, len(self.host.cpus) - self.cores)
        foreign, taken = max(0.0, self.host.foreign - spare), self._taken
        taken = max(taken, math.floor(foreign + 1 - TAKE_CORE))
        taken = min(taken, math.floor(foreign + 1 - FREE_CORE))
        return min(self.cores - 1, taken)

    @contextmanager
    def share(self, single: bool = False):
        """Count this batch as busy and set the thread count: its share of the free cores, or 1 if `single`.
        Within recent_s of two batches overlapping, a lone batch counts another as busy."""
        now = time.monotonic()
        with self._busy.get_lock():
            self._busy.value += 1
            busy = self._busy.value
            if busy > 1:
                self._overlap.value = now
            elif now - self._overlap.value < self.recent_s:
                busy = 2  # steady load: the other worker's next batch is about to start
        try:
            taken = self.taken
            share = max(1, (self.cores - taken) // busy)
            if taken != self._taken:
                log.info("other processes hold %d of %d cores (%.2f cores' worth): batches take %d thread(s)",
                         taken, self.cores, self.host.foreign, share)
                self._taken = taken
            threads = 1 if single else share
            _current.share = share
            if threads != self._threads:
                torch.set_num_threads(threads)
                self._threads = threads
            yield threads
        finally:
            _current.share = None
            with self._busy.get_lock():
                self._busy.value -= 1

    @property
    def busy(self) -> int:
        return self._busy.value
