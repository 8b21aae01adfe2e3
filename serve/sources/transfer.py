"""One object downloaded into a partial file: resumed from the bytes already there where the server
honours a Range, retried with exponential backoff, capped in size."""
from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from serve.errors import CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 5
BACKOFF_S = 0.5  # before the 2nd attempt; doubled each time (0.5, 1, 2, 4 s); none after an attempt that made progress


class Transient(Exception):
    """A failure worth another attempt: a connection cut or refused, a timeout, a 5xx, throttling.
    restart: the bytes already downloaded can't be resumed from (start again from byte 0)."""

    def __init__(self, message: str, restart: bool = False):
        super().__init__(message)
        self.restart = restart


@dataclass
class Opened:
    """An object's body from `start` on: the server may start at 0 although a later byte was asked for."""

    start: int
    total: int | None  # the whole object's size, when the server says it
    chunks: Iterator[bytes]
    close: Callable[[], None] = lambda: None


def download(open_at: Callable[[int], Opened], part: Path, what: str, limit: int | None = None,
             attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> int:
    """Fill `part` with the whole object, starting from the bytes `part` already holds; its size.

    Raises:
        CheckpointError: the object is larger than `limit`, a permanent refusal (raised by open_at),
            or every attempt failed (naming the last failure).
    """
    last: BaseException | None = None
    progressed = False
    for attempt in range(attempts):
        if attempt:
            delay = 0.0 if progressed else backoff_s * 2 ** (attempt - 1)
            log.warning("%s: attempt %d of %d failed (%s); retrying in %.1fs", what, attempt, attempts, last, delay)
            time.sleep(delay)
        have = part.stat().st_size if part.exists() else 0
        progressed = False
        try:
            opened = open_at(have)
            try:
                if opened.start not in (0, have):
                    raise Transient(f"the server answered from byte {opened.start}, not {have}", restart=True)
                if opened.total is not None and limit is not None and opened.total > limit:
                    raise CheckpointError(f"{what} is {opened.total} bytes, more than source_cache_max_bytes ({limit})")
                written = opened.start
                with open(part, "ab" if opened.start else "wb") as f:
                    for chunk in opened.chunks:
                        f.write(chunk)
                        written += len(chunk)
                        progressed = True
                        if limit is not None and written > limit:
                            raise CheckpointError(f"{what} is more than source_cache_max_bytes ({limit}) bytes")
                        if opened.total is not None and written > opened.total:
                            raise CheckpointError(f"{what}: the server sent more than the {opened.total} bytes it announced")
                if opened.total is not None and written < opened.total:
                    raise Transient(f"the connection closed after {written} of {opened.total} bytes")
                return written
            finally:
                opened.close()
        except CheckpointError:
            part.unlink(missing_ok=True)
            raise
        except Transient as exc:
            last = exc
            if exc.restart:
                part.unlink(missing_ok=True)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut mid-chunk
            last = exc
    raise CheckpointError(f"{what}: download failed after {attempts} attempts; the last: {last}")


def retried(call: Callable[[], T], what: str, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> T:
    """call(), attempted again after a transient failure (a metadata request: HEAD, an API document).

    Raises: CheckpointError: a permanent refusal (raised by call), or every attempt failed.
    """
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            log.warning("%s: attempt %d of %d failed (%s); retrying", what, attempt, attempts, last)
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            return call()
        except (Transient, OSError, http.client.HTTPException) as exc:
            last = exc
    raise CheckpointError(f"{what}: failed after {attempts} attempts; the last: {last}")
