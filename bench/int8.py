"""precision: int8 against fp32, side by side in one run: in-process limits, the gate's figures, served throughput.

    ~/.cache/serve-venv/bin/python bench/int8.py                      # ~5 minutes on 2 cores
    ~/.cache/serve-venv/bin/python bench/int8.py --seconds 4 --rounds 1 --reps 5                # a quick look
    ~/.cache/serve-venv/bin/python bench/int8.py --recipes                                      # ~3 minutes

Models: the default EfficientNet-Lite0 (its packaged ImageNet weights) and resnet50 with seeded random
weights (torch.manual_seed(0)): on random weights every class is a near-tie, so resnet50's gate judges
nothing (it runs with top1_agreement 0, top5_containment 0; its agreement figures are printed for what
they are). Each model is loaded through the server's own path (PredictionService: export, calibration
on the fallback photos, quantisation, the gate), once with precision fp32 and once with int8, sharing one
ONNX cache; then:

  in-process  each runtime's forward alone (the ONNX Runtime session, the same float batch): batch 8 on
              every core (img/s) and batch 1 (ms), fp32 and int8 taking turns forward by forward;
              and the per-image cost of the input path (decode + resize + crop of the cat photo, the
              task's prepare) beside int8's forward: where a served request's time goes at int8
  gate        the default model's gate figures on its calibration / held-out split
  served      gunicorn (serve/gunicorn_conf.py, 2 workers) with precision fp32, then int8, then fp32 and
              int8 again (--rounds): closed-loop clients in this process (each a thread with its own
              keep-alive connection) POST the cat photo (451 x 300 JPEG) at c = 4 and 16 for --seconds;
              req/s and p50 / p99, the median over rounds, and int8 / fp32

--recipes measures instead the quantisation choices on the default model (docs/precision.md's table):
each recipe variant's gate figures on the held-out fallback photos and its speed-up over fp32.

Prints a table and the ratios against the targets (default model served int8 >= 2 x fp32 at c = 16,
passing its gate; resnet50 int8 >= 2.5 x fp32 in-process); --json writes every figure.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import torch  # noqa: E402

from bench import start_ours  # noqa: E402  (bench/bench.py: gunicorn with serve/gunicorn_conf.py)

from serve.config import build_config, load_config  # noqa: E402
from serve.cores import available_cores  # noqa: E402

CORES = available_cores()
DEFAULT = "efficientnet_lite0"
LEVELS = (4, 16)


def cat_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def model_entries(workdir: Path) -> dict[str, dict]:
    """The models' config entries (precision left to the caller): the default model as models.yaml has
    it, resnet50 with seeded random weights saved here."""
    import torchvision

    default = load_config(ROOT / "models" / "models.yaml", env={}).model_dump(mode="json")["models"][0]
    default.update(device="cpu", checkpoint=str(default["checkpoint"]))
    torch.manual_seed(0)
    checkpoint = workdir / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), checkpoint)
    resnet = {"name": "resnet50", "architecture": "resnet50", "checkpoint": str(checkpoint), "device": "cpu",
              "labels": "torchvision:ResNet18_Weights.IMAGENET1K_V1",
              # random weights: every class a near-tie, so the gate judges nothing (see the docstring)
              "int8_gate": {"top1_agreement": 0, "top5_containment": 0}}
    return {DEFAULT: default, "resnet50": resnet}


def load(entry: dict, precision: str, cache: Path):
    from serve.service import PredictionService

    config = build_config({"models": [{**entry, "precision": precision}],
                           "server": {"onnx_cache_dir": str(cache)}})
    return PredictionService.load(config)


def paired(runners: dict, batch, reps: int) -> dict[str, float]:
    """Median seconds of each runner on batch, taking turns run by run (drift hits all alike)."""
    for fn in runners.values():
        fn(batch)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for label, fn in runners.items():
            started = time.perf_counter()
            fn(batch)
            times[label].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def in_process(name: str, entry: dict, cache: Path, reps: int, photo: bytes) -> dict:
    services = {p: load(entry, p, cache) for p in ("fp32", "int8")}
    try:
        predictors = {p: s.table.predictors[name] for p, s in services.items()}
        described = predictors["int8"].describe_runtime()
        runtimes = {p: pr.runtime for p, pr in predictors.items()}
        assert runtimes["fp32"].name == "onnxruntime", predictors["fp32"].describe_runtime()
        out = {"int8_served": described["precision"], "int8_reason": described.get("precision_reason"),
               "int8": described.get("int8")}
        shape = predictors["fp32"].task.input_shape
        runners = {p: (lambda x, rt=rt: rt.run_numpy([x], CORES)) for p, rt in runtimes.items()}
        batch8 = torch.randn(8, *shape).numpy()
        batch1 = batch8[:1].copy()
        t8 = paired(runners, batch8, reps)
        t1 = paired(runners, batch1, reps * 2)
        out["b8_img_s"] = {p: round(8 / t, 1) for p, t in t8.items()}
        out["b1_ms"] = {p: round(t * 1000, 2) for p, t in t1.items()}
        out["b8_ratio"] = round(t8["fp32"] / t8["int8"], 2)
        out["b1_ratio"] = round(t1["fp32"] / t1["int8"], 2)
        # CPU per image, one thread (as a served batch that shares the cores runs): the forward of a batch
        # of 4 (max_batch_size) in each precision, and the input path of one request (decode + resize + crop
        # + the task's prepare; normalizing is in the batch). process_time: other processes' load excluded.
        cpu = {p: (lambda x, rt=rt: rt.run_numpy([x], 1)) for p, rt in runtimes.items()}
        cpu["input path"] = lambda _: predictors["int8"].preprocess(photo)
        batch4 = batch8[:4].copy()
        for fn in cpu.values():
            fn(batch4)
        spent: dict[str, list[float]] = {k: [] for k in cpu}
        for _ in range(reps):
            for label, fn in cpu.items():
                started = time.process_time()
                fn(batch4)
                spent[label].append((time.process_time() - started) / (1 if label == "input path" else 4))
        out["cpu_ms_per_image"] = {k: round(statistics.median(v) * 1000, 2) for k, v in spent.items()}
        top = {p: pr.predict_batch([pr.preprocess(photo).tensor])[0].topk(5).indices.tolist()
               for p, pr in predictors.items()}
        out["cat_top5"] = top
        return out
    finally:
        for s in services.values():
            s.close()


def recipes(entry: dict, cache: Path, reps: int) -> list[dict]:
    """The default model quantised with each recipe of RECIPES (in this process), judged by the classify
    gate on the held-out fallback photos and timed against fp32 (batch 8, every core, in turns)."""
    from dataclasses import replace

    from serve.precision import RECIPE, _held_out_batches, calibration_set
    from serve.runtimes.onnx import OnnxRuntime
    from serve.runtimes.onnx.quantize import quantize, time_pair

    service = load(entry, "fp32", cache)
    try:
        predictor = service.table.predictors[DEFAULT]
        fp32, task = predictor.runtime, predictor.task
        images = calibration_set(predictor.spec, task, predictor.preprocess)
    finally:
        service.close()
    calibration = [x.numpy() for x in images.calibration]
    held = _held_out_batches(task, images.held_out)
    reference = [p for b in held for p in task.split(fp32.forward(b), len(b))]
    speed_batch = held[0].numpy()
    rows = []
    for label, changes in RECIPES:
        recipe = replace(RECIPE, **changes)
        started = time.perf_counter()
        model = quantize(fp32.model, calibration, recipe)
        quantize_s = time.perf_counter() - started
        int8 = OnnxRuntime(model, fp32.layout, threads=CORES)
        outputs = [p for b in held for p in task.split(int8.forward(b), len(b))]
        figures, reason = task.int8_gate(reference, outputs, predictor.spec.int8_gate)
        run = {k: (lambda b, rt=rt: rt.run_numpy([b], CORES)) for k, rt in (("fp32", fp32), ("int8", int8))}
        fp32_s, int8_s = time_pair(run["fp32"], run["int8"], speed_batch, reps)
        rows.append({"recipe": label, **figures, "speedup": round(fp32_s / int8_s, 2),
                     "int8_img_s": round(len(speed_batch) / int8_s, 1), "quantize_s": round(quantize_s, 1),
                     "passes": reason is None})
        row = rows[-1]
        print(f"{label:34s} top-1 decisive {row['top1_agreement']:.3f} ({row['decisive']} images), all "
              f"{row['top1_agreement_all']:.3f}, top-5 {row['top5_containment']:.3f}, max |dp| "
              f"{row['max_prob_diff']:.3f}, {row['speedup']}x fp32 ({row['int8_img_s']} img/s), quantised in "
              f"{row['quantize_s']} s{'' if row['passes'] else '  FAILS: ' + reason}", flush=True)
    return rows


# Recipe variants measured by --recipes: (label, changes to serve.precision.RECIPE).
RECIPES = [
    ("chosen: QDQ per-channel MinMax u8/s8", {}),
    ("no quant_pre_process", {"pre_process": False}),
    ("per-tensor weights", {"per_channel": False}),
    ("Entropy calibration", {"method": "entropy"}),
    ("Percentile calibration", {"method": "percentile"}),
    ("QOperator format", {"quant_format": "qoperator"}),
    ("s8 activations (s8s8)", {"activations": "int8"}),
    ("reduce_range (7-bit weights)", {"reduce_range": True}),
    ("stem conv + classifier in fp32", {"keep_fp32": ("first_conv", "last_gemm")}),
    ("Add nodes in fp32", {"keep_fp32": ("Add",)}),
    ("stem + blocks 0-1 in fp32", {"keep_fp32": ("first_conv", "/_blocks.0/", "/_blocks.1/")}),
    ("second recipe: early convs fp32", {"keep_fp32": ("early_convs",)}),
]


class Clients:
    """`concurrency` threads, each POSTing the photo on its own keep-alive connection as soon as answered."""

    def __init__(self, port: int, path: str, body: bytes):
        self.port, self.path, self.body = port, path, body

    def run(self, concurrency: int, seconds: float, warm_s: float = 1.0) -> dict:
        stop = time.perf_counter() + warm_s + seconds
        measure_from = time.perf_counter() + warm_s
        latencies: list[float] = []
        failures = [0]
        lock = threading.Lock()

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            mine, bad = [], 0
            while True:
                started = time.perf_counter()
                if started >= stop:
                    break
                try:
                    conn.request("POST", self.path, body=self.body, headers={"Content-Type": "image/jpeg"})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except OSError:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                    ok = False
                if started >= measure_from:
                    if ok:
                        mine.append(time.perf_counter() - started)
                    else:
                        bad += 1
            conn.close()
            with lock:
                latencies.extend(mine)
                failures[0] += bad

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        latencies.sort()
        pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)  # noqa: E731
        return {"requests_per_s": round(len(latencies) / seconds, 1), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                "errors": failures[0]}


def served(name: str, entry: dict, cache: Path, workdir: Path, args, photo: bytes) -> dict:
    import yaml

    runs: dict[str, dict[int, list[dict]]] = {p: {c: [] for c in LEVELS} for p in ("fp32", "int8")}
    starts: dict[str, list[float]] = {"fp32": [], "int8": []}
    for round_ in range(args.rounds):
        for precision in (("fp32", "int8") if round_ % 2 == 0 else ("int8", "fp32")):
            config = workdir / f"{name}-{precision}.yaml"
            config.write_text(yaml.safe_dump({"models": [{**entry, "precision": precision}],
                                              "server": {"onnx_cache_dir": str(cache)}}))
            started = time.perf_counter()
            server = start_ours(config, 2, workdir / f"{name}-{precision}.log")
            starts[precision].append(time.perf_counter() - started)
            try:
                meta = json.loads(_get(server.port, f"/models/{name}"))["runtime"]
                assert meta["precision"] == precision, meta
                clients = Clients(server.port, f"/predictions/{name}", photo)
                for concurrency in LEVELS:
                    before, forward_before = server.cpu_seconds(), forward_totals(server.port)
                    run = clients.run(concurrency, args.seconds)
                    forward = [b - a for a, b in zip(forward_before, forward_totals(server.port))]
                    # the server's own measure of its forwards (serve_inference_duration_seconds, wall time of
                    # each batch, summed over the workers) per image, and the mean batch
                    run["forward_ms_per_image"] = round(forward[0] * 1000 / max(1.0, forward[1]), 2)
                    run["mean_batch"] = round(forward[1] / max(1.0, forward[2]), 2)
                    answered = run["requests_per_s"] * args.seconds
                    # the server's CPU (master and workers) per answered request (refused ones' cost included),
                    # the warm-up second's requests counted at the measured rate
                    run["cpu_ms_per_request"] = round((server.cpu_seconds() - before) * 1000 / max(1.0, answered * (
                        1 + 1 / args.seconds)), 2)
                    runs[precision][concurrency].append(run)
                    server.wait_idle(10)
            finally:
                server.stop()
    out: dict = {"start_s": {p: round(statistics.median(s), 1) for p, s in starts.items()}}
    for concurrency in LEVELS:
        row = {p: {k: round(statistics.median(r[k] for r in runs[p][concurrency]), 2) for k in runs[p][concurrency][0]}
               for p in runs}
        row["ratio"] = round(row["int8"]["requests_per_s"] / row["fp32"]["requests_per_s"], 2)
        out[f"c{concurrency}"] = row
    return out


def forward_totals(port: int) -> tuple[float, float, float]:
    """From /metrics, summed over the workers: seconds spent in forwards, images forwarded, batches."""
    totals = {"serve_inference_duration_seconds_sum": 0.0, "serve_batch_size_sum": 0.0, "serve_batch_size_count": 0.0}
    for line in _get(port, "/metrics").decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return tuple(totals.values())  # type: ignore[return-value]


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return conn.getresponse().read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per concurrency (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="fp32/int8 server pairs, alternating order (default 2)")
    parser.add_argument("--reps", type=int, default=15, help="timed forwards per runtime in-process (default 15)")
    parser.add_argument("--models", nargs="+", default=[DEFAULT, "resnet50"], choices=[DEFAULT, "resnet50"])
    parser.add_argument("--skip-served", nargs="*", default=["resnet50"], metavar="MODEL",
                        help="models not served under gunicorn (default: resnet50, whose target is in-process)")
    parser.add_argument("--cache", type=Path, help="the ONNX cache to use (default: a fresh one: the first start "
                        "exports and quantises)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--recipes", action="store_true", help="instead: the default model quantised with each "
                        "recipe variant (docs/precision.md's table): the gate's figures and the speed-up of each")
    args = parser.parse_args()
    load_avg = os.getloadavg()
    print(f"# {CORES} cores, load average at start {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}", flush=True)
    photo = cat_jpeg()
    results: dict = {"cores": CORES, "load_at_start": load_avg}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        workdir = Path(tmp)
        cache = args.cache or workdir / "onnx"
        entries = model_entries(workdir)
        if args.recipes:
            print(f"\n## {DEFAULT}: recipes (batch 8, {CORES} threads)", flush=True)
            results["recipes"] = recipes(entries[DEFAULT], cache, args.reps)
            args.models = []
        for name in args.models:
            print(f"\n## {name}: in-process (ONNX Runtime sessions, {CORES} threads)", flush=True)
            r = results[name] = {"in_process": in_process(name, entries[name], cache, args.reps, photo)}
            ip = r["in_process"]
            print(f"int8 served: {ip['int8_served']}" + (f" ({ip['int8_reason']})" if ip["int8_reason"] else ""))
            print(f"batch 8 img/s: fp32 {ip['b8_img_s']['fp32']}, int8 {ip['b8_img_s']['int8']}, "
                  f"int8/fp32 {ip['b8_ratio']}x")
            print(f"batch 1 ms:    fp32 {ip['b1_ms']['fp32']}, int8 {ip['b1_ms']['int8']}, "
                  f"fp32/int8 {ip['b1_ratio']}x")
            cpu = ip["cpu_ms_per_image"]
            print(f"CPU ms per image, one thread: forward (batch 4) fp32 {cpu['fp32']}, int8 {cpu['int8']}; the input "
                  f"path (decode + resize + crop of the cat photo) {cpu['input path']}")
            print(f"cat photo top-5: fp32 {ip['cat_top5']['fp32']}, int8 {ip['cat_top5']['int8']}")
            int8 = ip["int8"] or {}
            print(f"gate ({int8.get('calibration')}): {json.dumps(int8.get('gate'))}")
            print(f"gate's start-up speed check: {json.dumps(int8.get('speed'))}", flush=True)
            if name not in (args.skip_served or []):
                print(f"\n## {name}: served, gunicorn 2 workers, cat photo, {args.seconds:g} s x {args.rounds} rounds",
                      flush=True)
                s = r["served"] = served(name, entries[name], cache, workdir, args, photo)
                print(f"start-up s (median): {s['start_s']}")
                for concurrency in LEVELS:
                    row = s[f"c{concurrency}"]
                    print(f"c={concurrency:<3} fp32 {row['fp32']['requests_per_s']} req/s (p50 {row['fp32']['p50_ms']}, "
                          f"p99 {row['fp32']['p99_ms']} ms)   int8 {row['int8']['requests_per_s']} req/s (p50 "
                          f"{row['int8']['p50_ms']}, p99 {row['int8']['p99_ms']} ms)   int8/fp32 {row['ratio']}x"
                          f"   errors {row['fp32']['errors']}/{row['int8']['errors']}", flush=True)
                    print(f"       server CPU ms/request fp32 {row['fp32']['cpu_ms_per_request']}, int8 "
                          f"{row['int8']['cpu_ms_per_request']}; of which the forward (the server's metric, ms/image) "
                          f"fp32 {row['fp32']['forward_ms_per_image']}, int8 {row['int8']['forward_ms_per_image']}; "
                          f"mean batch {row['fp32']['mean_batch']}/{row['int8']['mean_batch']}", flush=True)
                if name == DEFAULT:
                    # CPU figures, all of them: the server's per request at c=4 (nothing refused there), and the
                    # in-process one-thread forward and input path. The server's forward metric is wall time,
                    # which a loaded machine inflates past the CPU the forward used.
                    total = s["c4"]["int8"]["cpu_ms_per_request"]
                    cpu = r["in_process"]["cpu_ms_per_image"]
                    rest = total - cpu["int8"] - cpu["input path"]
                    print(f"where an int8 request's {total} server CPU ms go (c=4): the forward ~{cpu['int8']} "
                          f"({100 * cpu['int8'] / total:.0f} %), the input path (decode, resize, crop) "
                          f"~{cpu['input path']} ({100 * cpu['input path'] / total:.0f} %), the rest (HTTP, Flask, "
                          f"admission, batching, normalize, softmax, the answer) ~{rest:.2f} "
                          f"({100 * rest / total:.0f} %); fp32's forward ~{cpu['fp32']} of {s['c4']['fp32']['cpu_ms_per_request']}")
    print("\n## targets")
    if DEFAULT in results:
        d = results[DEFAULT]
        gate_ok = d["in_process"]["int8_served"] == "int8"
        served_ratio = d.get("served", {}).get("c16", {}).get("ratio")
        print(f"default model served int8 at c=16 >= 2x fp32, passing its gate: {served_ratio}x, gate "
              f"{'passed' if gate_ok else 'failed'} -> {'met' if gate_ok and served_ratio and served_ratio >= 2 else 'not met'}")
    if "resnet50" in results:
        ratio = results["resnet50"]["in_process"]["b8_ratio"]
        print(f"resnet50 int8 >= 2.5x fp32 in-process (batch 8): {ratio}x -> {'met' if ratio >= 2.5 else 'not met'}")
    load_avg = os.getloadavg()
    print(f"# load average at the end {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    results["load_at_end"] = load_avg
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
