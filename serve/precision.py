"""Precision: whether a model is served int8. Calibrate through the model's own preprocessing, quantise the
fp32 ONNX export (or take the cached int8 copy), gate int8 against fp32 on held-out images by the task's
rule, time both on the same batch; the int8 runtime, or the reason fp32 serves.

ONNX Runtime runs only in a forked child here (the fork rule, serve/runtimes/onnx/__init__.py), unless
this process has imported it already. docs/precision.md is the reference, with the measurements.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.config import CalibrationSpec, ModelSpec
from serve.cores import available_cores
from serve.errors import ConfigError, ExportError, ServeError
from serve.preprocess import load_image
from serve.runtimes.onnx import OnnxRuntime
from serve.runtimes.onnx.cache import cache_key, cache_paths, read_cached, write_cached
from serve.runtimes.onnx.export import KEY_PROP, with_metadata
from serve.runtimes.onnx.isolate import run_in_child
from serve.runtimes.onnx.layout import unflatten
from serve.runtimes.onnx.quantize import Recipe, quantize, time_pair
from serve.runtimes.onnx.reasons import first_line
from serve.sources.cache import file_sha256
from serve.tasks.base import Prepared, Task

log = logging.getLogger(__name__)

INT8_FORMAT = 1  # bump when the int8 cache entry's recipe or layout changes: old entries stop matching
# The recipes docs/precision.md chose from measurements on the default model, tried in order until one
# passes the accuracy gate: every layer int8 (the fastest), then the early layers left in fp32.
RECIPE = Recipe()
RECIPES = (RECIPE, Recipe(name="early convs fp32", keep_fp32=("early_convs",)))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The fallback set: scikit-image's bundled photos (colour ones first; the grey ones are converted).
FALLBACK_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "colorwheel", "logo", "stereo_motorcycle", "camera", "moon", "coins", "grass",
                   "gravel", "brick", "clock", "cell", "page", "text")
WEAK_GATE = ("no calibration.images: calibrated and gated on scikit-image's bundled photos (crops of 20), "
             "not on images like the model's own; the gate is weaker")
HELD_OUT_BATCH = 8  # held-out images per forward in the gate


@dataclass
class CalibrationSet:
    """The model inputs ([1, C, H, W] float, through the model's own preprocessing) that calibrate, and
    the held-out ones the gate judges on; where they came from; their digest (part of the cache key)."""

    calibration: list[torch.Tensor]
    held_out: list[torch.Tensor]
    source: str
    weak: bool
    digest: str = field(init=False)

    def __post_init__(self):
        digest = hashlib.sha256()
        for group in (self.calibration, self.held_out):
            digest.update(f"{len(group)};".encode())
            for x in group:
                digest.update(str(list(x.shape)).encode())
                digest.update(x.contiguous().numpy().tobytes())
        self.digest = digest.hexdigest()


@dataclass
class Decision:
    """What precision int8 came to: the int8 runtime (None: fp32 serves), the reason when not, the figures."""

    runtime: OnnxRuntime | None
    reason: str | None
    figures: dict[str, Any]


def calibration_set(spec: ModelSpec, task: Task, preprocess: Callable[[bytes], Prepared]) -> CalibrationSet:
    """The calibration and held-out inputs: from calibration.images (files in the order of their contents'
    sha256: the first `count` calibrate, the next `held_out` are held out), or the fallback photos (crops
    of even-numbered photos calibrate, of odd-numbered ones are held out: the gate's photos were never seen).

    Raises:
        ConfigError: the folder is missing or has too few images that decode.
        ExportError: no folder, and scikit-image (the fallback photos) is not installed.
    """
    calibration = spec.calibration
    if calibration.images is not None:
        calib, held = _folder_images(spec.name, calibration, preprocess)
        source, weak = f"{calibration.images} ({len(calib)} calibrate, {len(held)} held out)", False
    else:
        calib, held = _fallback_images(calibration, task, spec.preprocess.mode)
        source, weak = f"fallback: scikit-image photos ({len(calib)} crops calibrate, {len(held)} held out)", True
    inputs = [[_model_input(task, p) for p in group] for group in (calib, held)]
    return CalibrationSet(inputs[0], inputs[1], source, weak)


def _model_input(task: Task, prepared: Prepared) -> torch.Tensor:
    with torch.inference_mode():
        return task.collate([prepared.tensor]).float().cpu().clone()


def _folder_images(name: str, calibration: CalibrationSpec,
                   preprocess: Callable[[bytes], Prepared]) -> tuple[list[Prepared], list[Prepared]]:
    where = f"model '{name}': field 'calibration.images'"
    folder = calibration.images
    if not folder.is_dir():
        raise ConfigError(f"{where}: {folder} is not a folder")
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    prepared: list[Prepared] = []
    wanted = calibration.count + calibration.held_out
    for path in sorted(files, key=lambda p: (file_sha256(p), str(p))):  # read one at a time: a folder may be large
        if len(prepared) == wanted:
            break
        try:
            prepared.append(preprocess(path.read_bytes()))
        except ServeError as exc:
            log.warning("%s: %s is skipped: %s", where, path, exc.message)
    if len(prepared) < wanted:
        raise ConfigError(f"{where}: {len(prepared)} images in {folder} decode, int8 needs count + held_out = "
                          f"{calibration.count} + {calibration.held_out} = {wanted}")
    return prepared[:calibration.count], prepared[calibration.count:]


def fallback_photos() -> list:
    """scikit-image's bundled photos as RGB PIL images, in FALLBACK_PHOTOS' order.

    Raises:
        ExportError: scikit-image is not installed (fp32 serves, with this reason).
    """
    from PIL import Image

    try:
        from skimage import data
    except ImportError:
        raise ExportError("precision int8 without calibration.images calibrates on scikit-image's photos: "
                          "install scikit-image, or set calibration.images to a folder of your images") from None
    photos = []
    for name in FALLBACK_PHOTOS:
        image = getattr(data, name)()
        photos.append(Image.fromarray(image[0] if isinstance(image, tuple) else image).convert("RGB"))
    return photos


def fallback_crops(count: int, held_out: int) -> tuple[list, list]:
    """Deterministic crops (50-100 % of the side, some mirrored) of the fallback photos: `count` from the
    even-numbered photos, `held_out` from the odd-numbered ones."""
    from PIL import Image

    photos = fallback_photos()
    rng = np.random.default_rng(0)
    groups: tuple[list, list] = ([], [])
    for wanted, group, own in ((count, groups[0], photos[0::2]), (held_out, groups[1], photos[1::2])):
        for i in range(wanted):
            photo = own[i % len(own)]
            width, height = photo.size
            scale = rng.uniform(0.5, 1.0)
            w, h = int(width * scale), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = photo.crop((x, y, x + w, y + h))
            group.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return groups


def _fallback_images(calibration: CalibrationSpec, task: Task, mode: str) -> tuple[list[Prepared], list[Prepared]]:
    """The crops, decoded already, through the task's prepare as a request's decoded image goes (encoding
    them to decode them again cost 5 s of start-up on 2 cores and changed nothing the model sees)."""
    groups = fallback_crops(calibration.count, calibration.held_out)
    return tuple([task.prepare(load_image(crop, mode), crop.size) for crop in group]  # type: ignore[return-value]
                 for group in groups)


def int8_key_parts(fp32: OnnxRuntime, checkpoint_sha256: str, images: CalibrationSet, recipe: Recipe) -> dict:
    """What an int8 model depends on: the fp32 export (its sha256), the checkpoint, the calibration set,
    the recipe and the quantiser's versions."""
    model = fp32.model if isinstance(fp32.model, bytes) else Path(fp32.model).read_bytes()
    versions = {}
    for dist in ("onnxruntime", "onnx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return {"precision": "int8", "int8_format": INT8_FORMAT, "fp32_sha256": hashlib.sha256(model).hexdigest(),
            "checkpoint_sha256": checkpoint_sha256, "calibration": images.digest,
            "calibration_size": [len(images.calibration), len(images.held_out)], "recipe": recipe.key(),
            "quantizer": versions}


def decide_int8(spec: ModelSpec, task: Task, fp32: OnnxRuntime, checkpoint_sha256: str, images: CalibrationSet,
                *, cache_dir: Path | None, recipes: tuple[Recipe, ...] = RECIPES,
                threads: int | None = None) -> Decision:
    """Each recipe in turn until one passes the accuracy gate (try_recipe); int8's runtime if it is also fast
    enough, else None and the reasons. Every figure is in Decision.figures, with "tried": the recipes that
    failed the accuracy gate before."""
    tried: list[dict] = []
    for recipe in recipes:
        decision, accurate = try_recipe(spec, task, fp32, checkpoint_sha256, images, cache_dir=cache_dir,
                                        recipe=recipe, threads=threads)
        if accurate or recipe is recipes[-1] or decision.figures.get("gate") is None:
            break
        tried.append({"recipe": recipe.name, "gate": decision.figures["gate"], "reason": decision.reason})
    if tried:
        decision.figures["tried"] = tried
        if decision.reason is not None:
            decision.reason = "; ".join([f"{t['recipe']}: {t['reason']}" for t in tried] +
                                        [f"{recipe.name}: {decision.reason}"])
    return decision


def try_recipe(spec: ModelSpec, task: Task, fp32: OnnxRuntime, checkpoint_sha256: str, images: CalibrationSet,
               *, cache_dir: Path | None, recipe: Recipe, threads: int | None = None) -> tuple[Decision, bool]:
    """Quantise fp32 with recipe (or take the cached int8 model), run both on the held-out images and time
    both on the same batch, in one forked child; int8's runtime if it passes the task's gate and
    spec.int8_gate's min_speedup, else None and the reason; and whether it passed the accuracy gate."""
    gate = spec.int8_gate
    threads = threads or available_cores()
    parts = int8_key_parts(fp32, checkpoint_sha256, images, recipe)
    key = cache_key(parts)
    figures: dict[str, Any] = {"calibration": images.source, "recipe": recipe.name, "cache": "disabled",
                               "options": recipe.key()}
    cached = None
    if cache_dir is not None:
        cached, _, problem = read_cached(Path(cache_dir), key)
        figures["cache"] = "hit" if cached is not None else "miss"
        if problem:
            log.warning("int8 cache file %s is not used: %s; quantising again", cache_paths(Path(cache_dir), key)[0],
                        problem)
    held = _held_out_batches(task, images.held_out)
    speed_batch = held[0].numpy()
    calibration = [x.numpy() for x in images.calibration]
    layout, source = fp32.layout, fp32.model

    def work() -> list[list[np.ndarray]]:
        started = time.perf_counter()
        model = cached if cached is not None else with_metadata(
            quantize(_bytes(source), calibration, recipe, fp32.input_name), {KEY_PROP: key})
        quantize_s = time.perf_counter() - started
        runtimes = [OnnxRuntime(data, layout, threads=threads, input_name=fp32.input_name) for data in (source, model)]
        outputs = [runtime.run_numpy([b.numpy() for b in held], threads) for runtime in runtimes]
        fp32_s, int8_s = time_pair(*(lambda b, rt=rt: rt.run_numpy([b], threads) for rt in runtimes), speed_batch)
        head = [[np.frombuffer(model, np.uint8)], [np.array([quantize_s, fp32_s, int8_s])]]
        return head + outputs[0] + outputs[1]

    try:
        answer = run_in_child(work) if "onnxruntime" not in sys.modules else _in_process(work)
    except ExportError as exc:
        return Decision(None, f"int8 quantisation failed: {exc.message}", figures), False
    model = answer[0][0].tobytes()
    quantize_s, fp32_s, int8_s = (float(v) for v in answer[1][0])
    outputs = answer[2:]
    fp32_out = _split(task, layout, outputs[:len(held)], held)
    int8_out = _split(task, layout, outputs[len(held):], held)
    task_figures, reason = task.int8_gate(fp32_out, int8_out, gate)
    speedup = fp32_s / int8_s if int8_s > 0 else 0.0
    figures.update(gate=task_figures, speed={
        "batch": int(speed_batch.shape[0]), "threads": threads, "fp32_ms": round(fp32_s * 1000, 2),
        "int8_ms": round(int8_s * 1000, 2), "speedup": round(speedup, 2)})
    if cached is None:
        figures["quantize_s"] = round(quantize_s, 2)
        if cache_dir is not None:
            problem = write_cached(Path(cache_dir), key, model, parts)
            if problem is not None:
                log.warning("int8 cache directory can't be written: %s; the int8 model is kept in memory only",
                            problem)
                figures["cache"] = "unwritable"
    if images.weak:
        figures["warning"] = WEAK_GATE
    accurate = reason is None
    if reason is None and gate.min_speedup and speedup < gate.min_speedup:
        reason = (f"int8 is {speedup:.2f}x as fast as fp32 here ({figures['speed']['int8_ms']} against "
                  f"{figures['speed']['fp32_ms']} ms a batch of {speed_batch.shape[0]}; min_speedup "
                  f"{gate.min_speedup:g})")
    if reason is not None:
        return Decision(None, reason, figures), accurate
    info = {**fp32.info, "precision": "int8", "int8_cache": figures["cache"]}
    return Decision(OnnxRuntime(model, layout, threads=threads, info=info, input_name=fp32.input_name), None,
                    figures), True


def _bytes(model: bytes | Path) -> bytes:
    return model if isinstance(model, bytes) else Path(model).read_bytes()


def _held_out_batches(task: Task, held_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Held-out inputs in batches of up to HELD_OUT_BATCH where every input has one shape; one by one otherwise."""
    if task.fixed_size and len({tuple(x.shape) for x in held_out}) == 1:
        return [torch.cat(held_out[i:i + HELD_OUT_BATCH]) for i in range(0, len(held_out), HELD_OUT_BATCH)]
    return list(held_out)


def _split(task: Task, layout: dict, runs: list[list[np.ndarray]], batches: list[torch.Tensor]) -> list[Any]:
    outputs: list[Any] = []
    for arrays, batch in zip(runs, batches):
        outputs += task.split(unflatten(layout, [torch.from_numpy(a) for a in arrays]), len(batch))
    return outputs


def _in_process(work: Callable[[], Any]) -> Any:
    """work() in this process (one that runs ONNX Runtime already: a worker loading a lazy model or a new
    version), any failure an ExportError, as run_in_child reports a child's: fp32 then serves, with the reason.

    Raises:
        ExportError: quantising or running either model failed.
    """
    try:
        return work()
    except ExportError:
        raise
    except Exception as exc:  # onnx / onnxruntime / the quantiser on the user's model: a reason, never a crash
        raise ExportError(f"{type(exc).__name__}: {first_line(exc)}") from None
