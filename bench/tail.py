"""Tail: this server against a hand-written Flask + ONNX Runtime app (bench/flask_ort_app.py), side by side.

    python bench/tail.py                                # resnet18 (seeded weights), c = 4 and 16 (~3 minutes)
    python bench/tail.py --seconds 5 --rounds 2 --levels 4

Both serve the same resnet18 checkpoint (random weights, seed 0) on 2 gunicorn workers on 127.0.0.1:
this server with its defaults (runtime: auto, so ONNX Runtime; gthread, batching, core sharing), and the
peer with sync workers, one 1-thread ONNX Runtime session each. Closed-loop clients, each a thread on
its own keep-alive connection (the peer's sync workers close theirs after each answer: its clients
reconnect, as they would), post the cat photo (224 x 224 JPEG) and send the next request when
answered. Each level runs --rounds times, the two servers interleaved (the first alternates), so the
machine's drift touches both; the latencies of the rounds are pooled. It prints req/s (answered),
p50 and p99 of the answered, the other answers (`failed`: this server's 503s, to clients that resend
at once), the ratios this / peer, and for this server how its connections were spread over its
workers. --variant adds this server with other settings, e.g. 'one thread:SERVE_TORCH_THREADS=1'. The
target (issue 23): p99 within 1.1 x the peer's at c=4 and c=16, at no less throughput.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from bench import IMAGENET, Gunicorn, _answers, _ready, photo_jpeg, write_config  # noqa: E402
from servers import free_port  # noqa: E402


def closed_loop(port: int, path: str, body: bytes, clients: int, seconds: float) -> tuple[float, list[float], int]:
    """(answers per second, latencies in s of the 200s, other answers) for `clients` keep-alive clients."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed = [0] * clients
    start, stop = threading.Barrier(clients + 1), threading.Event()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
                answer = conn.getresponse()
                answer.read()  # a "Connection: close" answer closes conn; the next request reconnects
                ok = answer.status == 200
            except OSError:
                ok = False
                conn.close()
            if ok:
                latencies[i].append(time.perf_counter() - began)
            else:
                failed[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    flat = [x for each in latencies for x in each]
    return len(flat) / (time.perf_counter() - began), flat, sum(failed)


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def sockets_per_worker(server: Gunicorn) -> list[int]:
    """Open sockets of each worker: their difference from an idle count is the connections it holds."""
    counts = []
    for pid in server.pids()[1:]:
        try:
            counts.append(sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                              for fd in os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            counts.append(-1)
    return counts


def start_servers(folder: Path, workers: int, variants: dict[str, dict[str, str]]) -> dict[str, Gunicorn]:
    import torch

    from serve.formats.state_dict import build_module

    torch.manual_seed(0)
    checkpoint = folder / "resnet18.pth"
    torch.save(build_module("resnet18", {}).state_dict(), checkpoint)
    model = {"arch": "resnet18", "kwargs": {}, "checkpoint": str(checkpoint), "norm": IMAGENET}
    config = write_config(folder / "models.yaml", model, "resnet18", "auto", folder / "onnx-cache")
    servers = {}
    for label, env in {"this server": {}, **variants}.items():
        port = free_port()
        servers[label] = Gunicorn(["-c", "serve/gunicorn_conf.py", "serve.app:create_app()"],
                                  {"SERVE_CONFIG": str(config), "PORT": str(port), "WEB_CONCURRENCY": str(workers), **env},
                                  port, _ready, folder / f"{label}.log")
    port = free_port()
    env = {"BENCH_ARCH": "resnet18", "BENCH_CHECKPOINT": str(checkpoint), "BENCH_ONNX": str(folder / "peer.onnx"),
           "BENCH_MEAN": json.dumps(IMAGENET[0]), "BENCH_STD": json.dumps(IMAGENET[1]),
           "PYTHONPATH": str(ROOT)}
    peer = Gunicorn(["-w", str(workers), "--preload", "-b", f"127.0.0.1:{port}", "--chdir", str(ROOT / "bench"),
                     "flask_ort_app:app"], env, port, lambda p: _answers(p, "POST", "/predict", photo_jpeg()),
                    folder / "peer.log")
    return {**servers, PEER: peer}


PEER = "flask+ort"


def path(label: str) -> str:
    return "/predict" if label == PEER else "/predictions/resnet18"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seconds", type=float, default=10.0, help="per server, level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:VAR=VALUE[,VAR=VALUE]",
                        help="also this server with these environment settings, e.g. 'one thread:SERVE_TORCH_THREADS=1'")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    variants = {}
    for given in args.variant:
        label, _, settings = given.partition(":")
        variants[label] = dict(item.split("=", 1) for item in settings.split(",") if item)
    body = photo_jpeg()
    rows = []
    print(f"load average before: {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(Path(tmp), args.workers, variants)
        try:
            idle = {name: sockets_per_worker(server) for name, server in servers.items() if name != PEER}
            for name, server in servers.items():  # warm: every worker has answered
                closed_loop(server.port, path(name), body, 4, 3)
                server.wait_idle(20)
            for clients in args.levels:
                pooled = {name: ([], 0.0, 0) for name in servers}
                spread: dict[str, list] = {}
                for r in range(args.rounds):
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        server = servers[name]
                        if name != PEER:
                            timer = threading.Timer(args.seconds / 2, lambda s=server, n=name: spread.setdefault(
                                n, []).append([c - i for c, i in zip(sockets_per_worker(s), idle[n])]))
                            timer.start()
                        rate, latencies, failed = closed_loop(server.port, path(name), body, clients, args.seconds)
                        kept, rates, fails = pooled[name]
                        pooled[name] = (kept + latencies, rates + rate / args.rounds, fails + failed)
                        server.wait_idle(20)
                for name, (latencies, rate, failed) in pooled.items():
                    rows.append({"server": name, "c": clients, "req_s": round(rate, 1),
                                 "p50_ms": round(quantile(latencies, 0.5) * 1000, 1),
                                 "p99_ms": round(quantile(latencies, 0.99) * 1000, 1),
                                 "answers": len(latencies), "failed": failed})
                    print(json.dumps(rows[-1]), flush=True)
                print(f"  connections per worker, mid-round: {spread}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
                try:  # a worker its master left behind (one stuck at exit): the whole process group
                    os.killpg(server.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print(f"load average after: {load()}")
    print(f"\nresnet18 (seeded), {args.workers} workers, cat photo 224 x 224, {args.rounds} x {args.seconds:g} s per cell")
    print(f"{'c':>3} {'server':>24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}   ÷ {PEER}: req/s   p99")
    for clients in args.levels:
        peer = next(r for r in rows if r["c"] == clients and r["server"] == PEER)
        for row in (r for r in rows if r["c"] == clients):
            ratios = "" if row is peer else f"{row['req_s'] / peer['req_s']:17.2f} {row['p99_ms'] / peer['p99_ms']:5.2f}"
            print(f"{clients:>3} {row['server']:>24} {row['req_s']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
                  f"{row['failed']:7d}{ratios}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
