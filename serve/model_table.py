"""Model table: every configured model's loaded versions, changed whole, looked up by name and version."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from serve.admission import Deadline, retry_after_s
from serve.config import DEFAULT_VERSION, ModelSpec, ServeConfig
from serve.cores import SMALL_FORWARD_MS
from serve.errors import (
    ConfigError,
    ModelNotFoundError,
    ModelTooLargeError,
    NotReadyError,
    OverloadedError,
    ServeError,
)
from serve.formats.packaged import apply_implied
from serve.loader import load_labels, load_model
from serve.metrics import Metrics
from serve.predictor import Predictor
from serve.residency import Residency, rss_bytes, tensor_bytes
from serve.scheduler import Lanes, Scheduler, Work
from serve.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where a served version's weights come from, as the control file names them (serve/control_file.py)."""

    checkpoint: str
    sha256: str | None = None  # pinned: a file that no longer has it is refused
    loaded: int = 0  # the control generation that last (re)loaded it; 0: the config

    @property
    def key(self) -> tuple[str, int]:
        """What makes a version load again: another file, or a reload."""
        return self.checkpoint, self.loaded


@dataclass(frozen=True, eq=False)
class Served:
    """One version of a model, loaded and warm, with its own lanes: a request runs all its images on
    the Served it started with, whatever is installed meanwhile."""

    predictor: Predictor
    version: str
    source: Source
    lanes: Lanes
    bytes: int = 0  # what loading it took: its tensors, or the process's anonymous memory growth (a session's arena)

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def task(self) -> Task:
        return self.predictor.task

    @property
    def sha256(self) -> str:
        return self.predictor.loaded.sha256

    @property
    def tag(self) -> str:
        """The X-Model-Version header: the version and the first 12 hex digits of its checkpoint's sha256,
        then " int8" where the int8 model answers (an fp32 answer's header is as before)."""
        tag = f"{self.version} {self.sha256[:12]}"
        return f"{tag} int8" if self.predictor.precision == "int8" else tag


@dataclass(frozen=True)
class Versions:
    """A model's loaded versions and the one that answers when none is named."""

    versions: Mapping[str, Served]
    default: str

    @property
    def served(self) -> Served:
        return self.versions[self.default]


class ModelTable:
    """The models of one ServeConfig, each with its versions, in config order. Loads run on the
    scheduler's inference thread, the only thread doing torch work."""

    def __init__(self, config: ServeConfig, scheduler: Scheduler, metrics: Metrics | None = None):
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.models: dict[str, Versions] = {}  # loaded; replaced whole per model: readers never see half a change
        # Every model's versions as configured or as the control file last said, loaded or not (lazy).
        self.wanted: dict[str, tuple[Mapping[str, Source], str]] = {}
        self.residency = Residency(config.server.model_memory_budget)
        self.evicted: set[str] = set()
        # Lazy models that alone outgrew the budget, with the error: refused at once until their versions change.
        self.too_large: dict[str, str] = {}
        self.busy_sessions = False  # more than one worker shares the cores (gunicorn_conf, start_worker)

    def load(self, names: list[str] | None = None, include_lazy: bool = False) -> None:
        """Load and warm up every configured model (or those named), each version, except lazy ones
        unless include_lazy; any failure stops here, so nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        for spec in self.config.models:
            if names is None or spec.name in names:
                wanted = {v: Source(str(spec.for_version(v).checkpoint)) for v in spec.version_names}
                self.wanted[spec.name] = (wanted, spec.default)
                if spec.load == "eager" or include_lazy:
                    self.apply(spec.name, wanted, spec.default)

    # --- lookups ------------------------------------------------------------------------------------

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        """Every eager model loaded and warm (lazy ones load on first use)."""
        return bool(self.wanted) and all(name in self.models for name in self.wanted if not self.is_lazy(name))

    @property
    def closed(self) -> bool:
        """The scheduler has stopped: nothing will load or run any more."""
        return self.scheduler.closed

    @property
    def predictors(self) -> dict[str, Predictor]:
        """Each model's default version."""
        return {name: model.served.predictor for name, model in self.models.items()}

    def is_lazy(self, name: str) -> bool:
        return name in self.wanted and self.config.model(name).load == "lazy"

    def versions(self, name: str) -> Versions:
        """A loaded model's versions.

        Raises:
            ModelNotFoundError: no model of that name.
            NotReadyError: a lazy model not loaded now.
        """
        try:
            return self.models[name]
        except KeyError:
            if self.is_lazy(name):
                raise NotReadyError(f"model '{name}' is not loaded (load: lazy): its first prediction loads it") from None
            raise ModelNotFoundError(f"no model named '{name}'; models: {list(self.wanted) or sorted(self.models)}"
                                     ) from None

    def served(self, name: str | None = None, version: str | None = None) -> Served:
        """A loaded model's version: the default model with no name, its default version with no version.

        Raises: ModelNotFoundError: no model of that name, or no such version of it. NotReadyError: a
        lazy model not loaded now.
        """
        name = self.default_name if name is None else name
        return self._pick(name, self.versions(name), version)

    @staticmethod
    def _pick(name: str, model: Versions, version: str | None) -> Served:
        if version is None:
            return model.served
        try:
            return model.versions[version]
        except KeyError:
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}'; versions: "
                                     f"{sorted(model.versions)}") from None

    @contextmanager
    def use(self, name: str | None, version: str | None, deadline: Deadline) -> Iterator[Served]:
        """A model version for one request, loaded first if it is lazy and not loaded (requests that
        come meanwhile share the load), never evicted while the request holds it.

        Raises:
            ModelNotFoundError: no such model or version.
            OverloadedError: the load would not finish before the request's deadline (it goes on).
            ModelTooLargeError, CheckpointError, ...: the lazy model doesn't load.
        """
        name = self.default_name if name is None else name
        while True:
            with self.residency.lock:
                model = self.models.get(name)
                if model is not None:
                    served = self._pick(name, model, version)
                    self.residency.enter(name)
                    break
                if not self.is_lazy(name):
                    self.versions(name)  # ModelNotFoundError
                if name in self.too_large:
                    raise ModelTooLargeError(self.too_large[name])  # loading again would find the same size
                load = self.residency.start_load(name, lambda: self.scheduler.load_soon(self._load_lazy, name))
            try:
                load.result(timeout=max(0.0, deadline.remaining()))
            except FutureTimeout:
                raise OverloadedError(f"model '{name}' is loading (load: lazy) and won't be ready within "
                                      f"{deadline.source}; retry shortly",
                                      retry_after_s(self.residency.load_s.get(name, 1.0))) from None
        try:
            yield served
        finally:
            self.residency.leave(name)

    def loaded_versions(self, name: str) -> Versions:
        """A model's versions, loading it now if it is lazy and not loaded (management changes).

        Raises: ModelNotFoundError; ServeError: the lazy model doesn't load.
        """
        if name not in self.models and self.is_lazy(name):
            with self.residency.lock:
                load = self.residency.start_load(name, lambda: self.scheduler.load_soon(self._load_lazy, name))
            return load.result()
        return self.versions(name)

    def record(self, name: str, wanted: Mapping[str, Source], default: str) -> None:
        """The versions a lazy model not loaded now serves once it loads (the control file's)."""
        self.wanted[name] = (dict(wanted), default)
        self.too_large.pop(name, None)  # other versions may fit

    def describe(self, served: Served) -> dict[str, Any]:
        """A version's metadata, with its model's versions and default (GET /models/<name>)."""
        model = self.versions(served.name)
        spec = self.config.model(served.name) if served.name in self.wanted else served.predictor.spec
        return {**served.predictor.metadata(), "loaded": True, "load": spec.load, "pin": spec.pin,
                "bytes": sum(s.bytes for s in model.versions.values()),
                "version": served.version, "default_version": model.default,
                "versions": [{"version": v, "sha256": s.sha256, "checkpoint": s.source.checkpoint,
                              "default": v == model.default} for v, s in model.versions.items()]}

    def describe_model(self, name: str, version: str | None = None) -> dict[str, Any]:
        """GET /models/<name>: a loaded model's version, or what a lazy model not loaded now will serve.

        Raises: ModelNotFoundError: no such model or version.
        """
        if name in self.models or not self.is_lazy(name):
            return self.describe(self.served(name, version))
        spec = self.config.model(name)
        wanted, default = self.wanted[name]
        if version is not None and version not in wanted:
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}'; versions: {sorted(wanted)}")
        return {"name": name, "architecture": spec.architecture or "whole-model pickle", "device": spec.device,
                "task": {"name": spec.task}, "ready": False, "loaded": False, "load": spec.load, "pin": spec.pin,
                "state": self.state(name)[0], "bytes": 0, "version": version or default, "default_version": default,
                "versions": [{"version": v, "checkpoint": s.checkpoint, "default": v == default,
                              **({"sha256": s.sha256} if s.sha256 else {})} for v, s in wanted.items()]}

    def state(self, name: str) -> tuple[str, str]:
        """Triton's model state (READY, LOADING, UNAVAILABLE) and the reason for it."""
        if name in self.models:
            return "READY", ""
        if name in self.residency.loading:
            return "LOADING", "loading on first use (load: lazy)"
        if name in self.evicted:
            return "UNAVAILABLE", "evicted to stay within model_memory_budget; the next prediction loads it"
        return "UNAVAILABLE", "not loaded (load: lazy); the first prediction loads it"

    def index(self) -> list[dict[str, str]]:
        """Every model version and its state, in config order (Triton's repository index)."""
        rows = []
        for name, (wanted, _default) in self.wanted.items():
            state, reason = self.state(name)
            versions = self.models[name].versions if name in self.models else wanted
            rows += [{"name": name, "version": v, "state": state, "reason": reason} for v in versions]
        return rows

    # --- changes ------------------------------------------------------------------------------------

    def apply(self, name: str, wanted: Mapping[str, Source], default: str) -> Versions:
        """Make these the model's versions: load and warm those new or reloaded, keep the others, then
        switch in one step, on the inference thread between batches. If any version fails, nothing
        changes.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model and the version.
        """
        return self.scheduler.call(self._apply, name, wanted, default)

    def _load_lazy(self, name: str) -> Versions:
        """Load a lazy model on the loader thread, then evict what no longer fits the budget."""
        started = time.perf_counter()
        wanted, default = self.wanted[name]
        model = self._apply(name, wanted, default)
        seconds = time.perf_counter() - started
        self.residency.load_s[name] = seconds
        if self.metrics is not None:
            self.metrics.lazy_loads.labels(name).inc()
            self.metrics.lazy_load_seconds.labels(name).observe(seconds)
        log.info("model '%s': loaded on first use in %.2f s, %d bytes; lazy models hold %d bytes (budget %s)",
                 name, seconds, sum(s.bytes for s in model.versions.values()), self.residency.held(),
                 self.residency.budget)
        return model

    def _apply(self, name: str, wanted: Mapping[str, Source], default: str) -> Versions:
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
        self.wanted[name] = (dict(wanted), default)
        self.evicted.discard(name)
        if self.is_lazy(name):
            self._fit(name, model)
        self._count()
        return model

    def _fit(self, name: str, model: Versions) -> None:
        """Count a lazy model just loaded and evict the least recently used others past the budget.

        Raises: ModelTooLargeError: the model alone is larger than the budget (it is dropped again).
        """
        size = sum(s.bytes for s in model.versions.values())
        budget = self.residency.budget
        if budget is not None and size > budget:
            with self.residency.lock:
                dropped = [self.models.pop(name)]
            self.residency.forget(name)
            self.residency.release(dropped)
            self.too_large[name] = (f"model '{name}' holds {size} bytes loaded, more than the whole "
                                    f"model_memory_budget ({budget}); raise the budget or give it less to hold")
            raise ModelTooLargeError(self.too_large[name])
        with self.residency.lock:  # no request can take an evicted model between the choice and the drop
            evict = self.residency.admit(name, size, self.config.model(name).pin)
            dropped = [self.models.pop(other) for other in evict]
        for other in evict:
            self.evicted.add(other)
            log.info("model '%s': evicted to fit model '%s' within model_memory_budget (%d bytes)", other, name,
                     budget)
            if self.metrics is not None:
                self.metrics.evictions.labels(other).inc()
                self.metrics.model_bytes.labels(other).set(0)
        if self.metrics is not None:
            self.metrics.model_bytes.labels(name).set(size)
        self.residency.release(dropped)

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.models_loaded.set(len(self.models))

    def version_spec(self, name: str, version: str, source: Source) -> ModelSpec:
        """The spec that loads a version: the configured version's (its labels, keys, ...) when the
        source is its checkpoint, else the model's with the source's checkpoint."""
        spec = self.config.model(name)
        if version in spec.version_names and str(spec.for_version(version).checkpoint) == source.checkpoint:
            configured = spec.for_version(version)
            return configured.model_copy(update={"sha256": source.sha256 or configured.sha256})
        return spec.model_copy(update={"checkpoint": Path(source.checkpoint), "sha256": source.sha256})

    def _build(self, spec: ModelSpec, version: str, source: Source) -> Served:
        """Load and warm up one version: on the inference thread (start-up, management changes), or on
        the loader thread (a lazy model's first use)."""
        before = rss_bytes()
        loaded = load_model(spec)
        spec = apply_implied(spec, loaded.implied)  # an archive's task, labels, preprocess, where the config is silent
        settings = self.config.server
        predictor = Predictor(spec, loaded, load_labels(spec), self.scheduler.pixels, settings.onnx_cache_dir,
                              settings.torch_threads)
        predictor.warm_up()
        if self.scheduler.cores is not None and predictor.runtime is predictor.eager and predictor.single_threaded(1):
            log.info("model '%s': batch-1 forward %.2f ms on one thread: its batches under %.0f ms run "
                     "single-threaded", spec.name, predictor.forward_ms, SMALL_FORWARD_MS)
        self.scheduler.seed(spec.name, predictor.time_one())
        work = Work(spec.name, predictor.predict_batch, loaded.device.type == "cpu", predictor.single_threaded)
        lanes = self.scheduler.lanes(work, predictor.forward_many, spec.max_batch_size, spec.max_delay_ms)
        if self.metrics is not None:
            self.metrics.load_seconds.labels(spec.name).set(predictor.loaded.load_time_s)
        if spec.load == "lazy":  # in a worker, after the fork: its runtime's session counts in its size
            predictor.warm_runtime(self.busy_sessions)
        size = max(tensor_bytes(loaded.module), rss_bytes() - before)
        return Served(predictor, version, source, lanes, size)

    def warm_runtimes(self, busy_sessions: bool = True) -> None:
        """Start every loaded version's runtime in this process (ONNX Runtime sessions are made per
        process, after gunicorn's fork), before it takes a request. busy_sessions: see
        Predictor.warm_runtime; lazy models loaded later in this process start theirs the same way."""
        self.busy_sessions = busy_sessions
        for model in list(self.models.values()):
            for served in model.versions.values():
                self.scheduler.call(served.predictor.warm_runtime, busy_sessions)

