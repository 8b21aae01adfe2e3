"""Image bytes -> validated PIL image -> normalized tensor, as each model's PreprocessSpec (its
`preprocess:` config) describes."""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Literal

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.errors import ImageTooLargeError, InvalidImageError

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
# An exact transform resizes the whole image, then crops; past this many times the crop's area (a
# sliver about 56 times longer than wide at crop_pct 0.875: 10 MB at 224 px), it resamples only the
# cropped region, as the fast path does (within one level of the exact pixels).
EXACT_MAX_AREA = 64
# Modes with more than 8 bits a sample: Pillow's convert("RGB") clips them instead of scaling.
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class PreprocessSpec(BaseModel):
    """How an uploaded image becomes the model's input tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: int = Field(256, gt=0, description="shorter side after resizing, in pixels")
    crop: int = Field(224, gt=0, description="side of the centre crop, in pixels")
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    mode: Literal["RGB", "L"] = "RGB"
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] = "bilinear"
    # How a timm eval transform crops (timm folders set these; see serve/formats/timm_folder.py).
    crop_mode: Literal["center", "squash", "border"] = Field(
        "center", description="center: shorter side to resize, centre crop; squash: both sides to resize; "
        "border: longer side to resize, padded with the mean colour")
    crop_offset: Literal["round", "floor"] = Field(
        "round", description="where an odd margin puts the centre crop: round, torchvision's CenterCrop "
        "(half the margin, rounded); floor, Hugging Face image processors' center_crop (rounded down)")
    exact: bool = Field(
        False, description="the same pixels as torchvision's Resize + CenterCrop (timm's eval transform): "
        "no reduced-scale JPEG decoding, one resampling pass; slower on large photos")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        for field in ("mean", "std"):
            if len(getattr(self, field)) != self.channels:
                raise ValueError(f"{field} needs {self.channels} values for mode {self.mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


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
    """Return a function image -> uint8 tensor [C, crop, crop]: resize, then centre crop (crop_mode).

    Sizes and crop offsets are torchvision's (Resize truncates the longer side, CenterCrop rounds the
    offset). By default only the region that lands in the crop is resampled, with Pillow's
    reducing_gap; with `exact` (or a squash/border crop_mode) the whole image is resized in one
    pass and then cropped: the same pixels as torchvision's Resize + CenterCrop, as timm evaluates.

    It does no float math, so request threads never start torch thread pools; normalize() runs on
    whole batches in the inference thread (and on the GPU, where the model is).
    """
    resample = RESAMPLE[spec.interpolation]
    channels = spec.channels
    exact = spec.exact or spec.crop_mode != "center"
    fill = tuple(round(255 * m) for m in spec.mean) if spec.crop_mode == "border" else (0,) * channels

    def transform(image: Image.Image) -> torch.Tensor:
        size = resized_size(spec, *image.size)
        if exact and size[0] * size[1] <= EXACT_MAX_AREA * spec.crop * spec.crop:
            image = image if size == image.size else image.resize(size, resample)
            image = _crop_or_pad(image, spec.crop, fill[0] if channels == 1 else fill, spec.crop_offset)
        else:
            image = _resize_crop_region(image, size, spec.crop, resample, None if exact else 3.0, spec.crop_offset)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(spec.crop, spec.crop, channels).permute(2, 0, 1)

    return transform


def resized_size(spec: PreprocessSpec, width: int, height: int) -> tuple[int, int]:
    """The size the whole image is resized to before the crop, as torchvision / timm compute it."""
    if spec.crop_mode == "squash":
        return spec.resize, spec.resize
    if spec.crop_mode == "border":  # timm's ResizeKeepRatio(longest=1): the longer side to resize
        ratio = max(height / spec.resize, width / spec.resize)
        return round(width / ratio), round(height / ratio)
    short, long = min(width, height), max(width, height)
    new_long = int(spec.resize * long / short)  # torchvision's Resize(int) truncates
    return (spec.resize, new_long) if width <= height else (new_long, spec.resize)


def _offset(size: int, crop: int, rule: str = "round") -> int:
    if rule == "floor":
        return (size - crop) // 2  # Hugging Face's center_crop
    return int(round((size - crop) / 2.0))  # torchvision's CenterCrop


def _crop_or_pad(image: Image.Image, crop: int, fill, rule: str = "round") -> Image.Image:
    """torchvision's CenterCrop (timm's CenterCropOrPad): pad a side shorter than the crop with `fill`,
    then cut the centred crop."""
    width, height = image.size
    if width < crop or height < crop:
        padded = Image.new(image.mode, (max(width, crop), max(height, crop)), fill)
        padded.paste(image, ((crop - width) // 2 if width < crop else 0, (crop - height) // 2 if height < crop else 0))
        image, (width, height) = padded, padded.size
    if (width, height) == (crop, crop):
        return image
    left, top = _offset(width, crop, rule), _offset(height, crop, rule)
    return image.crop((left, top, left + crop, top + crop))


def _resize_crop_region(image: Image.Image, size: tuple[int, int], crop: int, resample, reducing_gap,
                        rule: str = "round") -> Image.Image:
    """Resample only the source region that lands in the crop, straight to the crop size: nearly the
    same pixels as resize-then-crop (within one level), without building a 5,120,000 x 256 image for
    a 20000 x 1 one."""
    width, height = image.size
    left, top = _offset(size[0], crop, rule), _offset(size[1], crop, rule)
    if size == image.size:
        return image.crop((left, top, left + crop, top + crop))
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), resample, box=box, reducing_gap=reducing_gap)


def draft_side(spec: PreprocessSpec) -> int | None:
    """The shorter side a JPEG may be decoded down to (open_image's min_side); None for an exact
    transform, which needs every decoded pixel."""
    return None if spec.exact or spec.crop_mode != "center" else spec.resize


def build_normalizer(spec: PreprocessSpec, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function uint8 batch [N, C, H, W] -> float batch, (pixel / 255 - mean) / std, on `device`."""
    mean = torch.tensor(spec.mean, device=device).mul(255.0).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).mul(255.0).view(1, -1, 1, 1)

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        return batch.float().sub_(mean).div_(std)

    return normalize
