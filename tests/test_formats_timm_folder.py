"""timm model folders (timm.models.save_for_hf) and timm: architectures, served through the real app;
the answer must be timm's own (timm.create_model('local-dir:...') + its eval transform), pixel for pixel."""
from __future__ import annotations

import io

import pytest
import timm
import torch
import yaml
from formats_helpers import LABELS, assert_same_answer, photo, served, timm_probs
from PIL import Image
from timm.data import create_transform, resolve_data_config

from serve.cli import main
from serve.config import build_config
from serve.errors import CheckpointError, ConfigError
from serve.formats.state_dict import build_module
from serve.loader import load_model
from serve.preprocess import PreprocessSpec, build_normalizer, build_transform, decode_image, draft_side

ARCH = "test_resnet"


@pytest.fixture(scope="module")
def photos(cat_jpeg) -> list[bytes]:
    """Non-square, both ways round, PNG and JPEG; the last is large enough for reduced-scale JPEG decoding."""
    return [cat_jpeg, photo((300, 451), "PNG"), photo((1400, 900), "JPEG"), photo((333, 1000), "JPEG")]


def save_folder(folder, crop_mode="center", safe_serialization=True, **data_config):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=10).eval()
    timm.models.save_for_hf(model, folder, model_config={"label_names": LABELS}, safe_serialization=safe_serialization,
                            data_config={"crop_mode": crop_mode, **data_config})
    return model


@pytest.mark.parametrize("crop_mode, data_config", [
    ("center", {}),
    ("center", {"crop_pct": 0.875, "interpolation": "bicubic", "input_size": (3, 128, 128)}),
    ("squash", {"crop_pct": 1.0}),
    ("border", {"crop_pct": 0.9, "mean": (0.2, 0.4, 0.6), "std": (0.3, 0.3, 0.3)}),
])
def test_model_folder_serves_timms_answer(tmp_path, photos, crop_mode, data_config):
    folder = tmp_path / "model"
    save_folder(folder, crop_mode, **data_config)
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm's own loader
    transform_config = resolve_data_config(model=reference)
    assert transform_config["crop_mode"] == crop_mode
    answers = served({"name": "folder", "checkpoint": str(folder), "device": "cpu"}, photos)
    for answer, data in zip(answers, photos):
        assert_same_answer(answer, timm_probs(reference, transform_config, data))
        assert answer["predictions"][0]["label"] == LABELS[answer["predictions"][0]["index"]]


def test_folder_fields_fill_the_config_and_the_entry_can_override_them(tmp_path):
    folder = tmp_path / "model"
    save_folder(folder, safe_serialization=False)  # pytorch_model.bin only
    spec = build_config({"models": [{"name": "f", "checkpoint": str(folder), "preprocess": {"exact": False}}]}).models[0]
    assert spec.architecture == f"timm:{ARCH}" and spec.kwargs["num_classes"] == 10
    assert spec.labels == tuple(LABELS)
    assert (spec.preprocess.resize, spec.preprocess.crop, spec.preprocess.mean) == (168, 160, (0.5, 0.5, 0.5))
    assert spec.preprocess.exact is False  # the entry's own value wins
    loaded = load_model(spec.model_copy(update={"device": "cpu"}))
    assert loaded.layout == "bare state_dict" and loaded.sha256


def test_inspect_prints_a_working_entry_for_a_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    save_folder(folder)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(timm / Hugging Face model folder: config.json + model.safetensors)" in out and "format:  safetensors" in out
    assert main(["inspect", str(folder), "--config"]) == 0
    text = capsys.readouterr().out
    assert "#   architecture: timm:test_resnet" in text
    entry = yaml.safe_load(text)[0]
    assert entry == {"name": "model", "checkpoint": str(folder)}
    assert build_config({"models": [entry]}).models[0].architecture == f"timm:{ARCH}"


def test_folder_problems_are_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model 'f': field 'checkpoint': .*config.json: not valid JSON"):
        build_config({"models": [{"name": "f", "checkpoint": str(folder)}]})
    (folder / "config.json").write_text('{"architecture": "test_resnet", "num_classes": 10}')
    spec = build_config({"models": [{"name": "f", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(CheckpointError, match="holds no weights file \\(model.safetensors, pytorch_model.bin"):
        load_model(spec)
    (folder / "config.json").write_text('{"architecture": "test_resnet", "pretrained_cfg": {"input_size": [3, 160, 128]}}')
    with pytest.raises(ConfigError, match="input_size \\(3, 160, 128\\) is not square"):
        build_config({"models": [{"name": "f", "checkpoint": str(folder)}]})
    with pytest.raises(CheckpointError, match="is a folder without config.json"):
        load_model(spec.model_copy(update={"checkpoint": tmp_path}))


def test_timm_architecture_is_built_without_pretrained_weights():
    module = build_module(f"timm:{ARCH}", {"num_classes": 7})
    assert module.fc.out_features == 7
    with pytest.raises(ConfigError, match="pretrained: true would download weights"):
        build_module(f"timm:{ARCH}", {"pretrained": True})
    with pytest.raises(ConfigError, match="timm has no model 'no_such_net'"):
        build_module("timm:no_such_net", {})


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (1400, 900), (999, 1001), (20, 700)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exact_transform_is_timms_pixels(size, fmt):
    """Normalized input tensors equal timm's create_transform output on the same bytes."""
    payload = photo(size, fmt)
    for crop_mode, interpolation in (("center", "bicubic"), ("squash", "bilinear"), ("border", "bicubic")):
        spec = PreprocessSpec(resize=256, crop=224, crop_mode=crop_mode, interpolation=interpolation, exact=True)
        ours = build_normalizer(spec)(build_transform(spec)(decode_image(payload, 10**8, "RGB", draft_side(spec)))[None])[0]
        timms = create_transform(input_size=(3, 224, 224), crop_pct=224 / 256, crop_mode=crop_mode,
                                 interpolation=interpolation)(Image.open(io.BytesIO(payload)).convert("RGB"))
        assert torch.allclose(ours, timms, atol=1e-5), (crop_mode, (ours - timms).abs().max())


def test_exact_transform_of_a_sliver_resamples_only_the_crop():
    spec = PreprocessSpec(exact=True)  # 20000 x 1 would become 5,120,000 x 256 if resized whole
    pixels = build_transform(spec)(Image.new("RGB", (20_000, 1), (0, 128, 255)))
    assert pixels.shape == (3, 224, 224) and pixels[:, 100, 100].tolist() == [0, 128, 255]
