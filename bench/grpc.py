"""gRPC beside REST V2 and the plain route: one server, one model, the same photo, the same clients.

One gunicorn (2 workers, the defaults, gRPC on a port of its own) serves the tiny test model, so the
figures are the protocols' cost around a forward of well under a millisecond: decoding the cat photo
(451 x 300 JPEG) is the same work on every route. Closed-loop clients, each a thread with its own
connection (its own channel for gRPC, so SO_REUSEPORT spreads them over the workers):

    grpc   tritonclient.grpc   InferenceServerClient.infer, BYTES input "image" (raw_input_contents)
    v2     tritonclient.http   the same call over REST V2 (binary tensor extension): its request body and
                               response parser, sent with requests (its own client is gevent-based)
    plain  requests            POST /predictions/tiny with the JPEG as the body

at c = 1, 4, 16 for DURATION_S each. Prints throughput and p50 / p99 latency per route and concurrency.
The clients run in this process, on the same cores as the server: their own cost is in the figures.

    ~/.cache/serve-venv/bin/python bench/grpc.py [--seconds 8]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# In place of this script's folder, where this file itself would be imported as `grpc`.
sys.path[:1] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from conftest import tiny_model_config, tiny_net, write_config  # noqa: E402
from servers import Server, free_port  # noqa: E402

CONCURRENCY = (1, 4, 16)


def cat_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def grpc_call(target: str, photo: bytes):
    client = grpcclient.InferenceServerClient(target)
    image = grpcclient.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([photo], dtype=np.object_))
    return lambda: client.infer("tiny", [image]).as_numpy("probabilities")


def v2_call(url: str, photo: bytes):
    """tritonclient.http's own request body and response parser over a requests session (its client is
    gevent-based and can't be called from several threads)."""
    session = requests.Session()
    image = httpclient.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([photo], dtype=np.object_))
    body, json_size = httpclient.InferenceServerClient.generate_request_body([image])
    headers = {"Inference-Header-Content-Length": str(json_size), "Content-Type": "application/octet-stream"}

    def call():
        response = session.post(f"{url}/v2/models/tiny/infer", data=body, headers=headers, timeout=60)
        response.raise_for_status()
        length = response.headers.get("Inference-Header-Content-Length")
        result = httpclient.InferenceServerClient.parse_response_body(
            response.content, header_length=int(length) if length else None)
        return result.as_numpy("probabilities")
    return call


def plain_call(url: str, photo: bytes):
    session = requests.Session()

    def call():
        response = session.post(f"{url}/predictions/tiny", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
        response.raise_for_status()
    return call


def run(make_call, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Closed loop: each client calls again as soon as answered; (answers per second, latencies in s)."""
    calls = [make_call() for _ in range(clients)]
    for call in calls:
        call()  # connect and warm up, outside the window
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            calls[i]()
            latencies[i].append(time.perf_counter() - began)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = [x for each in latencies for x in each]
    return len(flat) / elapsed, flat


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per route and concurrency")
    args = parser.parse_args()
    photo = cat_jpeg()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.save(tiny_net().state_dict(), folder / "tiny.pth")
        config = write_config(folder, [tiny_model_config(folder / "tiny.pth")])
        grpc_port = free_port()
        server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2", "SERVE_GRPC_PORT": str(grpc_port)},
                        folder / "gunicorn.log", inherit_settings=False)
        try:
            routes = {
                "grpc": lambda: grpc_call(f"127.0.0.1:{grpc_port}", photo),
                "v2": lambda: v2_call(server.url, photo),
                "plain": lambda: plain_call(server.url, photo),
            }
            print(f"tiny model, cat photo ({len(photo)} bytes), 2 workers, {args.seconds:g} s per cell")
            print(f"{'route':6} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for clients in CONCURRENCY:
                for name, make_call in routes.items():
                    rate, latencies = run(make_call, clients, args.seconds)
                    print(f"{name:6} {clients:>3} {rate:8.1f} {percentile(latencies, 50) * 1000:8.2f} "
                          f"{percentile(latencies, 99) * 1000:8.2f}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
