"""A real gunicorn process for end-to-end tests: start on a free 127.0.0.1 port, wait ready, stop."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server that binds it a moment later.

    Taken below the kernel's ephemeral range: a port the kernel picked for a bind to port 0 comes from
    that range, and so does the source port of every outgoing connection, so in the gap before the
    server binds it, a test's own client could take it. Below the range only an explicit bind can.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(50 if low > 11_000 else 0):
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(master: int, expected: int | None = None) -> set[int]:
    """The master's children; with `expected`, wait (10 s at most) for gunicorn's staggered spawns."""
    deadline = time.monotonic() + 10
    while True:
        pids = {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}
        if expected is None or len(pids) == expected:
            return pids
        if time.monotonic() > deadline:
            raise AssertionError(f"gunicorn {master} has {len(pids)} workers, not {expected}, after 10 s")
        time.sleep(0.05)


# How the README runs the server, and every test that starts one.
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "serve/gunicorn_conf.py", "serve.app:create_app()"]


def without_server_settings(env: dict[str, str]) -> dict[str, str]:
    """`env` less the server's own settings (SERVE_*, PORT, WEB_CONCURRENCY) a caller may have set."""
    return {k: v for k, v in env.items() if not k.startswith("SERVE_") and k not in ("WEB_CONCURRENCY", "PORT")}


class Server:
    def __init__(self, env: dict[str, str], log: Path, inherit_settings: bool = True, tls: dict | None = None):
        """gunicorn with `env` over this process's environment; without inherit_settings, over it
        less the caller's own server settings (the default config, whatever the shell has set).
        With `tls` (requests' options: verify, cert) the server speaks HTTPS and is polled with them."""
        self.port = free_port()
        self.url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}"
        self.log = log
        self.tls = tls or {}
        base = os.environ if inherit_settings else without_server_settings(os.environ)
        full_env = {**base, "PORT": str(self.port), "SERVE_HOST": "127.0.0.1", **env}
        self.proc = subprocess.Popen(
            GUNICORN, cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        self.ready_after_s = self._wait_ready()

    def _wait_ready(self) -> float:
        try:
            return wait_ready(self.url, self.proc, self.log, self.started, **self.tls)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_ready(url: str, proc: subprocess.Popen, log: Path, started: float, limit_s: float = START_TIMEOUT_S,
               name: str = "gunicorn", **request_options) -> float:
    """Poll url/ready (with requests' `request_options`: verify, cert) until it answers 200; return
    seconds since `started`.

    Raises RuntimeError (with the log's tail) if the process exits or limit_s passes first.
    """
    deadline = started + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ready", timeout=2, **request_options).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready in {limit_s}s:\n{log.read_text()[-3000:]}")
