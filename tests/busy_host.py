"""A busy host, for the busy-host test and bench/busy.py: CPU-bound neighbour processes, and lone
requests sent in turn to several servers so that each is measured beside the same neighbours."""
from __future__ import annotations

import http.client
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlsplit


@contextmanager
def neighbours(count: int):
    """`count` CPU-bound processes (busy loops), killed on the way out.

    They stay in the caller's session, so the kernel schedules them task by task beside the servers
    the caller started (as processes in one container or VM are). Started in sessions of their own
    (scheduling groups, as containers on a node are), they made the comparison a draw: a server's
    thread had a CPU to itself for seconds at a time, then shared one for seconds (17 against 40 ms a
    request, in streaks, both servers single-threaded), and which server got the quiet CPU decided
    the ratio, either way by up to 2x.
    """
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def lone_requests(urls: dict[str, str], body: bytes, blocks: int = 4, per_block: int = 10,
                  lead_s: float = 1.5, path: str = "/predictions") -> dict[str, list[float]]:
    """One request at a time (keep-alive), the servers taking turns block by block; the first lead_s
    of a block is not counted (a server's measure of the host's load covers the last second, in which
    the previous server was the one working). Returns each server's latencies in ms."""
    conns = {label: http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)
             for label, url in urls.items()}

    def one(label: str) -> float:
        started = time.perf_counter()
        conns[label].request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
        response = conns[label].getresponse()
        response.read()
        assert response.status == 200, (label, response.status)
        return (time.perf_counter() - started) * 1000

    times: dict[str, list[float]] = {label: [] for label in urls}
    try:
        for _ in range(blocks):
            for label in urls:
                lead = time.monotonic() + lead_s
                while time.monotonic() < lead:
                    one(label)
                times[label].extend(one(label) for _ in range(per_block))
    finally:
        for conn in conns.values():
            conn.close()
    return times


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {label: {"p50_ms": round(statistics.median(v), 1), "p90_ms": round(sorted(v)[int(0.9 * (len(v) - 1))], 1),
                    "n": len(v)} for label, v in times.items()}
