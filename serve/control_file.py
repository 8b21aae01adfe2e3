"""The control file in state_dir: its document (State), its flock, its atomic replace and its stat signature."""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve.errors import ReloadFailedError

CONTROL_FILE = "control.json"
LOCK_FILE = "control.lock"

State = dict[str, Any]  # the control file's document: {"generation": int, "models": {name: Entry}}
Entry = dict[str, Any]  # one model's: {"default": ..., "versions": {version: source fields}}
Signature = tuple[int, int, int]  # mtime_ns, size, inode: a replaced file has another


class ControlFile:
    """`<state_dir>/control.json`, locked by flock on `<state_dir>/control.lock`.

        {"generation": 3,
         "models": {"tiny": {"default": "2",
                             "versions": {"1": {"checkpoint": "/srv/models/a.pth", "sha256": "9f86…", "loaded": 0},
                                          "2": {"checkpoint": "/srv/models/b.pth", "sha256": "3b1c…", "loaded": 3}}}}}

    A writer holds the lock across its read, change and write; a reader needs no lock, since each
    write replaces the file whole.
    """

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.path = self.dir / CONTROL_FILE
        self._seen: Signature | None = None  # the signature changed() last answered True for

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (flock) until the block ends."""
        with open(self.dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def changed(self) -> bool:
        """Whether the file exists and was replaced since the last time this answered True (so a
        broken file is read, and reported, once per change)."""
        signature = _signature(self.path)
        if signature is None or signature == self._seen:
            return False
        self._seen = signature
        return True

    def read(self) -> State | None:
        """The control file's document; None when there is none yet.

        Raises: ReloadFailedError: it doesn't parse (only this server writes it).
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
            if not isinstance(state.get("generation"), int) or not isinstance(state.get("models"), dict):
                raise ValueError("needs 'generation' and 'models'")
        except (ValueError, AttributeError) as exc:
            raise ReloadFailedError(f"control file {self.path} is unreadable ({exc}); nothing changed") from None
        return state

    def write(self, state: State) -> None:
        """Atomically: a reader sees the old document or the new one, never half of it."""
        temporary = self.path.with_name(f".{CONTROL_FILE}.{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(state, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
