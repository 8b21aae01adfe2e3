"""Per-task figures: a torchvision detector and segmenter (seeded weights), in-process against served.

In-process: decode + prepare + forward + finish of the cat photo, one image at a time, on this process
(torch at its default threads). Served: this server under gunicorn (2 workers, the defaults) with
closed-loop clients at c=1 and c=4 for DURATION_S each. Prints one table.

    ~/.cache/serve-venv/bin/python bench/tasks.py
"""
from __future__ import annotations

import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from conftest import write_config  # noqa: E402
from servers import Server  # noqa: E402

DURATION_S = 10.0
MODELS = {
    "detector": ("detect", "fasterrcnn_mobilenet_v3_large_320_fpn", {}),
    "segmenter": ("segment", "lraspp_mobilenet_v3_large", {"num_classes": 21}),
}


def cat_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def in_process(config: Path, name: str, photo: bytes, runs: int = 20) -> list[float]:
    from serve.config import load_config
    from serve.service import Call, Inputs, PredictionService

    service = PredictionService.load(load_config(config), names=[name])
    call = Call(lambda _served: Inputs([photo]), name)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        service.predict(call).results()
        times.append((time.perf_counter() - started) * 1000)
    service.close()
    return times


def served(url: str, name: str, photo: bytes, clients: int) -> tuple[float, list[float], int]:
    """Closed-loop clients that wait the Retry-After of a shed (503) answer; answered req/s, latencies, sheds."""
    latencies: list[float] = []
    shed = [0]
    lock = threading.Lock()
    end = time.monotonic() + DURATION_S

    def loop():
        session = requests.Session()
        while time.monotonic() < end:
            started = time.perf_counter()
            answer = session.post(f"{url}/predictions/{name}", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
            if answer.status_code == 503:
                with lock:
                    shed[0] += 1
                time.sleep(min(1.0, float(answer.headers.get("Retry-After", 1))))
                continue
            answer.raise_for_status()
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / DURATION_S, latencies, shed[0]


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    photo = cat_jpeg()
    folder = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    specs = []
    for name, (task, arch, kwargs) in MODELS.items():
        torch.manual_seed(0)
        net = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs)
        torch.save(net.state_dict(), folder / f"{name}.pth")
        specs.append({"name": name, "task": task, "runtime": "eager", "architecture": arch, "kwargs": {"weights_backbone": None, **kwargs},
                      "checkpoint": str(folder / f"{name}.pth"), "device": "cpu",
                      **({"preprocess": {"resize": 520, "crop": 224}} if task == "segment" else {})})
    config = write_config(folder, specs)
    rows = []
    for name in MODELS:
        local = in_process(config, name, photo)
        rows.append((name, "in-process, 1 at a time", 1000 / statistics.median(local), statistics.median(local), p(local, 99), 0))
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, folder / "gunicorn.log", inherit_settings=False)
    try:
        for name in MODELS:
            for clients in (1, 4):
                rate, latencies, shed = served(server.url, name, photo, clients)
                rows.append((name, f"served, c={clients}", rate, statistics.median(latencies), p(latencies, 99), shed))
    finally:
        server.stop()
    print(f"{'model':<10} {'how':<26} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'shed':>6}")
    for name, how, rate, p50, p99, shed in rows:
        print(f"{name:<10} {how:<26} {rate:7.1f} {p50:8.1f} {p99:8.1f} {shed:6}")


if __name__ == "__main__":
    main()
