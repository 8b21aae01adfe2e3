"""Registry: every configured model loaded, warmed and looked up by name, all run by one Batcher."""
from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from serve.batching import Batcher
from serve.config import ModelSpec, ServeConfig
from serve.cores import SMALL_FORWARD_MS, CoreShare, available_cores
from serve.errors import (
    BatchTimeoutError,
    ModelNotFoundError,
    OverloadedError,
    ReloadFailedError,
    ServeError,
)
from serve.formats.packaged import apply_implied
from serve.loader import load_labels, load_model
from serve.memory import PixelBudget
from serve.metrics import Metrics
from serve.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    """A request's model outputs (one per image, as the task reads them) and the largest batch they ran in."""

    outputs: list[Any]
    batch_size: int


class Registry:
    """The predictors of one ServeConfig, in config order, and the Batcher whose thread runs them all."""

    def __init__(self, config: ServeConfig, predictors: dict[str, Predictor], batcher: Batcher,
                 cores: CoreShare | None = None, metrics: Metrics | None = None):
        self.config = config
        self.predictors = predictors
        self.batcher = batcher
        # With no fixed torch_threads, CPU batches take their share of the cores when they run.
        self.cores = cores
        self.metrics = metrics
        self.pixels = PixelBudget(config.server.max_image_pixels)  # one decode budget for every model

    @classmethod
    def load(cls, config: ServeConfig, names: list[str] | None = None, metrics: Metrics | None = None) -> Registry:
        """Load and warm up every model (or those named); any failure stops here, so nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        cores = None if config.server.torch_threads else CoreShare(available_cores())
        registry = cls(config, {}, Batcher("inference"), cores, metrics)
        try:
            for spec in config.models:
                if names is None or spec.name in names:
                    # Loading and warm-up run on the batcher's thread too: the only thread doing torch work.
                    registry.batcher.call(registry._build_and_install, spec).result()
        except BaseException:
            registry.close()
            raise
        return registry

    def _build_and_install(self, spec: ModelSpec) -> None:
        """Load and warm up one model, then make it the one served. Runs on the batcher's thread,
        between batches, so no batch ever sees a half-installed model."""
        loaded = load_model(spec)
        spec = apply_implied(spec, loaded.implied)  # an archive's task, labels, preprocess, where the config is silent
        predictor = Predictor(spec, loaded, load_labels(spec), self.pixels, self.config.server.onnx_cache_dir)
        predictor.warm_up()
        if self.cores is not None and predictor.single_threaded(1):
            log.info("model '%s': batch-1 forward %.2f ms on one thread: its batches under %.0f ms run "
                     "single-threaded", spec.name, predictor.forward_ms, SMALL_FORWARD_MS)
        # Two lanes a model: uint8 images (predict_batch normalizes them) and preprocessed float tensors
        # (V2's FP32 input); both batch up to max_batch_size, one image a queue entry.
        self.batcher.add_lane(spec.name, partial(self._run_lane, predictor, predictor.predict_batch),
                              spec.max_batch_size, spec.max_delay_ms)
        self.batcher.add_lane(_float_lane(spec.name), partial(self._run_lane, predictor, predictor.forward_many),
                              spec.max_batch_size, spec.max_delay_ms)
        self.predictors[spec.name] = predictor
        if self.metrics is not None:
            self.metrics.load_seconds.labels(spec.name).set(predictor.loaded.load_time_s)

    def _run_lane(self, predictor: Predictor, forward, inputs: list[torch.Tensor]) -> list[tuple[Any, int]]:
        """A gathered batch; each result carries the batch's size back to its request."""
        return [(p, len(inputs)) for p in self._run(predictor, forward, inputs)]

    def _run(self, predictor: Predictor, forward, batch) -> list[Any]:
        """One forward on the batcher's thread: CPU batches take their share of the cores; metrics kept."""
        started = time.perf_counter()
        if self.cores is not None and predictor.loaded.device.type == "cpu":
            with self.cores.share(single=predictor.single_threaded(len(batch))):
                probs = forward(batch)
        else:
            probs = forward(batch)
        if self.metrics is not None:
            waiting = self.batcher.pending - len(batch)  # this batch's futures are not resolved yet
            self.metrics.observe_batch(predictor.spec.name, len(batch), time.perf_counter() - started, waiting)
        return probs

    def _wait(self, futures: list, name: str) -> list:
        """The futures' results, all within request_timeout_s of now (one deadline for the request)."""
        timeout = self.config.server.request_timeout_s
        deadline = time.monotonic() + timeout
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()
            raise BatchTimeoutError(f"model '{name}' did not answer within {timeout:g}s; try again") from None

    def reload(self, name: str) -> Predictor:
        """Re-read a model's checkpoint; the new weights replace the old only once loaded and warm.

        Raises:
            ModelNotFoundError: no model of that name.
            ReloadFailedError: the file can't be loaded now; the previous weights keep serving.
        """
        self.get(name)
        spec = self.config.model(name)  # as configured: what the checkpoint implies is read again
        try:
            self.batcher.call(self._build_and_install, spec).result()
        except ServeError as exc:
            raise ReloadFailedError(f"reload failed, still serving the previous weights: {exc.message}") from None
        return self.predictors[name]

    def warm_runtimes(self) -> None:
        """Start every model's runtime in this process (ONNX Runtime sessions are made per process,
        after gunicorn's fork): gunicorn_conf's post_worker_init calls it before the worker takes a request."""
        for predictor in list(self.predictors.values()):
            self.batcher.call(predictor.warm_runtime).result()

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        return bool(self.predictors)  # each one installed only once warm

    def get(self, name: str) -> Predictor:
        """Raises: ModelNotFoundError: no model of that name."""
        try:
            return self.predictors[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named '{name}'; models: {sorted(self.predictors)}") from None

    def admit(self, count: int = 1) -> None:
        """Refuse work the worker can't start soon: checked before a request's body is even read.

        Raises:
            OverloadedError: max_queue images are already waiting.
        """
        limit = self.config.server.max_queue
        if self.batcher.pending + count > limit:
            raise OverloadedError(f"server busy: {self.batcher.pending} images waiting (limit {limit}); retry shortly")

    def infer(self, name: str, inputs: list[torch.Tensor]) -> Inference:
        """Run uint8 inputs through the model's batcher; one output per input.

        Raises:
            BatchTimeoutError: no answer within request_timeout_s.
            CheckpointError: the model's output doesn't fit its task.
        """
        return self._infer(name, name, inputs)

    def infer_float(self, name: str, batch: torch.Tensor) -> Inference:
        """As infer, for an already preprocessed float batch [N, C, H, W] (V2's FP32 input)."""
        return self._infer(_float_lane(name), name, list(batch))

    def _infer(self, lane, name: str, inputs: list[torch.Tensor]) -> Inference:
        results = self._wait(self.batcher.submit_many(lane, inputs), name)
        return Inference([output for output, _ in results], max(size for _, size in results))

    def close(self) -> None:
        self.batcher.stop()


def _float_lane(name: str) -> tuple[str, str]:
    return (name, "float")
