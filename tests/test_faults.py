"""Faults and overload on a real gunicorn: SIGKILL a worker, SIGTERM the server, 4x overload. Bounded loops."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import ForwardLog, image_bytes, tiny_model_config, tiny_net, write_config
from servers import Server, worker_pids

pytestmark = pytest.mark.server

IMAGE = image_bytes((0, 255, 0))


def slow_config(folder: Path, delay_ms: float, max_batch_size: int = 4, forwards: ForwardLog | None = None,
                **server) -> Path:
    """SlowNet's config; with `forwards`, its MarkedSlowNet, which logs each forward's start there."""
    torch.save(tiny_net().state_dict(), folder / "slow.pth")
    spec = tiny_model_config(Path("slow.pth"), name="slow", architecture="models.tiny:SlowNet",
                             kwargs={"num_classes": 3, "delay_ms": delay_ms}, max_batch_size=max_batch_size,
                             runtime="eager")  # its sleep is Python: an ONNX export would leave it out
    if forwards is not None:
        spec.update(architecture=forwards.architecture, kwargs=forwards.kwargs(delay_ms))
    return write_config(folder, [spec], **server)


class Load:
    """Closed-loop clients, each on its own connection, for at most `seconds`; every outcome is recorded."""

    def __init__(self, url: str, clients: int, seconds: float, fresh_connections: bool = False):
        self.url, self.seconds, self.fresh = url, seconds, fresh_connections
        self.results: list[tuple[float, float, object]] = []  # (start, end, status or exception name)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def __enter__(self):
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(self.seconds + 40)

    def _client(self):
        session = requests.Session()
        while time.monotonic() - self.started < self.seconds:
            begin = time.monotonic()
            try:
                headers = {"Content-Type": "image/png", **({"Connection": "close"} if self.fresh else {})}
                outcome: object = session.post(self.url, data=IMAGE, headers=headers, timeout=30).status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
                session = requests.Session()
            with self.lock:
                self.results.append((begin, time.monotonic(), outcome))


def test_sigkill_of_a_worker_costs_only_its_in_flight_requests(tmp_path):
    # A generous wait budget: after the kill, the survivor's queue holds every client's image, and
    # this test is about the kill, not about admission (tests/test_admission.py, test_operations.py).
    server = Server({"SERVE_CONFIG": str(slow_config(tmp_path, 100, max_queue_wait_ms=60_000)), "WEB_CONCURRENCY": "2"},
                    tmp_path / "g.log")
    try:
        before = worker_pids(server.proc.pid, expected=2)
        victim = min(before)
        with Load(f"{server.url}/predictions/slow", clients=6, seconds=4) as load:
            time.sleep(1.5)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
        after = worker_pids(server.proc.pid, expected=2)
        failed = [r for r in load.results if r[2] != 200]
        served = len(load.results) - len(failed)
        print(f"SIGKILL: {served} served, {len(failed)} failed: {[r[2] for r in failed]}")
        assert len(after) == 2 and victim not in after and server.proc.poll() is None
        # Only requests in flight on the killed worker fail: each client has at most one in flight.
        assert len(failed) <= 6
        assert all(start < killed_at + 0.05 for start, _, _ in failed)
        # A request in flight on the killed worker loses its connection: requests raises ConnectionError.
        assert all(status in (200, 503, "ConnectionError") for _, _, status in load.results), failed
        assert served > 30
        assert requests.get(f"{server.url}/ready", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    forwards = ForwardLog(tmp_path)
    server = Server({"SERVE_CONFIG": str(slow_config(tmp_path, 1000, forwards=forwards, max_queue_wait_ms=60_000)),
                     "WEB_CONCURRENCY": "1", "SERVE_GRACEFUL_TIMEOUT_S": "10", **forwards.env}, tmp_path / "g.log")
    warm_up = forwards.images()  # the forwards the worker ran before it was ready
    answers: list[object] = []

    def one():
        try:
            answers.append(requests.post(f"{server.url}/predictions/slow", data=IMAGE,
                                         headers={"Content-Type": "image/png"}, timeout=30).status_code)
        except requests.RequestException as exc:
            answers.append(type(exc).__name__)

    clients = [threading.Thread(target=one) for _ in range(4)]
    for t in clients:
        t.start()
    # All four are in the worker, inside a 1 s forward: the first batch's, or the next one's if the
    # first batch started before all four had come in.
    forwards.wait(warm_up + 4)
    stopped_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(requests.ConnectionError):  # new connections are refused (within 5 s of the signal)
        while time.monotonic() - stopped_at < 5:
            requests.get(f"{server.url}/ping", timeout=5)  # still answered until gunicorn closes its socket
            time.sleep(0.02)
    for t in clients:
        t.join(30)
    code = server.proc.wait(30)
    elapsed = time.monotonic() - stopped_at
    print(f"SIGTERM: in-flight answers {answers}, exit {code} after {elapsed:.2f}s")
    assert answers == [200, 200, 200, 200]
    assert code == 0 and elapsed < 10


def test_four_times_overload_is_shed_fast_and_accepted_requests_keep_their_latency(tmp_path):
    # One worker serving one 50 ms batch of up to 2 images at a time; 4 images may wait. 24 clients is
    # about 4x what the queue holds; the rest must get a fast 503 with Retry-After, not a timeout.
    config = slow_config(tmp_path, 50, max_batch_size=2, max_queue=4)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1"}, tmp_path / "g.log")
    try:
        pids = worker_pids(server.proc.pid, expected=1)
        with Load(f"{server.url}/predictions/slow", clients=4, seconds=3) as calm:
            pass
        with Load(f"{server.url}/predictions/slow", clients=24, seconds=4) as busy:
            pass
        ok = sorted(end - start for start, end, status in busy.results if status == 200)
        shed = sorted(end - start for start, end, status in busy.results if status == 503)
        calm_ok = sorted(end - start for start, end, status in calm.results if status == 200)
        other = [status for _, _, status in busy.results if status not in (200, 503)]

        def p(values, q):
            return values[min(len(values) - 1, int(q * len(values)))]

        print(f"overload: calm {len(calm_ok)} ok p50 {p(calm_ok, .5) * 1000:.0f} ms; busy {len(ok)} ok p50 "
              f"{p(ok, .5) * 1000:.0f} ms p99 {p(ok, .99) * 1000:.0f} ms; {len(shed)} shed p50 "
              f"{p(shed, .5) * 1000:.1f} ms p99 {p(shed, .99) * 1000:.1f} ms; other {other}")
        assert other == [] and len(shed) > len(ok) and len(ok) > 20
        assert p(shed, 0.99) < 0.5  # rejected at once, not after queueing
        assert p(ok, 0.5) < 4 * p(calm_ok, 0.5) + 0.2  # accepted requests wait for a bounded queue only
        assert worker_pids(server.proc.pid) == pids
    finally:
        assert server.stop() == 0
