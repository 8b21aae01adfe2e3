"""Connections spread evenly over the workers (serve/spread.py): the shared counts' rule, and 8 keep-alive
connections opened at once to a real 2-worker gunicorn held 4 and 4 (or within one of it)."""
from __future__ import annotations

import http.client
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import image_bytes, tiny_model_config, tiny_net, write_config
from servers import Server, worker_pids

from serve.spread import ConnectionCounts

RED = image_bytes((255, 0, 0))


def test_a_worker_takes_a_connection_only_at_or_below_the_live_workers_average():
    counts = ConnectionCounts(4)
    counts.join(0)
    assert counts.my_turn(0, 0) and counts.my_turn(0, 5)  # alone, always
    counts.join(1)
    counts.set(0, 1)
    assert not counts.my_turn(0, 1) and counts.my_turn(1, 0)
    counts.set(1, 1)
    assert counts.my_turn(0, 1) and counts.my_turn(1, 1)
    counts.set(1, 3)
    assert counts.my_turn(0, 1) and not counts.my_turn(1, 3)
    counts.leave(1)  # an exited worker's connections no longer count, nor does it wait for a turn
    assert counts.my_turn(0, 1) and counts.my_turn(0, 7)
    assert counts.free_slot({0, 2}) == 1 and counts.free_slot({0, 1, 2, 3}) == 0


def held_connections(pid: int, client_ports: set[int]) -> int:
    """How many of the connections from `client_ports` (this test's, on 127.0.0.1) process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].split(":")[1], 16) in client_ports:
            held += 1
    return held


@pytest.mark.server
def test_keep_alive_connections_opened_at_once_are_spread_over_the_workers(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "tiny.pth")
    config = write_config(tmp_path, [tiny_model_config(tmp_path / "tiny.pth")])
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, tmp_path / "g.log", inherit_settings=False)
    try:
        workers = sorted(worker_pids(server.proc.pid, 2))
        start = threading.Barrier(8)
        connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(8)]
        statuses = []

        def client(conn: http.client.HTTPConnection) -> None:
            start.wait()
            conn.request("POST", "/predictions/tiny", body=RED, headers={"Content-Type": "image/png"})
            answer = conn.getresponse()
            answer.read()
            statuses.append(answer.status)  # the connection stays open (keep-alive)

        threads = [threading.Thread(target=client, args=(conn,)) for conn in connections]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses == [200] * 8
        ports = {conn.sock.getsockname()[1] for conn in connections}
        held = [held_connections(pid, ports) for pid in workers]
        assert sum(held) == 8, held
        assert min(held) >= 3, held  # plain gthread was seen holding 4 to 0, 10 to 6
        for conn in connections:
            conn.close()
    finally:
        assert server.stop() == 0
