"""`batch` throughput on a folder of real photos, against the in-process limit and a server with 4 clients.

    python bench/batch.py [--images 300] [--config models/models.yaml] [--rounds 1]

Photos: scikit-image's colour photos, cropped, flipped and resized at random into --images JPEGs
(640 px on the longer side, quality 85-95), made once under bench/results/photos/.

Three figures, each images/s over the whole folder, decoding included, the model's load not:
    batch      python -m serve batch FOLDER (its own summary line: the images over the run's seconds)
    limit      one process, the same model and runtime (Predictor.warm_up chooses it: ONNX Runtime where
               runtime auto picks it), every core to torch / ONNX Runtime: read + decode + preprocess
               max_batch_size files, forward them as one batch, finish; no threads, no queue
               (bench/bench.py's limit_child, over the folder's files instead of one image)
    server     python -m serve serve (the default workers: one per core) and 4 client threads posting
               the files, each one request per image
The target: batch >= 0.9 x limit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
          "coins", "camera")


def make_photos(folder: Path, count: int, seed: int = 19) -> list[Path]:
    """`count` JPEGs from scikit-image's photos: a random crop (60-100 % of each side), a flip, 640 px on
    the longer side, quality 85-95."""
    from PIL import Image, ImageOps
    from skimage import data

    existing = sorted(folder.glob("*.jpg"))
    if len(existing) == count:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    rng = random.Random(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        photo = image.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            photo = ImageOps.mirror(photo)
        scale = 640 / max(photo.size)
        photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                             Image.Resampling.BICUBIC)
        path = folder / f"photo{i:04d}.jpg"
        photo.save(path, "JPEG", quality=rng.randrange(85, 96))
        paths.append(path)
    return paths


def measure_batch(folder: Path, config: Path, workdir: Path) -> dict:
    out = workdir / "batch.jsonl"
    result = subprocess.run([sys.executable, "-m", "serve", "batch", str(folder), "--config", str(config), "--output",
                             str(out), "--overwrite", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"batch failed: {result.stderr[-2000:]}")
    match = re.search(r": (\d+) images \((\d+) failed.*\) in ([\d.]+)s, ([\d.]+) images/s", result.stderr)
    lines = out.read_text().splitlines()
    return {"images": int(match[1]), "failed": int(match[2]), "seconds": float(match[3]),
            "images_per_s": float(match[4]), "lines": len(lines)}


def limit_child(args) -> None:
    """One process: read + decode + preprocess a batch of files, forward, finish; over every file once."""
    import torch

    from serve.config import load_config
    from serve.cores import available_cores
    from serve.loader import load_model
    from serve.memory import PixelBudget
    from serve.predictor import Predictor

    threads = available_cores()
    torch.set_num_threads(threads)
    config = load_config(args.config)
    spec = config.models[0]
    predictor = Predictor(spec, load_model(spec), None, PixelBudget(10**9), config.server.onnx_cache_dir,
                          threads=threads)
    predictor.warm_up()  # the runtime the server and batch choose
    files = sorted(Path(args.folder).glob("*.jpg"))
    params = predictor.task.parse_params({})

    def step(paths):
        prepared = [predictor.preprocess(p.read_bytes()) for p in paths]
        outputs = predictor.predict_batch([p.tensor for p in prepared])
        return [predictor.task.finish(o, p, params) for o, p in zip(outputs, prepared)]

    size = spec.max_batch_size
    step(files[:size])
    step(files[:size])
    started = time.perf_counter()
    for i in range(0, len(files), size):
        step(files[i:i + size])
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds,
                      "batch": size, "threads": threads, "runtime": predictor.runtime.name}))


def measure_limit(folder: Path, config: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "_limit", "--folder", str(folder), "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"limit failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_server(folder: Path, config: Path, workdir: Path, clients: int = 4) -> dict:
    import requests

    sys.path.insert(0, str(ROOT / "tests"))
    from servers import free_port, wait_ready, without_server_settings

    port = free_port()
    log = workdir / "server.log"
    env = {**without_server_settings(os.environ), "SERVE_CONFIG": str(config)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log, started, limit_s=300)
        from serve.config import load_config

        name = load_config(config).models[0].name
        files = sorted(folder.glob("*.jpg"))
        payloads = [p.read_bytes() for p in files]
        for data in payloads[:8]:  # warm: every worker's first batches
            requests.post(f"{url}/predictions/{name}", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
        queue = iter(range(len(payloads)))
        lock = threading.Lock()
        failures = []

        def client():
            session = requests.Session()
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                answer = session.post(f"{url}/predictions/{name}", data=payloads[i],
                                      headers={"Content-Type": "image/jpeg"}, timeout=120)
                if answer.status_code != 200:
                    failures.append(answer.status_code)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        return {"images": len(payloads), "seconds": seconds, "images_per_s": len(payloads) / seconds,
                "clients": clients, "non_200": len(failures)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "_limit"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--config", type=Path, default=ROOT / "models" / "models.yaml")
    parser.add_argument("--folder", type=Path, default=ROOT / "bench" / "results" / "photos")
    parser.add_argument("--rounds", type=int, default=1, help="measure each figure this many times, interleaved")
    args = parser.parse_args()
    if args.mode == "_limit":
        limit_child(args)
        return
    make_photos(args.folder, args.images)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        for _ in range(args.rounds):
            rounds.append({"limit": measure_limit(args.folder, args.config),
                           "batch": measure_batch(args.folder, args.config.resolve(), Path(tmp)),
                           "server": measure_server(args.folder, args.config.resolve(), Path(tmp))})
    for r in rounds:
        r["batch_over_limit"] = round(r["batch"]["images_per_s"] / r["limit"]["images_per_s"], 3)
        r["batch_over_server"] = round(r["batch"]["images_per_s"] / r["server"]["images_per_s"], 3)
    report = {"date": time.strftime("%Y-%m-%d"), "cores": len(os.sched_getaffinity(0)), "images": args.images,
              "config": str(args.config), "rounds": rounds}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "batch.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
