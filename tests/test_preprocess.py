"""Decoding and transforms: exact tensors, EXIF orientation, odd modes, bombs and broken files."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image

from serve.errors import ImageTooLargeError, InvalidImageError
from serve.memory import PixelBudget
from serve.preprocess import PreprocessSpec, build_normalizer, build_transform, decode_image

MAX = 50_000_000


def test_solid_colour_normalizes_exactly():
    spec = PreprocessSpec(resize=8, crop=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = build_transform(spec)(Image.new("RGB", (20, 12), (255, 51, 0)))
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.uint8
    batch = build_normalizer(spec)(torch.stack([pixels, pixels]))
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    expected = torch.tensor([(255 - 127.5) / 127.5, (51 - 63.75) / 63.75, 0.0])
    assert torch.allclose(batch, expected.view(1, 3, 1, 1).expand(2, 3, 8, 8))


def test_resize_shorter_side_then_centre_crop():
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # only the middle third is green
    pixels = build_transform(PreprocessSpec(resize=10, crop=10))(image)
    assert torch.equal(pixels[1], torch.full((10, 10), 255, dtype=torch.uint8))
    assert torch.equal(pixels[0], torch.zeros(10, 10, dtype=torch.uint8))


def test_grayscale_model_gets_one_channel():
    spec = PreprocessSpec(resize=4, crop=4, mean=(0.0,), std=(1.0,), mode="L")
    image = decode_image(image_bytes((255, 255, 255)), MAX, "L")
    assert build_transform(spec)(image).shape == (1, 4, 4)


def test_exif_orientation_is_honoured():
    stored = Image.new("RGB", (20, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    upright = decode_image(buf.getvalue(), MAX)
    assert upright.size == (10, 20)
    top, bottom = upright.getpixel((5, 2)), upright.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize(
    "mode, color, fmt, save_args",
    [
        ("L", 128, "PNG", {}),
        ("1", 1, "PNG", {}),
        ("CMYK", (0, 255, 255, 0), "JPEG", {}),
        ("RGBA", (255, 0, 0, 0), "PNG", {}),
        ("LA", (0, 0), "PNG", {}),
        ("P", 3, "GIF", {"transparency": 3}),
    ],
)
def test_odd_modes_become_rgb(mode, color, fmt, save_args):
    image = decode_image(image_bytes(color, mode=mode, fmt=fmt, **save_args), MAX)
    assert image.mode == "RGB" and image.size == (16, 16)


def test_transparent_pixels_become_white():
    image = decode_image(image_bytes((255, 0, 0, 0), mode="RGBA"), MAX)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    wide = Image.new("I;16", (4, 1))
    for x, v in enumerate((0, 1000, 2000, 4000)):
        wide.putpixel((x, 0), v)
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    image = decode_image(buf.getvalue(), MAX)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_big_jpeg_is_decoded_at_reduced_scale():
    data = image_bytes((10, 200, 30), size=(4000, 3000), fmt="JPEG")
    image = decode_image(data, MAX, min_side=256)
    assert min(image.size) >= 256 and image.size[0] <= 1000
    assert decode_image(data, MAX).size == (4000, 3000)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = image_bytes(0, size=(10_000, 10_000), mode="1")  # 100 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="10000x10000 = 100000000 pixels; the limit is 50000000"):
        decode_image(bomb, MAX)
    with pytest.raises(ImageTooLargeError, match="the limit is 100"):
        decode_image(image_bytes(size=(11, 10)), max_pixels=100)


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty"),
        (b"<html><body>not an image</body></html>", "not an image"),
        (image_bytes(fmt="JPEG", size=(64, 64))[:300], "truncated or corrupt"),
        (image_bytes(fmt="PNG", size=(64, 64))[:60], "truncated or corrupt"),
    ],
)
def test_broken_data_is_an_invalid_image(data, needle):
    with pytest.raises(InvalidImageError, match=needle):
        decode_image(data, MAX)


def test_extreme_aspect_ratio_resizes_only_the_crop():
    spec = PreprocessSpec()  # 256 / 224: a 20000 x 1 sliver would become 5,120,000 x 256 if resized whole
    sliver = Image.new("RGB", (20_000, 1), (0, 128, 255))
    pixels = build_transform(spec)(sliver)
    assert pixels.shape == (3, 224, 224)
    assert pixels[:, 100, 100].tolist() == [0, 128, 255]


def test_crop_box_resize_matches_resize_then_crop():
    rng = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8, generator=rng).numpy()
    image = Image.fromarray(array)
    spec = PreprocessSpec(resize=256, crop=224)
    expected = image.resize((341, 256), Image.Resampling.BILINEAR, reducing_gap=3.0).crop((58, 16, 282, 240))
    got = build_transform(spec)(image).permute(1, 2, 0).numpy()
    diff = abs(got.astype(int) - np.asarray(expected).astype(int))
    assert diff.mean() < 2.0


def _holders(budget: PixelBudget, sizes: list[int]) -> tuple[list[threading.Thread], list[int], threading.Event]:
    """One thread per size, each holding that many pixels until `done` is set; `entered` records the order."""
    entered: list[int] = []
    done = threading.Event()

    def hold(pixels: int) -> None:
        with budget.hold(pixels):
            entered.append(pixels)
            done.wait(10)

    threads = [threading.Thread(target=hold, args=(n,), daemon=True) for n in sizes]
    return threads, entered, done


def _wait_for(condition, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_pixel_budget_lets_small_images_in_together_and_a_big_one_in_alone():
    budget = PixelBudget(100)
    threads, entered, done = _holders(budget, [40, 40])
    for t in threads:
        t.start()
    _wait_for(lambda: len(entered) == 2)
    assert budget.in_flight == 80  # both at once: they fit

    big, big_entered, big_done = _holders(budget, [100])
    big[0].start()
    _wait_for(lambda: budget._next_ticket == 3)  # it is waiting for the two to finish
    late, late_entered, late_done = _holders(budget, [10])
    late[0].start()
    _wait_for(lambda: budget._next_ticket == 4)
    assert big_entered == [] and late_entered == []  # the small late one queues behind the big one
    done.set()
    _wait_for(lambda: big_entered == [100])
    assert budget.in_flight == 100 and late_entered == []
    big_done.set()
    _wait_for(lambda: late_entered == [10])
    late_done.set()
    for t in threads + big + late:
        t.join(10)
    assert budget.in_flight == 0


def test_an_image_over_the_budget_still_gets_in_alone():
    budget = PixelBudget(100)
    with budget.hold(10**6):  # counted as the whole budget, never waiting forever
        assert budget.in_flight == 100
    assert budget.in_flight == 0


def test_a_request_decodes_only_within_the_workers_pixel_budget(make_app):
    app = make_app(max_image_pixels=1000)
    budget = app.extensions["serve"].scheduler.pixels
    answers = []
    with budget.hold(1000):  # another request's image holds the whole budget
        request = threading.Thread(target=lambda: answers.append(app.test_client().post(
            "/predictions/tiny", data=image_bytes(size=(16, 16)), content_type="image/png")))
        request.start()
        _wait_for(lambda: budget._next_ticket == 2)  # read the header, now waiting to decode
        assert answers == []
    request.join(10)
    assert answers[0].status_code == 200 and budget.in_flight == 0
