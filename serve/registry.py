"""Registry: every configured model and its versions loaded, warmed and looked up by name, all run by one Batcher."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from serve.admission import Deadline, Resends, ServiceTime, retry_after_s
from serve.batching import Batcher, Lane, make_lane
from serve.config import DEFAULT_VERSION, ModelSpec, ServeConfig
from serve.cores import SMALL_FORWARD_MS, CoreShare, HostLoad, available_cores
from serve.errors import (
    BatchTimeoutError,
    ConfigError,
    ModelNotFoundError,
    OverloadedError,
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
    """A request's model outputs (one per image, as the task reads them), the largest batch they ran
    in, and the version that answered (X-Model-Version)."""

    outputs: list[Any]
    batch_size: int
    served: Served | None = None


@dataclass(frozen=True)
class Source:
    """Where a served version's weights come from, as the control file names them (serve/lifecycle.py)."""

    checkpoint: str
    sha256: str | None = None  # pinned: a file that no longer has it is refused
    loaded: int = 0  # the control generation that last (re)loaded it; 0: the config

    @property
    def key(self) -> tuple[str, int]:
        """What makes a version load again: another file, or a reload."""
        return self.checkpoint, self.loaded


@dataclass(frozen=True, eq=False)
class Served:
    """One version of a model, loaded and warm, with its own batcher lanes: a request runs all its
    images on the Served it started with, whatever is installed meanwhile."""

    predictor: Predictor
    version: str
    source: Source
    lane: Lane  # uint8 images (predict_batch normalizes them)
    float_lane: Lane  # preprocessed float tensors (V2's FP32 input)

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def tag(self) -> str:
        """The X-Model-Version header: the version and the first 12 hex digits of its checkpoint's sha256."""
        return f"{self.version} {self.predictor.loaded.sha256[:12]}"


@dataclass(frozen=True)
class Versions:
    """A model's loaded versions and the one that answers when none is named."""

    versions: Mapping[str, Served]
    default: str

    @property
    def served(self) -> Served:
        return self.versions[self.default]


class Registry:
    """The models of one ServeConfig, each with its versions, in config order, and the Batcher whose
    thread runs them all."""

    def __init__(self, config: ServeConfig, batcher: Batcher | None = None, cores: CoreShare | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        self.models: dict[str, Versions] = {}  # replaced whole per model: readers never see half a change
        self.batcher = batcher or Batcher("inference")
        # With no fixed torch_threads, CPU batches take their share of the cores when they run.
        self.cores = cores
        self.metrics = metrics
        self.pixels = PixelBudget(config.server.max_image_pixels)  # one decode budget for every model
        self.service = ServiceTime()
        self._last_end, self._backlog = 0.0, False  # the inference thread's last batch: when, and was work waiting
        self.resends = Resends(config.server.shed_hold_ms / 1000)  # refused clients that come back at once

    @classmethod
    def load(cls, config: ServeConfig, names: list[str] | None = None, metrics: Metrics | None = None) -> Registry:
        """Load and warm up every model (or those named), each version; any failure stops here, so
        nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        cores = None if config.server.torch_threads else CoreShare(available_cores(), HostLoad())
        registry = cls(config, Batcher("inference"), cores, metrics)
        try:
            for spec in config.models:
                if names is None or spec.name in names:
                    wanted = {v: Source(str(spec.for_version(v).checkpoint)) for v in spec.version_names}
                    # Loading and warm-up run on the batcher's thread too: the only thread doing torch work.
                    registry.batcher.call(registry.apply, spec.name, wanted, spec.default).result()
        except BaseException:
            registry.close()
            raise
        return registry

    @property
    def predictors(self) -> dict[str, Predictor]:
        """Each model's default version."""
        return {name: model.served.predictor for name, model in self.models.items()}

    def apply(self, name: str, wanted: Mapping[str, Source], default: str) -> Versions:
        """Make these the model's versions: load and warm those new or reloaded, keep the others, then
        switch in one step. Runs on the batcher's thread, between batches. If any version fails,
        nothing changes.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model and the version.
        """
        self._backlog = False  # the time loads take is no batch's cost
        if default not in wanted:
            raise ConfigError(f"model '{name}': default version '{default}' is not among {sorted(wanted)}")
        current = self.models.get(name)
        have = current.versions if current is not None else {}
        versions = {}
        for version, source in wanted.items():
            kept = have.get(version)
            if kept is not None and kept.source.key == source.key:
                versions[version] = kept
                continue
            try:
                versions[version] = self._build(self.version_spec(name, version, source), version, source)
            except ServeError as exc:
                if len(wanted) == 1 and version == DEFAULT_VERSION:
                    raise  # a model with one version: its message needs no version
                raise type(exc)(f"{exc.message} (version '{version}')") from None
        model = Versions(MappingProxyType(versions), default)
        self.models[name] = model
        return model

    def version_spec(self, name: str, version: str, source: Source) -> ModelSpec:
        """The spec that loads a version: the configured version's (its labels, keys, ...) when the
        source is its checkpoint, else the model's with the source's checkpoint."""
        spec = self.config.model(name)
        if version in spec.version_names and str(spec.for_version(version).checkpoint) == source.checkpoint:
            configured = spec.for_version(version)
            return configured.model_copy(update={"sha256": source.sha256 or configured.sha256})
        return spec.model_copy(update={"checkpoint": Path(source.checkpoint), "sha256": source.sha256})

    def _build(self, spec: ModelSpec, version: str, source: Source) -> Served:
        """Load and warm up one version. Runs on the batcher's thread."""
        loaded = load_model(spec)
        spec = apply_implied(spec, loaded.implied)  # an archive's task, labels, preprocess, where the config is silent
        predictor = Predictor(spec, loaded, load_labels(spec), self.pixels, self.config.server.onnx_cache_dir,
                              self.config.server.torch_threads)
        predictor.warm_up()
        if self.cores is not None and predictor.runtime is predictor.eager and predictor.single_threaded(1):
            log.info("model '%s': batch-1 forward %.2f ms on one thread: its batches under %.0f ms run "
                     "single-threaded", spec.name, predictor.forward_ms, SMALL_FORWARD_MS)
        self.service.seed(spec.name, self._time_one(predictor))
        # Two lanes a version: uint8 images and preprocessed float tensors; both batch up to
        # max_batch_size, one image a queue entry.
        served = Served(predictor, version, source,
                        make_lane(partial(self._run_lane, predictor, predictor.predict_batch), spec.max_batch_size,
                                  spec.max_delay_ms),
                        make_lane(partial(self._run_lane, predictor, predictor.forward_many), spec.max_batch_size,
                                  spec.max_delay_ms))
        if self.metrics is not None:
            self.metrics.load_seconds.labels(spec.name).set(predictor.loaded.load_time_s)
        return served

    def _time_one(self, predictor: Predictor) -> float:
        """A first per-image cost for admission: one blank image's forward, after warm-up. Eager's when
        another runtime serves (ONNX Runtime must not start in a process that forks workers later: a
        pessimistic first figure, replaced by the first measured batches); 0 for a model with no eager
        module (an .onnx file), so nothing is shed before it is measured."""
        if predictor.eager is None:
            return 0.0
        started = time.perf_counter()
        predictor.task.run(predictor.eager.forward, [predictor.task.blank()])
        return time.perf_counter() - started

    def _run_lane(self, predictor: Predictor, forward, inputs: list[torch.Tensor]) -> list[tuple[Any, int]]:
        """A gathered batch; each result carries the batch's size back to its request."""
        return [(p, len(inputs)) for p in self._run(predictor, forward, inputs)]

    def _run(self, predictor: Predictor, forward, batch) -> list[Any]:
        """One forward on the batcher's thread: CPU batches take their share of the cores; its time per
        image measured for admission (serve/admission.py); metrics kept."""
        started = time.perf_counter()
        if self.cores is not None and predictor.loaded.device.type == "cpu":
            with self.cores.share(single=predictor.single_threaded(len(batch))):
                probs = forward(batch)
        else:
            probs = forward(batch)
        ended = time.perf_counter()
        waiting = self.batcher.pending - len(batch)  # this batch's futures are not resolved yet
        # Its cost on the thread's timeline: from the previous batch's end when work was waiting then
        # (gathering, answering, the CPU taken by request threads count too), else from its start.
        self.service.observe(predictor.spec.name, len(batch), ended - (self._last_end if self._backlog else started))
        self._last_end, self._backlog = ended, waiting > 0
        if self.metrics is not None:
            self.metrics.observe_batch(predictor.spec.name, len(batch), ended - started, waiting)
        return probs

    def deadline(self, client_s: float | None = None, source: str = "the request's deadline") -> Deadline:
        """A request's deadline from now: request_timeout_s, or the client's own if sooner."""
        server = Deadline.after(self.config.server.request_timeout_s,
                                f"{self.config.server.request_timeout_s:g}s (request_timeout_s)")
        return server.tighter(client_s, source)

    def _wait(self, futures: list, name: str, deadline: Deadline) -> list:
        """The futures' results, all before the request's deadline; past it, its queued images are
        cancelled (the batcher skips them).

        Raises: BatchTimeoutError: the deadline passed.
        """
        try:
            return [future.result(timeout=max(0.0, deadline.remaining())) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()
            self._shed(name, "deadline")
            raise BatchTimeoutError(f"model '{name}' did not answer within {deadline.source}; try again") from None

    def warm_runtimes(self, busy_sessions: bool = True) -> None:
        """Start every loaded version's runtime in this process (ONNX Runtime sessions are made per
        process, after gunicorn's fork): gunicorn_conf's post_worker_init calls it before the worker
        takes a request. busy_sessions: see Predictor.warm_runtime."""
        for model in list(self.models.values()):
            for served in model.versions.values():
                self.batcher.call(served.predictor.warm_runtime, busy_sessions).result()

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        return bool(self.models)  # each one installed only once warm

    def versions(self, name: str) -> Versions:
        """Raises: ModelNotFoundError: no model of that name."""
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named '{name}'; models: {sorted(self.models)}") from None

    def served(self, name: str, version: str | None = None) -> Served:
        """A model's version, its default when none is named.

        Raises: ModelNotFoundError: no model of that name, or no such version of it.
        """
        model = self.versions(name)
        if version is None:
            return model.served
        try:
            return model.versions[version]
        except KeyError:
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}'; versions: "
                                     f"{sorted(model.versions)}") from None

    def get(self, name: str) -> Predictor:
        """The default version's predictor. Raises: ModelNotFoundError: no model of that name."""
        return self.served(name).predictor

    def admit(self, name: str, count: int = 1, deadline: Deadline | None = None) -> None:
        """Refuse work the worker can't start in time: checked before a request's body is read, and
        again when its images are queued.

        Raises:
            OverloadedError: the predicted wait is over max_queue_wait_ms (or the client's deadline),
                or max_queue images are already waiting.
        """
        wait = self.service.predicted_wait_s()
        pending, limit = self.batcher.pending, self.config.server.max_queue
        if pending + count > limit:
            self._shed(name, "queue_full")
            raise OverloadedError(f"server busy: {pending} images waiting (limit {limit}); retry shortly",
                                  retry_after_s(wait), holdable=True)
        budget = self.config.server.max_queue_wait_ms / 1000
        why = f"max_queue_wait_ms ({self.config.server.max_queue_wait_ms:g})"
        client = deadline is not None and deadline.remaining() < budget
        if client:
            budget, why = deadline.remaining(), deadline.source
        if wait > budget:
            self._shed(name, "predicted_wait")
            raise OverloadedError(f"server busy: model '{name}' would wait about {wait * 1000:.0f} ms, over "
                                  f"{why}; retry later", retry_after_s(wait), holdable=not client)

    def _shed(self, name: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(name, reason).inc()

    def infer(self, target: str | Served, inputs: list[torch.Tensor], deadline: Deadline | None = None) -> Inference:
        """Run uint8 inputs through a model (its default version, or the Served given); one output per
        input. Admitted again with the request's image count first.

        Raises:
            OverloadedError: see admit.
            BatchTimeoutError: no answer before the deadline (request_timeout_s by default).
            CheckpointError: the model's output doesn't fit its task.
        """
        served = self.served(target) if isinstance(target, str) else target
        return self._infer(served, served.lane, inputs, deadline)

    def infer_float(self, target: str | Served, batch: torch.Tensor, deadline: Deadline | None = None) -> Inference:
        """As infer, for an already preprocessed float batch [N, C, H, W] (V2's FP32 input)."""
        served = self.served(target) if isinstance(target, str) else target
        return self._infer(served, served.float_lane, list(batch), deadline)

    def _infer(self, served: Served, lane: Lane, inputs: list[torch.Tensor], deadline: Deadline | None) -> Inference:
        deadline = deadline or self.deadline()
        self.admit(served.name, len(inputs), deadline)
        futures = self.batcher.submit_many(lane, inputs)
        self.service.track(served.name, futures)
        results = self._wait(futures, served.name, deadline)
        return Inference([output for output, _ in results], max(size for _, size in results), served)

    @property
    def closed(self) -> bool:
        return self.batcher.stopped

    def close(self) -> None:
        self.batcher.stop()
        if self.cores is not None:
            self.cores.stop()


