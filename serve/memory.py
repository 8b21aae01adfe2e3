"""glibc malloc settings: decoded photos (tens of MB each) must go back to the OS, forwards must stay fast."""
from __future__ import annotations

import ctypes
import ctypes.util

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


def release_after(pixels: int) -> None:
    """Give freed heap pages back to the OS after an image big enough to have grown the heap."""
    if _LIBC is not None and pixels > TRIM_AFTER_PIXELS:
        _LIBC.malloc_trim(0)
