"""Hugging Face transformers model folders (save_pretrained), made by the real library from small configs
with seeded random weights (nothing from the hub), served through the real app; each answer must be the
same model's in-process through its own image processor (AutoImageProcessor.from_pretrained(folder))
and post-processing.

Tolerances: the server's preprocessing is pixel-exact with the processor's PIL backend (normalised
tensors within 1e-5); the default (torchvision) backend resizes with torchvision, whose pixels differ
from Pillow's by at most 2 levels of 255, so answers against it are compared within PROB_TOL_TV."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import yaml
from formats_helpers import photo
from PIL import Image

from serve.cli import main
from serve.config import build_config
from serve.errors import CheckpointError, ConfigError
from serve.formats import transformers_folder
from serve.formats.timm_folder import is_timm_folder, is_transformers_folder
from serve.loader import load_model
from serve.preprocess import PreprocessSpec, build_normalizer, build_transform

transformers = pytest.importorskip("transformers")

LABELS = {0: "cat", 1: "dog", 2: "bird"}
PIXEL_TOL = 1e-5  # normalised tensors, server vs the processor's PIL backend
PROB_TOL = 1e-5  # probabilities, server vs the same model on the PIL backend's pixels (the answer rounds to 6 places)
PROB_TOL_TV = 5e-3  # probabilities, server vs the default torchvision backend (pixels within 2 levels)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def photos(cat_jpeg) -> list[bytes]:
    """Non-square, both ways round, PNG and JPEG."""
    return [cat_jpeg, photo((300, 451), "PNG"), photo((333, 1000), "JPEG"), photo((1400, 900), "JPEG")]


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pixels(folder, data: bytes, backend: str = "pil") -> torch.Tensor:
    """The folder's own image processor's pixel_values for one image."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend=backend)
    return processor(rgb(data), return_tensors="pt")["pixel_values"]


def post(app, name: str, data: bytes, query: str = "") -> dict:
    response = app.test_client().post(f"/predictions/{name}{query}", data=data, content_type="application/octet-stream")
    assert response.status_code == 200, response.json
    return response.json


def serve_app(make_app, folder, name="hf", **entry):
    return make_app({"name": name, "checkpoint": str(folder), "device": "cpu", "runtime": "eager", **entry})


def save_vit(folder, seed=0, **config):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(**VIT, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **config)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


# --- telling folders apart, the fields a folder answers ----------------------------------------------


def test_a_transformers_folder_is_told_apart_from_a_timm_folder(tmp_path):
    import timm

    save_vit(tmp_path / "hf")
    timm.models.save_for_hf(timm.create_model("test_resnet", pretrained=False, num_classes=3), tmp_path / "timm")
    assert is_transformers_folder(tmp_path / "hf") and not is_timm_folder(tmp_path / "hf")
    assert is_timm_folder(tmp_path / "timm") and not is_transformers_folder(tmp_path / "timm")
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(tmp_path / "hf")}]}).models[0]
    assert spec.architecture is None  # not read as a timm folder: the fields come when it loads


@pytest.mark.parametrize("processor, expected", [
    (lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
     {"crop_mode": "squash", "resize": 32, "crop": 32, "interpolation": "bilinear", "mean": [0.5] * 3}),
    (lambda: transformers.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}),
     {"crop_mode": "squash", "resize": 40, "crop": 32, "interpolation": "bicubic"}),
    (lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
     {"crop_mode": "center", "resize": 32, "crop": 32, "interpolation": "bicubic"}),
    (lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
     {"crop_mode": "center", "resize": 36, "crop": 32, "interpolation": "bicubic"}),
    (lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 384}),
     {"crop_mode": "squash", "resize": 384, "crop": 384}),
    (lambda: transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                            do_normalize=False, resample=1),
     {"crop_mode": "center", "resize": 36, "crop": 32, "interpolation": "lanczos", "mean": [0.0] * 3, "std": [1.0] * 3}),
])
def test_each_processors_rule_maps_to_a_preprocess_block(tmp_path, processor, expected):
    save_vit(tmp_path)
    processor().save_pretrained(tmp_path)
    fields = transformers_folder.preprocess_fields(tmp_path, "classify")
    assert {k: fields[k] for k in expected} == expected
    assert fields["exact"] is True and fields["crop_offset"] == "floor"


@pytest.mark.parametrize("processor", [
    lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    lambda: transformers.DeiTImageProcessor(size={"height": 41, "width": 41}, crop_size={"height": 32, "width": 32}),
    lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 35}, crop_size={"height": 32, "width": 32}),
    lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.9),
    lambda: transformers.BitImageProcessor(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32}, resample=1),
    lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
])
def test_the_served_pixels_are_the_processors(tmp_path, photos, processor):
    """The server's normalised tensor against the processor's PIL backend: within PIXEL_TOL (odd crop
    margins included: crop_offset floor); against the default torchvision backend: within 2 levels."""
    save_vit(tmp_path)
    processor().save_pretrained(tmp_path)
    spec = PreprocessSpec(**transformers_folder.preprocess_fields(tmp_path, "classify"))
    transform, normalize = build_transform(spec), build_normalizer(spec)
    std = min(spec.std)
    for data in photos:
        served = normalize(transform(rgb(data))[None])
        assert (served - pixels(tmp_path, data, "pil")).abs().max() <= PIXEL_TOL
        assert (served - pixels(tmp_path, data, "torchvision")).abs().max() <= 2 / 255 / std + PIXEL_TOL


# --- the classifier ----------------------------------------------------------------------------------


def test_a_vit_classifier_answers_as_the_model_does_through_its_processor(tmp_path, photos, make_app):
    folder = tmp_path / "vit"
    model = save_vit(folder)
    app = serve_app(make_app, folder)
    for data in photos:
        answer = post(app, "hf", data, "?topk=3")
        with torch.no_grad():
            exact = model(pixel_values=pixels(folder, data, "pil")).logits.softmax(-1)[0]
            default = model(pixel_values=pixels(folder, data)).logits.softmax(-1)[0]
        assert [p["index"] for p in answer["predictions"]] == exact.argsort(descending=True).tolist()
        assert [p["label"] for p in answer["predictions"]] == [LABELS[p["index"]] for p in answer["predictions"]]
        for p in answer["predictions"]:
            assert abs(p["probability"] - float(exact[p["index"]])) <= PROB_TOL
            assert abs(p["probability"] - float(default[p["index"]])) <= PROB_TOL_TV
    described = app.test_client().get("/models/hf").json
    assert described["task"]["name"] == "classify" and described["num_labels"] == 3
    assert described["checkpoint"]["layout"] == "transformers folder (ViTForImageClassification, model.safetensors)"


def test_a_pickle_only_folder_is_read_weights_only(tmp_path, photos, make_app):
    folder = tmp_path / "vit"
    model = save_vit(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    answer = post(serve_app(make_app, folder), "hf", photos[0], "?topk=1")
    with torch.no_grad():
        probs = model(pixel_values=pixels(folder, photos[0])).logits.softmax(-1)[0]
    assert answer["predictions"][0]["index"] == int(probs.argmax())


def test_a_pickled_object_in_the_bin_is_refused_not_run(tmp_path):
    folder = tmp_path / "vit"
    model = save_vit(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": model.state_dict(), "hook": Image.Image}, folder / "pytorch_model.bin")
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(spec)


def test_the_entry_wins_over_what_the_folder_implies(tmp_path, photos, make_app):
    folder = tmp_path / "vit"
    save_vit(folder)
    app = serve_app(make_app, folder, labels=["a", "b", "c"], preprocess={"exact": False}, topk=1)
    assert post(app, "hf", photos[0])["predictions"][0]["label"] in {"a", "b", "c"}
    assert app.test_client().get("/models/hf").json["input"]["resize"] == 32  # the rest still the folder's


def test_runtime_auto_serves_onnx_verified_or_falls_back_with_a_reason(tmp_path, photos, make_app):
    folder = tmp_path / "vit"
    save_vit(folder)
    eager = serve_app(make_app, folder, name="eager")
    auto = make_app({"name": "auto", "checkpoint": str(folder), "device": "cpu", "runtime": "auto"},
                    onnx_cache_dir="off")
    runtime = auto.test_client().get("/models/auto").json["runtime"]
    assert (runtime["name"] == "onnxruntime" and runtime["fallback_reason"] is None) or (
        runtime["name"] == "eager" and runtime["fallback_reason"]), runtime
    for data in photos[:2]:
        want, got = post(eager, "eager", data, "?topk=3"), post(auto, "auto", data, "?topk=3")
        assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
        for g, w in zip(got["predictions"], want["predictions"]):
            assert abs(g["probability"] - w["probability"]) <= 1e-4  # the classify rule's tolerance


# --- what is refused ---------------------------------------------------------------------------------


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_folder_with_auto_map_is_refused_naming_it(tmp_path):
    folder = tmp_path / "vit"
    save_vit(folder)
    _edit_config(folder, auto_map={"AutoModelForImageClassification": "modeling_evil.EvilNet"})
    (folder / "modeling_evil.py").write_text("raise SystemExit('the folder code ran')\n")
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(CheckpointError, match=r"auto_map \(AutoModelForImageClassification: modeling_evil.EvilNet\)"
                                              r".*trust_code: true"):
        load_model(spec)


@pytest.mark.parametrize("name, message", [
    ("NoSuchNetForImageMagic", "not one transformers .* knows"),
    ("BertForMaskedLM", "'BertForMaskedLM' is not served"),
])
def test_an_unknown_or_unmapped_class_is_refused_naming_it(tmp_path, name, message):
    folder = tmp_path / "vit"
    save_vit(folder)
    _edit_config(folder, architectures=[name])
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(ConfigError, match=f"model 'hf'.*{message}"):
        load_model(spec)


def test_weights_that_do_not_fit_are_refused_with_the_key_diff(tmp_path):
    folder = tmp_path / "vit"
    save_vit(folder)
    _edit_config(folder, num_hidden_layers=3)
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(CheckpointError, match=r"do not fit ViTForImageClassification: \d+ missing keys: .*layers\.2\."):
        load_model(spec)


def test_a_folder_without_a_processor_needs_the_entrys_preprocess(tmp_path, photos, make_app):
    folder = tmp_path / "vit"
    save_vit(folder)
    (folder / "preprocessor_config.json").unlink()
    spec = build_config({"models": [{"name": "hf", "checkpoint": str(folder), "device": "cpu"}]}).models[0]
    with pytest.raises(ConfigError, match="no preprocessor_config.json .* preprocess block"):
        load_model(spec)
    app = serve_app(make_app, folder, preprocess={"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert len(post(app, "hf", photos[0])["predictions"]) == 3


# --- inspect --config --------------------------------------------------------------------------------


def test_inspect_writes_an_entry_check_accepts(tmp_path, capsys):
    folder = tmp_path / "vit"
    save_vit(folder)
    assert main(["inspect", str(folder), "--config"]) == 0
    text = capsys.readouterr().out
    assert "#   task: classify" in text and "#   labels: [cat, dog, bird]" in text
    entry = yaml.safe_load(text)[0]
    assert entry == {"name": "vit", "checkpoint": str(folder)}
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [{**entry, "device": "cpu"}]}))
    assert main(["check", str(config)]) == 0


def test_inspect_of_an_auto_map_folder_leaves_a_placeholder_check_refuses(tmp_path, capsys):
    folder = tmp_path / "vit"
    save_vit(folder)
    _edit_config(folder, auto_map={"AutoModelForImageClassification": "modeling_mine.MyNet"})
    assert main(["inspect", str(folder), "--config"]) == 0
    entry = yaml.safe_load(capsys.readouterr().out)[0]
    assert str(entry["trust_code"]).startswith("<")
    with pytest.raises(ConfigError):
        build_config({"models": [entry]})


# --- the embedders -----------------------------------------------------------------------------------


def save_clip(folder):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(vision_config=VIT, projection_dim=16, text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return lambda x: model.get_image_features(pixel_values=x).pooler_output  # the projected image embedding


def save_siglip(folder):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(vision_config=VIT, text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model = transformers.SiglipModel(cfg).eval()
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return lambda x: model.get_image_features(pixel_values=x).pooler_output


def save_dinov2(folder):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, mlp_ratio=2)
    model = transformers.Dinov2Model(cfg).eval()
    model.save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return lambda x: model(pixel_values=x).pooler_output


@pytest.mark.parametrize("save, dim", [(save_clip, 16), (save_siglip, 32), (save_dinov2, 32)],
                         ids=["clip", "siglip", "dinov2"])
def test_an_image_embedder_answers_its_own_image_embedding(tmp_path, photos, make_app, save, dim):
    """CLIP's get_image_features, SigLIP's, DINOv2's pooler_output (the layer-normed CLS token): equal
    within 1e-5 of the largest value on the PIL backend's pixels; unit length with normalize."""
    folder = tmp_path / "model"
    embed = save(folder)
    app = serve_app(make_app, folder)
    unit = serve_app(make_app, folder, name="unit", task="embed", embed={"normalize": True})
    for data in photos:
        with torch.no_grad():
            want = embed(pixels(folder, data, "pil"))[0]
        got = torch.tensor(post(app, "hf", data)["embedding"])
        assert got.shape == (dim,) and (got - want).abs().max() <= 1e-5 * want.abs().max()
        normalized = torch.tensor(post(unit, "unit", data)["embedding"])
        assert (normalized - torch.nn.functional.normalize(want, dim=0)).abs().max() <= 1e-5
    assert app.test_client().get("/models/hf").json["task"]["name"] == "embed"


def test_only_the_image_tower_of_a_two_tower_model_is_built(tmp_path):
    save_clip(tmp_path)
    spec = build_config({"models": [{"name": "clip", "checkpoint": str(tmp_path), "device": "cpu"}]}).models[0]
    module = load_model(spec).module
    assert type(module.model).__name__ == "CLIPVisionModelWithProjection"
    assert not any(k.startswith("model.text_model") for k in module.state_dict())


# --- the segmenter -----------------------------------------------------------------------------------


def save_segformer(folder):
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()})
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    model.save_pretrained(folder)
    transformers.SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return model


SEGMENT_MIN_AGREEMENT = 0.97


def test_a_segformer_answers_the_class_map_of_its_own_post_processing(tmp_path, photos, make_app):
    """The model's input is the processor's (within PIXEL_TOL); its logits are upsampled to the input
    size (bilinear, as the processor's post_process_semantic_segmentation does to the image size) and
    the class map scaled to the image nearest-neighbour: at least SEGMENT_MIN_AGREEMENT of the pixels
    have post_process_semantic_segmentation's class (the rest lie on class borders)."""
    folder = tmp_path / "seg"
    model = save_segformer(folder)
    app = serve_app(make_app, folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    for data in photos:
        answer = post(app, "hf", data)
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"]))))
        image = rgb(data)
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        want = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()
        assert served.shape == want.shape == (image.height, image.width)
        agreement = float((served == want).mean())
        assert agreement >= SEGMENT_MIN_AGREEMENT, agreement
        assert {c["label"] for c in answer["classes"]} <= set(LABELS.values())


# --- the detector ------------------------------------------------------------------------------------


def save_detr(folder):
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         out_features=["stage2"])
    cfg = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_queries=10, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = transformers.DetrForObjectDetection(cfg).eval()
    model.save_pretrained(folder)
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return model


def test_a_detr_answers_its_own_post_processing_in_the_uploaded_images_pixels(tmp_path, photos, make_app):
    """Every query (threshold 0) as post_process_object_detection answers it on the default processor's
    inputs: the same labels, scores within 1e-5, boxes (clamped to the image, as the server answers)
    within 0.01 px."""
    folder = tmp_path / "detr"
    model = save_detr(folder)
    app = serve_app(make_app, folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    for data in photos[:3]:
        answer = post(app, "hf", data, "?threshold=0")
        image = rgb(data)
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        want = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.size[::-1]])[0]
        boxes = want["boxes"].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        order = want["scores"][inside].argsort(descending=True, stable=True)
        expected = list(zip(want["labels"][inside][order].tolist(), want["scores"][inside][order].tolist(),
                            boxes[inside][order].tolist()))
        assert len(answer["detections"]) == len(expected) > 0
        for got, (label, score, box) in zip(answer["detections"], expected):
            assert got["index"] == label and got["label"] == LABELS[label]
            assert abs(got["score"] - score) <= 1e-5
            assert max(abs(a - b) for a, b in zip(got["box"], box)) <= 0.01, (got["box"], box)
    assert app.test_client().get("/models/hf").json["task"]["name"] == "detect"


def test_trust_code_imports_the_class_auto_map_names(tmp_path, photos, make_app, monkeypatch):
    """With trust_code, the folder's own class (here a ViT subclass) is imported from the folder and served
    by its name's family; transformers copies the code into its modules cache (HF_MODULES_CACHE)."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "mine"
    model = save_vit(folder)
    (folder / "modeling_mine.py").write_text(
        "from transformers import ViTForImageClassification\n\n\n"
        "class MineForImageClassification(ViTForImageClassification):\n    pass\n")
    _edit_config(folder, architectures=["MineForImageClassification"],
                 auto_map={"AutoModelForImageClassification": "modeling_mine.MineForImageClassification"})
    app = serve_app(make_app, folder, trust_code=True)
    answer = post(app, "hf", photos[0], "?topk=1")
    with torch.no_grad():
        probs = model(pixel_values=pixels(folder, photos[0], "pil")).logits.softmax(-1)[0]
    assert answer["predictions"][0]["index"] == int(probs.argmax())
    assert abs(answer["predictions"][0]["probability"] - float(probs.max())) <= PROB_TOL
