"""Replica drill: three gunicorn replicas behind nginx; SIGKILL one mid-run, restart it, count failures.

    python bench/drill.py --seconds 20 --clients 8      # the drill
    python bench/drill.py --seconds 12 --clients 6      # the short version (tests/test_replica_drill.py)

nginx plays the role a Kubernetes Service plays in front of the server's replicas: round robin over
three upstreams with passive health checks (`max_fails=1 fail_timeout=2s`: a replica that fails a
request is left out for 2 s, then tried again with one request), keepalive connections to the
upstreams, and a failed request (connection refused or reset, no answer, 502 or 503) retried on
another replica (`proxy_next_upstream ... non_idempotent`: predictions are POSTs, but idempotent).

Everything runs on 127.0.0.1 under one work directory: nginx with its own config, pid file, logs
and temp paths (`-p`, `-c`, `-e`; `daemon off;` as a child process, never the system's nginx), three
replicas of `models.tiny:SlowNet` (a 20 ms forward, so requests are in flight when the kill lands),
one gunicorn worker each, each replica in its own session so the kill takes its whole process group
(master and worker). Closed-loop clients (threads, one keep-alive `requests.Session` each) post a
PNG to nginx for `--seconds`; at 1/3 of the run replica 1's process group gets SIGKILL, at 2/3 it is
started again on the same port and waited for (`/ready`).

The report (printed, and written as JSON to `--out`): requests served and failed (with reasons),
latency p50/p99/max per phase -- `before` the kill, `during` (replica 1 down: from the kill until
it answers /ready again) and `after` -- each request counted in the phase it completed in, the
first second after the kill on its own, the requests nginx retried on another replica, requests
per replica and phase from nginx's access log (`$upstream_addr`), and the restarted replica's time
to ready. Exit status 1 if any request failed, the restarted replica served nothing, or a process
was left running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import GUNICORN, free_port, wait_ready  # noqa: E402

NGINX = "/usr/sbin/nginx"
START_TIMEOUT_S = 120
FAIL_TIMEOUT_S = 2  # nginx passive health check: a replica that failed is skipped this long
IMAGE_COLOR = (0, 255, 0)  # tiny_net answers "green" first for it

# Fields of one access-log line, tab-separated: completion time, status, request time, upstream
# addresses / statuses / response times (comma-separated when nginx tried more than one), request.
LOG_FORMAT = "$msec\\t$status\\t$request_time\\t$upstream_addr\\t$upstream_status\\t$upstream_response_time\\t$request"

NGINX_CONF = """\
# Written by bench/drill.py: a load balancer on 127.0.0.1 for the replica drill. Self-contained:
# every path is under the drill's work directory, nothing under /etc/nginx or /var is used.
{user}worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    log_format drill "{log_format}";
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 20m;
    keepalive_timeout 30s;

    upstream replicas {{
{servers}
        keepalive 32;                 # idle keep-alive connections to the replicas, per nginx worker
        keepalive_timeout 4s;         # below gunicorn's 5 s, so nginx never reuses one gunicorn is closing
    }}

    server {{
        listen 127.0.0.1:{port};
        access_log {dir}/access.log drill;

        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;         # keep-alive to the upstreams needs HTTP/1.1 ...
            proxy_set_header Connection ""; # ... and no "Connection: close" passed on
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 1s;
            proxy_send_timeout 10s;
            proxy_read_timeout 10s;
            # Retry on another replica: refused/reset connections, timeouts, 502 and 503 (a replica
            # starting up answers 503 not_ready). POST predictions are idempotent: non_idempotent.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 15s;
        }}
    }}
}}
"""


def image_png() -> bytes:
    from conftest import image_bytes

    return image_bytes(IMAGE_COLOR)


def write_model_config(folder: Path, delay_ms: float) -> Path:
    """models.tiny:SlowNet with tests/conftest's tiny_net weights, saved in the work directory."""
    import torch
    import yaml
    from conftest import tiny_model_config, tiny_net

    torch.save(tiny_net().state_dict(), folder / "slow.pth")
    spec = tiny_model_config(Path("slow.pth"), name="slow", architecture="models.tiny:SlowNet",
                             kwargs={"num_classes": 3, "delay_ms": delay_ms},
                             runtime="eager")  # its sleep is Python: an ONNX export would leave it out
    config = folder / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [spec]}))
    return config


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.02)
    return not group_members(pgid)


def stop_group(proc: subprocess.Popen, sig: int, grace_s: float) -> int | None:
    """Send `sig` to a process started in its own session and wait `grace_s` for it to exit; SIGKILL
    its whole group if it hangs or left members behind (a worker its master did not take down).
    Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    if group_members(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        wait_group_gone(proc.pid, 10)
    return proc.returncode


class Replica:
    """One gunicorn (master + WEB_CONCURRENCY workers) on a fixed 127.0.0.1 port, in its own session."""

    def __init__(self, index: int, port: int, folder: Path, env: dict[str, str]):
        self.index, self.port, self.folder, self.env = index, port, folder, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.pgids: list[int] = []  # every process group this replica has had

    def start(self) -> None:
        self.starts += 1
        log = self.folder / f"replica{self.index}.{self.starts}.log"
        prom = self.folder / f"prometheus{self.index}.{self.starts}"
        prom.mkdir()
        env = {**os.environ, **self.env, "PORT": str(self.port), "SERVE_HOST": "127.0.0.1",
               "PROMETHEUS_MULTIPROC_DIR": str(prom)}
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                GUNICORN, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # pgid == the master's pid: os.killpg reaches master and workers
            )
        self.pgids.append(self.proc.pid)
        self.started = time.monotonic()

    def wait_ready(self) -> float:
        """Seconds from start() until /ready answers 200."""
        return wait_ready(self.url, self.proc, self.log, self.started, START_TIMEOUT_S)

    def kill(self) -> dict:
        """SIGKILL the whole process group (master and workers) and wait until none of it is left."""
        pgid = self.proc.pid
        members = group_members(pgid)
        # The kill's time is taken next to the signal, not before the /proc scan: nginx keeps sending the
        # victim requests until it lands, and the test tells "in flight at the kill" by these marks.
        marks = {"monotonic": time.monotonic(), "wall": time.time()}
        os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)
        gone = wait_group_gone(pgid, 10)
        return {"pgid": pgid, "pids": sorted(members), "group_gone": gone, "marks": marks}

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL to the group if it takes too long; returns the exit status."""
        return None if self.proc is None else stop_group(self.proc, signal.SIGTERM, 40)

    def alive(self) -> bool:
        return any(group_members(pgid) for pgid in self.pgids)


class Nginx:
    """nginx as a child process (daemon off) with everything under `folder`."""

    def __init__(self, folder: Path, port: int, upstreams: list[int]):
        self.folder, self.port = folder, port
        self.url = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (folder / sub).mkdir(exist_ok=True)
        # As root nginx's workers would switch to "nobody", which can't write our 0700 temp dirs.
        user = f"user {_user_name()};\n" if os.geteuid() == 0 else ""
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;"
                            for p in upstreams)
        self.conf = folder / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(user=user, dir=folder, port=port, servers=servers,
                                               log_format=LOG_FORMAT))
        self.access_log = folder / "access.log"
        self.proc: subprocess.Popen | None = None

    def test_config(self) -> None:
        check = subprocess.run([NGINX, "-t", "-q", "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                                "-c", str(self.conf)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stdout}{check.stderr}")

    def start(self) -> None:
        out = (self.folder / "nginx.out").open("wb")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.folder), "-e", str(self.folder / "error.log"), "-c", str(self.conf)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()

    def wait_ready(self, timeout: float = 30) -> float:
        return wait_ready(self.url, self.proc, self.folder / "error.log", time.monotonic(), timeout, name="nginx")

    def stop(self) -> int | None:
        """SIGQUIT: graceful shutdown (workers finish, then exit); SIGKILL the group if it hangs."""
        return None if self.proc is None else stop_group(self.proc, signal.SIGQUIT, 15)

    def alive(self) -> bool:
        return self.proc is not None and bool(group_members(self.proc.pid))


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


class Load:
    """Closed-loop clients against one URL for `seconds` (which may be raised while they run); every
    outcome is recorded."""

    def __init__(self, url: str, clients: int, seconds: float, body: bytes):
        self.url, self.seconds, self.body = url, seconds, body
        self.started = time.monotonic()  # reset by start()
        self.results: list[tuple[float, float, object]] = []  # (start, end, 200 or a failure reason)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(self.seconds + 60)

    def _client(self) -> None:
        session = requests.Session()
        headers = {"Content-Type": "image/png"}
        while time.monotonic() - self.started < self.seconds:
            begin = time.monotonic()
            try:
                response = session.post(self.url, data=self.body, headers=headers, timeout=30)
                outcome: object = response.status_code
                if outcome == 200 and response.json()["predictions"][0]["label"] != "green":
                    outcome = "wrong answer"
                elif outcome != 200:
                    outcome = f"HTTP {outcome}: {response.text[:120]}"
            except (requests.RequestException, ValueError, KeyError) as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
                session.close()
                session = requests.Session()
            with self.lock:
                self.results.append((begin, time.monotonic(), outcome))
        session.close()


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    values = sorted(latencies)

    def p(q):
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {"p50_ms": p(0.50), "p99_ms": p(0.99), "max_ms": round(values[-1] * 1000, 1)}


def phase_stats(results, start: float, end: float) -> dict:
    """Requests that completed in [start, end): counts, failures, latency of the served ones."""
    inside = [r for r in results if start <= r[1] < end]
    ok = [e - s for s, e, outcome in inside if outcome == 200]
    return {"window_s": round(end - start, 2), "requests": len(inside), "served": len(ok),
            "failed": len(inside) - len(ok), "req_per_s": round(len(ok) / (end - start), 1) if end > start else None,
            **percentiles(ok)}


def parse_access_log(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text().splitlines():
        msec, status, request_time, addrs, statuses, _times, request = line.split("\t")
        entries.append({"t": float(msec), "status": int(status), "request_time": float(request_time),
                        "upstreams": [a.strip() for a in addrs.replace(" : ", ", ").split(",")],
                        "upstream_statuses": [s.strip() for s in statuses.replace(" : ", ", ").split(",")],
                        "request": request})
    return entries


def run_drill(seconds: float = 20, clients: int = 8, delay_ms: float = 20, workdir: Path | None = None,
              log=print) -> dict:
    """Run the drill; return the report. Every process it starts is stopped before it returns."""
    if not os.access(NGINX, os.X_OK):
        raise FileNotFoundError(f"{NGINX} not found: apt-get install -y nginx")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="replica-drill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_model_config(workdir, delay_ms)
    env = {"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "1", "SERVE_TORCH_THREADS": "1",
           "SERVE_LOG_LEVEL": "warning", "SERVE_GRACEFUL_TIMEOUT_S": "10"}
    ports = []
    while len(ports) < 4:
        port = free_port()
        if port not in ports:
            ports.append(port)
    replicas = [Replica(i, ports[i], workdir, env) for i in range(3)]
    nginx = Nginx(workdir / "nginx", ports[3], ports[:3])
    nginx.test_config()
    victim = replicas[1]
    # Wall-clock (time.time) marks, to line up with nginx's $msec; monotonic for the clients' timings.
    marks: dict[str, float] = {}
    report: dict = {"config": {"seconds": seconds, "clients": clients, "model": "models.tiny:SlowNet",
                               "forward_delay_ms": delay_ms, "workers_per_replica": 1,
                               "replicas": [r.url for r in replicas], "nginx": nginx.url,
                               "workdir": str(workdir)}}
    load = None
    try:
        for r in replicas:  # start all three at once: they load in parallel
            r.start()
        report["replica_start_s"] = [round(r.wait_ready(), 2) for r in replicas]
        nginx.start()
        report["nginx_ready_s"] = round(nginx.wait_ready(), 2)
        log(f"replicas ready in {report['replica_start_s']} s on ports {ports[:3]}; nginx on {ports[3]}")
        processes = {f"replica{r.index}": group_members(r.proc.pid) for r in replicas}
        processes["nginx"] = group_members(nginx.proc.pid)
        report["processes"] = processes

        load = Load(f"{nginx.url}/predictions/slow", clients, seconds, image_png())
        wall0 = time.time()
        load.start()
        t0 = load.started
        time.sleep(seconds / 3)
        kill = victim.kill()
        marks["kill"], wall_kill = kill["marks"].pop("monotonic"), kill.pop("marks")["wall"]
        kill["at_s"] = round(marks["kill"] - t0, 2)
        kill["group_gone_after_ms"] = round((time.monotonic() - marks["kill"]) * 1000, 1)
        report["kill"] = kill
        log(f"t={kill['at_s']}s SIGKILL process group {kill['pgid']} of replica 1 (pids {kill['pids']})")

        time.sleep(max(0.0, t0 + 2 * seconds / 3 - time.monotonic()))
        marks["restart"] = time.monotonic()
        wall_restart = time.time()
        # Keep the clients going while the replica starts, however long that takes (they stop when the
        # clock passes load.seconds); the real end is set once it is ready.
        load.seconds = marks["restart"] - t0 + START_TIMEOUT_S + 2 * FAIL_TIMEOUT_S + 1
        victim.start()
        ready_after = victim.wait_ready()
        marks["ready"] = time.monotonic()
        wall_ready = time.time()
        processes["replica1_restarted"] = group_members(victim.proc.pid)
        report["restart"] = {"at_s": round(marks["restart"] - t0, 2), "ready_after_s": round(ready_after, 2),
                             "ready_at_s": round(marks["ready"] - t0, 2), "port": victim.port,
                             "pgid": victim.proc.pid}
        log(f"t={report['restart']['at_s']}s restarted replica 1 on port {victim.port}: "
            f"ready after {ready_after:.2f} s")
        # nginx tries a failed replica again only after fail_timeout, on a request that picks it: keep
        # the load on long enough after the replica is ready for that to happen twice.
        load.seconds = max(seconds, marks["ready"] - t0 + 2 * FAIL_TIMEOUT_S + 1)
        report["load_seconds"] = round(load.seconds, 2)
        load.join()
        t_end = max([t0 + load.seconds] + [e for _, e, _ in load.results])
        wall_end = time.time() + 1
    finally:
        if load is not None:
            load.seconds = min(load.seconds, time.monotonic() - load.started)  # on an error: stop them now
            load.join()
        stopped = {"nginx_exit": nginx.stop(), "replica_exits": [r.stop() for r in replicas]}
    stopped["nginx_running"] = nginx.alive()
    stopped["replicas_running"] = [r.alive() for r in replicas]
    report["stopped"] = stopped
    # Wall-clock marks (seconds since the epoch, as nginx's $msec in the access log).
    report["wall"] = {"start": wall0, "kill": wall_kill, "restart": wall_restart, "ready": wall_ready,
                      "end": wall_end}
    report["access_log"] = str(nginx.access_log)

    results = load.results
    failures = Counter(str(outcome) for _, _, outcome in results if outcome != 200)
    served = sum(1 for _, _, outcome in results if outcome == 200)
    report["served"] = served
    report["failed"] = sum(failures.values())
    report["failures"] = dict(failures)
    report["phases"] = {
        "before": phase_stats(results, t0, marks["kill"]),
        "during": phase_stats(results, marks["kill"], marks["ready"]),
        "after": phase_stats(results, marks["ready"], t_end + 1e-6),
        "first_second_after_kill": phase_stats(results, marks["kill"], marks["kill"] + 1),
    }
    in_flight = [e - s for s, e, outcome in results if s < marks["kill"] < e]
    report["in_flight_at_kill"] = {"requests": len(in_flight), **percentiles(in_flight)}

    # nginx's view: which replica answered each request, and which requests it retried elsewhere.
    entries = [e for e in parse_access_log(nginx.access_log) if "/predictions/" in e["request"]]
    names = {f"127.0.0.1:{r.port}": f"replica{r.index}" for r in replicas}
    per_replica: dict[str, Counter] = {name: Counter() for name in names.values()}
    for e in entries:
        # By the time nginx received the request: an answer sent just before the SIGKILL landed can be
        # logged a moment after the kill's timestamp, and it belongs to "before".
        received = e["t"] - e["request_time"]
        phase = "before" if received < wall_kill else "during" if received < wall_ready else "after"
        if wall0 <= e["t"] <= wall_end:
            per_replica.setdefault(names.get(e["upstreams"][-1], e["upstreams"][-1]), Counter())[phase] += 1
    retried = [e for e in entries if len(e["upstreams"]) > 1]
    report["nginx"] = {
        "requests_logged": len(entries),
        "answered_by": {name: {"before": c["before"], "during": c["during"], "after": c["after"]}
                        for name, c in per_replica.items()},
        "retried_on_another_replica": len(retried),
        "retried_upstream_statuses": dict(Counter(",".join(e["upstream_statuses"]) for e in retried)),
        "client_statuses": dict(Counter(e["status"] for e in entries)),
    }
    return report


def summary(report: dict) -> str:
    lines = [f"served {report['served']}, failed {report['failed']}"
             + (f" {report['failures']}" if report["failures"] else "")]
    for name, p in report["phases"].items():
        lines.append(f"  {name:<24} {p['served']:>5} served {p['failed']:>3} failed  {p['req_per_s']!s:>6} req/s  "
                     f"p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  max {p['max_ms']} ms")
    f = report["in_flight_at_kill"]
    lines.append(f"  in flight at the kill: {f['requests']} (all answered; max {f['max_ms']} ms)")
    lines.append(f"  kill at {report['kill']['at_s']} s; restart at {report['restart']['at_s']} s, "
                 f"ready after {report['restart']['ready_after_s']} s")
    n = report["nginx"]
    lines.append(f"  nginx retried {n['retried_on_another_replica']} requests on another replica "
                 f"{n['retried_upstream_statuses']}; answered by {n['answered_by']}")
    lines.append(f"  stopped: {report['stopped']}")
    return "\n".join(lines)


def problems(report: dict) -> list[str]:
    found = []
    if report["failed"]:
        found.append(f"{report['failed']} requests failed")
    if report["phases"]["during"]["served"] == 0:
        found.append("nothing served while replica 1 was down")
    if report["nginx"]["answered_by"]["replica1"]["after"] == 0:
        found.append("the restarted replica served nothing")
    if report["stopped"]["nginx_running"] or any(report["stopped"]["replicas_running"]):
        found.append(f"processes left running: {report['stopped']}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="length of the load (kill at 1/3, restart at 2/3)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop client threads")
    parser.add_argument("--delay-ms", type=float, default=20, help="SlowNet's forward delay")
    parser.add_argument("--workdir", type=Path, help="where configs and logs go (kept); default: a temp dir, "
                                                     "removed unless --keep or the drill fails")
    parser.add_argument("--keep", action="store_true", help="keep the temp work directory")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "replica-drill.json",
                        help="the JSON report")
    args = parser.parse_args()
    if not 3 <= args.seconds <= 600 or not 1 <= args.clients <= 64:
        parser.error("--seconds must be 3..600 and --clients 1..64")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="replica-drill-"))
    report = run_drill(args.seconds, args.clients, args.delay_ms, workdir)
    found = problems(report)
    report["problems"] = found
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"report: {args.out}")
    if found:
        print("DRILL FAILED: " + "; ".join(found))
    if args.workdir is None and not args.keep and not found:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs: {workdir}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
