"""The detect, segment and embed tasks with small real models whose right answers are known: boxes,
masks and keypoints in pixels of the uploaded image (resized, EXIF-rotated, non-square, several sizes in
one request), class maps and shares, embeddings; start-up refuses outputs that don't fit the task."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as coco_mask

from conftest import tiny_model_config, tiny_net
from models.bright import BrightBoxDetector, BrightSegmenter
from serve.app import create_app
from serve.config import build_config
from serve.errors import CheckpointError, ConfigError
from serve.tasks import TASKS
from serve.tasks.base import Task

PLAIN = {"mean": [0, 0, 0], "std": [1, 1, 1]}


def bright_image(size=(300, 200), rect=(50, 40, 110, 90), fmt="PNG", orientation: int | None = None) -> bytes:
    """A dark image with one white rectangle (x1, y1, x2, y2, exclusive), in the stored (unrotated) pixels."""
    image = Image.new("RGB", size, (10, 10, 10))
    image.paste((250, 250, 250), rect)
    buf = io.BytesIO()
    extra = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **extra)
    return buf.getvalue()


def shown_mask(data: bytes) -> np.ndarray:
    """The bright pixels of the image as a viewer shows it (EXIF orientation applied), [H, W] bool."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    return np.asarray(image) > 127


def bbox(mask: np.ndarray) -> list[float]:
    ys, xs = mask.nonzero()
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    paths = {"detector": folder / "detector.pth", "segmenter": folder / "segmenter.pth", "tiny": folder / "tiny.pth"}
    torch.save(BrightBoxDetector().state_dict(), paths["detector"])
    torch.save(BrightSegmenter().state_dict(), paths["segmenter"])
    torch.save(tiny_net().state_dict(), paths["tiny"])
    return paths


def detector(checkpoints, **overrides) -> dict:
    return {"name": "boxes", "task": "detect", "runtime": "eager", "architecture": "models.bright:BrightBoxDetector",
            "checkpoint": str(checkpoints["detector"]), "device": "cpu", "labels": ["__background__", "bright"],
            "preprocess": PLAIN, "max_batch_size": 4, **overrides}


def segmenter(checkpoints, **overrides) -> dict:
    return {"name": "regions", "task": "segment", "runtime": "eager", "architecture": "models.bright:BrightSegmenter",
            "checkpoint": str(checkpoints["segmenter"]), "device": "cpu", "labels": ["dark", "bright"],
            "preprocess": {"resize": 200, "crop": 200, **PLAIN}, **overrides}


@pytest.fixture(scope="module")
def client(checkpoints):
    app = create_app(build_config({"models": [
        detector(checkpoints),
        detector(checkpoints, name="small-boxes", detect={"max_side": 160}),
        segmenter(checkpoints),
        segmenter(checkpoints, name="small-regions", preprocess={"resize": 50, "crop": 50, **PLAIN}),
        {**tiny_model_config(checkpoints["tiny"]), "name": "colours", "task": "embed"},
        {**tiny_model_config(checkpoints["tiny"]), "name": "unit-colours", "task": "embed", "embed": {"normalize": True}},
    ]}))
    yield app.test_client()
    app.extensions["serve"].close()


def post(client, model: str, data: bytes, query: str = ""):
    return client.post(f"/predictions/{model}{query}", data=data, content_type="image/png")


# --- detect --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(size=(300, 200), rect=(50, 40, 110, 90)),  # non-square, as uploaded
    dict(size=(200, 300), rect=(0, 250, 200, 300)),  # touching three edges
    dict(size=(400, 40), rect=(300, 0, 380, 40)),  # a strip: padded to 4:1 for the model, the padding never answered
    dict(size=(300, 200), rect=(50, 40, 110, 90), orientation=6),  # EXIF: shown rotated 90 degrees
    dict(size=(300, 200), rect=(20, 150, 60, 190), orientation=3),  # EXIF: shown upside down
])
def test_detect_boxes_the_bright_region_in_uploaded_pixels(client, case):
    data = bright_image(**case)
    answer = post(client, "boxes", data).json
    expected = shown_mask(data)
    assert answer["model"] == "boxes" and len(answer["detections"]) == 1
    found = answer["detections"][0]
    assert (found["label"], found["index"], found["score"]) == ("bright", 1, 0.9)
    assert found["box"] == bbox(expected)
    x1, y1, x2, y2 = found["box"]
    assert found["keypoints"] == [[x1, y1, 1.0], [x2, y2, 1.0]]
    mask = coco_mask.decode({"size": found["mask"]["size"], "counts": found["mask"]["counts"].encode()})
    assert found["mask"]["size"] == list(expected.shape)
    assert np.array_equal(mask.astype(bool), expected)


def test_detect_maps_boxes_back_from_a_scaled_down_upload(client):
    """max_side 160: a 1200 x 800 JPEG is decoded at reduced scale and resized, boxes mapped back."""
    data = bright_image(size=(1200, 800), rect=(300, 200, 700, 520), fmt="JPEG")
    found = post(client, "small-boxes", data).json["detections"][0]
    pixel = 1200 / 160  # one pixel the model saw, in uploaded pixels
    assert np.allclose(found["box"], [300, 200, 700, 520], atol=pixel + 0.5)
    mask = coco_mask.decode({"size": found["mask"]["size"], "counts": found["mask"]["counts"].encode()}).astype(bool)
    assert mask.shape == (800, 1200) and iou(mask, shown_mask(data)) > 0.97


def test_several_sizes_in_one_request_are_batched_and_each_mapped_back(client):
    images = [bright_image((300, 200), (50, 40, 110, 90)), bright_image((123, 457), (3, 400, 100, 450)),
              bright_image((64, 64), (0, 0, 64, 64), orientation=8)]
    answer = client.post("/predictions/boxes", data={f"f{i}": (io.BytesIO(d), f"{i}.png") for i, d in enumerate(images)},
                         content_type="multipart/form-data")
    assert answer.status_code == 200
    assert [a["detections"][0]["box"] for a in answer.json] == [bbox(shown_mask(d)) for d in images]


def test_detect_threshold_per_request_and_in_the_config(client, checkpoints, make_app):
    data = bright_image()
    assert post(client, "boxes", data, "?threshold=0.95").json["detections"] == []
    assert len(post(client, "boxes", data, "?threshold=0.9").json["detections"]) == 1
    for bad in ("abc", "1.5", "-0.1"):
        answer = post(client, "boxes", data, f"?threshold={bad}")
        assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_request"
    strict = make_app(detector(checkpoints, detect={"score_threshold": 0.95})).test_client()
    assert post(strict, "boxes", data).json["detections"] == []
    assert post(strict, "boxes", bright_image(size=(40, 40), rect=(0, 0, 0, 0))).json["detections"] == []


def test_detect_answers_in_torchserve_shape(client, checkpoints, make_app):
    data = bright_image()
    box = bbox(shown_mask(data))
    assert post(client, "boxes", data, "?format=torchserve").json == [{"bright": box, "score": 0.9}]
    default = make_app(detector(checkpoints, response_format="torchserve")).test_client()
    assert post(default, "boxes", data).json == [{"bright": box, "score": 0.9}]
    assert post(default, "boxes", data, "?format=json").json["detections"][0]["box"] == box


# --- segment -------------------------------------------------------------------------------------


def mask_of(answer: dict) -> np.ndarray:
    assert answer["mask"]["format"] == "png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"]))))


@pytest.mark.parametrize("orientation", [None, 6])
def test_segment_answers_the_class_of_every_uploaded_pixel(client, orientation):
    data = bright_image(size=(300, 200), rect=(50, 40, 110, 90), orientation=orientation)
    expected = shown_mask(data)
    answer = post(client, "regions", data).json
    mask = mask_of(answer)
    assert (answer["mask"]["width"], answer["mask"]["height"]) == (expected.shape[1], expected.shape[0])
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected.astype(np.uint8))
    bright = round(expected.mean(), 6)
    assert answer["classes"] == [{"label": "dark", "index": 0, "fraction": round(1 - bright, 6)},
                                 {"label": "bright", "index": 1, "fraction": bright}]
    png = post(client, "regions", data, "?format=png")
    assert png.mimetype == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(png.data))), mask)


def test_segment_scales_the_class_map_back_to_the_upload(client):
    """The model sees a 75 x 50 image; the answer covers all 300 x 200 pixels."""
    data = bright_image(size=(300, 200), rect=(50, 40, 110, 90))
    mask = mask_of(post(client, "small-regions", data).json)
    assert mask.shape == (200, 300) and iou(mask.astype(bool), shown_mask(data)) > 0.9


def test_segment_several_sizes_and_torchserve_shape(client):
    images = [bright_image((300, 200), (0, 0, 150, 200)), bright_image((200, 260), (0, 0, 200, 10))]
    answer = client.post("/predictions/regions", data={f"f{i}": (io.BytesIO(d), f"{i}.png") for i, d in enumerate(images)},
                         content_type="multipart/form-data").json
    assert [np.array_equal(mask_of(a), shown_mask(d)) for a, d in zip(answer, images)] == [True, True]
    pixels = post(client, "small-regions", bright_image((100, 50), (0, 0, 50, 50)), "?format=torchserve").json
    assert np.asarray(pixels).shape == (50, 100, 2)  # [class, probability] for each pixel the model saw
    assert pixels[10][10][0] == 1.0 and pixels[10][90][0] == 0.0 and pixels[10][10][1] > 0.99
    many = client.post("/predictions/regions?format=png", data={f"f{i}": (io.BytesIO(d), f"{i}.png") for i, d in enumerate(images)},
                       content_type="multipart/form-data")
    assert many.status_code == 400 and "one image" in many.json["error"]["message"]


# --- embed ---------------------------------------------------------------------------------------


def test_embed_answers_the_model_output(client):
    answer = post(client, "colours", bright_image(size=(8, 8), rect=(0, 0, 8, 8))).json
    assert (answer["model"], answer["dim"]) == ("colours", 3)
    assert np.allclose(answer["embedding"], [2 * 250 / 255 + 1] * 3, atol=1e-6)
    unit = post(client, "unit-colours", bright_image(size=(8, 8), rect=(0, 0, 8, 8))).json
    assert np.isclose(np.linalg.norm(unit["embedding"]), 1.0, atol=1e-6)
    assert np.allclose(unit["embedding"], [3 ** -0.5] * 3, atol=1e-6)
    wrong = post(client, "colours", bright_image(), "?format=torchserve")
    assert wrong.status_code == 400 and "format must be one of ['json']" in wrong.json["error"]["message"]


def test_embed_an_inner_node_of_a_classifier(tmp_path, make_app, cat_jpeg):
    """embed: {node: avgpool} serves resnet18's pooled features, as torchvision's feature extractor gives them."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from serve.preprocess import PreprocessSpec, build_normalizer, build_transform, decode_image

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    spec = {"name": "r18", "task": "embed", "runtime": "eager", "architecture": "resnet18", "kwargs": {"num_classes": 10},
            "checkpoint": str(tmp_path / "r18.pth"), "device": "cpu", "embed": {"node": "avgpool", "normalize": True}}
    answer = make_app(spec).test_client().post("/predictions/r18", data=cat_jpeg, content_type="image/jpeg").json
    pre = PreprocessSpec()
    x = build_normalizer(pre)(build_transform(pre)(decode_image(cat_jpeg, 10**8, min_side=pre.resize))[None])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(create_feature_extractor(net, {"avgpool": "e"})(x)["e"].flatten(1))[0]
    assert answer["dim"] == 512 and np.allclose(answer["embedding"], expected.numpy(), atol=1e-5)


# --- outputs that don't fit the task stop start-up ----------------------------------------------


def test_output_that_does_not_fit_the_task_stops_start_up(checkpoints, tmp_path):
    from models.seed_fcn import MyModel

    torch.save(MyModel().state_dict(), tmp_path / "seed.pth")
    seed = {"name": "seed", "architecture": "models.seed_fcn:MyModel", "checkpoint": str(tmp_path / "seed.pth"),
            "device": "cpu", "preprocess": {"resize": 100, "crop": 96}}
    cases = [
        (seed, CheckpointError, r"model 'seed': task 'classify' expects class scores \[1, classes\].*"
                                r"spatial_average.*output a tensor \[1, 32, 9, 9\]"),
        (detector(checkpoints, task="classify", labels=None), CheckpointError,
         r"model 'boxes': task 'classify' expects class scores .* output a list of 1 \(dict\)"),
        ({**tiny_model_config(checkpoints["tiny"]), "task": "detect"}, CheckpointError,
         r"model 'tiny': task 'detect': the model's forward failed on a list of 1 \(tensor \[3, 320, 320\]\)"),
        ({**tiny_model_config(checkpoints["tiny"]), "task": "segment"}, CheckpointError,
         r"model 'tiny': task 'segment' expects a score map \[1, classes, h, w\] .* output a tensor \[1, 3\]"),
        (segmenter(checkpoints, labels=["a", "b", "c"]), ConfigError, r"3 labels, but the model segments 2 classes"),
        ({**tiny_model_config(checkpoints["tiny"]), "task": "embed", "embed": {"node": "nope"}}, ConfigError,
         r"model 'tiny': field 'embed.node': no node 'nope'; nodes include"),
        ({**tiny_model_config(checkpoints["tiny"]), "task": "embed", "response_format": "torchserve"}, ConfigError,
         r"field 'response_format': task 'embed' answers \['json'\]"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            create_app(build_config({"models": [spec]})).extensions["serve"].close()  # closed if it wrongly starts
    averaged = create_app(build_config({"models": [{**seed, "classify": {"spatial_average": True}}]}))
    try:
        assert averaged.test_client().get("/models/seed").json["num_classes"] == 32
    finally:
        averaged.extensions["serve"].close()


# --- the seam: a task is one module --------------------------------------------------------------


def test_every_task_implements_the_whole_seam():
    hooks = ["prepare", "split", "finish", "v2_outputs", "v2_tensors"]
    for name, task in TASKS.items():
        assert task.name == name
        missing = [hook for hook in hooks if getattr(task, hook) is getattr(Task, hook)]
        assert not missing, f"task '{name}' lacks {missing}"
        assert task.Result.model_json_schema()["type"] == "object" and "model" in task.Result.model_fields
        assert set(task.formats) >= {"json"}


def test_nothing_outside_the_task_modules_names_a_task():
    """Adding a task must be one module plus one line in serve/tasks/__init__.py: no other file of the
    request path branches on a task's name."""
    from pathlib import Path

    serve = Path(__file__).resolve().parent.parent / "serve"
    for path in serve.rglob("*.py"):
        if path.parent.name == "tasks":
            continue
        text = path.read_text()
        for name in TASKS:
            if name == "classify" and path.name == "config.py":
                continue  # the default task's name is the config's default
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{path.name} names task '{name}'"
