"""Operations on a real gunicorn: version rollout, reload and rollback across 2 workers under continuous load
(0 failed requests, every answer from the old or the new weights, every worker switched within 10 s),
shedding by predicted wait with Retry-After, and a shed answer read whole on a keep-alive connection
whose large body is still being sent. Loops are bounded in time and count."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import LABELS, ForwardLog, image_bytes, metric, tiny_model_config, wait_until, write_config
from servers import Server, worker_pids
from test_versions import save, sha12

pytestmark = pytest.mark.server

RED = image_bytes((255, 0, 0))
SWITCH_LIMIT_S = 10


class Load:
    """Clients posting the red image in a loop on fresh connections (so both workers get them), until
    stopped, for `limit_s` or `limit_count` requests at most; every outcome is kept."""

    def __init__(self, url: str, clients: int = 4, limit_s: float = 60, limit_count: int = 5000):
        self.url, self.limit_s, self.limit_count = url, limit_s, limit_count
        self.results: list[tuple[float, float, object, str | None, str | None]] = []  # start, end, status, version, label
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def __enter__(self):
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_answers(self, count: int = 20, after: float = 0.0) -> None:
        """Until `count` requests sent after `after` (time.monotonic()) have their outcome (30 s at most)."""
        def answered() -> bool:
            with self.lock:
                return sum(1 for begin, *_ in self.results if begin > after) >= count
        wait_until(answered, 30, f"{count} answers")

    def _client(self):
        while (not self.stop.is_set() and time.monotonic() - self.started < self.limit_s
               and len(self.results) < self.limit_count):
            begin = time.monotonic()
            try:
                answer = requests.post(self.url, data=RED, timeout=30,
                                       headers={"Content-Type": "image/png", "Connection": "close"})
                outcome: object = answer.status_code
                version = answer.headers.get("X-Model-Version")
                label = answer.json()["predictions"][0]["label"] if answer.status_code == 200 else None
            except requests.RequestException as exc:
                outcome, version, label = type(exc).__name__, None, None
            with self.lock:
                self.results.append((begin, time.monotonic(), outcome, version, label))


def generations(url: str, pids: set[int]) -> dict[int, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {pid: metric(text, "serve_control_generation", default=-1, pid=str(pid)) for pid in pids}


def wait_all_workers(url: str, pids: set[int], generation: int) -> float:
    """Seconds until every worker reports `generation` applied (SWITCH_LIMIT_S at most)."""
    started = time.monotonic()
    while time.monotonic() - started < SWITCH_LIMIT_S:
        if all(g >= generation for g in generations(url, pids).values()):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"generation {generation} not applied by every worker in {SWITCH_LIMIT_S}s: "
                         f"{generations(url, pids)}")


def test_rollout_reload_and_rollback_under_load_fail_nothing(tmp_path):
    a, b = save(tmp_path / "a.pth", 0), save(tmp_path / "b.pth", 1)
    spec = tiny_model_config(Path("a.pth"), architecture="models.tiny:SlowNet", kwargs={"num_classes": 3, "delay_ms": 10},
                             versions=[{"version": "1", "checkpoint": "a.pth"}])
    del spec["checkpoint"]
    config = write_config(tmp_path, [spec], enable_management=True)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "g.log")
    url = f"{server.url}/models/tiny"
    try:
        pids = worker_pids(server.proc.pid, expected=2)
        v1 = f"1 {sha12(a)}"
        v2 = f"2 {sha12(b)}"
        expected_label = {v1: "red", v2: "blue"}
        switched: list[tuple[float, float, str]] = []  # (call made, every worker serves it, the version)
        with Load(f"{server.url}/predictions/tiny") as load:
            load.wait_answers()  # served by version 1 before the rollout
            began = time.monotonic()
            answer = requests.post(f"{url}/versions", json={"version": "2", "checkpoint": "b.pth", "default": True}, timeout=30)
            assert answer.status_code == 201, answer.text
            # The call answers once every worker serves it.
            assert answer.json()["rollout"] == {"generation": 1, "workers": 2, "switched": 2, "failed": 0}
            assert all(g == 1 for g in generations(server.url, pids).values())
            switched.append((began, time.monotonic(), v2))
            load.wait_answers(after=switched[-1][1])  # requests sent once every worker serves it
            save(b, 2)  # new weights in version 2's file, then a reload: every worker reads them again
            v2c = f"2 {sha12(b)}"
            expected_label[v2c] = LABELS[1]  # shift 2: class 1 scores the red channel
            began = time.monotonic()
            answer = requests.post(f"{url}/versions/2/reload", timeout=30)
            assert answer.status_code == 200 and answer.json()["rollout"]["switched"] == 2
            wait_all_workers(server.url, pids, 2)
            switched.append((began, time.monotonic(), v2c))
            load.wait_answers(after=switched[-1][1])
            began = time.monotonic()
            answer = requests.put(f"{url}/versions/1/set-default", timeout=30)  # rollback
            assert answer.status_code == 200 and answer.json()["rollout"]["switched"] == 2
            wait_all_workers(server.url, pids, 3)
            switched.append((began, time.monotonic(), v1))
            load.wait_answers(after=switched[-1][1])
        results = load.results
        failed = [r for r in results if r[2] != 200]
        print(f"rollout under load: {len(results)} requests, {len(failed)} failed; every worker serving it after "
              + ", ".join(f"{version}: {done - began:.2f}s" for began, done, version in switched))
        assert failed == [] and len(results) > 50
        assert {r[3] for r in results} <= set(expected_label)
        assert all(label == expected_label[version] for _, _, _, version, label in results)  # weights never mixed
        for (_, done, version), (next_call, _, _) in zip(switched, [*switched[1:], (float("inf"), 0, "")]):
            after = [r[3] for r in results if done < r[0] and r[1] < next_call]
            assert after and set(after) == {version}, (version, set(after))
        assert worker_pids(server.proc.pid) == pids  # no worker died
    finally:
        assert server.stop() == 0


def test_a_worker_started_later_serves_the_current_versions(tmp_path):
    import os
    import signal

    save(tmp_path / "a.pth", 0)
    b = save(tmp_path / "b.pth", 1)
    config = write_config(tmp_path, [tiny_model_config(Path("a.pth"))], enable_management=True)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "g.log")
    try:
        pids = worker_pids(server.proc.pid, expected=2)
        answer = requests.post(f"{server.url}/models/tiny/versions", json={"version": "2", "checkpoint": "b.pth",
                                                                           "default": True}, timeout=30)
        assert answer.status_code == 201
        wait_all_workers(server.url, pids, 1)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> set[int] | None:  # the master has reaped the victim and forked another worker
            now = worker_pids(server.proc.pid)
            return now if victim not in now and len(now) == 2 else None

        fresh = wait_until(replaced, 30, "a new worker in the killed one's place")
        assert min(pids) not in fresh
        wait_all_workers(server.url, fresh, 1)  # the new worker applied the control file before serving
        versions = {requests.post(f"{server.url}/predictions/tiny", data=RED, timeout=10,
                                  headers={"Content-Type": "image/png", "Connection": "close"}).headers["X-Model-Version"]
                    for _ in range(20)}
        assert versions == {f"2 {sha12(b)}"}
    finally:
        assert server.stop() == 0


def slow_config(folder: Path, delay_ms: float, forwards: ForwardLog | None = None, **server) -> Path:
    """SlowNet's config; with `forwards`, its MarkedSlowNet, which logs each forward's start there."""
    from conftest import tiny_net

    torch.save(tiny_net().state_dict(), folder / "slow.pth")
    spec = tiny_model_config(Path("slow.pth"), name="slow", architecture="models.tiny:SlowNet",
                             kwargs={"num_classes": 3, "delay_ms": delay_ms}, max_batch_size=1)
    if forwards is not None:
        spec.update(architecture=forwards.architecture, kwargs=forwards.kwargs(delay_ms))
    return write_config(folder, [spec], **server)


def test_overload_is_shed_by_predicted_wait_with_retry_after(tmp_path):
    # One worker, 200 ms an image, a 500 ms budget: about 3 images may wait; 12 clients can't all.
    config = slow_config(tmp_path, 200, max_queue_wait_ms=500)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1"}, tmp_path / "g.log")
    answers: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def client():
        for _ in range(4):
            started = time.monotonic()
            answer = requests.post(f"{server.url}/predictions/slow", data=RED, timeout=30,
                                   headers={"Content-Type": "image/png"})
            with lock:
                answers.append((answer.status_code, time.monotonic() - started, answer.headers.get("Retry-After")))

    try:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ok = [seconds for status, seconds, _ in answers if status == 200]
        shed = [(seconds, retry) for status, seconds, retry in answers if status == 503]
        print(f"predicted-wait shedding: {len(ok)} answered, max {max(ok):.2f}s; {len(shed)} shed, "
              f"max {max(s for s, _ in shed):.3f}s, Retry-After {sorted({r for _, r in shed})}")
        assert len(ok) + len(shed) == 48 and ok and shed
        assert all(retry is not None and int(retry) >= 1 for _, retry in shed)
        assert max(s for s, _ in shed) < max(ok)  # shed at once, not after waiting its turn
        assert max(ok) < 5  # admitted requests waited about the budget, not for 12 clients' worth of work
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "serve_shed_total", model="slow", reason="predicted_wait") == len(shed)
    finally:
        assert server.stop() == 0


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length from the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_a_shed_answer_reaches_a_client_still_sending_a_large_body_on_keep_alive(tmp_path):
    config = slow_config(tmp_path, 1)
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1"}, tmp_path / "g.log")
    try:
        size = 4_000_000  # 4 MB: gunicorn alone drains 64 KiB of an unread body, then closes
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            # A deadline already past on arrival: shed before the body is read, deterministically.
            sock.sendall((f"POST /predictions/slow HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                          f"Content-Length: {size}\r\nX-Request-Timeout-Ms: 0.001\r\n\r\n").encode())
            chunk = b"\0" * 65536
            sent = 0
            while sent < size:  # slowly: the answer is sent while the body is still coming
                piece = chunk[:size - sent]
                sock.sendall(piece)
                sent += len(piece)
                time.sleep(0.005)
            status, headers, body = read_answer(sock)
            assert status == 503 and json.loads(body)["error"]["code"] == "overloaded"
            assert int(headers["retry-after"]) >= 1 and headers.get("connection", "").lower() != "close"
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")  # the same connection serves on
            status, _, body = read_answer(sock)
            assert status == 200 and json.loads(body) == {"status": "Healthy"}
    finally:
        assert server.stop() == 0


def test_tritonclient_timeout_is_the_request_deadline(tmp_path):
    import numpy as np
    import pytest
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    # One worker, 500 ms an image: while one request runs, the next would wait about that long.
    forwards = ForwardLog(tmp_path)
    server = Server({"SERVE_CONFIG": str(slow_config(tmp_path, 500, forwards=forwards, max_queue_wait_ms=60_000)),
                     "WEB_CONCURRENCY": "1", **forwards.env}, tmp_path / "g.log")
    warm_up = forwards.images()  # the forwards the worker ran before it was ready
    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30.0)
    try:
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([RED], dtype=object), binary_data=True)
        busy = threading.Thread(target=lambda: requests.post(f"{server.url}/predictions/slow", data=RED, timeout=30,
                                                             headers={"Content-Type": "image/png"}))
        busy.start()
        forwards.wait(warm_up + 1)  # its forward is running (if not, the next request times out at 200 ms instead)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            triton.infer("slow", [image], timeout=200_000)  # 200 ms, in microseconds
        assert time.monotonic() - started < 0.5  # refused at once, or at its deadline: not after waiting its turn
        assert refused.value.status() == "503"
        assert "200000 us (the request's timeout parameter)" in refused.value.message()
        busy.join(30)
        answer = triton.infer("slow", [image], timeout=10_000_000)
        assert answer.get_response()["model_version"] == "1"
    finally:
        triton.close()
        assert server.stop() == 0
