"""Refusals that stay fast, on a real gunicorn: 64 concurrent requests to a server whose every forward is
blocked get their 503s while the forwards are still blocked (they never wait behind the admitted ones),
and the inference thread runs at inference_nice, below the request threads."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import requests
import torch
from conftest import image_bytes, tiny_model_config, tiny_net, wait_until, write_config
from servers import Server, worker_pids

pytestmark = pytest.mark.server

RED = image_bytes((255, 0, 0))

GATED_NET = '''
import os
import time

from models.tiny import TinyNet


class GatedNet(TinyNet):
    """TinyNet whose forward, once the file `closed` exists, notes its entry in `entered` and waits until
    `closed` is gone: a test holds every forward of a server from outside."""

    def __init__(self, num_classes=3, closed="", entered=""):
        super().__init__(num_classes)
        self.closed, self.entered = closed, entered

    def forward(self, x):
        if os.path.exists(self.closed):
            with open(self.entered, "a") as f:
                f.write(f"{x.shape[0]}\\n")
            while os.path.exists(self.closed):
                time.sleep(0.005)
        return super().forward(x)
'''


def gated_server(tmp_path: Path, workers: int, **server) -> tuple[Server, Path, Path]:
    (tmp_path / "gated_net.py").write_text(GATED_NET)
    torch.save(tiny_net().state_dict(), tmp_path / "gated.pth")
    closed, entered = tmp_path / "closed", tmp_path / "entered"
    spec = tiny_model_config(tmp_path / "gated.pth", name="gated", architecture="gated_net:GatedNet",
                             kwargs={"num_classes": 3, "closed": str(closed), "entered": str(entered)},
                             max_batch_size=1)
    config = write_config(tmp_path, [spec], **server)
    env = {"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": str(workers),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    return Server(env, tmp_path / "g.log", inherit_settings=False), closed, entered


def images_entered(entered: Path) -> int:
    try:
        return sum(int(line) for line in entered.read_text().split())
    except FileNotFoundError:
        return 0


def test_refusals_are_answered_while_every_forward_is_blocked(tmp_path):
    # 2 workers that admit 1 image each (max_queue): 64 clients at once, every admitted forward held.
    server, closed, entered = gated_server(tmp_path, 2, max_queue=1)
    answers: list[tuple[int, dict, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        answer = requests.post(f"{server.url}/predictions/gated", data=RED, timeout=60,
                               headers={"Content-Type": "image/png"})
        with lock:
            answers.append((answer.status_code, answer.json(), answer.headers.get("Retry-After")))

    try:
        closed.touch()
        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        # Every refusal arrives while the admitted requests' forwards are still held.
        wait_until(lambda: len(answers) + images_entered(entered) >= 64 and images_entered(entered) >= 1, 60,
                   "64 requests either refused or inside a held forward")
        admitted = images_entered(entered)
        assert 1 <= admitted <= 2  # one image a worker at most
        with lock:
            refused = list(answers)
        assert len(refused) == 64 - admitted
        assert all(status == 503 and body["error"]["code"] == "overloaded" and int(retry) >= 1
                   for status, body, retry in refused), refused[:3]
        closed.unlink()  # the held forwards finish
        for t in threads:
            t.join(60)
        assert sorted(status for status, _, _ in answers) == [200] * admitted + [503] * (64 - admitted)
        assert len(worker_pids(server.proc.pid, 2)) == 2  # no worker died
    finally:
        closed.unlink(missing_ok=True)
        assert server.stop() == 0


def thread_nice_values(pid: int) -> list[int]:
    values = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            values.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except OSError:  # a thread that just ended
            continue
    return values


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="per-thread nice values are read from Linux's /proc")
def test_the_inference_thread_runs_at_inference_nice_and_request_threads_at_zero(tmp_path):
    server, _, _ = gated_server(tmp_path, 1, inference_nice=7)
    try:
        requests.post(f"{server.url}/predictions/gated", data=RED, timeout=30, headers={"Content-Type": "image/png"})
        (worker,) = worker_pids(server.proc.pid, 1)
        values = thread_nice_values(worker)
        assert 7 in values and 0 in values, values  # the inference thread lowered, the request threads not
        assert set(thread_nice_values(server.proc.pid)) == {0}  # nor the master
    finally:
        assert server.stop() == 0
