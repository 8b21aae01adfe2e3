"""Benchmark: the in-process limit, our server under gunicorn, and a naive Flask baseline, side by side.

    python bench/bench.py                 # full run (~6 minutes on 2 cores), writes bench/results/
    python bench/bench.py --seconds 2 --models tiny_cnn --levels 1 4   # a quick look

For each model it measures, interleaved so machine drift cancels out:
  limit     decode + preprocess + forward in-process (no HTTP) at batch 1/4/16/32 with one process
            using every core, and with one single-threaded process per core; the best is "the limit"
  server    this project under gunicorn on 127.0.0.1, closed-loop clients at each concurrency
  baseline  bench/naive_app.py (the tutorial Flask app) under gunicorn with the same worker count
It prints a table with the ratios server/limit and server/baseline, saves JSON and draws a PNG.
Also: CPU per request (server processes' CPU time / requests), memory (PSS) for 1, 2 and 4 workers,
and a 12-megapixel photo decoded with and without JPEG draft mode.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import free_port  # noqa: E402

from serve.cores import available_cores  # noqa: E402

CORES = available_cores()  # the server's own default worker count
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
LITE = ([0.498, 0.498, 0.498], [0.502, 0.502, 0.502])


def model_table(workdir: Path) -> dict[str, dict]:
    """The three benchmark models; random-weight checkpoints are made here, as the tests do."""
    import torch

    from serve.config import load_config
    from serve.loader import build_module

    default = load_config(ROOT / "models" / "models.yaml", env={}).models[0]
    models = {
        "efficientnet_lite0": dict(arch=default.architecture, kwargs=dict(default.kwargs),
                                   checkpoint=str(default.checkpoint), norm=LITE),
        "resnet18": dict(arch="resnet18", kwargs={}, norm=IMAGENET),
        "tiny_cnn": dict(arch="models.tiny:TinyCNN", kwargs={"num_classes": 10}, norm=IMAGENET),
    }
    torch.manual_seed(0)
    for name, m in models.items():
        if "checkpoint" not in m:
            m["checkpoint"] = str(workdir / f"{name}.pth")
            torch.save(build_module(m["arch"], m["kwargs"]).state_dict(), m["checkpoint"])
    return models


def photo_jpeg(size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    image = image.resize(size, Image.Resampling.BICUBIC) if size else image.resize((224, 224))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- in-process limit


def limit_child(args) -> None:
    """One measuring process: run decode + preprocess + forward batches from start_at for `seconds`."""
    import torch

    from serve.config import build_config
    from serve.loader import load_model
    from serve.memory import PixelBudget
    from serve.predictor import Predictor

    torch.set_num_threads(args.threads)
    m = json.loads(args.spec)
    spec = build_config({"models": [{"name": "m", "architecture": m["arch"], "kwargs": m["kwargs"],
                                     "checkpoint": m["checkpoint"], "device": "cpu",
                                     "preprocess": {"mean": m["norm"][0], "std": m["norm"][1]}}]}).models[0]
    predictor = Predictor(spec, load_model(spec), None, PixelBudget(10**9))
    data = Path(args.image).read_bytes()

    def step():
        probs = predictor.predict_batch([predictor.preprocess(data) for _ in range(args.batch)])
        return [predictor.describe(p, 5) for p in probs]

    for _ in range(2):
        step()
    while time.time() < args.start_at:
        time.sleep(0.001)
    images, latencies, end = 0, [], args.start_at + args.seconds
    while time.time() < end:
        t = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - t)
        images += args.batch
    print(json.dumps({"images": images, "seconds": args.seconds, "latency_p50_ms": 1000 * statistics.median(latencies)}))


def measure_limit(model: dict, image: Path, batch: int, procs: int, threads: int, seconds: float) -> dict:
    start_at = time.time() + 8  # every process has loaded its model by then
    cmd = [sys.executable, __file__, "_limit", "--spec", json.dumps(model), "--image", str(image),
           "--batch", str(batch), "--threads", str(threads), "--seconds", str(seconds), "--start-at", str(start_at)]
    children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(procs)]
    results = [json.loads(c.communicate(timeout=120)[0]) for c in children]
    return {
        "batch": batch, "procs": procs, "threads": threads,
        "images_per_s": sum(r["images"] for r in results) / seconds,
        "batch_latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in results),
    }


# ---------------------------------------------------------------- servers and load


class Gunicorn:
    def __init__(self, args: list[str], env: dict[str, str], port: int, ready, log: Path):
        """Start gunicorn and wait (2 minutes at most) until ready(port) is true."""
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", *args], cwd=ROOT, env={**os.environ, **env},
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not ready(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def memory_mb(self) -> dict:
        pss = rss = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        return {"pss_mb": round(pss / 1024), "rss_mb": round(rss / 1024)}

    def wait_idle(self, limit_s: float = 60) -> float:
        """Wait until the server's processes use under 5 % of a core: a step's backlog must not run
        into the next step (a collapsed server keeps working long after its clients are gone)."""
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            before = self.cpu_seconds()
            time.sleep(0.5)
            if self.cpu_seconds() - before < 0.025:
                break
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the master and its workers at once (a process group): no backlog survives."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_ours(config: Path, workers: int, log: Path, extra_env: dict | None = None) -> Gunicorn:
    port = free_port()
    env = {"SERVE_CONFIG": str(config), "PORT": str(port), **(extra_env or {})}
    if workers:
        env["WEB_CONCURRENCY"] = str(workers)
    return Gunicorn(["-c", "serve/gunicorn_conf.py", "serve.app:create_app()"], env, port, _ready, log)


def start_baseline(model: dict, workers: int, log: Path) -> Gunicorn:
    port = free_port()
    env = {"BENCH_ARCH": model["arch"], "BENCH_KWARGS": json.dumps(model["kwargs"]),
           "BENCH_CHECKPOINT": model["checkpoint"], "BENCH_MEAN": json.dumps(model["norm"][0]),
           "BENCH_STD": json.dumps(model["norm"][1]), "PYTHONPATH": str(ROOT)}
    # The tutorial app has no readiness route: it is ready when a prediction succeeds.
    args = ["-w", str(workers), "-b", f"127.0.0.1:{port}", "--chdir", str(ROOT / "bench"), "naive_app:app"]
    return Gunicorn(args, env, port, lambda p: _answers(p, "POST", "/predict", photo_jpeg()), log)


def _ready(port: int) -> bool:
    return _answers(port, "GET", "/ready", None)


def _answers(port: int, method: str, path: str, body: bytes | None) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers={"Content-Type": "image/jpeg"} if body else {})
        return conn.getresponse().status == 200
    except OSError:
        return False


def closed_loop(port: int, path: str, body_file: Path, concurrency: int, seconds: float) -> dict:
    """`concurrency` keep-alive clients (wrk, one thread), each sending the next request when answered."""
    url = f"http://127.0.0.1:{port}{path}"
    env = {**os.environ, "BENCH_BODY": str(body_file)}

    def wrk(duration: float) -> dict:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "30s", "-s", str(ROOT / "bench" / "post.lua"), url]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60).stdout
        return json.loads(out.split("BENCH ", 1)[1])

    r = wrk(seconds)  # wrk takes whole seconds
    ok = r["requests"] - r["non_2xx"]
    return {"concurrency": concurrency, "requests": r["requests"],
            "requests_per_s": round(ok / (r["duration_us"] / 1e6), 1),
            "p50_ms": round(r["p50_us"] / 1000, 1), "p95_ms": round(r["p95_us"] / 1000, 1),
            "p99_ms": round(r["p99_us"] / 1000, 1), "max_ms": round(r["max_us"] / 1000, 1),
            "errors": r["non_2xx"] + r["socket_errors"] + r["timeouts"],
            "non_2xx": r["non_2xx"], "socket_errors": r["socket_errors"], "timeouts": r["timeouts"]}


# ---------------------------------------------------------------- the run


def settle(server: Gunicorn, base: Gunicorn, model: dict, workers: int, log: Path) -> Gunicorn:
    """Let a server finish what wrk left behind before the next step; return the (maybe new) baseline.

    A collapsed baseline would work through its backlog for minutes, stealing the CPU from the next
    step: it is killed and started afresh instead.
    """
    if server.wait_idle(10) < 10 or server is not base:
        server.wait_idle(50)
        return base
    base.kill()
    return start_baseline(model, workers, log)


def write_config(path: Path, model: dict, name: str) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"models": [{
        "name": name, "architecture": model["arch"], "kwargs": model["kwargs"], "checkpoint": model["checkpoint"],
        "device": "cpu", "preprocess": {"mean": model["norm"][0], "std": model["norm"][1]},
    }]}))
    return path


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"logs in {workdir}")
    models = model_table(workdir)
    image = workdir / "photo.jpg"
    image.write_bytes(photo_jpeg())
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {CORES} cores, "
              f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**30} GiB, {platform.python_version()}",
              "workers": args.workers, "seconds_per_step": args.seconds, "models": {}}
    for name in args.models:
        model = models[name]
        print(f"\n== {name}", flush=True)
        limits = []
        for batch in (1, 4, 16, 32):
            limits.append(measure_limit(model, image, batch, 1, CORES, args.seconds))
            print(f"limit 1 proc x {CORES} threads batch {batch:2}: {limits[-1]['images_per_s']:.1f} img/s", flush=True)
        for batch in (1, 4):
            limits.append(measure_limit(model, image, batch, CORES, 1, args.seconds))
            print(f"limit {CORES} procs x 1 thread batch {batch:2}: {limits[-1]['images_per_s']:.1f} img/s", flush=True)
        config = write_config(workdir / f"{name}.yaml", model, name)
        ours = start_ours(config, args.workers, workdir / f"{name}-ours.log")
        base = start_baseline(model, args.workers, workdir / f"{name}-base.log")
        steps = []
        for i, c in enumerate(args.levels):
            order = [("server", f"/predictions/{name}"), ("baseline", "/predict")]
            pair = {}
            for label, path in (order if i % 2 == 0 else order[::-1]):
                server = ours if label == "server" else base
                closed_loop(server.port, path, image, c, 1.0)
                base = settle(server, base, model, args.workers, workdir / f"{name}-base.log")
                server = ours if label == "server" else base
                cpu = server.cpu_seconds()
                result = closed_loop(server.port, path, image, c, args.seconds)
                result["cpu_ms_per_request"] = round(1000 * (server.cpu_seconds() - cpu) / max(result["requests"], 1), 2)
                base = settle(server, base, model, args.workers, workdir / f"{name}-base.log")
                pair[label] = result
                print(f"{label:8} c={c:3}: {result['requests_per_s']:7.1f} req/s  p50 {result['p50_ms']} ms  "
                      f"p99 {result['p99_ms']} ms  errors {result['errors']} (non-2xx {result['non_2xx']}, socket "
                      f"{result['socket_errors']}, timeouts {result['timeouts']})  cpu/req {result['cpu_ms_per_request']} ms",
                      flush=True)
            steps.append(pair)
        ours.stop()
        base.stop()
        # The best in-process configuration once more, after the servers: drift shows up as a difference.
        best = max(limits, key=lambda r: r["images_per_s"])
        again = measure_limit(model, image, best["batch"], best["procs"], best["threads"], args.seconds)
        limit = (best["images_per_s"] + again["images_per_s"]) / 2
        batch1 = [r for r in limits if r["batch"] == 1 and r["procs"] == 1][0]
        report["models"][name] = {"limits": limits, "best_limit_again": again, "limit_images_per_s": round(limit, 1),
                                  "batch1_latency_ms": round(batch1["batch_latency_p50_ms"], 1), "steps": steps}
    if not args.skip_extras:
        report["memory"] = measure_memory(workdir, image)
        report["large_photo"] = measure_large_photo()
    return report


def measure_memory(workdir: Path, body: Path) -> dict:
    config = ROOT / "models" / "models.yaml"
    memory = {}
    for workers in (1, 2, 4):
        server = start_ours(config, workers, workdir / f"mem-{workers}.log", {"SERVE_DEVICE": "cpu"})
        deadline = time.monotonic() + 10
        while len(server.pids()) < workers + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        closed_loop(server.port, "/predictions/efficientnet_lite0", body, workers * 2, 2)
        memory[str(workers)] = server.memory_mb()
        server.stop()
        print(f"memory, {workers} worker(s): {memory[str(workers)]}", flush=True)
    return memory


def measure_large_photo() -> dict:
    """A 12-megapixel JPEG through decode + preprocess, with and without scale-on-decode (draft)."""
    from serve.config import PreprocessSpec
    from serve.preprocess import build_transform, decode_image

    data = photo_jpeg((4000, 3000))
    transform = build_transform(PreprocessSpec())
    result = {"bytes": len(data)}
    for label, min_side in (("full_decode_ms", None), ("draft_decode_ms", 256)):
        times = []
        for _ in range(7):
            t = time.perf_counter()
            transform(decode_image(data, 10**9, "RGB", min_side=min_side))
            times.append(1000 * (time.perf_counter() - t))
        result[label] = round(statistics.median(times), 1)
    result["speedup"] = round(result["full_decode_ms"] / result["draft_decode_ms"], 1)
    print(f"12 MP photo decode + preprocess: {result}", flush=True)
    return result


def print_table(report: dict) -> None:
    print(f"\n{report['date']}, {report['machine']}, {report['workers']} worker(s), {report['seconds_per_step']} s a step")
    print(f"{'model':20} {'limit img/s':>11} {'c':>3} {'server r/s':>10} {'p50':>7} {'p99':>7} {'baseline':>9} "
          f"{'b p99':>7} {'srv/limit':>9} {'srv/base':>8} {'cpu/req':>8}")
    for name, m in report["models"].items():
        for pair in m["steps"]:
            s, b = pair["server"], pair["baseline"]
            print(f"{name:20} {m['limit_images_per_s']:11.1f} {s['concurrency']:3} {s['requests_per_s']:10.1f} "
                  f"{s['p50_ms']:7} {s['p99_ms']:7} {b['requests_per_s']:9.1f} {b['p99_ms']:7} "
                  f"{s['requests_per_s'] / m['limit_images_per_s']:9.2f} {s['requests_per_s'] / max(b['requests_per_s'], 0.1):8.2f} "
                  f"{s['cpu_ms_per_request']:8}")
        print(f"{'':20} in-process batch-1 latency {m['batch1_latency_ms']} ms")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        m = report["models"][name]
        levels = [p["server"]["concurrency"] for p in m["steps"]]
        ax = axes[0][col]
        for label, style in (("server", "o-"), ("baseline", "s--")):
            ax.plot(levels, [p[label]["requests_per_s"] for p in m["steps"]], style, label=label)
        ax.axhline(m["limit_images_per_s"], color="grey", linestyle=":", label="in-process limit")
        ax.set(title=f"{name}: throughput", xlabel="concurrent clients", ylabel="requests/s", xscale="log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend()
        ax = axes[1][col]
        for label, style in (("server", "-"), ("baseline", "--")):
            for pct, marker in (("p50_ms", "o"), ("p99_ms", "^")):
                ax.plot(levels, [p[label][pct] for p in m["steps"]], style, marker=marker, label=f"{label} {pct[:3]}")
        ax.set(title=f"{name}: latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend(fontsize=8)
    fig.suptitle(f"torch-serve vs in-process limit vs tutorial Flask app — {report['date']}, {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("_limit")
    for flag, kind in (("--spec", str), ("--image", str), ("--batch", int), ("--threads", int),
                       ("--seconds", float), ("--start-at", float)):
        child.add_argument(flag, type=kind, required=True)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18", "tiny_cnn"])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=CORES, help="gunicorn workers, for both servers "
                        "(default: one per core, the server's own default)")
    parser.add_argument("--skip-extras", action="store_true", help="skip the memory and large-photo measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.command == "_limit":
        limit_child(args)
        return
    report = run(args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "bench.png")
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()
