"""Many models on one machine: what lazy loading and a memory budget cost as the model count grows.

For each count (1, 10, 50, 200 by default) it writes a config of that many models: the first is the
"hot" model (load: eager), the rest lazy, real torchvision and timm architectures with seeded weights
(mixed sizes, 1-45 MB), all runtime eager; and starts gunicorn with 2 workers and a per-worker
model_memory_budget that holds a fraction of them. Then, in one run:

  - start-up: seconds until /ready;
  - calm: the hot model at c=1 beside 2 clients cycling over the lazy models already loaded (nothing
    loads): the hot model's p50/p99;
  - churn: the hot model at c=1 beside 2 clients choosing lazy models by Zipf popularity (s=1.1), so
    models load and are evicted: the hot model's p50/p99 again, and the cold loads (each worker logs
    "loaded on first use in X s": their p50/p99);
  - memory: the server's PSS (master and workers) after the churn.

Then, in process: a cold and a warm lazy load (runtime auto, so the ONNX export is part of a cold
one; the export cache and the checkpoint's sha256 make the reload after an eviction skip it) for
EfficientNet-Lite0 (the default model) and resnet50 (seeded weights).

    ~/.cache/serve-venv/bin/python bench/many_models.py                    # ~5 minutes
    ~/.cache/serve-venv/bin/python bench/many_models.py --counts 1 10 --seconds 5
Writes docs/many_models.json and docs/many_models.png.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
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
from PIL import Image  # noqa: E402

from conftest import write_config  # noqa: E402
from servers import Server, worker_pids  # noqa: E402

# (architecture, kwargs): small to mid-sized real networks, torchvision's and timm's.
ARCHITECTURES = [
    ("squeezenet1_1", {}),
    ("mobilenet_v3_small", {}),
    ("shufflenet_v2_x0_5", {}),
    ("mnasnet0_5", {}),
    ("timm:resnet10t", {}),
    ("timm:lcnet_050", {}),
    ("timm:mobilenetv3_small_050", {}),
    ("timm:regnetx_002", {}),
    ("efficientnet_b0", {}),
    ("resnet18", {}),
]
HOT = ("mobilenet_v3_small", {})
BUDGET_MB = 120  # per worker: a handful of these models


def build(architecture: str, kwargs: dict) -> torch.nn.Module:
    from serve.formats.state_dict import build_module

    return build_module(architecture, kwargs)


def checkpoints(folder: Path) -> dict[str, Path]:
    """One seeded checkpoint per architecture (models of the same architecture share its file)."""
    paths = {}
    for i, (arch, kwargs) in enumerate([HOT, *ARCHITECTURES]):
        path = folder / f"{arch.replace(':', '_')}.pth"
        if not path.exists():
            torch.manual_seed(i)
            torch.save(build(arch, kwargs).state_dict(), path)
        paths[arch] = path
    return paths


def spec(name: str, arch: str, kwargs: dict, path: Path, load: str) -> dict:
    return {"name": name, "architecture": arch, "kwargs": kwargs, "checkpoint": str(path), "device": "cpu",
            "runtime": "eager", "load": load, "topk": 1, "preprocess": {"resize": 224, "crop": 224}}


def photo() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((224, 224)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def pss_mb(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def run_count(count: int, folder: Path, paths: dict[str, Path], image: bytes, seconds: float) -> dict:
    lazy = [f"m{i:03d}" for i in range(1, count)]
    specs = [spec("hot", *HOT, paths[HOT[0]], "eager")]
    for i, name in enumerate(lazy):
        arch, kwargs = ARCHITECTURES[i % len(ARCHITECTURES)]
        specs.append(spec(name, arch, kwargs, paths[arch], "lazy"))
    config = write_config(folder, specs, model_memory_budget=f"{BUDGET_MB}MiB")
    log = folder / f"gunicorn-{count}.log"
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2"}, log, inherit_settings=False)
    try:
        pids = worker_pids(server.proc.pid, expected=2) | {server.proc.pid}
        post = lambda session, name: session.post(  # noqa: E731
            f"{server.url}/predictions/{name}", data=image, headers={"Content-Type": "image/jpeg"}, timeout=120)
        # The few most popular lazy models, loaded in both workers before the calm phase.
        resident = lazy[:2]
        for _ in range(4):
            for name in resident:
                post(requests, name)

        def phase(choose) -> tuple[list[float], int]:
            hot, end, stop = [], time.monotonic() + seconds, threading.Event()

            def background(seed: int):
                rng, session = random.Random(seed), requests.Session()
                while not stop.is_set():
                    name = choose(rng)
                    if name is not None:
                        answer = post(session, name)
                        if answer.status_code == 503:
                            time.sleep(min(1.0, float(answer.headers.get("Retry-After", 1))))

            threads = [threading.Thread(target=background, args=(s,)) for s in range(2)]
            for thread in threads:
                thread.start()
            session = requests.Session()
            while time.monotonic() < end:
                started = time.perf_counter()
                assert post(session, "hot").status_code == 200
                hot.append((time.perf_counter() - started) * 1000)
            stop.set()
            for thread in threads:
                thread.join(120)
            return hot, len(hot)

        weights = [1 / (rank ** 1.1) for rank in range(1, len(lazy) + 1)]
        calm, _ = phase(lambda rng: rng.choice(resident) if resident else None)
        loads_before = len(re.findall(r"loaded on first use in ([0-9.]+) s", log.read_text()))
        churn, _ = phase(lambda rng: rng.choices(lazy, weights)[0] if lazy else None)
        loads = [float(s) * 1000 for s in re.findall(r"loaded on first use in ([0-9.]+) s", log.read_text())]
        memory = pss_mb(pids)
        evictions = len(re.findall(r"evicted to fit", log.read_text()))
    finally:
        server.stop()
    return {"models": count, "startup_s": round(server.ready_after_s, 2), "pss_mb": round(memory, 1),
            "budget_mb_per_worker": BUDGET_MB,
            "hot_calm_p50_ms": round(statistics.median(calm), 1), "hot_calm_p99_ms": round(pct(calm, 99), 1),
            "hot_churn_p50_ms": round(statistics.median(churn), 1), "hot_churn_p99_ms": round(pct(churn, 99), 1),
            "hot_p99_ratio": round(pct(churn, 99) / pct(calm, 99), 2),
            "lazy_loads": len(loads), "loads_during_churn": len(loads) - loads_before, "evictions": evictions,
            "cold_load_p50_ms": round(pct(loads, 50), 1), "cold_load_p99_ms": round(pct(loads, 99), 1)}


def cold_and_warm(folder: Path, image: bytes) -> list[dict]:
    """A lazy model's first load (export cache empty) and its reload after an eviction (cache warm)."""
    import yaml

    from serve.config import build_config
    from serve.service import Call, Inputs, PredictionService

    default = yaml.safe_load((ROOT / "models" / "models.yaml").read_text())["models"][0]
    torch.manual_seed(0)
    resnet50 = folder / "resnet50.pth"
    torch.save(build("resnet50", {}).state_dict(), resnet50)
    models = [
        {**default, "name": "lite0", "load": "lazy", "device": "cpu"},
        {**spec("resnet50", "resnet50", {}, resnet50, "lazy"), "runtime": "auto"},
    ]
    config = build_config({"models": models, "server": {"model_memory_budget": "520MiB",  # one at a time
                                                        "onnx_cache_dir": str(folder / "onnx-cache")}},
                          base_dir=ROOT / "models", env={})
    service = PredictionService.load(config)
    rows = []
    try:
        call = lambda name: service.predict(Call(lambda _s: Inputs([image]), name))  # noqa: E731
        for name in ("lite0", "resnet50", "lite0", "resnet50"):  # each load evicts the other
            call(name)
            served = service.table.served(name)
            rows.append({"model": name, "load": "warm" if any(r["model"] == name for r in rows) else "cold",
                         "seconds": round(service.table.residency.load_s[name], 2),
                         "runtime": served.predictor.runtime.name, "bytes": served.bytes})
    finally:
        service.close()
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["models"] for r in results]
    fig, (memory, latency) = plt.subplots(1, 2, figsize=(10, 4))
    memory.plot(counts, [r["pss_mb"] for r in results], "o-", label="server PSS after churn")
    base = next((r["pss_mb"] for r in results if r["models"] == 1), None)
    if base is not None:  # the one-model server (the hot model alone) plus what the budget lets the workers hold
        memory.axhline(base + 2 * BUDGET_MB, color="grey", ls="--",
                       label=f"1-model server + 2 workers x budget ({BUDGET_MB} MiB)")
    memory.set_xscale("log"), memory.set_xlabel("configured models"), memory.set_ylabel("MiB"), memory.legend()
    for key, label in (("hot_calm_p99_ms", "hot p99, nothing loading"), ("hot_churn_p99_ms", "hot p99, loads and evictions"),
                       ("cold_load_p50_ms", "cold load p50"), ("cold_load_p99_ms", "cold load p99")):
        latency.plot(counts, [r[key] for r in results], "o-", label=label)
    latency.set_xscale("log"), latency.set_yscale("log"), latency.set_xlabel("configured models")
    latency.set_ylabel("ms"), latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument("--seconds", type=float, default=15.0, help="each phase's length")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "many_models.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-many-"))
    image = photo()
    paths = checkpoints(folder)
    results = []
    for count in args.counts:
        row = run_count(count, folder, paths, image, args.seconds)
        print(json.dumps(row), flush=True)
        results.append(row)
    loads = cold_and_warm(folder, image)
    for row in loads:
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cores": len(__import__("os").sched_getaffinity(0)),
                                    "scaling": results, "cold_and_warm": loads}, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"{'models':>6} {'start s':>8} {'PSS MiB':>8} {'hot p99 calm':>13} {'churn':>7} {'ratio':>6} "
          f"{'loads':>6} {'evict':>6} {'cold p50':>9} {'cold p99':>9}")
    for r in results:
        print(f"{r['models']:>6} {r['startup_s']:>8} {r['pss_mb']:>8} {r['hot_calm_p99_ms']:>13} "
              f"{r['hot_churn_p99_ms']:>7} {r['hot_p99_ratio']:>6} {r['lazy_loads']:>6} {r['evictions']:>6} "
              f"{r['cold_load_p50_ms']:>9} {r['cold_load_p99_ms']:>9}")


if __name__ == "__main__":
    main()
