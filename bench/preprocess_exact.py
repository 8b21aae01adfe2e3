"""Decode + preprocess time and pixel difference: the fast default transform against `exact: true`.

    python bench/preprocess_exact.py

`exact` gives torchvision's / timm's eval pixels (full JPEG decode, one resampling pass, then the
crop); the default decodes large JPEGs at reduced scale and resamples only the cropped region with
Pillow's reducing_gap. Printed side by side per photo size: median ms of each (decode + transform,
one thread), and how far the default's uint8 pixels are from the exact ones.
"""
from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from serve.preprocess import PreprocessSpec, build_transform, decode_image, draft_side  # noqa: E402

SIZES = [(451, 300), (640, 480), (1600, 1200), (4000, 3000)]
RUNS = 9


def photo(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize(size, Image.Resampling.BICUBIC).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def run(spec: PreprocessSpec, payload: bytes) -> tuple[float, np.ndarray]:
    transform = build_transform(spec)
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        out = transform(decode_image(payload, 10**9, "RGB", min_side=draft_side(spec)))
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), out.numpy().astype(int)


def main() -> None:
    print(f"{'photo':>16} {'default ms':>10} {'exact ms':>9} {'ratio':>6} {'mean |diff|':>11} {'max |diff|':>10}")
    for fmt in ("JPEG", "PNG"):
        for size in SIZES:
            payload = photo(size, fmt)
            fast_ms, fast = run(PreprocessSpec(interpolation="bicubic"), payload)
            exact_ms, exact = run(PreprocessSpec(interpolation="bicubic", exact=True), payload)
            diff = np.abs(fast - exact)
            print(f"{fmt + ' ' + 'x'.join(map(str, size)):>16} {fast_ms:10.1f} {exact_ms:9.1f} "
                  f"{exact_ms / fast_ms:6.1f} {diff.mean():11.2f} {diff.max():10d}")


if __name__ == "__main__":
    main()
