"""Image bytes -> validated PIL image -> normalized tensor, as each model's config describes."""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serve.config import PreprocessSpec
from serve.errors import ImageTooLargeError, InvalidImageError

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Modes with more than 8 bits a sample: Pillow's convert("RGB") clips them instead of scaling.
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(data: bytes, max_pixels: int, mode: str = "RGB", min_side: int | None = None) -> Image.Image:
    """Decode bytes into an upright image in `mode`, refusing bombs before any pixel is decoded.

    With min_side set, a JPEG is decoded at the smallest DCT scale whose shorter side still reaches it.

    Raises:
        InvalidImageError: empty, unrecognised, truncated or corrupt data.
        ImageTooLargeError: more pixels than max_pixels.
    """
    return load_image(open_image(data, max_pixels, mode, min_side), mode)


def open_image(data: bytes, max_pixels: int, mode: str = "RGB", min_side: int | None = None,
               max_side: int | None = None) -> Image.Image:
    """decode_image's first half: read the header, check the size, set a JPEG's draft scale. No pixel
    is decoded yet; `.size` is what load_image will decode (a JPEG's reduced size).

    min_side / max_side: see draft().

    Raises: as decode_image.
    """
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    with _decode_errors():
        # Image.open reads the header only; our own limit is checked before any pixel is decoded.
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if width < 1 or height < 1:
            raise InvalidImageError(f"image has no pixels ({width}x{height})")
        return draft(image, mode, min_side, max_side)


def draft(image: Image.Image, mode: str = "RGB", min_side: int | None = None, max_side: int | None = None) -> Image.Image:
    """Have a JPEG decoded at the smallest DCT scale whose shorter side still reaches min_side, or
    (with max_side instead) whose longer side still reaches max_side; other formats are left as they are."""
    if (min_side or max_side) and image.format == "JPEG":
        width, height = image.size
        scale = min_side / min(width, height) if min_side else max_side / max(width, height)
        image.draft(mode if mode == "L" else "RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) an opened image shows once its EXIF orientation is applied; call it before
    draft() to get the size the user uploaded."""
    width, height = image.size
    with _decode_errors():
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """decode_image's second half: decode the pixels of an open_image, turn it upright, convert it.

    Raises: as decode_image.
    """
    with _decode_errors():
        image.load()
        image = ImageOps.exif_transpose(image)
        return _convert(image, mode)


@contextmanager
def _decode_errors():
    """Pillow's ways of saying the data is bad, as this server's errors."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError("the data is not an image in a format this server reads (JPEG, PNG, GIF, WebP, TIFF, BMP, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(f"the image is truncated or corrupt: {exc}") from None


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in WIDE_MODES:
        # Scale the sample range into 8 bits rather than clipping everything above 255 to white.
        image = image if image.mode == "F" else image.convert("I")
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.point(lambda v: v * scale - lo * scale + 0.5).convert("L")
    if image.mode in ("P", "PA", "LA", "RGBA") and mode == "RGB":
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == mode else image.convert(mode)


def build_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Return a function image -> uint8 tensor [C, crop, crop]: resize the shorter side, centre crop.

    It does no float math, so request threads never start torch thread pools; normalize() runs on
    whole batches in the inference thread (and on the GPU, where the model is).
    """
    resample = RESAMPLE[spec.interpolation]
    channels = spec.channels

    def transform(image: Image.Image) -> torch.Tensor:
        width, height = image.size
        scale = spec.resize / min(width, height)
        size = (max(spec.crop, round(width * scale)), max(spec.crop, round(height * scale)))
        left, top = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
        if size == image.size:
            image = image.crop((left, top, left + spec.crop, top + spec.crop))
        else:
            # Resample only the source region that lands in the crop, straight to the crop size: the
            # same pixels as resize-then-crop, without building a 5,120,000 x 256 image for a 20000 x 1 one.
            sx, sy = width / size[0], height / size[1]
            box = (left * sx, top * sy, (left + spec.crop) * sx, (top + spec.crop) * sy)
            image = image.resize((spec.crop, spec.crop), resample, box=box, reducing_gap=3.0)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(spec.crop, spec.crop, channels).permute(2, 0, 1)

    return transform


def build_normalizer(spec: PreprocessSpec, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function uint8 batch [N, C, H, W] -> float batch, (pixel / 255 - mean) / std, on `device`."""
    mean = torch.tensor(spec.mean, device=device).mul(255.0).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).mul(255.0).view(1, -1, 1, 1)

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        return batch.float().sub_(mean).div_(std)

    return normalize
