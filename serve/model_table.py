"""Model table: every configured model's loaded versions, changed whole, looked up by name and version."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from serve.config import DEFAULT_VERSION, ModelSpec, ServeConfig
from serve.cores import SMALL_FORWARD_MS
from serve.errors import ConfigError, ModelNotFoundError, ServeError
from serve.formats.packaged import apply_implied
from serve.loader import load_labels, load_model
from serve.metrics import Metrics
from serve.predictor import Predictor
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
        """The X-Model-Version header: the version and the first 12 hex digits of its checkpoint's sha256."""
        return f"{self.version} {self.sha256[:12]}"


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
        self.models: dict[str, Versions] = {}  # replaced whole per model: readers never see half a change

    def load(self, names: list[str] | None = None) -> None:
        """Load and warm up every configured model (or those named), each version; any failure stops
        here, so nothing half-loaded is served.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model.
        """
        for spec in self.config.models:
            if names is None or spec.name in names:
                wanted = {v: Source(str(spec.for_version(v).checkpoint)) for v in spec.version_names}
                self.apply(spec.name, wanted, spec.default)

    # --- lookups ------------------------------------------------------------------------------------

    @property
    def default_name(self) -> str:
        return self.config.models[0].name

    @property
    def ready(self) -> bool:
        return bool(self.models)  # each one installed only once warm

    @property
    def closed(self) -> bool:
        """The scheduler has stopped: nothing will load or run any more."""
        return self.scheduler.closed

    @property
    def predictors(self) -> dict[str, Predictor]:
        """Each model's default version."""
        return {name: model.served.predictor for name, model in self.models.items()}

    def versions(self, name: str) -> Versions:
        """Raises: ModelNotFoundError: no model of that name."""
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named '{name}'; models: {sorted(self.models)}") from None

    def served(self, name: str | None = None, version: str | None = None) -> Served:
        """A model's version: the default model with no name, its default version with no version.

        Raises: ModelNotFoundError: no model of that name, or no such version of it.
        """
        model = self.versions(self.default_name if name is None else name)
        if version is None:
            return model.served
        try:
            return model.versions[version]
        except KeyError:
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}'; versions: "
                                     f"{sorted(model.versions)}") from None

    def describe(self, served: Served) -> dict[str, Any]:
        """A version's metadata, with its model's versions and default (GET /models/<name>)."""
        model = self.versions(served.name)
        return {**served.predictor.metadata(), "version": served.version, "default_version": model.default,
                "versions": [{"version": v, "sha256": s.sha256, "checkpoint": s.source.checkpoint,
                              "default": v == model.default} for v, s in model.versions.items()]}

    # --- changes ------------------------------------------------------------------------------------

    def apply(self, name: str, wanted: Mapping[str, Source], default: str) -> Versions:
        """Make these the model's versions: load and warm those new or reloaded, keep the others, then
        switch in one step, on the inference thread between batches. If any version fails, nothing
        changes.

        Raises:
            ConfigError, DeviceError, CheckpointError: naming the model and the version.
        """
        return self.scheduler.call(self._apply, name, wanted, default)

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
        """Load and warm up one version, on the inference thread."""
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
        return Served(predictor, version, source, lanes)

    def warm_runtimes(self, busy_sessions: bool = True) -> None:
        """Start every loaded version's runtime in this process (ONNX Runtime sessions are made per
        process, after gunicorn's fork), before it takes a request. busy_sessions: see
        Predictor.warm_runtime."""
        for model in list(self.models.values()):
            for served in model.versions.values():
                self.scheduler.call(served.predictor.warm_runtime, busy_sessions)

