"""glibc malloc settings: decoded photos (tens of MB each) must go back to the OS, forwards must stay fast."""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager

M_ARENA_MAX = -8
# Images above this many pixels leave enough freed memory behind to be worth a malloc_trim.
TRIM_AFTER_PIXELS = 4_000_000


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> None:
    """Cap malloc arenas: with one per request thread, freed image buffers stay spread across them.

    A fixed mmap threshold would return big buffers too, but makes every activation tensor a fresh
    mmap: resnet18 forwards then took twice as long. Trimming after big images keeps both.
    """
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, count)


def trim() -> None:
    """Give freed heap pages back to the OS now (after an evicted model's tensors are freed)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_after(pixels: int) -> None:
    """Give freed heap pages back to the OS after an image big enough to have grown the heap."""
    if _LIBC is not None and pixels > TRIM_AFTER_PIXELS:
        _LIBC.malloc_trim(0)


class PixelBudget:
    """Decoded pixels in flight in this process, at most `limit` of them (one image of up to `limit`
    pixels alone, or many smaller ones together), admitted first come, first served.

    Decoding allocates about 12 bytes a pixel at its peak (a paletted PNG with transparency goes
    through RGBA), while the upload can be a few kB: without a bound, a handful of concurrent 50 MP
    uploads on a worker's request threads would take gigabytes and get it OOM-killed.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0  # the ticket admitted next: later arrivals wait behind a big image

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: ticket == self._serving and (
                self.in_flight == 0 or self.in_flight + pixels <= self.limit))
            self._serving += 1
            self.in_flight += pixels
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= pixels
                self._changed.notify_all()
