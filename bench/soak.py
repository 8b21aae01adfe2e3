"""Soak: a bounded run of valid and hostile requests against a real gunicorn, watching every worker's memory.

    python bench/soak.py                          # 5 minutes, 16 clients, 2 workers, the default model
    python bench/soak.py --seconds 15 --clients 8 # the short version CI runs (tests/test_soak.py)

Each client loops: 80 % the cat photo, 20 % a random case from tools/hostile_corpus.py, each checked
against the status that case must get. Every `--sample-s` seconds it records each worker's RSS and
PSS. At the end it stops the server with SIGTERM and reports requests served, answers by status,
mismatches, worker PIDs before/after, RSS at start and end. Exit status 1 on any 5xx, mismatch,
dead worker or unclean exit.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]

from hostile_corpus import build_corpus  # noqa: E402
from servers import Server, worker_pids  # noqa: E402


def memory_kb(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(line.split()[1])
    return values


def cat_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hostile", type=float, default=0.2, help="fraction of hostile requests")
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()

    corpus = build_corpus()
    photo = cat_jpeg()
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "gunicorn.log"
    # The default model (efficientnet_lite0, asked for below), whatever SERVE_* the shell has set.
    # A generous wait budget: the soak is about what hostile input and time do to the workers, and on a
    # machine shared with other jobs 8 clients' queue can outlast max_queue_wait_ms (admission: tests/test_admission.py).
    server = Server({"SERVE_DEVICE": "cpu", "WEB_CONCURRENCY": str(args.workers), "SERVE_MAX_QUEUE_WAIT_MS": "60000"},
                    log, inherit_settings=False)
    model = "efficientnet_lite0"
    pids_before = worker_pids(server.proc.pid, expected=args.workers)
    samples = [{"t": 0.0, **{str(p): memory_kb(p) for p in pids_before}}]
    statuses: Counter = Counter()
    mismatches: Counter = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    end = started + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        previous = "-"
        while time.monotonic() < end:
            if rng.random() < args.hostile:
                case = rng.choice(corpus)
                url, kwargs, expected = case.url(server.url, model), case.request_kwargs(), case.status
                name = case.name
            else:
                url, kwargs, expected, name = f"{server.url}/predictions/{model}", {
                    "data": photo, "headers": {"Content-Type": "image/jpeg"}}, 200, "photo"
            try:
                status: object = session.post(url, timeout=60, **kwargs).status_code
            except requests.RequestException as exc:
                status, session = type(exc).__name__, requests.Session()
            with lock:
                statuses[str(status)] += 1
                if status != expected:
                    mismatches[f"{name}: {status} (expected {expected}; previous on this connection: {previous})"] += 1
            previous = name
            if expected == 413 and name != "photo" and case.code == "request_entity_too_large":
                # A body the server refuses to read ends the connection (RFC 9110 allows it), as
                # gunicorn does for a chunked body over the limit: clients open a new one.
                session = requests.Session()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    while time.monotonic() < end:
        time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        current = worker_pids(server.proc.pid)
        samples.append({"t": round(time.monotonic() - started, 1),
                        **{str(p): memory_kb(p) for p in current if Path(f"/proc/{p}").exists()}})
    for t in threads:
        t.join(120)
    pids_after = worker_pids(server.proc.pid)
    stopping = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(60)

    def total(sample: dict, key: str) -> int:
        return round(sum(v[key] for k, v in sample.items() if k != "t") / 1024)

    report = {
        "seconds": args.seconds, "clients": args.clients, "workers": args.workers, "hostile_fraction": args.hostile,
        "requests": sum(statuses.values()), "statuses": dict(statuses), "mismatches": dict(mismatches),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5") or not s.isdigit()),
        "workers_before": sorted(pids_before), "workers_after": sorted(pids_after),
        "rss_mb_start": total(samples[0], "rss"), "rss_mb_end": total(samples[-1], "rss"),
        "pss_mb_start": total(samples[0], "pss"), "pss_mb_end": total(samples[-1], "pss"),
        "per_worker_rss_mb": {p: [round(s[p]["rss"] / 1024) for s in samples if p in s] for p in map(str, pids_before)},
        "exit_code": exit_code, "stop_seconds": round(time.monotonic() - stopping, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "samples": samples}, indent=1))
    print(json.dumps(report, indent=1))
    ok = (report["server_errors"] == 0 and not mismatches and pids_before == pids_after and exit_code == 0)
    print("soak:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
