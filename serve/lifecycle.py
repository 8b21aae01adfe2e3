"""Lifecycle: model versions loaded, made default, unloaded and reloaded in every gunicorn worker.

Each worker is its own process with its own copy of the models, so a management call that one
worker takes must reach the others. They share a control file, `<state_dir>/control.json`:

    {"generation": 3,
     "models": {"tiny": {"default": "2",
                         "versions": {"1": {"checkpoint": "/srv/models/a.pth", "sha256": "9f86…", "loaded": 0},
                                      "2": {"checkpoint": "/srv/models/b.pth", "sha256": "3b1c…", "loaded": 3}}}}}

A management call takes an exclusive lock (flock on control.lock), catches this worker up with the
file, applies the change here first (loading and warming any new version on this worker's
inference thread), and only if that worked writes the next generation (a temporary file, then an
atomic rename), with every version's sha256 as loaded here: the other workers load the same bytes
or refuse. A failure answers 409 and writes nothing, so every worker keeps what it serves.

Every worker checks the file's stat every POLL_S on a watcher thread; a new generation is applied
on its inference thread, between batches, each new version loaded and warmed before the switch. A
worker that fails to apply it (the file changed or vanished since) logs why, counts it in
serve_lifecycle_failures_total and keeps its previous versions; serve_control_generation shows
what each worker has applied, and each writes it to `<state_dir>/workers/<pid>` too: the worker
that took the call answers once every live sibling serves the new generation (SWITCH_WAIT_S at
most), saying how many do. A request runs all its images on the version it started with, so a
switch fails no request and mixes no weights. A worker (re)started later applies the file before
it serves (gunicorn's post_worker_init).

Without a state_dir (create_app called directly, not under gunicorn) the changes apply to this
process only. New versions load only from files under models_dir (default: the config file's
directory), after resolving symbolic links; never from a URL.
"""
from __future__ import annotations

import copy
import fcntl
import json
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

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
LOCK_FILE = "control.lock"
POLL_S = 0.2
WORKERS_DIR = "workers"
SWITCH_WAIT_S = 10.0  # how long a management call waits for the other workers to switch

State = dict[str, Any]  # the control file's document
Entry = dict[str, Any]  # one model's: {"default": ..., "versions": {version: source fields}}


@dataclass(frozen=True)
class Rollout:
    """How far a change got: the workers serving it (switched), those that could not (failed)."""

    generation: int
    workers: int
    switched: int
    failed: int

    def to_dict(self) -> dict:
        return {"generation": self.generation, "workers": self.workers, "switched": self.switched,
                "failed": self.failed}


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
        self.dir = Path(state_dir) if state_dir is not None else None
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self.metrics = metrics
        self.applied = 0  # the generation this worker serves
        self._signature: tuple[int, int, int] | None = None
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
        if self.dir is None or self._watcher_pid == os.getpid():
            return
        self._watcher_pid = os.getpid()
        threading.Thread(target=self._follow, name="lifecycle", daemon=True).start()

    def _follow(self) -> None:
        while not self.table.closed:
            try:
                self.sync()
            except Exception:  # the watcher must outlive any one bad read
                log.exception("lifecycle: following %s failed", self._path())
            time.sleep(POLL_S)

    def sync(self) -> None:
        """Apply the control file if it changed since it was last read and names a newer generation."""
        if self.dir is None:
            return
        with self._lock:  # a change in progress here finishes first
            signature = _signature(self._path())
            if signature is None or signature == self._signature:
                return
            self._signature = signature  # read once per change: a broken file is reported once
            try:
                state = self._read()
            except ReloadFailedError as exc:
                log.error("lifecycle: %s; still serving generation %d", exc.message, self.applied)
                return
            if state is not None and state["generation"] > self.applied:
                self._apply(state)

    def _apply(self, state: State) -> None:
        """Make this worker serve what `state` says; a model that fails keeps its versions."""
        failed = []
        for name, entry in state["models"].items():
            if name not in self.table.models:
                continue
            try:
                wanted = {v: Source(**fields) for v, fields in entry["versions"].items()}
                self.table.apply(name, wanted, entry["default"])
            except (ServeError, TypeError, KeyError) as exc:
                message = exc.message if isinstance(exc, ServeError) else f"malformed entry: {exc!r:.200}"
                log.error("lifecycle: generation %d: model '%s': %s; still serving versions %s (default %s)",
                          state["generation"], name, message, sorted(self.table.models[name].versions),
                          self.table.models[name].default)
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

    # --- what each worker reports: <state_dir>/workers/<pid> -----------------------------------------

    def _report(self, failed: list[str]) -> None:
        """Tell the worker that takes the next call which generation this one serves, and what failed."""
        if self.dir is None:
            return
        folder = self.dir / WORKERS_DIR
        folder.mkdir(exist_ok=True)
        temporary = folder / f".{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"generation": self.applied, "failed": failed}))
        os.replace(temporary, folder / str(os.getpid()))

    def _siblings(self) -> dict[int, dict]:
        """What the other live workers of this server last reported (a dead one's report is removed)."""
        found: dict[int, dict] = {}
        for path in (self.dir / WORKERS_DIR).glob("[0-9]*") if self.dir is not None else ():
            pid = int(path.name)
            if pid == os.getpid():
                continue
            if not _is_sibling(pid):
                path.unlink(missing_ok=True)
                continue
            try:
                found[pid] = json.loads(path.read_text())
            except (OSError, ValueError):
                found[pid] = {"generation": -1, "failed": []}
        return found

    def _await_workers(self, generation: int, name: str) -> Rollout:
        """Wait (SWITCH_WAIT_S at most) until every other worker has applied `generation`."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:
            others = self._siblings()
            done = {pid: r for pid, r in others.items() if r.get("generation", -1) >= generation}
            if len(done) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = sum(1 for r in done.values() if name in r.get("failed", []))
        rollout = Rollout(generation, workers=len(others) + 1, switched=len(done) + 1 - failed, failed=failed)
        if rollout.switched < rollout.workers:
            log.warning("lifecycle: generation %d: %d of %d workers serve it after %gs (%d could not apply it)",
                        generation, rollout.switched, rollout.workers, SWITCH_WAIT_S, failed)
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
        self.table.versions(name)  # ModelNotFoundError first
        with self._exclusive():
            state = self._read() if self.dir is not None else None
            if state is not None and state["generation"] > self.applied:
                self._apply(state)  # catch up: the change builds on what every worker serves
            state = state or {"generation": self.applied, "models": {}}
            generation = state["generation"] + 1
            entry = edit(copy.deepcopy(state["models"].get(name) or self.entry(name)), generation)
            wanted = {v: Source(**fields) for v, fields in entry["versions"].items()}
            try:
                model = self.table.apply(name, wanted, entry["default"])
            except ServeError as exc:
                raise ReloadFailedError(f"{failure}: {exc.message}") from None
            state["models"][name] = self.entry(name)  # each version's sha256 as loaded here: the others must match
            state["generation"] = generation
            if self.dir is not None:
                self._write(state)
            self._applied(generation)
        log.info("lifecycle: generation %d: model '%s' serves versions %s, default %s", generation, name,
                 sorted(model.versions), model.default)
        return Change(model, self._await_workers(generation, name))

    def entry(self, name: str) -> Entry:
        """What this worker serves for a model, as a control file entry."""
        model = self.table.versions(name)
        return {"default": model.default, "versions": {
            v: {"checkpoint": s.source.checkpoint, "sha256": s.predictor.loaded.sha256, "loaded": s.source.loaded}
            for v, s in model.versions.items()}}

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

    # --- the file --------------------------------------------------------------------------------

    def _path(self) -> Path:
        assert self.dir is not None
        return self.dir / CONTROL_FILE

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if self.dir is None:
                yield
                return
            with open(self.dir / LOCK_FILE, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> State | None:
        """The control file's document; None when there is none yet.

        Raises: ReloadFailedError: it doesn't parse (only this server writes it).
        """
        try:
            text = self._path().read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
            if not isinstance(state.get("generation"), int) or not isinstance(state.get("models"), dict):
                raise ValueError("needs 'generation' and 'models'")
        except (ValueError, AttributeError) as exc:
            raise ReloadFailedError(f"control file {self._path()} is unreadable ({exc}); nothing changed") from None
        return state

    def _write(self, state: State) -> None:
        """Atomically: a reader sees the old document or the new one, never half of it."""
        path = self._path()
        temporary = path.with_name(f".{CONTROL_FILE}.{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(state, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)


def _is_sibling(pid: int) -> bool:
    """Whether `pid` is alive and another worker of this gunicorn master (its parent is ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
