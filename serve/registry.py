"""Registry: every configured model loaded, warmed and looked up by name, all run by one Batcher."""
from __future__ import annotations

import logging
import os
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import torch

from serve.batching import Batcher
from serve.config import ModelSpec, ServeConfig
from serve.cores import CoreShare
from serve.errors import (
    BatchTimeoutError,
    ModelNotFoundError,
    OverloadedError,
    ReloadFailedError,
    ServeError,
)
from serve.loader import load_labels, load_model
from serve.predictor import Predictor

log = logging.getLogger(__name__)


class Registry:
    """The predictors of one ServeConfig, in config order, and the Batcher whose thread runs them all."""

    def __init__(self, config: ServeConfig, predictors: dict[str, Predictor], batcher: Batcher,
                 cores: CoreShare | None = None):
        self.config = config
        self.predictors = predictors
        self.batcher = batcher
        # With no fixed torch_threads, CPU batches take their share of the cores when they run.
        self.cores = cores

    @classmethod
    def load(cls, config: ServeConfig, names: list[str] | None = None) -> Registry:
        """Load and warm up every model (or those named); any failure stops here, so nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        cores = None if config.server.torch_threads else CoreShare(len(os.sched_getaffinity(0)))
        registry = cls(config, {}, Batcher("inference"), cores)
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
        predictor = Predictor(spec, load_model(spec), load_labels(spec), self.config.server.max_image_pixels)
        predictor.warm_up()
        run = predictor.predict_batch
        if self.cores is not None and predictor.loaded.device.type == "cpu":
            run = partial(self._run_on_shared_cores, predictor.predict_batch)
        self.batcher.add_lane(spec.name, run, spec.max_batch_size, spec.max_delay_ms)
        self.predictors[spec.name] = predictor

    def _run_on_shared_cores(self, predict_batch, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.cores.share():
            return predict_batch(inputs)

    def reload(self, name: str) -> Predictor:
        """Re-read a model's checkpoint; the new weights replace the old only once loaded and warm.

        Raises:
            ModelNotFoundError: no model of that name.
            ReloadFailedError: the file can't be loaded now; the previous weights keep serving.
        """
        spec = self.get(name).spec
        try:
            self.batcher.call(self._build_and_install, spec).result()
        except ServeError as exc:
            raise ReloadFailedError(f"reload failed, still serving the previous weights: {exc.message}") from None
        return self.predictors[name]

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        return bool(self.predictors) and all(p.ready for p in self.predictors.values())

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

    def infer(self, name: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run inputs through the model's batcher; return one probability vector each.

        Raises:
            BatchTimeoutError: no answer within request_timeout_s.
        """
        timeout = self.config.server.request_timeout_s
        futures = self.batcher.submit_many(name, inputs)
        try:
            return [future.result(timeout=timeout) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()
            raise BatchTimeoutError(f"model '{name}' did not answer within {timeout:g}s; try again") from None

    def close(self) -> None:
        self.batcher.stop()
