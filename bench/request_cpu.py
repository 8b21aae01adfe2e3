"""CPU per request outside the forward: what a served request costs besides the model itself.

    python bench/request_cpu.py                     # default config, cat photo 224 x 224, 1,000 requests
    python bench/request_cpu.py --requests 300 --photo full

One gunicorn worker (the default config: EfficientNet-Lite0 on ONNX Runtime) with one inference thread
(SERVE_TORCH_THREADS=1, so no thread spins and wall time in the forward is its CPU time), one client on
one keep-alive connection, --requests posts of the cat photo (224 x 224 as bench/bench.py sends it, or
the full 451 x 300 photo). It reads the CPU time the server's processes and the worker's threads used
(/proc) and prints per request: all of it, the inference thread's (the forward, with its normalisation
and the batch's bookkeeping), and the other threads' (HTTP in gunicorn, Flask, decode and resize,
admission, JSON, the access log, metrics): the input path. CPU time does not grow with a busy machine's
waiting, so these figures are steadier than latencies there (clock ticks: 10 ms each, so use enough
requests).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from bench import Gunicorn, _ready, photo_jpeg  # noqa: E402
from servers import free_port  # noqa: E402


def full_photo() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of process `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that just ended
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def measure(port: int, server: Gunicorn, body: bytes, requests: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post() -> None:
        conn.request("POST", "/predictions", body=body, headers={"Content-Type": "image/jpeg"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status

    for _ in range(20):  # warm
        post()
    server.wait_idle(10)
    worker = server.pids()[1]
    threads0, cpu0, began = thread_cpu(worker), server.cpu_seconds(), time.perf_counter()
    for _ in range(requests):
        post()
    wall = time.perf_counter() - began
    cpu = server.cpu_seconds() - cpu0
    threads1 = thread_cpu(worker)
    conn.close()
    used = {tid: threads1[tid] - threads0.get(tid, 0.0) for tid in threads1}
    # The inference thread is the one that ran the forwards: the most CPU of the worker's threads; the
    # main thread (gunicorn's loop: accepting, polling keep-alive connections) has the process's id.
    inference = max(used.values())
    main = used.get(worker, 0.0)
    per = lambda seconds: round(seconds / requests * 1000, 2)  # noqa: E731
    return {"requests": requests, "cpu_ms": per(cpu), "inference_thread_ms": per(inference),
            "outside_inference_ms": per(cpu - inference), "of_which_main_thread_ms": per(main),
            "of_which_request_threads_ms": per(sum(used.values()) - inference - main),
            "of_which_master_ms": per(cpu - sum(used.values())), "latency_ms": per(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--photo", choices=["224", "full"], default="224")
    parser.add_argument("--config", type=Path, default=ROOT / "models" / "models.yaml")
    args = parser.parse_args()
    body = photo_jpeg() if args.photo == "224" else full_photo()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {"SERVE_CONFIG": str(args.config), "PORT": str(port), "WEB_CONCURRENCY": "1", "SERVE_TORCH_THREADS": "1"}
        server = Gunicorn(["-c", "serve/gunicorn_conf.py", "serve.app:create_app()"], env, port, _ready,
                          Path(tmp) / "gunicorn.log")
        try:
            row = measure(port, server, body, args.requests)
        finally:
            server.stop()
    row["photo_bytes"] = len(body)
    row["load_average"] = Path("/proc/loadavg").read_text().split()[0]
    print(json.dumps(row))


if __name__ == "__main__":
    main()
