"""Predictor: one served model = its loaded checkpoint, its task and its runtime; bytes in, outputs out."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from serve.config import ModelSpec
from serve.cores import SMALL_FORWARD_MS, sharing_as
from serve.errors import CheckpointError, ConfigError, ExportError
from serve.loader import LoadedModel
from serve.memory import PixelBudget, release_after
from serve.precision import WEAK_GATE, calibration_set, decide_int8
from serve.preprocess import draft, load_image, open_image, upright_size
from serve.runtimes import RUNTIMES
from serve.runtimes.onnx import OnnxRuntime, build_onnx_runtime
from serve.runtimes.onnx.detection import build_detector_runtime, detector_family
from serve.tasks import TASKS
from serve.tasks.base import Prepared, describe_output

log = logging.getLogger(__name__)


class Predictor:
    """A model's three parts: the loaded checkpoint, the task (what goes in and out), the runtime (the forward)."""

    def __init__(self, spec: ModelSpec, loaded: LoadedModel, labels: tuple[str, ...] | None, pixels: PixelBudget,
                 onnx_cache_dir: Path | None = None, threads: int | None = None):
        """`pixels`: the process's decode budget, shared by its models; its limit is also the largest
        image accepted. `onnx_cache_dir`: where runtime auto/onnxruntime keeps its exports (None: none).
        `threads`: a fixed thread count for a runtime with its own pool (ONNX Runtime), as
        SERVE_TORCH_THREADS fixes torch's; None: every core."""
        self.spec = spec
        self.loaded = loaded
        self.labels = labels
        self.pixels = pixels
        self.onnx_cache_dir = onnx_cache_dir
        self.threads = threads
        self.task = TASKS[spec.task](spec, labels, loaded.device)
        if spec.response_format not in self.task.formats:
            raise ConfigError(f"model '{spec.name}': field 'response_format': task '{spec.task}' answers "
                              f"{list(self.task.formats)}, not '{spec.response_format}'")
        self.runtime_note: str | None = None  # why the runtime serving is not the one asked for
        self.precision = "fp32"  # the precision serving: int8 only once it passed its gate (serve/precision.py)
        self.precision_note: str | None = None  # why fp32 serves where int8 was asked for
        self.int8_figures: dict[str, Any] | None = None  # the int8 gate's figures, where int8 was asked for
        if loaded.runtime is not None:  # a file only its own runtime runs (an .onnx checkpoint)
            if spec.runtime == "eager":
                raise ConfigError(f"model '{spec.name}': field 'runtime': {spec.checkpoint.name} runs on "
                                  f"{loaded.runtime.name} only, not eager")
            if self.task.needs_module():
                raise ConfigError(f"model '{spec.name}': task '{spec.task}': its options need the PyTorch "
                                  f"module, which {spec.checkpoint.name} doesn't have")
            self.module, self.eager, self.runtime = None, None, loaded.runtime
            self.runtime.use_threads(threads)
            if spec.precision == "int8":
                self.precision_note = (f"int8 is made from the fp32 export of a PyTorch module; {spec.checkpoint.name} "
                                       "is served as it is")
        else:
            self.module = self.task.adapt(loaded.module)
            self.eager = RUNTIMES["eager"](self.module, loaded.device, spec.half, spec.channels_last)
            self.runtime = self.eager
        self.forward_ms: float | None = None  # batch-1 CPU eager forward on one thread, timed at warm-up

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.task.input_shape

    def warm_up(self) -> None:
        """Forward one blank image, let the task check the output fits it (and learn its size), then
        choose the runtime (runtime auto: ONNX Runtime where its export agrees with eager).

        Call it on the thread that runs predict_batch: even building the blank input starts an OpenMP
        thread team on the calling thread. ONNX Runtime itself is never started in this process here
        (it may be the gunicorn master, whose forked workers it would hang): its checks run in a child.

        Raises:
            CheckpointError: the output doesn't fit the task (naming the model, the task and the shape),
                or runtime onnxruntime was asked for and can't serve the model.
            ConfigError: the labels don't match the output.
        """
        blank = self.task.blank()
        model_input = self.task.collate([blank])
        with torch.inference_mode():
            try:
                output = (self.eager.forward(model_input) if self.eager is not None
                          else self.runtime.forward_isolated(model_input)[0])
            except Exception as exc:  # the user's forward on the task's input: any failure stops start-up
                raise CheckpointError(
                    f"model '{self.spec.name}': task '{self.task.name}': the model's forward failed on "
                    f"{describe_output(model_input)}: {type(exc).__name__}: {str(exc)[:300]}") from None
        self.task.check(output)
        if self.eager is not None and self.spec.runtime != "eager":
            self._choose_runtime(model_input)
        if self.eager is not None and self.loaded.device.type == "cpu":
            self.forward_ms = self._time_forward(blank)
        if "onnxruntime" in sys.modules:
            # This process runs ONNX Runtime already (a worker loading a new version, or no gunicorn at
            # all): start the new session now, so the version is switched in warm.
            self.warm_runtime()

    def _choose_runtime(self, model_input: Any) -> None:
        """ONNX Runtime where the export (or its cached copy) answers as eager does; else eager, with the reason.

        Raises:
            CheckpointError: runtime onnxruntime was asked for and can't serve the model.
        """
        spec = self.spec
        sample = model_input if isinstance(model_input, torch.Tensor) else torch.stack(list(model_input))
        reason = None
        # runtime auto leaves a task that doesn't export (detect) on eager; torchvision's detectors split
        policy = spec.runtime == "auto" and not self.task.auto_export and not detector_family(self.module)
        if spec.half or spec.channels_last:
            reason = "half and channels_last are eager PyTorch settings"
        elif policy:
            reason = f"runtime auto leaves task '{self.task.name}' on eager PyTorch (ask for runtime: onnxruntime)"
        else:
            # torchvision's detectors split: backbone and heads on ONNX Runtime, the data-dependent rest eager
            build = build_detector_runtime if detector_family(self.module) else build_onnx_runtime
            try:
                self.runtime = build(
                    self.module, sample, verify=self.task.verify_runtime, dynamic_hw=not self.task.fixed_size,
                    cache_dir=self.onnx_cache_dir, device=self.loaded.device,
                    score_threshold=0.0,  # every detection must agree, not only those above a threshold
                    cache_key_parts={"sha256": self.loaded.sha256, "architecture": spec.architecture,
                                     "kwargs": spec.kwargs, "task": spec.task, "weights": spec.weights,
                                     "state_dict_key": spec.state_dict_key, "strip_prefix": spec.strip_prefix,
                                     "task_options": self.task.options.model_dump()})
            except ExportError as exc:
                reason = exc.message
        if reason is None:
            self.runtime.use_threads(self.threads)
            described = self.runtime.describe()
            log.info("model '%s': serving ONNX Runtime (export %s s, cache %s)", spec.name,
                     described.get("export_s"), described.get("cache"))
            if spec.precision == "int8":
                self._choose_precision()
            return
        if spec.precision == "int8":
            self.precision_note = f"int8 runs on ONNX Runtime, which can't serve this model: {reason}"
        if spec.runtime == "onnxruntime":
            raise CheckpointError(f"model '{spec.name}': field 'runtime': onnxruntime can't serve it: {reason}")
        self.runtime_note = reason
        log.log(logging.INFO if policy else logging.WARNING, "model '%s': serving eager PyTorch, not ONNX Runtime: %s",
                spec.name, reason)

    def _choose_precision(self) -> None:
        """int8 where it passes its gate against fp32 and is faster (serve/precision.py); else fp32, with the reason.

        Raises:
            ConfigError: calibration.images is not a folder of enough images.
        """
        spec = self.spec
        if self.loaded.device.type != "cpu":
            self.precision_note = f"int8 runs on the CPU, not on {self.loaded.device}"
        elif not isinstance(self.runtime, OnnxRuntime):
            self.precision_note = f"int8 is made from a whole-model ONNX export; {self.runtime.name} is not one"
        else:
            try:
                images = calibration_set(spec, self.task, self.preprocess)
            except ExportError as exc:
                self.precision_note = exc.message
            else:
                if images.weak:
                    log.warning("model '%s': precision int8: %s", spec.name, WEAK_GATE)
                decision = decide_int8(spec, self.task, self.runtime, self.loaded.sha256, images,
                                       cache_dir=self.onnx_cache_dir)
                self.int8_figures, self.precision_note = decision.figures, decision.reason
                if decision.runtime is not None:
                    self.runtime, self.precision = decision.runtime, "int8"
                    self.runtime.use_threads(self.threads)
        if self.precision == "int8":
            log.info("model '%s': serving int8 (gate %s, %sx fp32's speed)", spec.name,
                     self.int8_figures["gate"], self.int8_figures["speed"]["speedup"])
        else:
            log.warning("model '%s': serving fp32, not int8: %s", spec.name, self.precision_note)

    def warm_runtime(self, busy_sessions: bool = True) -> None:
        """Start the runtime in this process (a forked worker's ONNX Runtime session) before any request
        needs it: one blank batch on the thread that runs predict_batch. With busy_sessions (more than
        one worker), also the single-threaded session for batches that run beside another worker's;
        a lone worker never needs it (it would be made on first use)."""
        if self.runtime is not self.eager:
            self.predict_batch([self.task.blank()])
            if busy_sessions and getattr(self.runtime, "load_threads", None):
                with sharing_as(1):
                    self.predict_batch([self.task.blank()])

    def _time_forward(self, blank: torch.Tensor, runs: int = 5) -> float:
        """The fastest batch-1 forward on one torch thread, in ms of this thread's CPU time (so other
        processes' load doesn't inflate it), after warm-up's first forward paid the one-time set-up.
        A model plainly above SMALL_FORWARD_MS stops early. The thread count is put back afterwards."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the forward runs on this one, all of it in thread_time
        try:
            times: list[float] = []
            for _ in range(runs):
                started = time.thread_time()
                self.task.run(self.eager.forward, [blank])
                times.append((time.thread_time() - started) * 1000)
                if times[-1] > 10 * SMALL_FORWARD_MS or (len(times) >= 2 and min(times) > 2 * SMALL_FORWARD_MS):
                    break
            return min(times)
        finally:
            torch.set_num_threads(threads)

    def time_one(self) -> float:
        """Seconds of one blank image's eager forward after warm-up: admission's first per-image cost.
        Eager's even where another runtime serves (ONNX Runtime must not start in a process that forks
        workers later: a pessimistic first figure, replaced by the first measured batches); 0 for a
        model with no eager module (an .onnx file), so nothing is shed before it is measured."""
        if self.eager is None:
            return 0.0
        started = time.perf_counter()
        self.task.run(self.eager.forward, [self.task.blank()])
        return time.perf_counter() - started

    def single_threaded(self, batch_size: int) -> bool:
        """Whether torch runs this CPU batch on one thread: a batch too small for a second thread to pay
        for OpenMP's spin-waiting (serve/cores.py), or any batch another runtime forwards. ONNX Runtime
        has its own thread pool, and torch's part (normalizing, softmax) is too small to gain from a
        second thread (docs/performance.md); a split detector's eager part (RoIAlign, NMS, the transform)
        is larger, and runs on one torch thread too, beside ONNX Runtime's pool."""
        if self.runtime is not self.eager:
            return True
        return self.forward_ms is not None and self.forward_ms * batch_size < SMALL_FORWARD_MS

    def preprocess(self, data: bytes) -> Prepared:
        """Decode one image and let the task turn it into the model's uint8 input (request thread).

        Raises:
            InvalidImageError, ImageTooLargeError: see decode_image.
        """
        mode = self.spec.preprocess.mode
        image = open_image(data, self.pixels.limit, mode)
        size = upright_size(image)
        draft(image, mode, **self.task.decode_sides())
        pixels = image.width * image.height
        with self.pixels.hold(pixels):  # from the first decoded pixel until only the small tensor is left
            prepared = self.task.prepare(load_image(image, mode), size)
            del image
        release_after(pixels)
        return prepared

    def predict_batch(self, inputs: list[torch.Tensor]) -> list[Any]:
        """Batcher thread: uint8 inputs -> one CPU output per input, as the task reads them.

        Raises:
            CheckpointError: the model's output doesn't fit the task.
        """
        with torch.inference_mode():
            return self.task.run(self.runtime.forward, inputs)

    def forward_many(self, inputs: list[torch.Tensor]) -> list[Any]:
        """predict_batch for normalized float inputs [C, H, W] (V2's FP32 input)."""
        with torch.inference_mode():
            return self.task.run_float(self.runtime.forward, inputs)

    def describe_runtime(self) -> dict[str, Any]:
        """The runtime serving, what was asked for and, after a fallback to eager, why."""
        described = {k: v for k, v in self.runtime.describe().items() if k not in ("name", "runtime")}
        precision = {"precision": self.precision}
        if self.spec.precision != "fp32":
            precision.update(requested_precision=self.spec.precision, precision_reason=self.precision_note,
                             int8=self.int8_figures)
        return {"name": self.runtime.name, "requested": self.spec.runtime, **described,
                "fallback_reason": self.runtime_note, **precision}

    def metadata(self) -> dict:
        spec, pre = self.spec, self.spec.preprocess
        task = self.task.metadata()
        return {
            "name": spec.name,
            "task": task,
            "runtime": self.describe_runtime(),
            "architecture": spec.architecture or "whole-model pickle",
            "device": str(self.loaded.device),
            "ready": True,  # a model is served only once loaded and warm (ModelTable._build)
            "input": {
                "shape": list(self.input_shape),
                "mode": pre.mode,
                "resize": pre.resize,
                "crop": pre.crop,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "interpolation": pre.interpolation,
            },
            "num_classes": task.get("num_classes"),
            "num_labels": len(self.labels) if self.labels is not None else 0,
            "topk": spec.topk,
            "response_format": spec.response_format,
            "checkpoint": {
                "file": spec.checkpoint.name,
                "sha256": self.loaded.sha256,
                "layout": self.loaded.layout,
                "skipped_keys": len(self.loaded.skipped_keys),
            },
            "load_time_s": round(self.loaded.load_time_s, 3),
        }
