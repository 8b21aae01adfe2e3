"""The source cache: fetched checkpoints stored by content, shared by every process on the machine.

    entries/<sha256>/<name>       a fetched file, under the sha256 of its bytes (its name keeps the suffix
                                  the formats key on)
    entries/<tree sha256>/...     a fetched model folder, under the sha256 of its files' names and digests
    refs/<sha256 of source>.json  what a source last resolved to (an S3 ETag, a Hub commit): offline mode
                                  and unpinned sources find their entry through it
    partial/<key>.part            a download in progress, resumed where it stopped
    locks/<key>.lock              one download of a source at a time (flock); cache.lock: commits, eviction

Entries appear whole (written beside, then renamed into place) and are evicted least recently used
first when max_bytes would be exceeded; entries this process resolved are never evicted by it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serve.errors import CheckpointError

log = logging.getLogger(__name__)


def key_of(text: str) -> str:
    """A file name for anything (a source string, an ETag): its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's sha256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(part: Path, expected: str | None, what: str) -> str:
    """The downloaded file's sha256, checked against the one expected (a mismatch removes the file).

    Raises: CheckpointError: the digests differ.
    """
    digest = file_sha256(part)
    if expected and digest != expected.lower():
        part.unlink(missing_ok=True)
        raise CheckpointError(f"{what}: sha256 is {digest}, the config expects {expected.lower()}; "
                              "nothing was cached")
    return digest


def pinned(entry: Path, digest: str, sha256: str | None, what: str, cached_as: str) -> Path:
    """A cached entry, if its sha256 is the one the config pins (or none is pinned).

    Raises: CheckpointError: another digest; `cached_as` says which version of the source it is.
    """
    if sha256 is not None and digest != sha256.lower():
        raise CheckpointError(f"{what}: sha256 is {digest} ({cached_as}), the config expects {sha256.lower()}")
    return entry


def tree_digest(files: dict[str, str]) -> str:
    """A folder's identity: the sha256 of its sorted (relative name, file sha256) pairs."""
    return key_of("".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())))


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class SourceCache:
    """One cache directory: lookups, partial files, locks, and committing whole entries."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.kept: set[str] = set()  # entries this process resolved: never evicted by it

    def _dir(self, name: str) -> Path:
        path = self.root / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"source cache {self.root}: cannot create {name}/: {exc.strerror or exc} "
                                  "(source_cache_dir must be writable)") from None
        return path

    # --- lookups ----------------------------------------------------------------------------------------

    def file(self, sha256: str, name: str) -> Path | None:
        """The cached file with these bytes, under `name` (linked from another name if cached as one)."""
        folder = self.root / "entries" / sha256.lower()
        if not folder.is_dir():
            return None
        target = folder / name
        if not target.is_file():
            other = next((p for p in folder.iterdir() if p.is_file()), None)
            if other is None:
                return None
            with contextlib.suppress(FileExistsError):
                os.link(other, target)  # same inode: no second copy
        return self._used(folder, target)

    def tree(self, digest: str) -> Path | None:
        folder = self.root / "entries" / digest
        return self._used(folder, folder) if folder.is_dir() else None

    def ref(self, source: str) -> dict | None:
        """What `source` last resolved to: {"entry": path under entries/, "version": ..., "sha256": ...}."""
        try:
            ref = json.loads((self.root / "refs" / f"{key_of(source)}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return ref if isinstance(ref, dict) and isinstance(ref.get("entry"), str) else None

    def current(self, ref: dict | None, version: str) -> Path | None:
        """The entry a ref names, if it is of this version of the source (an ETag, a commit) and cached."""
        if ref is None or ref.get("version") != version:
            return None
        return self.entry(ref)

    def offline(self, ref: dict | None, sha256: str | None, what: str, cached_as: str) -> Path:
        """Offline mode: the entry the source last resolved to, whatever its version now.

        Raises: CheckpointError: not cached, or not the pinned sha256.
        """
        entry = self.entry(ref) if ref is not None else None
        if entry is None:
            raise CheckpointError(f"{what}: offline, and not in the source cache {self.root}")
        return pinned(entry, ref["sha256"], sha256, what, cached_as)

    def entry(self, ref: dict) -> Path | None:
        """A ref's entry, if it is still cached."""
        relative = Path(ref["entry"])
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) < 1:
            return None
        path = self.root / "entries" / relative
        return self._used(self.root / "entries" / relative.parts[0], path) if path.exists() else None

    def _used(self, folder: Path, path: Path) -> Path:
        self.kept.add(folder.name)
        with contextlib.suppress(OSError):  # the LRU clock; a read-only (pre-filled) cache still serves
            os.utime(folder)
        return path

    # --- writing ----------------------------------------------------------------------------------------

    def partial(self, key: str) -> Path:
        return self._dir("partial") / f"{key}.part"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold `key`'s lock: a second process fetching the same source waits, then finds the entry."""
        with open(self._dir("locks") / f"{key}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def scratch(self) -> Path:
        """A new empty folder on the cache's filesystem (so a commit is a rename)."""
        return Path(tempfile.mkdtemp(dir=self._dir("tmp")))

    def check_size(self, size: int, what: str) -> None:
        """Raises: CheckpointError: an object larger than the whole cache may hold."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise CheckpointError(f"{what} is {size} bytes, more than source_cache_max_bytes ({self.max_bytes})")

    def commit_file(self, part: Path, sha256: str, name: str) -> Path:
        """Move a verified download into entries/<sha256>/<name>."""
        with self.lock("cache"):
            self._make_room(part.stat().st_size, sha256)
            folder = self._dir("entries") / sha256
            folder.mkdir(exist_ok=True)
            os.replace(part, folder / name)
        return self._used(folder, folder / name)

    def commit_tree(self, staged: Path, digest: str) -> Path:
        """Rename a verified staged folder into entries/<digest> (or drop it: another process was first)."""
        with self.lock("cache"):
            target = self._dir("entries") / digest
            if target.exists():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                self._make_room(tree_size(staged), digest)
                os.rename(staged, target)
        return self._used(target, target)

    def write_ref(self, source: str, entry: Path, version: str | None, sha256: str) -> None:
        ref = {"source": source, "entry": entry.relative_to(self.root / "entries").as_posix(),
               "version": version, "sha256": sha256}
        folder = self._dir("refs")
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(ref, f)
        os.replace(tmp, folder / f"{key_of(source)}.json")

    def _make_room(self, need: int, adding: str) -> None:
        """Evict least recently used entries until `need` more bytes fit under max_bytes."""
        if self.max_bytes is None:
            return
        entries = [p for p in (self.root / "entries").glob("*") if p.is_dir() and p.name != adding]
        sizes = {p: tree_size(p) for p in entries}
        total = sum(sizes.values())
        for folder in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total + need <= self.max_bytes:
                break
            if folder.name in self.kept:
                continue
            log.info("source cache: evicting %s (%d bytes) to stay under %d bytes", folder.name, sizes[folder],
                     self.max_bytes)
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
        if total + need > self.max_bytes:
            raise CheckpointError(f"source cache {self.root} can't hold {need} more bytes under "
                                  f"source_cache_max_bytes ({self.max_bytes}): {total} bytes are in use by "
                                  "the checkpoints this process serves")
