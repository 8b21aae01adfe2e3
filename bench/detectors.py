"""Benchmark: torchvision detectors eager against ONNX Runtime (the split runtime of
serve/runtimes/onnx/detection.py: backbone and heads on ONNX Runtime, the rest eager), in-process, side by side.

    python bench/detectors.py --quick                  # the MobileNetV3 320 Faster R-CNN, 1 round: 1 minute
    python bench/detectors.py --models fasterrcnn_mobilenet_v3_large_320_fpn fasterrcnn_mobilenet_v3_large_fpn \
        ssdlite320_mobilenet_v3_large                  # the MobileNetV3 ones: about 3 minutes on 2 cores
    python bench/detectors.py                          # every model: over 20 minutes on 2 busy cores (each
                                                       # ResNet-50 one takes 1-2 minutes to export and check)

Per model (seeded weights, batch norms calibrated on photos and scores spread: tests/seeded_detectors.py;
its own transform at its default sizes), on the same photos (scikit-image's, at 4 sizes and aspect ratios),
one image a forward, the two runtimes taking turns image by image:
  eager img/s, ORT img/s, ratio     images a second over all rounds (the median round), and ORT / eager
  p50 ms                            the median latency of one image's forward
  same detections                   the detections rule the server checks with (serve/tasks/detect.py,
                                    threshold 0: every detection, label, score within 1e-4, box within
                                    0.01 px) on every photo: yes, or the first difference
  start s, check                    build_detector_runtime: export (no cache) and the check against eager
torch and ONNX Runtime get the same threads (--threads, default every core); the split runtime's eager part
runs on torch's threads here (in the server on one: the batcher's rule for another runtime). Load from
other processes shows as noise: uptime's load averages are printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from seeded_detectors import PHOTOS, photo, seeded_detector  # noqa: E402
from serve.cores import available_cores  # noqa: E402
from serve.runtimes.onnx.detection import build_detector_runtime  # noqa: E402
from serve.tasks.detect import detections  # noqa: E402

MODELS = {  # name -> builder kwargs (COCO's 91 classes; each model's own default transform sizes)
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "fasterrcnn_mobilenet_v3_large_fpn": {},
    "ssdlite320_mobilenet_v3_large": {},
    "retinanet_resnet50_fpn": {},
    "fcos_resnet50_fpn": {},
    "fasterrcnn_resnet50_fpn": {},
    "maskrcnn_resnet50_fpn": {},
    "keypointrcnn_resnet50_fpn": {"num_classes": 2},
    "ssd300_vgg16": {},
}
SIZES = ((300, 451), (512, 384), (427, 640), (256, 512))  # one per photo: landscape, portrait, 4:3, 2:1


def photos() -> list[torch.Tensor]:
    return [photo(name, h, w) for name, (h, w) in zip(PHOTOS, SIZES)]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_model(name: str, kwargs: dict, images: list[torch.Tensor], rounds: int, threads: int) -> dict:
    model = seeded_detector(name, **{"num_classes": 91, **kwargs})
    started = time.perf_counter()
    try:
        runtime = build_detector_runtime(model, torch.zeros(1, 3, 320, 320), cache_key_parts={"bench": name},
                                         cache_dir=None, verify=detections, score_threshold=0.0, threads=threads)
        check = "passed"
    except Exception as exc:  # the check failed: measure anyway, unchecked, and say so
        check = f"failed: {exc}"
        runtime = build_detector_runtime(model, torch.zeros(1, 3, 320, 320), cache_key_parts={"bench": name},
                                         cache_dir=None, verify=None, threads=threads)
    start_s = time.perf_counter() - started
    with torch.inference_mode():
        eager_out = [model([x])[0] for x in images]  # also the warm-up of every size
        split_out = [runtime.forward([x])[0] for x in images]
    differences = [r for r in (detections([e], [s], 0.0) for e, s in zip(eager_out, split_out)) if r]
    times: dict[str, list[list[float]]] = {"eager": [], "onnx": []}
    with torch.inference_mode():
        for round_ in range(rounds):
            per = {"eager": [], "onnx": []}
            for i, x in enumerate(images):
                order = ("eager", "onnx") if (round_ + i) % 2 == 0 else ("onnx", "eager")
                for which in order:
                    t = time.perf_counter()
                    model([x]) if which == "eager" else runtime.forward([x])
                    per[which].append(time.perf_counter() - t)
            for which in per:
                times[which].append(per[which])
    result = {"model": name, "start_s": round(start_s, 1), "check": check,
              "same_detections": "yes" if not differences else f"no: {differences[0]}",
              "detections": [len(o["scores"]) for o in eager_out]}
    for which, rounds_ in times.items():
        result[f"{which}_img_s"] = round(statistics.median(len(r) / sum(r) for r in rounds_), 2)
        result[f"{which}_p50_ms"] = round(1000 * statistics.median(t for r in rounds_ for t in r), 1)
    result["ratio"] = round(result["onnx_img_s"] / result["eager_img_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the photos (median round reported)")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch's and ONNX Runtime's")
    parser.add_argument("--quick", action="store_true", help="the MobileNetV3 320 Faster R-CNN, 1 round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    models = ["fasterrcnn_mobilenet_v3_large_320_fpn"] if args.quick else args.models
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    images = photos()
    print(f"torch {torch.__version__}, {args.threads} threads, {rounds} rounds over {len(images)} photos "
          f"{[tuple(x.shape[1:]) for x in images]}; load before: {load()}", flush=True)
    header = (f"{'model':40} {'eager img/s':>11} {'ORT img/s':>9} {'ratio':>5} {'eager p50':>9} {'ORT p50':>8} "
              f"{'start s':>7}  same detections")
    print(header, flush=True)
    results = []
    for name in models:
        r = bench_model(name, MODELS[name], images, rounds, args.threads)
        results.append(r)
        same = r["same_detections"] if r["check"] == "passed" else f"{r['same_detections']} (check {r['check']})"
        print(f"{name:40} {r['eager_img_s']:>11} {r['onnx_img_s']:>9} {r['ratio']:>5} {r['eager_p50_ms']:>9} "
              f"{r['onnx_p50_ms']:>8} {r['start_s']:>7}  {same}  {r['detections']}", flush=True)
    print(f"load after: {load()}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rounds": rounds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
