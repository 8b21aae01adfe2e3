"""Detectors on ONNX Runtime (serve/runtimes/onnx/detection.py): a torchvision detector split into its dense
parts on ONNX Runtime and its data-dependent rest eager answers as eager does on real photos of several
sizes, on every detection; runtime auto serves it so (and reads the export cache on the next start); a
detector whose export answers otherwise falls back to eager with the reason."""
from __future__ import annotations

import io

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from conftest import match_detections, torch_threads
from seeded_detectors import photo, seeded_detector, sized_photos
from serve.app import create_app
from serve.config import build_config
from serve.errors import ExportError
from serve.preprocess import decode_image
from serve.runtimes.onnx.detection import (DenseStage, SplitDetector, build_detector_runtime, detector_inputs,
                                           detector_family)
from serve.tasks.detect import detections

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
# Small: 3 classes, the transform at 256 px, 50 detections: a forward takes a tenth of a second on 2 cores.
KWARGS = {"num_classes": 3, "min_size": 256, "max_size": 384, "box_detections_per_img": 50}
SIZES = ((300, 451), (480, 360), (256, 512))  # landscape, portrait, a wide strip


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    return seeded_detector(NAME, **KWARGS)


def build(model: nn.Module, cache_dir=None, verify=detections) -> SplitDetector:
    return build_detector_runtime(model, torch.zeros(1, 3, 320, 320), cache_key_parts={"test": NAME},
                                  cache_dir=cache_dir, verify=verify, score_threshold=0.0, threads=1)


def test_the_families_that_split():
    made = {name: torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
            for name in ("fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                         "ssdlite320_mobilenet_v3_large")}
    assert {n: detector_family(m) for n, m in made.items()} == {
        "fasterrcnn_mobilenet_v3_large_320_fpn": "rcnn", "retinanet_resnet50_fpn": "retinanet",
        "fcos_resnet50_fpn": "fcos", "ssdlite320_mobilenet_v3_large": "ssd"}
    assert detector_family(nn.Conv2d(3, 3, 1)) is None
    with pytest.raises(ExportError, match="not a torchvision detector"):
        build(nn.Conv2d(3, 3, 1))


@pytest.mark.slow
def test_split_detector_answers_as_eager_on_photos_of_three_sizes(detector, tmp_path):
    runtime = build(detector, cache_dir=tmp_path)
    described = runtime.describe()
    assert described["runtime"] == "onnxruntime" and described["cache"] == "miss", described
    assert list(runtime.parts) == ["dense", "box"] and described["split"].startswith("rcnn: dense, box on ONNX")
    images = sized_photos(SIZES)
    with torch.inference_mode(), torch_threads(1):
        eager = detector(images)
        split = runtime.forward(images)
    assert [len(e["scores"]) for e in eager] == [50, 50, 50]
    assert detections(eager, split, score_threshold=0.0) is None
    # the scores spread (seeded_detector): a match is not one tied box standing in for another
    assert all(len(set(e["scores"].tolist())) == 50 for e in eager)

    # The next start reads both parts from the cache, and the check passes again.
    again = build(detector, cache_dir=tmp_path)
    assert again.describe()["cache"] == "hit" and again.describe()["export_s"] is None


def test_the_dense_part_takes_any_height_and_width(detector):
    runtime = build(detector, verify=None)
    dense = DenseStage(detector.backbone, detector.rpn.head)
    for height, width in ((224, 320), (352, 256)):
        x = photo("coffee", height, width)[None]
        with torch.inference_mode():
            want = dense(x)
        got = runtime.parts["dense"].forward(x)
        assert len(got) == len(want) == 3 * 3  # 3 feature maps, objectness and box deltas for each
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-4, rtol=1e-4)


def test_detector_check_inputs_are_photo_like_and_of_three_sizes():
    batches = detector_inputs(torch.zeros(1, 3, 320, 320))
    assert [[tuple(x.shape) for x in batch] for batch in batches] == [[(3, 320, 320)], [(3, 384, 288), (3, 272, 416)]]
    images = [x for batch in batches for x in batch]
    assert all(0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.1 for x in images)
    again = [x for batch in detector_inputs(torch.zeros(1, 3, 320, 320)) for x in batch]
    assert all(torch.equal(a, b) for a, b in zip(images, again))


class ScalarBackbone(nn.Module):
    """A backbone whose output is scaled by its input's mean taken as a Python number: the TorchScript
    exporter bakes the export sample's mean in, so the export answers otherwise on any other image."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner, self.out_channels = backbone, backbone.out_channels

    def forward(self, x):
        scale = float(x.mean()) + 0.5
        return {k: v * scale for k, v in self.inner(x).items()}


@pytest.mark.slow
def test_a_detector_whose_export_answers_otherwise_is_refused_with_the_reason(detector):
    model = seeded_detector(NAME, **KWARGS)
    model.backbone = ScalarBackbone(model.backbone)
    # The check says so, or ONNX Runtime fails on the check's other sizes (the traced graph has fixed shapes).
    with pytest.raises(ExportError, match=r"^ONNX (output differs from eager \(detections rule, split rcnn\)|Runtime failed)"):
        build(model)


def jpeg(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def serve_app(folder, runtime: str, architecture: str = NAME, kwargs=None):
    spec = {"name": "det", "task": "detect", "runtime": runtime, "architecture": architecture,
            "kwargs": {"weights_backbone": None, **KWARGS} if kwargs is None else kwargs,
            "checkpoint": str(folder / "det.pth"), "device": "cpu", "labels": ["__background__", "one", "two"]}
    return create_app(build_config({"models": [spec], "server": {"torch_threads": 1,
                                                                 "onnx_cache_dir": str(folder / "cache")}}))


@pytest.mark.slow
def test_runtime_auto_serves_a_detector_on_onnx_runtime_as_eager_answers(detector, tmp_path):
    torch.save(detector.state_dict(), tmp_path / "det.pth")
    app = serve_app(tmp_path, "auto")
    try:
        client = app.test_client()
        runtime = client.get("/models/det").json["runtime"]
        assert runtime["name"] == "onnxruntime" and runtime["fallback_reason"] is None, runtime
        assert runtime["split"].startswith("rcnn") and runtime["cache"] == "miss"
        for image in sized_photos(SIZES):
            data = jpeg(image)
            answer = client.post("/predictions/det?threshold=0", data=data, content_type="image/jpeg")
            assert answer.status_code == 200, answer.json
            decoded = torchvision.transforms.functional.pil_to_tensor(decode_image(data, 10**8)).float() / 255
            with torch.inference_mode(), torch_threads(1):
                want = detector([decoded])[0]
            assert len(want["scores"]) == 50
            match_detections(answer.json["detections"], want["scores"], want["boxes"], want["labels"])
    finally:
        app.extensions["serve"].close()


def test_runtime_auto_leaves_a_detector_that_does_not_split_on_eager(tmp_path):
    """Any other detector would be exported whole, its data-dependent post-processing traced for one image:
    only when runtime: onnxruntime asks for it."""
    from models.bright import BrightBoxDetector

    torch.save(BrightBoxDetector().state_dict(), tmp_path / "det.pth")
    app = serve_app(tmp_path, "auto", architecture="models.bright:BrightBoxDetector", kwargs={})
    try:
        runtime = app.test_client().get("/models/det").json["runtime"]
        assert runtime["name"] == "eager", runtime
        assert runtime["fallback_reason"] == ("runtime auto leaves task 'detect' on eager PyTorch "
                                              "(ask for runtime: onnxruntime)")
    finally:
        app.extensions["serve"].close()
