"""Lifecycle: model versions loaded, made default, unloaded and reloaded in every gunicorn worker.

Each worker is its own process with its own copy of the models; they share one control file
(serve/control_file.py) and each reports what it applied (serve/rollout.py). The rules:

- A management call holds the control file's lock from its read to its write, catches this worker
  up with the file, then applies the change here first (a new version loaded and warmed on this
  worker's inference thread). Only if that worked does it write the next generation, with every
  version's sha256 as loaded here: the other workers load the same bytes or refuse.
- A call that fails (409, 400, 404) writes nothing, so every worker keeps what it serves.
- Every worker follows the file on a watcher thread (a stat every POLL_S) and applies a newer
  generation on its inference thread, between batches, each new version warm before the switch. A
  model it cannot apply keeps its previous versions: logged, and counted in
  serve_lifecycle_failures_total. serve_control_generation shows what it applied.
- A request runs all its images on the version it started with: a switch fails no request and
  mixes no weights.
- A worker (re)started later applies the file before it serves (gunicorn's post_worker_init).
- The worker that took a call answers once every live sibling serves the new generation
  (SWITCH_WAIT_S at most), saying how many do.
- Without a state_dir (create_app called directly, not under gunicorn) changes apply to this
  process only.
- New versions load only from files under models_dir (default: the config file's directory), after
  resolving symbolic links; never from a URL.

For operators: docs/operations-lifecycle.md.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.config import VERSION_PATTERN
from serve.control_file import ControlFile, Entry, State
from serve.errors import (
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    ReloadFailedError,
    ServeError,
    VersionConflictError,
)
from serve.metrics import Metrics
from serve.model_table import ModelTable, Source, Versions
from serve.rollout import SWITCH_WAIT_S, Rollout, WorkerReports

log = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass(frozen=True)
class Change:
    """A management call's result: the model's versions in this worker, and the rollout across workers."""

    versions: Versions
    rollout: Rollout


class NewVersion(BaseModel):
    """The body of POST /models/<name>/versions."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN)
    checkpoint: str = Field(min_length=1, max_length=4096)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    default: bool = False


def parse_new_version(body: Any) -> NewVersion:
    """Raises: InvalidRequestError: not a JSON object of the fields NewVersion names."""
    if isinstance(body, dict) and isinstance(body.get("version"), int) and not isinstance(body["version"], bool):
        body = {**body, "version": str(body["version"])}
    try:
        return NewVersion.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in e['loc']) or '-'}': {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(f"new version: {problems} (send JSON: {{\"version\": \"2\", \"checkpoint\": "
                                  "\"b.pth\", \"sha256\": optional, \"default\": optional}})") from None


def check_state_dir(state_dir: Path | None) -> None:
    """Raises: ConfigError: state_dir is set but not a writable directory (the management API writes there)."""
    if state_dir is not None and not (Path(state_dir).is_dir() and os.access(state_dir, os.W_OK | os.X_OK)):
        raise ConfigError(f"server: field 'state_dir': {state_dir} is not a writable directory")


class Lifecycle:
    """This worker's side of the control file: management calls, and following the other workers'."""

    def __init__(self, table: ModelTable, state_dir: Path | None, models_dir: Path | None,
                 metrics: Metrics | None = None):
        self.table = table
        self.control = ControlFile(Path(state_dir)) if state_dir is not None else None
        self.reports = WorkerReports(Path(state_dir)) if state_dir is not None else None
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self.metrics = metrics
        self.applied = 0  # the generation this worker serves
        self._lock = threading.Lock()  # one change at a time in this process; flock across processes
        self._watcher_pid: int | None = None

    # --- following the file ------------------------------------------------------------------------

    def start(self) -> None:
        """Apply the control file now, report, then follow it on a watcher thread (once per process)."""
        self.sync()
        self._report([])
        self.watch()

    def watch(self) -> None:
        """Start this process's watcher thread, unless it runs already (threads don't survive fork)."""
        if self.control is None or self._watcher_pid == os.getpid():
            return
        self._watcher_pid = os.getpid()
        threading.Thread(target=self._follow, name="lifecycle", daemon=True).start()

    def _follow(self) -> None:
        assert self.control is not None
        while not self._closed():
            try:
                self.sync()
            except Exception:  # the watcher must outlive any one bad read
                log.exception("lifecycle: following %s failed", self.control.path)
            time.sleep(POLL_S)

    def sync(self) -> None:
        """Apply the control file if it changed since it was last read and names a newer generation."""
        if self.control is None:
            return
        with self._lock:  # a change in progress here finishes first
            if not self.control.changed():  # read once per change: a broken file is reported once
                return
            try:
                state = self.control.read()
            except ReloadFailedError as exc:
                log.error("lifecycle: %s; still serving generation %d", exc.message, self.applied)
                return
            if state is not None and state["generation"] > self.applied:
                self._apply(state)

    def _apply(self, state: State) -> None:
        """Make this worker serve what `state` says; a model that fails keeps its versions."""
        failed = []
        for name, entry in state["models"].items():
            if self._serving(name) is None:
                self._remember(name, entry)  # a lazy model not loaded here serves this once it loads
                continue
            try:
                self._install(name, entry)
            except (ServeError, TypeError, KeyError) as exc:
                message = exc.message if isinstance(exc, ServeError) else f"malformed entry: {exc!r:.200}"
                serving = self._serving(name)
                log.error("lifecycle: generation %d: model '%s': %s; still serving versions %s (default %s)",
                          state["generation"], name, message, sorted(serving.versions), serving.default)
                if self.metrics is not None:
                    self.metrics.lifecycle_failures.labels(name).inc()
                failed.append(name)
        self._applied(state["generation"], failed)
        log.info("lifecycle: generation %d applied", state["generation"])

    def _applied(self, generation: int, failed: list[str] | None = None) -> None:
        self.applied = generation
        if self.metrics is not None:
            self.metrics.control_generation.set(generation)
        self._report(failed or [])

    # --- what each worker reports (serve/rollout.py) -------------------------------------------------

    def _report(self, failed: list[str]) -> None:
        if self.reports is not None:
            self.reports.write(self.applied, failed)

    def _await_workers(self, generation: int, name: str) -> Rollout:
        """Wait (SWITCH_WAIT_S at most) until every other worker has applied `generation`."""
        if self.reports is None:
            return Rollout.alone(generation)
        rollout = self.reports.await_generation(generation, name)
        if rollout.switched < rollout.workers:
            log.warning("lifecycle: generation %d: %d of %d workers serve it after %gs (%d could not apply it)",
                        generation, rollout.switched, rollout.workers, SWITCH_WAIT_S, rollout.failed)
        return rollout

    # --- management calls ----------------------------------------------------------------------------

    def load(self, name: str, new: NewVersion) -> Change:
        """Load a new version of a model in every worker (and make it the default if asked).

        Raises:
            ModelNotFoundError, InvalidRequestError (a path outside models_dir), VersionConflictError
            (the version exists), ReloadFailedError (it doesn't load: nothing changed).
        """
        checkpoint = self.checkpoint_path(new.checkpoint)

        def edit(entry: Entry, generation: int) -> Entry:
            if new.version in entry["versions"]:
                raise VersionConflictError(f"model '{name}' already has version '{new.version}'; unload it first, "
                                           "or reload it")
            entry["versions"][new.version] = {"checkpoint": str(checkpoint), "sha256": new.sha256, "loaded": generation}
            if new.default:
                entry["default"] = new.version
            return entry

        return self._change(name, edit, f"loading version '{new.version}' failed")

    def set_default(self, name: str, version: str) -> Change:
        """Raises: ModelNotFoundError: no such model or version."""
        def edit(entry: Entry, generation: int) -> Entry:
            self._known(name, entry, version)
            entry["default"] = version
            return entry

        return self._change(name, edit, "setting the default failed")

    def unload(self, name: str, version: str) -> Change:
        """Raises: ModelNotFoundError: no such model or version. VersionConflictError: it is the default."""
        def edit(entry: Entry, generation: int) -> Entry:
            self._known(name, entry, version)
            if entry["default"] == version:
                raise VersionConflictError(f"version '{version}' is the default of model '{name}'; set another default first")
            del entry["versions"][version]
            return entry

        return self._change(name, edit, "unloading failed")

    def reload(self, name: str, version: str | None = None) -> Change:
        """Re-read a version's checkpoint (the default's when none is named) in every worker.

        Raises: ModelNotFoundError; ReloadFailedError: the file doesn't load now, the previous weights keep serving.
        """
        def edit(entry: Entry, generation: int) -> Entry:
            chosen = version or entry["default"]
            self._known(name, entry, chosen)
            entry["versions"][chosen].update(sha256=None, loaded=generation)  # whatever the file holds now
            return entry

        return self._change(name, edit, "reload failed, still serving the previous weights")

    def _change(self, name: str, edit: Callable[[Entry, int], Entry], failure: str) -> Change:
        self._versions(name)  # ModelNotFoundError first
        with self._exclusive():
            state = self.control.read() if self.control is not None else None
            if state is not None and state["generation"] > self.applied:
                self._apply(state)  # catch up: the change builds on what every worker serves
            state = state or {"generation": self.applied, "models": {}}
            generation = state["generation"] + 1
            entry = edit(copy.deepcopy(state["models"].get(name) or self.entry(name)), generation)
            try:
                model = self._install(name, entry)
            except ServeError as exc:
                raise ReloadFailedError(f"{failure}: {exc.message}") from None
            state["models"][name] = self.entry(name)  # each version's sha256 as loaded here: the others must match
            state["generation"] = generation
            if self.control is not None:
                self.control.write(state)
            self._applied(generation)
        log.info("lifecycle: generation %d: model '%s' serves versions %s, default %s", generation, name,
                 sorted(model.versions), model.default)
        return Change(model, self._await_workers(generation, name))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One change at a time: in this process (a thread lock), and across workers (the file's flock)."""
        with self._lock:
            if self.control is None:
                yield
                return
            with self.control.locked():
                yield

    @staticmethod
    def _known(name: str, entry: Entry, version: str) -> None:
        if version not in entry["versions"]:
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}'; versions: "
                                     f"{sorted(entry['versions'])}")

    def checkpoint_path(self, given: str) -> Path:
        """A new version's file: under models_dir once symbolic links are resolved; never a URL.

        Raises: InvalidRequestError: a URL, no models_dir, or a path outside it.
        """
        if "://" in given:
            raise InvalidRequestError("checkpoint must be a path on the server (under models_dir), not a URL")
        if self.models_dir is None:
            raise InvalidRequestError("new versions load only from files under models_dir (SERVE_MODELS_DIR); none is set")
        path = Path(given).expanduser()
        resolved = (path if path.is_absolute() else self.models_dir / path).resolve()
        if not resolved.is_relative_to(self.models_dir):
            raise InvalidRequestError(f"checkpoint '{given[:200]}' is outside models_dir ({self.models_dir})")
        return resolved

    # --- the model table: every call into it is one of these -----------------------------------------

    def _closed(self) -> bool:
        """Whether the model table has shut down (the watcher stops)."""
        return self.table.closed

    def _serving(self, name: str) -> Versions | None:
        """What this worker serves for a model now; None for a model it doesn't serve."""
        return self.table.models.get(name)

    def _versions(self, name: str) -> Versions:
        """A model's versions, a lazy one loaded first. Raises: ModelNotFoundError: no such model."""
        return self.table.loaded_versions(name)

    def entry(self, name: str) -> Entry:
        """What this worker serves for a model, as a control file entry."""
        model = self._versions(name)
        return {"default": model.default, "versions": {
            v: {"checkpoint": s.source.checkpoint, "sha256": s.sha256, "loaded": s.source.loaded}
            for v, s in model.versions.items()}}

    def _remember(self, name: str, entry: Entry) -> None:
        """A lazy model not loaded here: what it serves once it loads. Others (not served here): nothing."""
        if self.table.is_lazy(name):
            try:
                self.table.record(name, {v: Source(**fields) for v, fields in entry["versions"].items()},
                                  entry["default"])
            except (TypeError, KeyError) as exc:
                log.error("lifecycle: model '%s': malformed entry: %r", name, exc)

    def _install(self, name: str, entry: Entry) -> Versions:
        """Make a control file entry what this worker serves, loading and warming on its inference thread.

        Raises: ServeError (nothing changed); TypeError, KeyError: a malformed entry.
        """
        wanted = {v: Source(**fields) for v, fields in entry["versions"].items()}
        return self.table.apply(name, wanted, entry["default"])
