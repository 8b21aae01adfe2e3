"""Benchmark: the in-process limits, our server under gunicorn, and a naive Flask baseline, side by side.

    python bench/bench.py                 # full run (~12 minutes on 2 cores), writes bench/results/
    python bench/bench.py --seconds 2 --models tiny_cnn --levels 1 4   # a quick look

For each model it measures, interleaved so machine drift cancels out:
  limit     decode + preprocess + forward + top-5 in-process (no HTTP) at batch 1 and 4 with one
            process using every core, and with one single-threaded process per core, for eager
            PyTorch and for ONNX Runtime; the best of each runtime is its limit
  auto      this project under gunicorn on 127.0.0.1 with runtime: auto, closed-loop clients at each
            concurrency
  eager     the same server with runtime: eager
  baseline  bench/naive_app.py (the tutorial Flask app) under gunicorn with the same worker count
  tuned     the same app with OMP_NUM_THREADS=1 (one thread per worker), as a careful user runs it
It prints a table with the ratios, saves JSON and draws a PNG.
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
    from serve.formats.state_dict import build_module

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
                                     "checkpoint": m["checkpoint"], "device": "cpu", "runtime": m["runtime"],
                                     "preprocess": {"mean": m["norm"][0], "std": m["norm"][1]}}],
                         "server": {"onnx_cache_dir": m["cache"]}}).models[0]
    # threads: ONNX Runtime's sessions get the same count as torch (a "1 thread" process is one)
    predictor = Predictor(spec, load_model(spec), None, PixelBudget(10**9), Path(m["cache"]), threads=args.threads)
    predictor.warm_up()  # chooses the runtime: ONNX Runtime for auto where it agrees with eager
    assert predictor.runtime.name == ("eager" if m["runtime"] == "eager" else "onnxruntime"), predictor.runtime_note
    data = Path(args.image).read_bytes()
    params = {"topk": 5}

    def step():
        prepared = [predictor.preprocess(data) for _ in range(args.batch)]
        outputs = predictor.predict_batch([p.tensor for p in prepared])
        return [predictor.task.finish(o, p, params) for o, p in zip(outputs, prepared)]

    for _ in range(2):
        step()
    print("READY", flush=True)  # the parent starts every child's clock together once all are warm
    start_at = float(sys.stdin.readline())
    while time.time() < start_at:
        time.sleep(0.001)
    images, latencies, end = 0, [], start_at + args.seconds
    while time.time() < end or not latencies:  # at least one step, however slow
        t = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - t)
        images += args.batch
    seconds = max(args.seconds, time.time() - start_at)
    latencies.sort()
    print(json.dumps({"images": images, "seconds": seconds, "latency_p50_ms": 1000 * statistics.median(latencies),
                      "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}))


def measure_limit(model: dict, image: Path, batch: int, procs: int, threads: int, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "_limit", "--spec", json.dumps(model), "--image", str(image),
           "--batch", str(batch), "--threads", str(threads), "--seconds", str(seconds)]
    children = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                for _ in range(procs)]
    for child in children:
        if child.stdout.readline().strip() != "READY":  # loaded, warm (and exported, for ONNX Runtime)
            raise RuntimeError(f"a limit process failed to start: {child.communicate(timeout=60)}")
    start_at = time.time() + 0.5
    results = [json.loads(c.communicate(f"{start_at}\n", timeout=120)[0]) for c in children]
    return {
        "batch": batch, "procs": procs, "threads": threads,
        "images_per_s": sum(r["images"] / r["seconds"] for r in results),
        "batch_latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in results),
        "batch_latency_p99_ms": max(r["latency_p99_ms"] for r in results),
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


def start_baseline(model: dict, workers: int, log: Path, tuned: bool = False) -> Gunicorn:
    port = free_port()
    env = {"BENCH_ARCH": model["arch"], "BENCH_KWARGS": json.dumps(model["kwargs"]),
           "BENCH_CHECKPOINT": model["checkpoint"], "BENCH_MEAN": json.dumps(model["norm"][0]),
           "BENCH_STD": json.dumps(model["norm"][1]), "PYTHONPATH": str(ROOT)}
    if tuned:
        env["OMP_NUM_THREADS"] = "1"  # one thread per worker: no oversubscription
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


def settle(server: Gunicorn, servers: dict[str, Gunicorn], restart: dict) -> None:
    """Let a server finish what wrk left behind before the next step. A collapsed baseline would work
    through its backlog for minutes, stealing the CPU from the next step: it is killed and started
    afresh instead (restart maps a server's label to how to start it again)."""
    label = next(k for k, v in servers.items() if v is server)
    if server.wait_idle(10) < 10 or label not in restart:
        server.wait_idle(50)
        return
    server.kill()
    servers[label] = restart[label]()


def write_config(path: Path, model: dict, name: str, runtime: str, cache: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"models": [{
        "name": name, "architecture": model["arch"], "kwargs": model["kwargs"], "checkpoint": model["checkpoint"],
        "device": "cpu", "runtime": runtime, "preprocess": {"mean": model["norm"][0], "std": model["norm"][1]},
    }], "server": {"onnx_cache_dir": str(cache)}}))
    return path


SERVERS = ("auto", "eager", "baseline", "tuned")


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"logs in {workdir}")
    models = model_table(workdir)
    image = workdir / "photo.jpg"
    image.write_bytes(photo_jpeg())
    cache = workdir / "onnx-cache"
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {CORES} cores, "
              f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**30} GiB, {platform.python_version()}",
              "workers": args.workers, "seconds_per_step": args.seconds, "models": {}}
    for name in args.models:
        model = models[name]
        print(f"\n== {name}", flush=True)
        limits: dict[str, list] = {"eager": [], "onnxruntime": []}
        for runtime, spec in (("eager", {**model, "runtime": "eager"}), ("onnxruntime", {**model, "runtime": "auto"})):
            spec["cache"] = str(cache)
            for batch in (1, 4):
                for procs, threads in ((1, CORES), (CORES, 1)):
                    limits[runtime].append(measure_limit(spec, image, batch, procs, threads, args.seconds))
                    print(f"limit {runtime:11} {procs} proc x {threads} threads batch {batch}: "
                          f"{limits[runtime][-1]['images_per_s']:.1f} img/s", flush=True)
        restart = {
            "baseline": lambda: start_baseline(model, args.workers, workdir / f"{name}-baseline.log"),
            "tuned": lambda: start_baseline(model, args.workers, workdir / f"{name}-tuned.log", tuned=True),
        }
        servers = {
            runtime: start_ours(write_config(workdir / f"{name}-{runtime}.yaml", model, name, runtime, cache),
                                args.workers, workdir / f"{name}-{runtime}.log")
            for runtime in ("auto", "eager")
        }
        servers.update({label: start() for label, start in restart.items()})
        steps = []
        for i, c in enumerate(args.levels):
            row = {}
            order = SERVERS[i % len(SERVERS):] + SERVERS[:i % len(SERVERS)]  # a different one first at each level
            for label in order:
                path = f"/predictions/{name}" if label in ("auto", "eager") else "/predict"
                closed_loop(servers[label].port, path, image, c, 1.0)
                settle(servers[label], servers, restart)
                server = servers[label]
                cpu = server.cpu_seconds()
                result = closed_loop(server.port, path, image, c, args.seconds)
                result["cpu_ms_per_request"] = round(1000 * (server.cpu_seconds() - cpu) / max(result["requests"], 1), 2)
                settle(server, servers, restart)
                row[label] = result
                print(f"{label:8} c={c:3}: {result['requests_per_s']:7.1f} req/s  p50 {result['p50_ms']} ms  "
                      f"p99 {result['p99_ms']} ms  errors {result['errors']} (non-2xx {result['non_2xx']}, socket "
                      f"{result['socket_errors']}, timeouts {result['timeouts']})  cpu/req {result['cpu_ms_per_request']} ms",
                      flush=True)
            steps.append(row)
        for server in servers.values():
            server.stop()
        summary = {}
        for runtime, rows in limits.items():
            best = max(rows, key=lambda r: r["images_per_s"])
            batch1 = [r for r in rows if r["batch"] == 1 and r["procs"] == 1][0]
            summary[runtime] = {"limit_images_per_s": round(best["images_per_s"], 1), "best": best,
                                "batch1_latency_ms": round(batch1["batch_latency_p50_ms"], 1),
                                "batch1_latency_p99_ms": round(batch1["batch_latency_p99_ms"], 1)}
        report["models"][name] = {"limits": limits, "summary": summary, "steps": steps}
    if not args.skip_extras:
        report["memory"] = measure_memory(workdir, image)
        report["large_photo"] = measure_large_photo()
    return report


def measure_memory(workdir: Path, body: Path) -> dict:
    """PSS of the default model's server with 1, 2 and 4 workers, for each runtime."""
    memory = {}
    for runtime in ("eager", "auto"):
        for workers in (1, 2, 4):
            server = start_ours(ROOT / "models" / "models.yaml", workers, workdir / f"mem-{runtime}-{workers}.log",
                                {"SERVE_DEVICE": "cpu", "SERVE_RUNTIME": runtime, "SERVE_ONNX_CACHE_DIR": str(workdir / "onnx-cache")})
            deadline = time.monotonic() + 10
            while len(server.pids()) < workers + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            closed_loop(server.port, "/predictions/efficientnet_lite0", body, workers * 2, 2)
            memory[f"{runtime}/{workers}"] = server.memory_mb()
            server.stop()
            print(f"memory, runtime {runtime}, {workers} worker(s): {memory[f'{runtime}/{workers}']}", flush=True)
    return memory


def measure_large_photo() -> dict:
    """A 12-megapixel JPEG through decode + preprocess, with and without scale-on-decode (draft)."""
    from serve.preprocess import PreprocessSpec, build_transform, decode_image

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
    print(f"{'model':19} {'c':>3} | {'auto r/s':>8} {'p50':>6} {'p99':>6} | {'eager r/s':>9} {'p99':>6} | "
          f"{'base r/s':>8} {'tuned r/s':>9} {'t p99':>6} | {'auto/ORT lim':>12} {'auto/eager':>10} {'auto/tuned':>10}")
    for name, m in report["models"].items():
        onnx_limit = m["summary"]["onnxruntime"]["limit_images_per_s"]
        for row in m["steps"]:
            a, e, b, t = (row[k] for k in SERVERS)
            print(f"{name:19} {a['concurrency']:3} | {a['requests_per_s']:8.1f} {a['p50_ms']:6} {a['p99_ms']:6} | "
                  f"{e['requests_per_s']:9.1f} {e['p99_ms']:6} | {b['requests_per_s']:8.1f} {t['requests_per_s']:9.1f} "
                  f"{t['p99_ms']:6} | {a['requests_per_s'] / onnx_limit:12.2f} "
                  f"{a['requests_per_s'] / max(e['requests_per_s'], 0.1):10.2f} {a['requests_per_s'] / max(t['requests_per_s'], 0.1):10.2f}")
        for runtime, s in m["summary"].items():
            print(f"{'':19} limit {runtime}: {s['limit_images_per_s']} img/s (batch {s['best']['batch']}, "
                  f"{s['best']['procs']} proc x {s['best']['threads']} threads); batch-1 latency {s['batch1_latency_ms']} ms "
                  f"(p99 {s['batch1_latency_p99_ms']} ms)")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    styles = {"auto": "o-", "eager": "o--", "baseline": "s:", "tuned": "s-."}
    for col, name in enumerate(names):
        m = report["models"][name]
        levels = [row["auto"]["concurrency"] for row in m["steps"]]
        ax = axes[0][col]
        for label, style in styles.items():
            ax.plot(levels, [row[label]["requests_per_s"] for row in m["steps"]], style, label=label)
        for runtime, colour in (("onnxruntime", "grey"), ("eager", "silver")):
            ax.axhline(m["summary"][runtime]["limit_images_per_s"], color=colour, linestyle=":", label=f"{runtime} limit")
        ax.set(title=f"{name}: throughput", xlabel="concurrent clients", ylabel="requests/s", xscale="log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for label, style in styles.items():
            ax.plot(levels, [row[label]["p99_ms"] for row in m["steps"]], style, label=f"{label} p99")
        ax.set(title=f"{name}: p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend(fontsize=8)
    fig.suptitle(f"torch-serve (auto, eager) vs in-process limits vs tutorial Flask app — {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("_limit")
    for flag, kind in (("--spec", str), ("--image", str), ("--batch", int), ("--threads", int),
                       ("--seconds", float)):
        child.add_argument(flag, type=kind, required=True)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
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
