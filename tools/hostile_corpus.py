"""A deterministic corpus of awkward and hostile requests for POST /predictions/<model>.

Every payload is made at run time: images with Pillow and numpy (a seeded RNG), malformed files
hand-assembled with struct/zlib, and two photographs that ship inside scikit-image (a dev
requirement) where a real, recognisable picture is needed. Nothing binary is committed.

Each Case says how to send it (a raw body with a Content-Type, multipart files, or a JSON body)
and what the server must answer: 200 with predictions for a valid-but-odd image (any format Pillow
reads), or a specific 4xx status and error code:

    400 invalid_image           the data is not a decodable image (empty file, truncated, corrupt, not an image)
    400 invalid_request         nothing to decode (empty body, multipart without a file), bad topk
    413 image_too_large         too many pixels, refused from the header before decoding
    413 too_many_images         more than max_images_per_request (32) files
    413 request_entity_too_large  a body over max_upload_bytes (20 MiB)
    415 unsupported_media_type  a body type that can't be an image (JSON, text, PDF)

Usage:
    python tools/hostile_corpus.py OUTDIR      # writes blobs/ and manifest.json into OUTDIR

    from hostile_corpus import build_corpus    # (tools/ on sys.path) in-memory list[Case]
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SEED = 20261128
MIB = 2**20
# Server defaults the expectations are written against (serve/config.py, README "Server settings").
MAX_UPLOAD_BYTES = 20 * MIB
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGES_PER_REQUEST = 32


@dataclass(frozen=True)
class Part:
    """One multipart part; filename None makes it a plain form field rather than a file."""

    field: str
    filename: str | None
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    # How to send it: exactly one of body (raw, with content_type), parts (multipart), json_body.
    body: bytes | None = None
    content_type: str | None = None
    parts: tuple[Part, ...] = ()
    json_body: Any = None
    chunked: bool = False  # raw body sent with Transfer-Encoding: chunked (no Content-Length)
    query: str = ""  # e.g. "topk=3", appended to the URL
    # What the server must answer.
    status: int = 200
    code: str | None = None  # the error code for a 4xx; None for 200
    results: int | None = None  # a 200 for several files answers a list of this many predictions
    same_top1_as: str | None = None  # another case whose top-1 label this one must equal
    different_top1_from: str | None = None  # another case whose top-1 label this one must NOT equal
    max_seconds: float | None = None  # the answer must come within this (else the 30 s client timeout)
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kind(self) -> str:
        if self.parts:
            return "multipart"
        if self.json_body is not None:
            return "json"
        return "raw"

    def url(self, base: str, model: str) -> str:
        return f"{base}/predictions/{model}" + (f"?{self.query}" if self.query else "")

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for requests.post(url, **kwargs)."""
        if self.kind == "multipart":
            # A (None, data) tuple is a plain form field (no filename); requests then still sends multipart.
            return {"files": [
                (p.field, (p.filename, p.data, p.content_type) if p.content_type else (p.filename, p.data))
                for p in self.parts
            ]}
        if self.kind == "json":
            return {"json": self.json_body}
        body = self.body or b""
        data: Any = _chunks(body) if self.chunked else body
        headers = {"Content-Type": self.content_type} if self.content_type is not None else {}
        return {"data": data, "headers": headers}

    def payload_size(self) -> int:
        if self.parts:
            return sum(len(p.data) for p in self.parts)
        if self.json_body is not None:
            return len(json.dumps(self.json_body))
        return len(self.body or b"")


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


# --------------------------------------------------------------------------- building blocks

def _rng(salt: int) -> np.random.Generator:
    return np.random.default_rng([SEED, salt])


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    return _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def _png_zeros(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of width x height black pixels, compressed row by row (never held in memory)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = bytearray()
    rows_per_step = max(1, (4 * MIB) // len(row))
    for start in range(0, height, rows_per_step):
        idat += comp.compress(row * min(rows_per_step, height - start))
    idat += comp.flush()
    return PNG_SIGNATURE + _png_ihdr(width, height, 1, 0) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """A real photograph bundled with scikit-image, as RGB."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


@functools.lru_cache(maxsize=None)
def _texture(width: int = 320, height: int = 240, salt: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image: a low-resolution random field upscaled, plus a little grain."""
    rng = _rng(salt)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _jpeg(width: int = 320, height: int = 240, quality: int = 90) -> bytes:
    return _save(_texture(width, height), "JPEG", quality=quality)


@functools.lru_cache(maxsize=None)
def _png(width: int = 64, height: int = 48) -> bytes:
    return _save(_texture(width, height, salt=1), "PNG")


def _multipart_body(boundary: str, parts: list[tuple[str, str, bytes]], close: bool = True) -> bytes:
    out = bytearray()
    for field_name, filename, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        out += data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


# --------------------------------------------------------------------------- the cases

BUILDERS: list[Callable[[], Case]] = []


def case(fn: Callable[[], Case]) -> Callable[[], Case]:
    BUILDERS.append(fn)
    return fn


def raw(name, description, body, content_type="application/octet-stream", status=200, code=None, **kw) -> Case:
    return Case(name=name, description=description, body=body, content_type=content_type, status=status, code=code, **kw)


def upload(name, description, parts, status=200, code=None, **kw) -> Case:
    return Case(name=name, description=description, parts=tuple(parts), status=status, code=code, **kw)


# ---- pixel bombs and lying dimensions: refused from the header (413) or as corrupt (400)

@case
def png_bomb_1bit_20000x20000() -> Case:
    return raw("png_bomb_1bit_20000x20000", "decompression bomb: ~50 KB 1-bit PNG, 400 Mpx (beyond Pillow's own bomb limit)",
               _png_zeros(20_000, 20_000), "image/png", 413, "image_too_large", tags=("bomb",))


@case
def png_1bit_8000x8000_over_limit() -> Case:
    return raw("png_1bit_8000x8000_over_limit", "64 Mpx 1-bit PNG: under Pillow's bomb limit, over the server's 50 Mpx",
               _png_zeros(8_000, 8_000), "image/png", 413, "image_too_large", tags=("bomb",))


@case
def png_1bit_7000x7000_under_limit() -> Case:
    return raw("png_1bit_7000x7000_under_limit", "49 Mpx 1-bit PNG, just under the server's pixel limit: must be decoded",
               _png_zeros(7_000, 7_000), "image/png", tags=("bomb", "valid"))


@case
def png_ihdr_65535x65535_no_data() -> Case:
    body = PNG_SIGNATURE + _png_ihdr(65_535, 65_535) + _png_chunk(b"IEND", b"")
    return raw("png_ihdr_65535x65535_no_data", "hand-made IHDR (valid CRC) declaring 65535x65535 RGB, no IDAT at all",
               body, "image/png", 413, "image_too_large", tags=("bomb",))


@case
def jpeg_sof_65535x65535_no_data() -> Case:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 65_535, 65_535, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + bytes([1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0])
    return raw("jpeg_sof_65535x65535_no_data", "JPEG whose SOF0 declares 65535x65535, followed by SOS and EOI, no scan data",
               b"\xff\xd8" + sof + sos + b"\xff\xd9", "image/jpeg", 413, "image_too_large", tags=("bomb",))


@case
def gif_logical_screen_65535x65535() -> Case:
    body = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    body[6:10] = struct.pack("<HH", 65_535, 65_535)
    return raw("gif_logical_screen_65535x65535", "GIF with a 1x1 frame on a 65535x65535 logical screen",
               bytes(body), "image/gif", 413, "image_too_large", tags=("bomb",))


@case
def tiff_declares_100000x100000() -> Case:
    entries = [(256, 4, 1, 100_000), (257, 4, 1, 100_000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, 1, 100_000)]
    return raw("tiff_declares_100000x100000", "tiny TIFF whose IFD declares a 10-gigapixel greyscale image",
               _tiff(entries), "image/tiff", 413, "image_too_large", tags=("bomb",))


def _tiff(entries: list[tuple[int, int, int, int]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF: header, one IFD of (tag, type, count, value) entries, then `tail`."""
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in sorted(entries):
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + tail


@case
def tiff_huge_declared_strip() -> Case:
    # 2000x2000 greyscale (4 Mpx, allowed) in one strip that claims 4 GB at an offset far past the end of the file.
    entries = [(256, 4, 1, 2_000), (257, 4, 1, 2_000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 0x7FFF_0000), (277, 3, 1, 1), (278, 4, 1, 2_000), (279, 4, 1, 0xFFFF_FFF0)]
    return raw("tiff_huge_declared_strip", "TIFF whose only strip claims 4 GB at an offset beyond the end of the file",
               _tiff(entries, b"\x80" * 256), "image/tiff", 400, "invalid_image", tags=("corrupt",))


@case
def bmp_lying_header() -> Case:
    width = height = 4_000
    pixels = _rng(2).integers(0, 256, 64, dtype=np.uint8).tobytes()
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, width * height * 3, 2835, 2835, 0, 0)
    file_header = b"BM" + struct.pack("<IHHI", 14 + len(info) + width * height * 3, 0, 0, 14 + len(info))
    return raw("bmp_lying_header", "BMP header claims 4000x4000x24 bit (48 MB of pixels); 64 bytes follow",
               file_header + info + pixels, "image/bmp", 400, "invalid_image", tags=("corrupt",))


# ---- broken or non-image data: 400 invalid_image

@case
def jpeg_truncated() -> Case:
    data = _jpeg()
    return raw("jpeg_truncated", "the first half of a valid 320x240 JPEG", data[: len(data) // 2], "image/jpeg",
               400, "invalid_image", tags=("corrupt",))


@case
def jpeg_soi_only() -> Case:
    return raw("jpeg_soi_only", "a body that is only a JPEG start-of-image marker FF D8", b"\xff\xd8", "image/jpeg",
               400, "invalid_image", tags=("corrupt",))


@case
def jpeg_soi_and_marker_prefix() -> Case:
    return raw("jpeg_soi_and_marker_prefix", "FF D8 FF: enough for Pillow to guess JPEG, then nothing", b"\xff\xd8\xff",
               "image/jpeg", 400, "invalid_image", tags=("corrupt",))


@case
def jpeg_headers_only() -> Case:
    data = _jpeg()
    sos = data.index(b"\xff\xda")
    return raw("jpeg_headers_only", "a JPEG cut right after its headers (every marker up to SOS, no scan data)",
               data[: sos + 14], "image/jpeg", 400, "invalid_image", tags=("corrupt",))


@case
def png_signature_only() -> Case:
    return raw("png_signature_only", "the 8-byte PNG signature and nothing else", PNG_SIGNATURE, "image/png",
               400, "invalid_image", tags=("corrupt",))


@case
def png_corrupt_ihdr_crc() -> Case:
    data = bytearray(_png())
    data[29] ^= 0xFF  # IHDR's CRC: 8 signature + 4 length + 4 type + 13 data = offset 29
    return raw("png_corrupt_ihdr_crc", "a valid 64x48 PNG with one byte of the IHDR CRC flipped", bytes(data), "image/png",
               400, "invalid_image", tags=("corrupt",))


@case
def png_idat_not_zlib() -> Case:
    noise = _rng(3).integers(0, 256, 2_000, dtype=np.uint8).tobytes()
    body = PNG_SIGNATURE + _png_ihdr(64, 48) + _png_chunk(b"IDAT", b"\x00\x00" + noise) + _png_chunk(b"IEND", b"")
    return raw("png_idat_not_zlib", "well-formed PNG chunks (valid CRCs) whose IDAT is random bytes, not zlib", body,
               "image/png", 400, "invalid_image", tags=("corrupt",))


@case
def png_ztxt_text_bomb() -> Case:
    # A valid 64x48 PNG with a zTXt chunk (before IDAT) that inflates 60 KB into 64 MB of text.
    png = _png()
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 64 * MIB, 9))
    body = png[:33] + text + png[33:]
    return raw("png_ztxt_text_bomb", "valid small PNG carrying a zTXt metadata chunk that inflates to 64 MB (text bomb)",
               body, "image/png", 400, "invalid_image", tags=("bomb", "corrupt"))


@case
def gif_zero_size() -> Case:
    body = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    body[6:10] = b"\0\0\0\0"  # logical screen 0x0
    desc = body.index(b"\x2c\x00\x00\x00\x00")
    body[desc + 5: desc + 9] = b"\0\0\0\0"  # image descriptor 0x0
    return raw("gif_zero_size", "GIF whose logical screen and only frame are 0x0", bytes(body), "image/gif",
               400, "invalid_image", tags=("corrupt",))


@case
def gif_no_frames() -> Case:
    body = _save(Image.new("P", (16, 16)), "GIF")
    desc = body.index(b"\x2c\x00\x00\x00\x00")
    return raw("gif_no_frames", "GIF header and colour table, then the trailer: no image at all", body[:desc] + b"\x3b",
               "image/gif", 400, "invalid_image", tags=("corrupt",))


@case
def random_bytes() -> Case:
    return raw("random_bytes", "64 KB of seeded random bytes", _rng(4).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes(),
               "application/octet-stream", 400, "invalid_image", tags=("garbage",))


@case
def text_as_raw_jpeg() -> Case:
    return raw("text_as_raw_jpeg", "plain text sent as image/jpeg", b"this is not a photo, just some words\n" * 20,
               "image/jpeg", 400, "invalid_image", tags=("garbage",))


@case
def text_named_jpg() -> Case:
    return upload("text_named_jpg", "multipart file photo.jpg holding plain text",
                  [Part("image", "photo.jpg", b"hello, I am a text file pretending to be a JPEG\n" * 10, "image/jpeg")],
                  400, "invalid_image", tags=("garbage",))


@case
def html_named_jpg() -> Case:
    html = b"<!DOCTYPE html><html><head><title>x</title></head><body><img src=x onerror=alert(1)></body></html>\n"
    return upload("html_named_jpg", "multipart file cat.jpg holding an HTML page with a script",
                  [Part("image", "cat.jpg", html, "image/jpeg")], 400, "invalid_image", tags=("garbage",))


@case
def svg_image() -> Case:
    svg = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
           b'<circle cx="50" cy="50" r="40" fill="red"/></svg>')
    return raw("svg_image", "an SVG (vector; not a raster format Pillow reads) as image/svg+xml", svg, "image/svg+xml",
               400, "invalid_image", tags=("garbage",))


def _pdf() -> bytes:
    fixed = time.gmtime(1_795_000_000)  # a fixed date keeps the bytes the same on every run
    return _save(_texture(64, 64), "PDF", creationDate=fixed, modDate=fixed, title="scan")


@case
def pdf_named_jpg() -> Case:
    return upload("pdf_named_jpg", "a one-page PDF (made by Pillow, which can't read PDFs) uploaded as scan.jpg",
                  [Part("image", "scan.jpg", _pdf(), "image/jpeg")], 400, "invalid_image", tags=("garbage",))


@case
def pdf_raw_application_pdf() -> Case:
    return raw("pdf_raw_application_pdf", "a PDF as the raw body with Content-Type application/pdf", _pdf(),
               "application/pdf", 415, "unsupported_media_type", tags=("media-type",))


# ---- valid but odd images: 200 with predictions

@case
def jpeg_with_8mib_trailing_garbage() -> Case:
    garbage = _rng(5).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    return raw("jpeg_with_8mib_trailing_garbage", "a valid JPEG followed by 8 MiB of random bytes after EOI",
               _jpeg() + garbage, "image/jpeg", tags=("valid",))


@case
def jpeg_24mp_photo_like() -> Case:
    data = _save(_texture(6_000, 4_000, salt=6), "JPEG", quality=85)
    assert len(data) < MAX_UPLOAD_BYTES - MIB, len(data)
    return raw("jpeg_24mp_photo_like", f"a legitimate 6000x4000 (24 Mpx) photo-like JPEG, {len(data) // 1024} KB",
               data, "image/jpeg", tags=("valid", "large"))


@case
def jpeg_cmyk() -> Case:
    return raw("jpeg_cmyk", "a CMYK JPEG", _save(_texture().convert("CMYK"), "JPEG", quality=90), "image/jpeg", tags=("valid",))


@case
def jpeg_grayscale_progressive() -> Case:
    return raw("jpeg_grayscale_progressive", "a progressive greyscale JPEG",
               _save(_texture().convert("L"), "JPEG", quality=80, progressive=True), "image/jpeg", tags=("valid",))


@case
def png_16bit_grayscale() -> Case:
    ramp = np.linspace(0, 65_535, 128 * 96, dtype=np.float64).reshape(96, 128).astype(np.uint16)
    return raw("png_16bit_grayscale", "a 16-bit greyscale PNG (mode I;16), full 0..65535 ramp",
               _save(Image.fromarray(ramp), "PNG"), "image/png", tags=("valid",))


@case
def png_palette_with_transparency() -> Case:
    image = _texture(96, 64).quantize(16)
    return raw("png_palette_with_transparency", "a 16-colour palette PNG whose colour 0 is transparent (tRNS)",
               _save(image, "PNG", transparency=0), "image/png", tags=("valid",))


@case
def png_rgba() -> Case:
    image = _texture(96, 64).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((96, 64)))
    return raw("png_rgba", "an RGBA PNG with a gradient alpha channel", _save(image, "PNG"), "image/png", tags=("valid",))


@case
def png_la() -> Case:
    image = _texture(96, 64).convert("LA")
    return raw("png_la", "a greyscale+alpha (LA) PNG", _save(image, "PNG"), "image/png", tags=("valid",))


@case
def png_1bit() -> Case:
    return raw("png_1bit", "a 1-bit black and white dithered PNG", _save(_texture(96, 64).convert("1"), "PNG"),
               "image/png", tags=("valid",))


@case
def png_1x1() -> Case:
    return raw("png_1x1", "a single-pixel PNG", _save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "image/png",
               tags=("valid",))


@case
def png_10000x10() -> Case:
    return raw("png_10000x10", "an extreme 1000:1 aspect ratio, 10000x10 RGB PNG", _save(_texture(10_000, 10, salt=7), "PNG"),
               "image/png", tags=("valid",))


@case
def png_10x10000() -> Case:
    return raw("png_10x10000", "an extreme 1:1000 aspect ratio, 10x10000 RGB PNG", _save(_texture(10, 10_000, salt=8), "PNG"),
               "image/png", tags=("valid",))


@case
def png_20000x1_sliver() -> Case:
    # 20000 pixels, ~140 bytes. Scaling the shorter side (1 px) to 256 before cropping makes a
    # 5,120,000x256 intermediate (1.3 Gpx, ~5 GB); a correct server answers in well under a second.
    return raw("png_20000x1_sliver", "a 20000x1 PNG (~140 bytes, 20 kpx): must not be blown up before the crop",
               _save(Image.new("RGB", (20_000, 1), (40, 160, 90)), "PNG"), "image/png", max_seconds=5.0,
               tags=("valid", "amplification"))


@case
def gif_animated() -> Case:
    frames = [_texture(80, 60, salt=10 + i).quantize(64) for i in range(4)]
    body = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return raw("gif_animated", "a 4-frame animated GIF (the first frame is used)", body, "image/gif", tags=("valid",))


@case
def tiff_multiframe() -> Case:
    frames = [_texture(80, 60, salt=20 + i) for i in range(3)]
    body = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return raw("tiff_multiframe", "a 3-page deflate-compressed TIFF", body, "image/tiff", tags=("valid",))


@case
def tiff_float32_with_inf_nan() -> Case:
    values = np.linspace(-1.0, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    values[0, 0], values[0, 1], values[1, 0] = np.inf, -np.inf, np.nan
    return raw("tiff_float32_with_inf_nan", "a 32-bit float TIFF (mode F) holding inf, -inf and NaN",
               _save(Image.fromarray(values, "F"), "TIFF"), "image/tiff", tags=("valid",))


@case
def webp_lossy() -> Case:
    return raw("webp_lossy", "a lossy WebP", _save(_texture(), "WEBP", quality=80), "image/webp", tags=("valid",))


@case
def webp_animated_alpha() -> Case:
    frames = [_texture(80, 60, salt=30 + i).convert("RGBA") for i in range(3)]
    body = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    return raw("webp_animated_alpha", "an animated lossless RGBA WebP", body, "image/webp", tags=("valid",))


@case
def bmp_32bit() -> Case:
    return raw("bmp_32bit", "a valid 32-bit BMP", _save(_texture(64, 48).convert("RGBA"), "BMP"), "image/bmp", tags=("valid",))


@case
def ppm_16bit() -> Case:
    ramp = np.linspace(0, 65_535, 64 * 48, dtype=np.float64).reshape(48, 64).astype(np.uint16)
    return raw("ppm_16bit", "a 16-bit PGM (P5, maxval 65535)", _save(Image.fromarray(ramp), "PPM"),
               "image/x-portable-graymap", tags=("valid",))


def _camera() -> Image.Image:
    # scikit-image's "cameraman": EfficientNet-Lite0 says tripod (p~0.94) upright, something else on its side.
    return _photo("camera")


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@case
def jpeg_upright_reference() -> Case:
    return raw("jpeg_upright_reference", "the upright photo (reference for the EXIF cases)",
               _save(_camera(), "JPEG", quality=95, subsampling=0), "image/jpeg", tags=("valid", "exif"))


@case
def jpeg_exif_orientation_6() -> Case:
    # Orientation 6 = "rotate 90 degrees clockwise to display": store the pixels turned 90 degrees counter-clockwise.
    stored = _camera().transpose(Image.Transpose.ROTATE_90)
    body = _save(stored, "JPEG", quality=95, subsampling=0, exif=_exif_orientation(6))
    return raw("jpeg_exif_orientation_6", "the same photo stored on its side with EXIF Orientation=6: must be read upright",
               body, "image/jpeg", same_top1_as="jpeg_upright_reference", tags=("valid", "exif"))


@case
def jpeg_rotated_no_exif() -> Case:
    stored = _camera().transpose(Image.Transpose.ROTATE_90)
    return raw("jpeg_rotated_no_exif", "the on-its-side pixels without EXIF (shows orientation changes the answer)",
               _save(stored, "JPEG", quality=95, subsampling=0), "image/jpeg",
               different_top1_from="jpeg_upright_reference", tags=("valid", "exif"))


@case
def jpeg_exif_orientation_out_of_range() -> Case:
    return raw("jpeg_exif_orientation_out_of_range", "EXIF Orientation=9 (no such value): read as stored",
               _save(_texture(), "JPEG", quality=90, exif=_exif_orientation(9)), "image/jpeg", tags=("valid", "exif"))


@case
def jpeg_exif_not_tiff() -> Case:
    # An APP1 'Exif\0\0' segment whose payload is not a TIFF structure; the pixels are fine.
    return raw("jpeg_exif_not_tiff", "valid JPEG whose APP1 Exif payload is garbage (not a TIFF header)",
               _save(_texture(), "JPEG", quality=90, exif=b"Exif\x00\x00garbage-not-a-tiff-header"), "image/jpeg",
               tags=("valid", "exif"))


@case
def jpeg_exif_ifd_past_end() -> Case:
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0x7FFF_FFF0)
    return raw("jpeg_exif_ifd_past_end", "valid JPEG whose EXIF IFD offset points 2 GB past the end of the segment",
               _save(_texture(), "JPEG", quality=90, exif=exif), "image/jpeg", tags=("valid", "exif"))


@case
def jpeg_sent_as_image_png() -> Case:
    return raw("jpeg_sent_as_image_png", "JPEG bytes declared as image/png (content decides)", _jpeg(), "image/png",
               tags=("valid", "media-type"))


@case
def jpeg_content_type_uppercase_params() -> Case:
    return raw("jpeg_content_type_uppercase_params", "Content-Type 'IMAGE/JPEG; charset=binary'", _jpeg(),
               "IMAGE/JPEG; charset=binary", tags=("valid", "media-type"))


@case
def jpeg_form_urlencoded() -> Case:
    return raw("jpeg_form_urlencoded", "JPEG as application/x-www-form-urlencoded (curl --data-binary's default)", _jpeg(),
               "application/x-www-form-urlencoded", tags=("valid", "media-type"))


@case
def jpeg_chunked_transfer() -> Case:
    return Case(name="jpeg_chunked_transfer", description="a JPEG sent with Transfer-Encoding: chunked (no Content-Length)",
                body=_jpeg(), content_type="image/jpeg", chunked=True, tags=("valid", "transport"))


# ---- request shape: empty, media types, multipart abuse, limits

@case
def zero_bytes() -> Case:
    return raw("zero_bytes", "an empty raw body (Content-Length: 0) declared image/jpeg", b"", "image/jpeg",
               400, "invalid_request", tags=("request",))


@case
def text_plain_with_png_bytes() -> Case:
    return raw("text_plain_with_png_bytes", "valid PNG bytes declared text/plain", _png(), "text/plain",
               415, "unsupported_media_type", tags=("media-type",))


@case
def json_body() -> Case:
    return Case(name="json_body", description="a JSON body with a base64-looking image field",
                json_body={"image": "iVBORw0KGgo=", "topk": 3}, status=415, code="unsupported_media_type",
                tags=("media-type",))


@case
def body_over_upload_limit() -> Case:
    body = _png() + b"\0" * (MAX_UPLOAD_BYTES + MIB)
    return raw("body_over_upload_limit", "a 21 MiB raw body (the limit is 20 MiB)", body, "image/png",
               413, "request_entity_too_large", tags=("request", "limits"))


@case
def chunked_body_over_upload_limit() -> Case:
    body = _png() + b"\0" * (MAX_UPLOAD_BYTES + MIB)
    return Case(name="chunked_body_over_upload_limit", description="a 21 MiB body sent chunked (no Content-Length to check up front)",
                body=body, content_type="image/png", chunked=True, status=413, code="request_entity_too_large",
                tags=("request", "limits", "transport"))


@case
def chunked_multipart_over_upload_limit() -> Case:
    body = _multipart_body("xyzzy", [("image", "big.png", _png() + b"\0" * (MAX_UPLOAD_BYTES + MIB))])
    return Case(name="chunked_multipart_over_upload_limit", description="a 21 MiB multipart upload sent chunked",
                body=body, content_type="multipart/form-data; boundary=xyzzy", chunked=True, status=413,
                code="request_entity_too_large", tags=("multipart", "limits", "transport"))


@case
def multipart_no_file() -> Case:
    return upload("multipart_no_file", "multipart form with only a text field, no file",
                  [Part("comment", None, b"where is the image?")], 400, "invalid_request", tags=("multipart",))


@case
def multipart_image_in_form_field() -> Case:
    return upload("multipart_image_in_form_field", "image bytes sent as a plain form field (no filename), not as a file",
                  [Part("image", None, _png())], 400, "invalid_request", tags=("multipart",))


@case
def multipart_empty_file() -> Case:
    return upload("multipart_empty_file", "multipart with one 0-byte file empty.jpg",
                  [Part("image", "empty.jpg", b"", "image/jpeg")], 400, "invalid_image", tags=("multipart",))


@case
def multipart_missing_boundary() -> Case:
    body = _multipart_body("xyzzy", [("image", "a.png", _png())])
    return raw("multipart_missing_boundary", "Content-Type multipart/form-data with no boundary parameter", body,
               "multipart/form-data", 400, "invalid_request", tags=("multipart",))


@case
def multipart_unterminated() -> Case:
    body = _multipart_body("xyzzy", [("image", "a.png", _png())], close=False)[:-200]
    return raw("multipart_unterminated", "multipart body cut off inside the file part (no closing boundary)", body,
               "multipart/form-data; boundary=xyzzy", 400, "invalid_request", tags=("multipart",))


@case
def multipart_path_traversal_filename() -> Case:
    return upload("multipart_path_traversal_filename", "a valid PNG uploaded as ../../../../etc/passwd",
                  [Part("image", "../../../../etc/passwd", _png(), "image/png")], tags=("multipart", "valid"))


@case
def multipart_two_files() -> Case:
    return upload("multipart_two_files", "two valid files in one request: a list of two answers",
                  [Part("image", "a.png", _png()), Part("image", "b.jpg", _jpeg())], results=2, tags=("multipart", "valid"))


@case
def multipart_one_corrupt_of_three() -> Case:
    parts = [Part("image", "a.png", _png()), Part("image", "b.jpg", _jpeg()[:500]), Part("image", "c.png", _png())]
    return upload("multipart_one_corrupt_of_three", "three files, the second truncated: 400 naming image 2 of 3",
                  parts, 400, "invalid_image", tags=("multipart",))


def _too_many_files(count: int, text: str) -> Case:
    """`count` 1x1 PNGs in one multipart request: over the per-request limit, 413 too_many_images."""
    tiny = _save(Image.new("RGB", (1, 1)), "PNG")
    return upload(f"multipart_{count}_files", text, [Part("image", f"{i}.png", tiny) for i in range(count)],
                  413, "too_many_images", tags=("multipart", "limits"))


@case
def multipart_33_files() -> Case:
    return _too_many_files(33, "33 files: one over the 32 per-request limit")


@case
def multipart_1000_files() -> Case:
    return _too_many_files(1000, "1000 tiny files in one request")


@case
def multipart_1001_files() -> Case:
    return _too_many_files(1001, "1001 tiny files: past werkzeug's 1000-part parser limit as well")


@case
def topk_not_an_integer() -> Case:
    return raw("topk_not_an_integer", "a valid image with ?topk=1e9999", _png(), "image/png", 400, "invalid_request",
               query="topk=1e9999", tags=("request",))


@case
def topk_huge() -> Case:
    return raw("topk_huge", "a valid image with ?topk=99999999999999999999999", _png(), "image/png", 400, "invalid_request",
               query="topk=99999999999999999999999", tags=("request",))


def build_corpus() -> list[Case]:
    """Every case, in a fixed order; the same bytes on every run (seeded RNG, deterministic encoders)."""
    cases = [build() for build in BUILDERS]
    names = [c.name for c in cases]
    assert names == case_names() and len(set(names)) == len(names), "case names must be unique and match their builders"
    for c in cases:
        assert (c.status == 200) == (c.code is None), c.name
        assert c.payload_size() < MAX_UPLOAD_BYTES or c.code == "request_entity_too_large", c.name
    return cases


def case_names() -> list[str]:
    return [build.__name__ for build in BUILDERS]


# --------------------------------------------------------------------------- writing the corpus

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/tiff": "tiff", "image/webp": "webp",
              "image/bmp": "bmp", "image/svg+xml": "svg", "application/pdf": "pdf", "text/plain": "txt"}


def write_corpus(outdir: Path, cases: list[Case] | None = None) -> Path:
    """Write each distinct payload once under outdir/blobs/ and describe every request in outdir/manifest.json."""
    cases = build_corpus() if cases is None else cases
    blobs = outdir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, hint: str | None) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        ext = Path(hint).suffix.lstrip(".") if hint and "." in hint else EXTENSIONS.get((hint or "").split(";")[0].lower(), "bin")
        path = blobs / f"{digest[:16]}.{ext or 'bin'}"
        if not path.exists():
            path.write_bytes(data)
        return {"file": str(path.relative_to(outdir)), "bytes": len(data), "sha256": digest}

    entries = []
    for c in cases:
        request: dict[str, Any] = {"method": "POST", "path": "/predictions/{model}" + (f"?{c.query}" if c.query else ""),
                                   "kind": c.kind}
        if c.kind == "raw":
            request.update(content_type=c.content_type, chunked=c.chunked, body=blob(c.body or b"", c.content_type))
        elif c.kind == "multipart":
            request["parts"] = [{"field": p.field, "filename": p.filename, "content_type": p.content_type,
                                 "body": blob(p.data, p.filename or p.content_type)} for p in c.parts]
        else:
            request["json"] = c.json_body
        expect: dict[str, Any] = {"status": c.status}
        if c.code:
            expect["code"] = c.code
        for key in ("results", "same_top1_as", "different_top1_from", "max_seconds"):
            if getattr(c, key) is not None:
                expect[key] = getattr(c, key)
        entries.append({"name": c.name, "description": c.description, "tags": list(c.tags), "request": request,
                        "expect": expect})
    manifest = outdir / "manifest.json"
    manifest.write_text(json.dumps({"seed": SEED, "cases": entries}, indent=1) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__.strip().split("\n\n")[-2], file=sys.stderr)
        return 2
    cases = build_corpus()
    manifest = write_corpus(Path(argv[1]), cases)
    for c in cases:
        expected = "200" if c.status == 200 else f"{c.status} {c.code}"
        print(f"{c.name:40s} {c.kind:9s} {c.payload_size():>10d} B  -> {expected}")
    print(f"{len(cases)} cases; manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
